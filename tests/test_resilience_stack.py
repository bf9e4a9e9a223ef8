"""The guard stack: its fixed order, the fan-out's one deadline, config, and telemetry."""

from __future__ import annotations

import anyio
import pytest
from pydantic import ValidationError
from trio.testing import MockClock

from genfan import (
    BackendConnectionError,
    ChatRequest,
    CircuitOpenError,
    ConfigurationError,
    FanOut,
    HTTPStatusError,
)
from genfan.resilience import (
    GUARD_ORDER,
    BreakerPolicy,
    BulkheadPolicy,
    GuardedBackend,
    GuardsConfig,
    HedgePolicy,
    RateLimitPolicy,
    RetryPolicy,
    guard,
)
from genfan.testing import Fail, FakeBackend, capture_events

REQ = ChatRequest.from_prompt("hi")
FAST_RETRY = RetryPolicy(attempts=3, initial=1.0, jitter="none", budget=None)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


def chain(g: GuardedBackend) -> list[str]:
    names, node = [], g.inner
    while hasattr(node, "inner"):
        names.append(type(node).__name__)
        node = node.inner
    return names


def test_the_order_is_fixed_and_defaults_are_on() -> None:
    assert GUARD_ORDER == ("hedge", "bulkhead", "retry", "rate_limit", "breaker", "timeout")
    full = guard(
        FakeBackend("b"), hedge=HedgePolicy(), rate_limit=RateLimitPolicy(requests_per_minute=60)
    )
    assert chain(full) == ["Hedge", "Bulkhead", "Retry", "RateLimiter", "CircuitBreaker", "Timeout"]
    default = guard(FakeBackend("b"))
    assert chain(default) == ["Bulkhead", "Retry", "CircuitBreaker", "Timeout"]
    assert default.name == "b" and default.hedge is None and default.rate_limiter is None
    bare = guard(FakeBackend("b"), bulkhead=None, breaker=None, retry=None, timeout=None)
    assert chain(bare) == []


@pytest.mark.anyio
async def test_retries_hold_one_bulkhead_slot() -> None:
    fake = FakeBackend("b", [Fail(error=BackendConnectionError), "ok"])
    g = guard(fake, bulkhead=BulkheadPolicy(max_concurrent=1, max_queued=0), retry=FAST_RETRY)
    async with anyio.create_task_group() as tg:
        tg.start_soon(g.complete, REQ)
        await anyio.sleep(0.5)  # first attempt failed; backing off while holding the slot
        assert g.bulkhead is not None and g.bulkhead.statistics().running == 1
    assert len(fake.calls) == 2


@pytest.mark.anyio
async def test_breaker_inside_retry_stops_retries_once_open() -> None:
    fake = FakeBackend("b", [Fail(error=BackendConnectionError)])
    g = guard(
        fake,
        breaker=BreakerPolicy(failure_ratio=None, consecutive_failures=2, break_duration=60.0),
        retry=RetryPolicy(attempts=10, initial=0.1, jitter="none", budget=None),
    )
    with pytest.raises(CircuitOpenError):
        await g.complete(REQ)
    assert len(fake.calls) == 2  # the third attempt met the open breaker and was not sent


@pytest.mark.anyio
async def test_rate_limit_counts_every_attempt() -> None:
    fake = FakeBackend("b", [Fail(error=BackendConnectionError), "ok"])
    g = guard(
        fake, retry=FAST_RETRY, rate_limit=RateLimitPolicy(requests_per_minute=60, burst_requests=5)
    )
    await g.complete(REQ)
    assert g.rate_limiter is not None and g.rate_limiter.statistics().admitted == 2


@pytest.mark.anyio
async def test_one_deadline_for_a_fan_out() -> None:
    flaky = FakeBackend(
        "flaky", [Fail(error=HTTPStatusError("down", status_code=503), latency=1.0)]
    )
    ok = FakeBackend("ok", ["fine"], latency=0.5)
    slow_retry = RetryPolicy(attempts=5, initial=2.0, jitter="none", budget=None)
    fan = FanOut([guard(flaky, retry=slow_retry), guard(ok)], mode="all", deadline=5.0)
    start = anyio.current_time()
    result = await fan.run(REQ)
    # flaky: attempt 1 fails at 1 s, backs off 2 s, attempt 2 fails at 4 s; the next backoff
    # (4 s) does not fit in the 1 s left, so it fails fast with its last error, not at 5 s.
    assert anyio.current_time() - start == pytest.approx(4.0)
    assert result.text == "fine" and not result.deadline_hit
    failed = result.candidates[0]
    assert failed.status == "failed" and isinstance(failed.error, HTTPStatusError)
    assert len(flaky.calls) == 2


