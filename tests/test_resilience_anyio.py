"""The guards on asyncio and trio alike (real, short sleeps), streaming included."""

from __future__ import annotations

import anyio
import pytest

from genfan import (
    BackendConnectionError,
    BackendTimeoutError,
    BulkheadFullError,
    ChatRequest,
    CircuitOpenError,
    StreamEnd,
)
from genfan.resilience import (
    BreakerPolicy,
    Bulkhead,
    BulkheadPolicy,
    CircuitBreaker,
    Hedge,
    HedgePolicy,
    Pool,
    RateLimiter,
    RateLimitPolicy,
    RetryPolicy,
    guard,
)
from genfan.testing import Fail, FakeBackend

REQ = ChatRequest.from_prompt("hello there")


@pytest.mark.anyio
async def test_full_stack_answers_and_retries() -> None:
    fake = FakeBackend("b", [Fail(error=BackendConnectionError), "ok"])
    g = guard(
        fake,
        retry=RetryPolicy(attempts=3, initial=0.001, max_delay=0.01),
        hedge=HedgePolicy(delay=1.0),
        rate_limit=RateLimitPolicy(requests_per_minute=6000),
    )
    assert (await g.complete(REQ)).text == "ok"
    stats = g.statistics()
    assert stats.retry is not None and stats.retry.retries == 1
    assert stats.breaker is not None and stats.breaker.state == "closed"


@pytest.mark.anyio
async def test_hedge_race_cancels_the_loser() -> None:
    primary = FakeBackend("p", latency=5.0)
    alternate = FakeBackend("alt", ["quick"], latency=0.01)
    hedge = Hedge(primary, HedgePolicy(delay=0.02, max_extra_ratio=1.0), alternates=[alternate])
    hedge.budget.deposit()
    with anyio.fail_after(2.0):
        assert (await hedge.complete(REQ)).text == "quick"
    assert primary.cancelled == 1 and primary.in_flight == 0


@pytest.mark.anyio
async def test_timeout_and_bulkhead_shed() -> None:
    slow = FakeBackend("s", latency=5.0)
    with pytest.raises(BackendTimeoutError):
        await guard(slow, timeout=0.02, retry=None).complete(REQ)
    bulkhead = Bulkhead(slow, BulkheadPolicy(max_concurrent=1, max_queued=0))
    async with anyio.create_task_group() as tg:
        tg.start_soon(bulkhead.complete, REQ)
        await anyio.sleep(0.01)
        with pytest.raises(BulkheadFullError):
            await bulkhead.complete(REQ)
        tg.cancel_scope.cancel()
    assert bulkhead.statistics().running == 0


@pytest.mark.anyio
async def test_streams_pass_through_every_guard() -> None:
    fake = FakeBackend("b", ["one two three"])
    g = guard(fake, rate_limit=RateLimitPolicy(requests_per_minute=600), hedge=HedgePolicy())
    events = [e async for e in g.stream(REQ)]
    assert isinstance(events[-1], StreamEnd) and events[-1].completion.text == "one two three"
    pool = Pool([guard(FakeBackend("x", ["a b"])), guard(FakeBackend("y", ["a b"]))])
    events = [e async for e in pool.stream(REQ)]
    assert isinstance(events[-1], StreamEnd)
    assert sum(r.calls for r in pool.statistics()) == 1
    limiter = RateLimiter(FakeBackend("r", ["x"]), RateLimitPolicy(requests_per_minute=60))
    assert [e.type async for e in limiter.stream(REQ)][-1] == "end"
    assert limiter.statistics().admitted == 1


@pytest.mark.anyio
async def test_stream_breaker_records_failures_and_refuses() -> None:
    breaker = CircuitBreaker(
        FakeBackend("b", [Fail(error=BackendConnectionError)]),
        BreakerPolicy(minimum_throughput=1, failure_ratio=1.0, break_duration=60.0),
    )
    with pytest.raises(BackendConnectionError):
        async for _ in breaker.stream(REQ):
            pass
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError):
        async for _ in breaker.stream(REQ):
            pass
