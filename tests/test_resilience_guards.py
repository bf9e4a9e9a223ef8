"""Bulkhead, timeout, fallback, hedge and rate limiter on a mock clock."""

from __future__ import annotations

import math

import anyio
import anyio.lowlevel
import pytest
from trio.testing import MockClock

from genfan import (
    BackendConnectionError,
    BackendTimeoutError,
    BulkheadFullError,
    ChatRequest,
    Completion,
    ConfigurationError,
    HTTPStatusError,
    RateLimitError,
    RateLimitExceededError,
    RateLimitInfo,
    Usage,
)
from genfan.resilience import (
    Bulkhead,
    BulkheadPolicy,
    Fallback,
    Hedge,
    HedgePolicy,
    RateLimiter,
    RateLimitPolicy,
    Timeout,
    TimeoutPolicy,
)
from genfan.testing import Fail, FakeBackend, Reply, capture_events

REQ = ChatRequest.from_prompt("hi")


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


# -- bulkhead ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_bulkhead_runs_queues_and_sheds() -> None:
    fake = FakeBackend("b", latency=10.0)
    bulkhead = Bulkhead(fake, BulkheadPolicy(max_concurrent=2, max_queued=1, max_queue_wait=None))
    outcomes: list[str] = []

    async def call() -> None:
        try:
            await bulkhead.complete(REQ)
            outcomes.append("ok")
        except BulkheadFullError:
            outcomes.append("shed")

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(call)
        await anyio.sleep(1.0)
        stats = bulkhead.statistics()
        assert (stats.running, stats.queued, stats.rejected) == (2, 1, 2)
        assert sorted(outcomes) == ["shed", "shed"]  # shed at once, not after waiting
    assert sorted(outcomes) == ["ok", "ok", "ok", "shed", "shed"]
    assert fake.max_in_flight == 2
    final = bulkhead.statistics()
    assert (final.running, final.queued, final.admitted) == (0, 0, 3)