@pytest.mark.anyio
async def test_decisions_are_events_and_span_events() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    fake = FakeBackend("b", [Fail(error=BackendConnectionError), "ok"])
    g = guard(fake, retry=FAST_RETRY)
    with capture_events() as events, tracer.start_as_current_span("call"):
        await g.complete(REQ)
    assert [e["event"] for e in events] == ["retry_scheduled"]
    assert events[0]["backend"] == "b" and events[0]["attempt"] == 2
    (span,) = exporter.get_finished_spans()
    assert [e.name for e in span.events] == ["genfan.retry_scheduled"]
    assert span.events[0].attributes is not None
    assert span.events[0].attributes["genfan.backend"] == "b"
    assert span.attributes is not None and span.attributes["genfan.retry.attempts"] == 2


def test_guards_config_builds_and_merges() -> None:
    defaults = GuardsConfig.model_validate(
        {"timeout": 30, "retry": {"attempts": 4, "initial": 0.2}, "hedge": False}
    )
    mine = GuardsConfig.model_validate(
        {"retry": {"attempts": 2}, "rate_limit": {"requests_per_minute": 100}, "breaker": False}
    )
    merged = mine.merged_over(defaults)
    p = merged.policies()
    assert p["retry"].attempts == 2 and p["retry"].initial == 0.2
    assert p["timeout"].timeout == 30.0
    assert p["breaker"] is None and p["hedge"] is None
    assert p["rate_limit"].requests_per_minute == 100
    g = merged.build(FakeBackend("b"))
    assert g.breaker is None and g.rate_limiter is not None and g.retry is not None
    assert GuardsConfig().build(FakeBackend("b")).breaker is not None  # defaults on
    assert (
        GuardsConfig.model_validate({"retry": {"budget": False}}).policies()["retry"].budget is None
    )


def test_guards_config_rejects_bad_values_naming_the_field() -> None:
    with pytest.raises(
        ValidationError, match=r"BulkheadPolicy.max_concurrent must be an integer >= 1"
    ):
        GuardsConfig.model_validate({"bulkhead": {"max_concurrent": 0}})
    with pytest.raises(ValidationError, match=r"unexpected keyword argument 'atempts'"):
        GuardsConfig.model_validate({"retry": {"atempts": 3}})
    with pytest.raises(ValidationError):
        GuardsConfig.model_validate({"circuit": True})


def test_guards_config_hedge_trigger() -> None:
    g = GuardsConfig.model_validate({"hedge": {"trigger": "first_token"}}).build(FakeBackend("b"))
    assert g.hedge is not None and g.hedge.policy.trigger == "first_token"
    with pytest.raises(ValidationError, match=r"HedgePolicy.trigger must be one of"):
        GuardsConfig.model_validate({"hedge": {"trigger": "token"}})


def test_guards_config_stream_timeouts() -> None:
    cfg = {"timeout": {"timeout": 120, "first_token": 10, "idle": 15}}
    g = GuardsConfig.model_validate(cfg).build(FakeBackend("b"))
    assert g.timeout is not None
    assert (g.timeout.policy.first_token, g.timeout.policy.idle) == (10, 15)


@pytest.mark.anyio
async def test_guards_share_one_rate_limit_store() -> None:
    from genfan.resilience import RedisQuota

    store = RedisQuota("redis://:secret@127.0.0.1:6379/0")
    policy = RateLimitPolicy(requests_per_minute=60)
    a = guard(FakeBackend("a"), rate_limit=policy, rate_limit_store=store)
    b = guard(FakeBackend("b"), rate_limit=policy, rate_limit_store=store)
    assert a.rate_limiter is not None and b.rate_limiter is not None
    assert a.rate_limiter.store is store and b.rate_limiter.store is store
    assert "secret" not in repr(a) + repr(a.rate_limiter) + repr(store)
    with pytest.raises(ConfigurationError, match=r"needs a rate_limit policy"):
        guard(FakeBackend("c"), rate_limit_store=store)
    await a.aclose()
    assert not store._closed  # whoever made the store closes it
    await store.aclose()


def test_the_bulkhead_is_the_one_concurrency_cap_by_default() -> None:
    g = guard(FakeBackend("b"))
    assert g.bulkhead is not None and g.bulkhead.policy == BulkheadPolicy()
    assert g.bulkhead.statistics().max_concurrent == 1000
    assert GuardsConfig().build(FakeBackend("b")).bulkhead is not None
