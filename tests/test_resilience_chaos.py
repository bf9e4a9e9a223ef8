"""Chaos: a fan-out through the guards against local HTTP servers that misbehave.

Three OpenAI-compatible fake servers on 127.0.0.1: one healthy, one that injects 5xx, 429 with
``Retry-After``, hangs, slow answers, dropped connections and malformed bodies at random, and one
with an outage window. The workload keeps being served from the healthy backends, the outage
backend's breaker opens and recovers, and no call reaches a backend while its breaker is open.
Real time (a few seconds), on asyncio and trio.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import anyio
import pytest

from genfan import AllBackendsFailedError, Backend, BaseBackend, ChatRequest, Completion, FanOut
from genfan.resilience import (
    BreakerPolicy,
    BulkheadPolicy,
    GuardedBackend,
    RetryBudgetPolicy,
    RetryPolicy,
    TimeoutPolicy,
    guard,
)
from genfan.testing import capture_events

testserver = pytest.importorskip("genfan.testserver")
openai_provider = pytest.importorskip("genfan_providers.openai")
FakeLLMServer, Fault, TextReply = testserver.FakeLLMServer, testserver.Fault, testserver.TextReply


class Spy(BaseBackend):
    """Sits between the breaker and the provider: records the breaker's state at every call."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner.name)
        self.inner = inner
        self.guarded: GuardedBackend | None = None
        self.states: Counter[str] = Counter()

    async def complete(self, request: ChatRequest) -> Completion:
        assert self.guarded is not None and self.guarded.breaker is not None
        self.states[self.guarded.breaker._state] += 1
        return await self.inner.complete(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def chaos_handler(seed: int) -> Any:
    rng = random.Random(seed)
    faults = [
        Fault("status", status=503),
        Fault("status", status=500),
        Fault("status", status=429, retry_after=0.05),
        Fault("hang"),
        Fault("drop"),
        Fault("malformed"),
        TextReply("too slow", latency=1.0),
    ]

    def handler(path: str, body: dict[str, Any]) -> Any:
        return rng.choice(faults) if rng.random() < 0.35 else None

    return handler


@pytest.mark.anyio
async def test_fan_out_survives_chaos_and_breaker_recovers() -> None:
    healthy, chaotic, outage = FakeLLMServer(), FakeLLMServer(), FakeLLMServer(seed=1)
    with healthy, chaotic, outage:
        chaotic.set_handler(chaos_handler(7))
        outage.set_outage(0.0, 1.0, Fault("status", status=503))
        spies, guarded = [], []
        for name, srv in (("healthy", healthy), ("chaotic", chaotic), ("outage", outage)):
            provider = openai_provider.OpenAIBackend(
                "m", name=name, base_url=srv.url, api_key_env=None, timeout=5.0
            )
            spy = Spy(provider)
            g = guard(
                spy,
                bulkhead=BulkheadPolicy(max_concurrent=8, max_queued=16),
                breaker=BreakerPolicy(
                    window="count",
                    window_size=10,
                    minimum_throughput=4,
                    failure_ratio=0.5,
                    break_duration=0.25,
                ),
                retry=RetryPolicy(
                    attempts=2,
                    initial=0.02,
                    max_delay=0.1,
                    budget=RetryBudgetPolicy(ratio=0.2, min_per_second=5),
                ),
                timeout=TimeoutPolicy(timeout=0.5),
            )
            spy.guarded = g
            spies.append(spy)
            guarded.append(g)

        served: Counter[str] = Counter()
        failures = 0
        with capture_events() as events:
            async with FanOut(guarded, mode="all", deadline=1.5) as fan:
                start = anyio.current_time()
                while anyio.current_time() - start < 2.2:
                    try:
                        results = await fan.run("ping")
                    except AllBackendsFailedError:
                        failures += 1
                        continue
                    for c in results.successes:
                        served[c.backend] += 1
                    await anyio.sleep(0.02)

        runs = served["healthy"]
        assert failures == 0 and runs >= 10  # every fan-out was served
        assert served["chaotic"] > 0  # the flaky backend still contributes between faults
        opened = [e for e in events if e["event"] == "breaker_opened" and e["backend"] == "outage"]
        closed = [e for e in events if e["event"] == "breaker_closed" and e["backend"] == "outage"]
        assert opened and closed  # the breaker opened during the outage and recovered after it
        outage_breaker = guarded[2].breaker
        assert outage_breaker is not None and outage_breaker.state == "closed"
        assert served["outage"] > 0
        rejected = [e for e in events if e["event"] == "breaker_rejected"]
        assert rejected  # calls were refused while open...
        for spy in spies:  # ...and none reached a backend whose breaker was open
            assert set(spy.states) <= {"closed", "half_open"}, spy.states
        # the outage server saw far fewer requests than the workload sent it
        assert outage.count("/v1/chat/completions") < runs