@pytest.mark.anyio
async def test_bulkhead_queue_wait_is_exact() -> None:
    bulkhead = Bulkhead(
        FakeBackend("b", latency=10.0),
        BulkheadPolicy(max_concurrent=1, max_queued=5, max_queue_wait=3.0),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(bulkhead.complete, REQ)
        await anyio.sleep(0.1)  # let the first call take the slot
        start = anyio.current_time()
        with capture_events() as events, pytest.raises(BulkheadFullError, match=r"waited 3s"):
            await bulkhead.complete(REQ)
        assert anyio.current_time() - start == pytest.approx(3.0)
        assert events[0]["event"] == "bulkhead_rejected"
    assert bulkhead.statistics().queued == 0


@pytest.mark.anyio
async def test_bulkhead_queue_wait_never_exceeds_the_deadline() -> None:
    bulkhead = Bulkhead(
        FakeBackend("b", latency=10.0), BulkheadPolicy(max_concurrent=1, max_queue_wait=None)
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(bulkhead.complete, REQ)
        await anyio.sleep(0.1)  # let the first call take the slot
        with anyio.move_on_after(2.0) as scope:
            await bulkhead.complete(REQ)
        assert scope.cancelled_caught
        assert bulkhead.statistics().queued == 0


@pytest.mark.anyio
async def test_bulkhead_fifo_handoff_and_cancelled_waiter() -> None:
    order: list[int] = []
    bulkhead = Bulkhead(
        FakeBackend("b", latency=1.0), BulkheadPolicy(max_concurrent=1, max_queued=10)
    )

    async def call(i: int) -> None:
        await bulkhead.complete(REQ)
        order.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(call, i)
            await anyio.sleep(0.01)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await bulkhead.complete(REQ)  # a waiter cancelled at once gives up its place
    assert order == [0, 1, 2, 3]
    assert bulkhead.statistics().running == 0


def test_bulkhead_policy_validation() -> None:
    with pytest.raises(
        ConfigurationError, match=r"BulkheadPolicy.max_concurrent must be an integer >= 1"
    ):
        BulkheadPolicy(max_concurrent=0)
    with pytest.raises(ConfigurationError, match=r"max_queue_wait"):
        BulkheadPolicy(max_queue_wait=-1)


# -- timeout ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_timeout_raises_typed_error_at_the_limit() -> None:
    fake = FakeBackend("b", latency=10.0)
    timeout = Timeout(fake, TimeoutPolicy(timeout=2.0))
    start = anyio.current_time()
    with pytest.raises(BackendTimeoutError) as info:
        await timeout.complete(REQ)
    assert anyio.current_time() - start == pytest.approx(2.0)
    assert info.value.backend == "b" and fake.cancelled == 1


@pytest.mark.anyio
async def test_timeout_uses_the_request_timeout_when_smaller() -> None:
    timeout = Timeout(FakeBackend("b", latency=10.0), TimeoutPolicy(timeout=5.0))
    start = anyio.current_time()
    with pytest.raises(BackendTimeoutError):
        await timeout.complete(REQ.with_overrides(timeout=1.5))
    assert anyio.current_time() - start == pytest.approx(1.5)


@pytest.mark.anyio
async def test_timeout_stream() -> None:
    timeout = Timeout(FakeBackend("b", latency=10.0), TimeoutPolicy(timeout=2.0))
    with pytest.raises(BackendTimeoutError):
        async for _ in timeout.stream(REQ):
            pass
    ok = Timeout(FakeBackend("b", ["a b c"]), TimeoutPolicy(timeout=2.0))
    assert [e.type async for e in ok.stream(REQ)] == ["text", "text", "text", "end"]


@pytest.mark.anyio
async def test_timeout_stream_first_token_and_idle() -> None:
    policy = TimeoutPolicy(timeout=100.0, first_token=2.0, idle=3.0)
    stalled = Timeout(FakeBackend("b", [Reply(text="a b", latency=50.0, ttft=40.0)]), policy)
    start = anyio.current_time()
    with (
        capture_events() as log,
        pytest.raises(BackendTimeoutError, match="no first token within 2s"),
    ):
        async for _ in stalled.stream(REQ):
            pass
    assert anyio.current_time() - start == pytest.approx(2.0)
    assert [e["event"] for e in log] == ["stream_stalled"]

    # First token at 1 s, then 10 s between words: idle after 3 s, with the first word passed on.
    paused = FakeBackend("b", [Reply(text="a b", latency=21.0, ttft=1.0)])
    got: list[str] = []
    start = anyio.current_time()
    with pytest.raises(BackendTimeoutError, match="stream idle for 3s"):
        async for ev in Timeout(paused, policy).stream(REQ):
            got.append(ev.type)
    assert got == ["text"] and anyio.current_time() - start == pytest.approx(4.0)
    assert paused.in_flight == 0 and paused.cancelled == 1

    # Steady words within both limits: the whole stream, even past first_token + idle.
    steady = FakeBackend("b", [Reply(text="a b c d e", latency=12.5, ttft=1.5)])
    events = [e.type async for e in Timeout(steady, policy).stream(REQ)]
    assert events == ["text"] * 5 + ["end"]

    # The whole-stream limit still applies when it is the tighter one.
    short = TimeoutPolicy(timeout=1.0, first_token=2.0)
    with pytest.raises(BackendTimeoutError, match="no answer within 1s"):
        async for _ in Timeout(FakeBackend("b", latency=5.0), short).stream(REQ):
            pass


def test_timeout_policy_validates_first_token_and_idle() -> None:
    with pytest.raises(ConfigurationError, match=r"TimeoutPolicy.idle must be a number > 0"):
        TimeoutPolicy(idle=0)
    with pytest.raises(ConfigurationError, match=r"TimeoutPolicy.first_token must be a number"):
        TimeoutPolicy(first_token=-1.0)


# -- fallback ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_fallback_tries_in_order_and_reports_all_errors() -> None:
    a = FakeBackend("a", [Fail(error=BackendConnectionError)])
    b = FakeBackend("b", [Fail(error=HTTPStatusError("bad", status_code=400))])
    c = FakeBackend("c", ["from c"])
    chain = Fallback([a, b, c])
    assert chain.name == "fallback(a,b,c)"
    assert (await chain.complete(REQ)).text == "from c"
    dead = Fallback([a, b])
    with pytest.raises(HTTPStatusError) as info:
        await dead.complete(REQ)
    assert any("BackendConnectionError" in note for note in info.value.__notes__)


@pytest.mark.anyio
async def test_fallback_respects_the_deadline_and_predicate() -> None:
    slow = FakeBackend("slow", [Fail(error=BackendConnectionError, latency=5.0)])
    spare = FakeBackend("spare")
    with anyio.move_on_after(5.0):
        with pytest.raises(BackendConnectionError):
            await Fallback([slow, spare]).complete(REQ)  # no time left when slow fails
    assert spare.calls == []
    picky = Fallback([slow, spare], fallback_on=lambda e: isinstance(e, BackendTimeoutError))
    with pytest.raises(BackendConnectionError):
        await picky.complete(REQ)
    assert spare.calls == []


@pytest.mark.anyio
async def test_fallback_stream_before_first_event() -> None:
    chain = Fallback(
        [FakeBackend("a", [Fail(error=BackendConnectionError)]), FakeBackend("b", ["x y"])]
    )
    events = [e async for e in chain.stream(REQ)]
    assert events[-1].completion.backend == "b"  # type: ignore[union-attr]


# -- hedge ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_hedge_after_fixed_delay_first_wins_loser_cancelled() -> None:
    primary = FakeBackend("p", latency=10.0)
    alternate = FakeBackend("alt", ["fast"], latency=1.0)
    hedge = Hedge(primary, HedgePolicy(delay=2.0, max_extra_ratio=1.0), alternates=[alternate])
    hedge.budget.deposit()  # let the very first call hedge
    start = anyio.current_time()
    with capture_events() as events:
        c = await hedge.complete(REQ)
    assert c.text == "fast" and anyio.current_time() - start == pytest.approx(3.0)
    assert primary.cancelled == 1
    stats = hedge.statistics()
    assert (stats.calls, stats.hedges_sent, stats.hedge_wins) == (1, 1, 1)
    assert [e["event"] for e in events] == ["hedge_sent", "hedge_won"]


@pytest.mark.anyio
async def test_hedge_not_sent_when_primary_is_fast() -> None:
    primary = FakeBackend("p", latency=1.0)
    hedge = Hedge(primary, HedgePolicy(delay=2.0, max_extra_ratio=1.0))
    for _ in range(5):
        await hedge.complete(REQ)
    assert len(primary.calls) == 5 and hedge.statistics().hedges_sent == 0


@pytest.mark.anyio
async def test_hedge_learns_the_percentile() -> None:
    latencies = iter([1.0] * 19 + [2.0] + [10.0])
    primary = FakeBackend("p", lambda r: Reply(text="x", latency=next(latencies, 1.0)))
    hedge = Hedge(primary, HedgePolicy(percentile=0.95, min_samples=20, max_extra_ratio=1.0))
    for _ in range(19):
        await hedge.complete(REQ)
    assert hedge.current_delay() is None  # still learning
    await hedge.complete(REQ)
    assert hedge.current_delay() == 1.0  # p95 of nineteen 1s and one 2
    start = anyio.current_time()
    await hedge.complete(REQ)  # primary 10 s: hedge at 1 s answers at 2 s
    assert anyio.current_time() - start == pytest.approx(2.0)
    assert hedge.statistics().hedge_wins == 1


@pytest.mark.anyio
async def test_hedge_budget_caps_extra_load() -> None:
    primary = FakeBackend("p", latency=5.0)
    hedge = Hedge(primary, HedgePolicy(delay=1.0, max_extra_ratio=0.1, budget_ttl=1000.0))
    for _ in range(50):
        await hedge.complete(REQ)
    stats = hedge.statistics()
    assert stats.hedges_sent == 5 and stats.budget_refused == 45
    assert stats.extra_ratio == pytest.approx(0.1)


@pytest.mark.anyio
async def test_hedge_failed_attempt_starts_next_at_once_and_all_fail() -> None:
    primary = FakeBackend("p", [Fail(error=BackendConnectionError("p down"), latency=0.5)])
    alternate = FakeBackend("alt", [Fail(error=BackendConnectionError("alt down"), latency=0.5)])
    hedge = Hedge(primary, HedgePolicy(delay=5.0, max_extra_ratio=1.0), alternates=[alternate])
    hedge.budget.deposit()
    start = anyio.current_time()
    with pytest.raises(BackendConnectionError, match=r"alt down"):
        await hedge.complete(REQ)
    assert anyio.current_time() - start == pytest.approx(1.0)


@pytest.mark.anyio
async def test_hedge_not_started_when_deadline_too_short() -> None:
    primary = FakeBackend("p", latency=1.0)
    hedge = Hedge(primary, HedgePolicy(delay=0.5, max_extra_ratio=1.0))
    for _ in range(3):
        await hedge.complete(REQ)  # learns a median of ~1 s (cut short by hedges)
    hedge.budget.deposit()
    sent = hedge.statistics().hedges_sent
    with anyio.move_on_after(0.6):
        await hedge.complete(REQ)
    assert hedge.statistics().hedges_sent == sent


# -- rate limiter -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_rate_limiter_waits_fifo_exactly() -> None:
    limiter = RateLimiter(
        FakeBackend("b"), RateLimitPolicy(requests_per_minute=60, burst_requests=2)
    )
    times = []
    for _ in range(5):
        await limiter.complete(REQ)
        times.append(anyio.current_time())
    start = times[0]
    assert [t - start for t in times] == pytest.approx([0.0, 0.0, 1.0, 2.0, 3.0])
    assert limiter.statistics().waited == 3


@pytest.mark.anyio
async def test_rate_limiter_reject_mode() -> None:
    limiter = RateLimiter(
        FakeBackend("b"), RateLimitPolicy(requests_per_minute=30, burst_requests=1, mode="reject")
    )
    await limiter.complete(REQ)
    with pytest.raises(RateLimitExceededError) as info:
        await limiter.complete(REQ)
    assert info.value.retry_after == pytest.approx(2.0)


@pytest.mark.anyio
async def test_rate_limiter_fails_fast_when_wait_exceeds_deadline() -> None:
    limiter = RateLimiter(
        FakeBackend("b"), RateLimitPolicy(requests_per_minute=6, burst_requests=1)
    )
    await limiter.complete(REQ)
    with anyio.move_on_after(5.0):
        with pytest.raises(RateLimitExceededError):
            await limiter.complete(REQ)  # quota back in 10 s, only 5 s left


@pytest.mark.anyio
async def test_rate_limiter_tokens_per_minute_corrected_by_usage() -> None:
    reply = Reply(text="x", usage=Usage(input_tokens=50, output_tokens=50))
    limiter = RateLimiter(
        FakeBackend("b", [reply]), RateLimitPolicy(tokens_per_minute=600, default_output_tokens=500)
    )
    await limiter.complete(REQ)  # estimated ~501, used 100
    assert limiter.tokens is not None
    assert limiter.tokens.level == pytest.approx(500)
    start = anyio.current_time()
    await limiter.complete(REQ)  # needs ~501 of 500: waits 0.1 s at 10 tokens/s
    assert anyio.current_time() - start == pytest.approx(0.1, abs=0.02)


@pytest.mark.anyio
async def test_rate_limiter_learns_from_headers_and_retry_after() -> None:
    info = RateLimitInfo(remaining_requests=0, reset_requests=4.0)

    def script(request: ChatRequest) -> Completion:
        return Completion(text="x", rate_limit=info)

    from genfan.testing import FunctionBackend

    limiter = RateLimiter(FunctionBackend(script, name="b"), RateLimitPolicy())
    await limiter.complete(REQ)
    start = anyio.current_time()
    await limiter.complete(REQ)
    assert anyio.current_time() - start == pytest.approx(4.0)

    limiter2 = RateLimiter(
        FakeBackend("c", [Fail(error=RateLimitError("429", retry_after=3.0)), "ok"])
    )
    with pytest.raises(RateLimitError):
        await limiter2.complete(REQ)
    start = anyio.current_time()
    await limiter2.complete(REQ)
    assert anyio.current_time() - start == pytest.approx(3.0)
    assert limiter2.statistics().blocked_until is None


def test_rate_limit_policy_validation() -> None:
    with pytest.raises(ConfigurationError, match=r"requests_per_minute"):
        RateLimitPolicy(requests_per_minute=0)
    with pytest.raises(ConfigurationError, match=r"mode must be one of"):
        RateLimitPolicy(mode="block")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"HedgePolicy.percentile"):
        HedgePolicy(percentile=1.5)
    with pytest.raises(ConfigurationError, match=r"TimeoutPolicy.timeout must be a number > 0"):
        TimeoutPolicy(timeout=0)
    with pytest.raises(ConfigurationError):
        TimeoutPolicy(timeout=math.nan)


@pytest.mark.anyio
async def test_rate_limiter_adopts_a_lower_remaining_quota() -> None:
    from genfan.testing import FunctionBackend

    def script(request: ChatRequest) -> Completion:
        return Completion(text="x", rate_limit=RateLimitInfo(remaining_requests=1))

    limiter = RateLimiter(
        FunctionBackend(script, name="b"), RateLimitPolicy(requests_per_minute=60)
    )
    await limiter.complete(REQ)  # our bucket holds 59; the provider says 1 is left
    assert limiter.requests is not None and limiter.requests.level == pytest.approx(1.0)
    await limiter.complete(REQ)  # takes the last one; the provider still says 1 left
    start = anyio.current_time()
    await limiter.complete(REQ)
    await limiter.complete(REQ)  # the bucket is empty now: one second per request
    assert anyio.current_time() - start == pytest.approx(2.0)
