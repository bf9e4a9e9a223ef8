"""The first token: hedging streams on it (and ``complete()`` with ``trigger="first_token"``),
and retrying a stream stalled before it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import anyio
import pytest
from trio.testing import MockClock

from genfan import (
    Backend,
    BackendConnectionError,
    ChatRequest,
    ConfigurationError,
    FanOut,
    MalformedResponseError,
    NoAnswerError,
    StreamEnd,
    StreamEvent,
    TextDelta,
    collect_stream,
)
from genfan.resilience import (
    GuardedBackend,
    Hedge,
    HedgePolicy,
    RetryPolicy,
    TimeoutPolicy,
    guard,
)
from genfan.testing import Fail, FakeBackend, Reply, capture_events

REQ = ChatRequest.from_prompt("hi")


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


async def read(events: AsyncIterator[StreamEvent]) -> list[tuple[float, StreamEvent]]:
    """Every event with the time it arrived."""
    return [(anyio.current_time(), ev) async for ev in events]


def text_of(events: list[tuple[float, StreamEvent]]) -> str:
    return "".join(ev.text for _, ev in events if isinstance(ev, TextDelta))


@pytest.mark.anyio
async def test_fake_backend_paces_a_stream_by_its_time_to_first_token() -> None:
    fake = FakeBackend("f", [Reply(text="a b c d", latency=5.0, ttft=1.0)])
    start = anyio.current_time()
    events = await read(fake.stream(REQ))
    times = [t - start for t, _ in events]
    assert times == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])  # 4 words, then the end
    assert text_of(events) == "a b c d"
    assert isinstance(events[-1][1], StreamEnd)
    assert fake.in_flight == 0 and fake.completed == 1


@pytest.mark.anyio
async def test_stream_hedged_when_first_token_is_late_and_loser_closed() -> None:
    primary = FakeBackend("p", [Reply(text="slow answer", latency=20.0, ttft=10.0)])
    alternate = FakeBackend("alt", [Reply(text="quick answer", latency=4.0, ttft=1.0)])
    hedge = Hedge(primary, HedgePolicy(delay=2.0, max_extra_ratio=1.0), alternates=[alternate])
    hedge.budget.deposit()  # let the very first call hedge
    start = anyio.current_time()
    with capture_events() as log:
        events = await read(hedge.stream(REQ))
    assert events[0][0] - start == pytest.approx(3.0)  # hedged at 2 s, its first token at +1 s
    assert text_of(events) == "quick answer"
    end = events[-1][1]
    assert isinstance(end, StreamEnd) and end.completion.backend == "alt"
    assert events[-1][0] - start == pytest.approx(6.0)
    assert primary.cancelled == 1 and primary.in_flight == 0 and alternate.in_flight == 0
    stats = hedge.statistics()
    assert (stats.calls, stats.hedges_sent, stats.hedge_wins, stats.primary_wins) == (1, 1, 1, 0)
    assert [e["event"] for e in log] == ["hedge_sent", "hedge_won"]


@pytest.mark.anyio
async def test_stream_not_hedged_when_first_token_is_on_time_even_if_answer_is_long() -> None:
    primary = FakeBackend("p", [Reply(text="a long answer here", latency=30.0, ttft=1.0)])
    hedge = Hedge(primary, HedgePolicy(delay=2.0, max_extra_ratio=1.0))
    hedge.budget.deposit()
    events = await read(hedge.stream(REQ))
    assert text_of(events) == "a long answer here"
    assert len(primary.calls) == 1 and hedge.statistics().hedges_sent == 0
    assert hedge.statistics().primary_wins == 1


@pytest.mark.anyio
async def test_first_token_delay_is_learned_from_times_to_first_token() -> None:
    script = [Reply(text="a b", latency=10.0, ttft=1.0)] * 19 + [
        Reply(text="a b", latency=10.0, ttft=2.0),
        Reply(text="a b", latency=60.0, ttft=50.0),  # stalled before its first token
    ]
    primary = FakeBackend("p", [*script, Reply(text="a b", latency=10.0, ttft=1.0)])
    hedge = Hedge(primary, HedgePolicy(percentile=0.95, min_samples=20, max_extra_ratio=1.0))
    for _ in range(19):
        await collect_stream(hedge.stream(REQ))
    assert hedge.current_first_token_delay() is None  # still learning
    await collect_stream(hedge.stream(REQ))
    assert hedge.current_first_token_delay() == 1.0  # p95 of nineteen 1s and one 2
    assert hedge.current_delay() == 10.0  # whole answers are learned apart
    # The next primary stalls 50 s before its first token: hedged at 1 s, first token at 2 s.
    start = anyio.current_time()
    events = await read(hedge.stream(REQ))
    assert events[0][0] - start == pytest.approx(2.0)
    stats = hedge.statistics()
    # The stalled primary's 2 s (cancelled: a lower bound of its time) is learned too.
    assert stats.hedge_wins == 1 and stats.first_token_delay == 2.0


@pytest.mark.anyio
async def test_complete_with_first_token_trigger_catches_a_stall_sooner() -> None:
    """A call stalled before its first token: hedged after p95(TTFT), not after p95(answer)."""

    def script() -> list[Reply]:
        return [Reply(text="x y", latency=5.0, ttft=0.5)] * 20 + [
            Reply(text="x y", latency=50.0, ttft=45.5)
        ]

    answers: dict[str, float] = {}
    for trigger in ("answer", "first_token"):
        fake = FakeBackend("p", script()[:21])
        hedge = Hedge(fake, HedgePolicy(trigger=trigger, min_samples=20, max_extra_ratio=1.0))  # type: ignore[arg-type]
        for _ in range(20):
            await hedge.complete(REQ)
        start = anyio.current_time()
        completion = await hedge.complete(REQ)  # the stalled call (the script then cycles)
        answers[trigger] = anyio.current_time() - start
        assert completion.text == "x y" and hedge.statistics().hedge_wins == 1
    assert answers["answer"] == pytest.approx(10.0)  # hedged at p95 = 5 s, + 5 s
    assert answers["first_token"] == pytest.approx(5.5)  # hedged at p95(TTFT) = 0.5 s, + 5 s


@pytest.mark.anyio
async def test_complete_with_first_token_trigger_still_hedges_a_slow_answer() -> None:
    """First token on time, then slow tokens: hedged at p95 of whole answers, first answer wins."""
    normal = Reply(text="x y", latency=5.0, ttft=0.5)
    slow_decode = Reply(text="x y", latency=50.0, ttft=0.3)  # on time, before p95(TTFT)
    fake = FakeBackend("p", [normal] * 20 + [slow_decode, normal])
    hedge = Hedge(fake, HedgePolicy(trigger="first_token", min_samples=20, max_extra_ratio=1.0))
    for _ in range(20):
        await hedge.complete(REQ)
    start = anyio.current_time()
    with capture_events() as log:
        completion = await hedge.complete(REQ)
    assert anyio.current_time() - start == pytest.approx(10.0)  # hedged at 5 s, + 5 s
    assert completion.text == "x y" and completion.ttft == pytest.approx(0.5)  # the hedge's
    assert [e["delay"] for e in log if e["event"] == "hedge_sent"] == [5.0]
    assert fake.in_flight == 0 and fake.cancelled == 1


@pytest.mark.anyio
async def test_error_before_first_token_hedges_at_once_error_after_it_is_raised() -> None:
    primary = FakeBackend("p", [Fail(error=BackendConnectionError("p down"), latency=0.5)])
    alternate = FakeBackend("alt", [Reply(text="ok", latency=1.0, ttft=0.5)])
    hedge = Hedge(primary, HedgePolicy(delay=5.0, max_extra_ratio=1.0), alternates=[alternate])
    hedge.budget.deposit()
    start = anyio.current_time()
    events = await read(hedge.stream(REQ))
    assert events[0][0] - start == pytest.approx(1.0)  # failed at 0.5 s, hedge's token +0.5 s
    assert text_of(events) == "ok"

    async def breaks_after_first_token(request: ChatRequest) -> AsyncIterator[StreamEvent]:
        yield TextDelta(text="par")
        await anyio.sleep(1.0)
        raise BackendConnectionError("reset mid-stream", backend="mid")

    mid = FakeBackend("mid")
    mid.stream = breaks_after_first_token  # type: ignore[method-assign]
    spare = FakeBackend("spare", ["whole"])
    hedge = Hedge(mid, HedgePolicy(delay=0.1, max_extra_ratio=1.0), alternates=[spare])
    hedge.budget.deposit()
    got: list[StreamEvent] = []
    with pytest.raises(BackendConnectionError, match="mid-stream"):
        async for ev in hedge.stream(REQ):
            got.append(ev)
    assert got == [TextDelta(text="par")]  # the first token was passed on: no hedge after it
    assert len(spare.calls) == 0 and hedge.statistics().hedges_sent == 0


@pytest.mark.anyio
async def test_first_tokens_at_the_same_instant_one_wins_the_other_is_closed() -> None:
    primary = FakeBackend("p", [Reply(text="from p", latency=6.0, ttft=3.0)])
    alternate = FakeBackend("alt", [Reply(text="from alt", latency=4.0, ttft=2.0)])
    hedge = Hedge(primary, HedgePolicy(delay=1.0, max_extra_ratio=1.0), alternates=[alternate])
    hedge.budget.deposit()
    events = await read(hedge.stream(REQ))
    assert text_of(events) in ("from p", "from alt")  # exactly one stream, whole
    assert primary.in_flight == 0 and alternate.in_flight == 0
    assert primary.cancelled + alternate.cancelled == 1  # the other was closed, not leaked
    assert primary.completed + alternate.completed == 1


@pytest.mark.anyio
async def test_caller_leaving_early_or_cancelling_closes_every_attempt() -> None:
    primary = FakeBackend("p", [Reply(text="a b c", latency=9.0, ttft=1.0)])
    hedge = Hedge(primary, HedgePolicy(delay=5.0, max_extra_ratio=1.0))
    async with aclosing_stream(hedge.stream(REQ)) as events:
        async for _ in events:
            break  # the caller has what it needs
    assert primary.in_flight == 0 and primary.cancelled == 1

    slow = FakeBackend("s", [Reply(text="late", latency=30.0, ttft=20.0)])
    hedge = Hedge(slow, HedgePolicy(delay=1.0, max_extra_ratio=1.0))
    hedge.budget.deposit()
    with anyio.move_on_after(3.0):
        await collect_stream(hedge.stream(REQ))  # primary and hedge both waiting for a token
    assert len(slow.calls) == 2 and slow.in_flight == 0 and slow.cancelled == 2


@pytest.mark.anyio
async def test_an_empty_stream_is_a_malformed_answer() -> None:
    async def nothing(request: ChatRequest) -> AsyncIterator[StreamEvent]:
        return
        yield  # pragma: no cover

    empty = FakeBackend("e")
    empty.stream = nothing  # type: ignore[method-assign]
    hedge = Hedge(empty, HedgePolicy(delay=1.0, max_extra_ratio=1.0))
    with pytest.raises(MalformedResponseError, match="before its first event"):
        await collect_stream(hedge.stream(REQ))


@pytest.mark.anyio
async def test_guarded_stream_is_hedged_through_the_whole_stack() -> None:
    """Bulkhead, retry, breaker and timeout streams, each read in one task by the hedge."""
    replies = iter([Reply(text="stalled", latency=40.0, ttft=30.0)])
    fake = FakeBackend("f", lambda r: next(replies, Reply(text="fine", latency=2.0, ttft=0.2)))
    guarded = guard(
        fake,
        hedge=HedgePolicy(delay=1.0, max_extra_ratio=1.0),
        retry=RetryPolicy(attempts=2, initial=0.1),
        timeout=TimeoutPolicy(timeout=60.0),
    )
    assert guarded.hedge is not None
    guarded.hedge.budget.deposit()
    start = anyio.current_time()
    completion = await collect_stream(guarded.stream(REQ))
    assert completion.text == "fine" and anyio.current_time() - start == pytest.approx(3.0)
    assert fake.in_flight == 0 and fake.cancelled == 1
    assert guarded.bulkhead is not None and guarded.bulkhead.statistics().running == 0


def test_trigger_is_validated() -> None:
    with pytest.raises(ConfigurationError, match=r"HedgePolicy.trigger must be one of"):
        HedgePolicy(trigger="token")  # type: ignore[arg-type]


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_stream_hedge_on_a_real_clock(anyio_backend: str) -> None:
    """The same race of streams, each read in a task of its own, on asyncio and trio in real
    time."""
    primary = FakeBackend("p", [Reply(text="slow", latency=2.0, ttft=1.5)])
    alternate = FakeBackend("alt", [Reply(text="fast one", latency=0.05, ttft=0.01)])
    hedge = Hedge(
        guard(primary, hedge=None),
        HedgePolicy(delay=0.05, max_extra_ratio=1.0),
        alternates=[guard(alternate, hedge=None)],
    )
    hedge.budget.deposit()
    with anyio.fail_after(1.0):
        completion = await collect_stream(hedge.stream(REQ))
    assert completion.text == "fast one"
    assert primary.in_flight == 0 and primary.cancelled == 1 and alternate.in_flight == 0


def aclosing_stream(events: AsyncIterator[StreamEvent]):  # type: ignore[no-untyped-def]
    from contextlib import aclosing

    return aclosing(events)  # type: ignore[type-var]


@pytest.mark.anyio
async def test_stream_stalled_before_first_token_is_retried() -> None:
    fake = FakeBackend(
        "f", [Reply(text="stalled", latency=90.0, ttft=80.0), Reply(text="fresh", latency=1.0)]
    )
    guarded = guard(
        fake,
        retry=RetryPolicy(attempts=2, initial=0.5, jitter="none"),
        timeout=TimeoutPolicy(timeout=60.0, first_token=2.0),
    )
    start = anyio.current_time()
    with capture_events() as log:
        completion = await collect_stream(guarded.stream(REQ))
    assert completion.text == "fresh"
    assert anyio.current_time() - start == pytest.approx(2.0 + 0.5 + 1.0)
    assert [e["event"] for e in log] == ["stream_stalled", "retry_scheduled"]
    assert fake.in_flight == 0 and fake.cancelled == 1


# -- streams that cannot change tasks: a fan-out's holds a task group across its events ------

BOTH_LOOPS = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])  # in real time
STALLED = Reply(text="stalled answer", latency=2.0, ttft=1.5)


def quick(text: str, ttft: float = 0.01) -> Reply:
    return Reply(text=text, latency=ttft + 0.08, ttft=ttft)


def idle(*fakes: FakeBackend) -> bool:
    return all(f.in_flight == 0 for f in fakes)


def hedged(backend: Backend, **policy: Any) -> GuardedBackend:
    """``backend`` in its guard stack with a hedge that may fire on the first call.

    Without the timeout guard: ``Timeout.stream`` reads each event under a cancel scope of its
    own, which a stream holding a task group across its events (a fan-out's) cannot be read
    under, hedged or not (a separate fix, in ``_timeout.py``).
    """
    guarded = guard(backend, hedge=HedgePolicy(max_extra_ratio=1.0, **policy))
    assert guarded.hedge is not None
    guarded.hedge.budget.deposit()
    return guarded


def holding_a_scope(fake: FakeBackend) -> FakeBackend:
    """``fake``, its stream read under a cancel scope held across its events, as a fan-out's
    task group is: the stream can neither change tasks nor be closed under a newer scope."""
    plain = fake.stream

    async def stream(request: ChatRequest) -> AsyncIterator[StreamEvent]:
        with anyio.CancelScope():
            async with aclosing(plain(request)) as events:  # type: ignore[type-var]
                async for event in events:
                    yield event

    fake.stream = stream  # type: ignore[method-assign]
    return fake


@BOTH_LOOPS
@pytest.mark.anyio
async def test_a_guarded_fanout_stream_is_hedged_on_a_slow_first_token(anyio_backend: str) -> None:
    # Both candidates stall before their first token; the hedge (the same fan-out again) answers.
    a = FakeBackend("a", [STALLED, quick("a quick answer here")])
    b = FakeBackend("b", [STALLED, quick("b is slower", ttft=0.3)])
    guarded = hedged(FanOut([a, b], mode="first"), delay=0.05)
    with capture_events() as log, anyio.fail_after(1.0):
        events = await read(guarded.stream(REQ))
    assert text_of(events) == "a quick answer here"
    assert [type(ev) for _, ev in events] == [TextDelta] * 4 + [StreamEnd]
    end = events[-1][1]
    assert isinstance(end, StreamEnd) and end.completion.backend == "a"
    assert events[-1][0] - events[0][0] >= 0.05  # passed on live, as the tokens came
    assert guarded.hedge is not None
    stats = guarded.hedge.statistics()
    assert (stats.hedges_sent, stats.hedge_wins, stats.primary_wins) == (1, 1, 0)
    hedging = [e["event"] for e in log if e["event"].startswith("hedge")]
    assert hedging == ["hedge_sent", "hedge_won"]
    # The stalled attempt's two calls and the hedge's losing candidate were cancelled.
    assert idle(a, b) and (a.cancelled, a.completed, b.cancelled) == (1, 1, 2)


@BOTH_LOOPS
@pytest.mark.anyio
async def test_a_guarded_fanout_stream_on_time_is_not_hedged(anyio_backend: str) -> None:
    a = FakeBackend("a", [quick("on time")])
    b = FakeBackend("b", [quick("later", ttft=0.3)])
    fan = FanOut([a, b], mode="first")
    learning = hedged(fan)  # no delay learned yet: read in the caller's task, not raced
    for g in (learning, hedged(fan, delay=0.5)):
        with anyio.fail_after(1.0):
            events = await read(g.stream(REQ))
        assert text_of(events) == "on time" and isinstance(events[-1][1], StreamEnd)
        assert g.hedge is not None
        stats = g.hedge.statistics()
        assert (stats.hedges_sent, stats.primary_wins) == (0, 1)
    assert learning.hedge is not None and learning.hedge.current_first_token_delay() is None
    assert len(a.calls) == len(b.calls) == 2
    assert idle(a, b) and (a.completed, b.cancelled) == (2, 2)


@BOTH_LOOPS
@pytest.mark.anyio
async def test_a_hedged_stream_closed_early_or_cancelled_closes_every_call(
    anyio_backend: str,
) -> None:
    a = FakeBackend("a", [STALLED, quick("a b c d e f")])
    b = FakeBackend("b", [STALLED, quick("slower", ttft=0.3)])
    guarded = hedged(FanOut([a, b], mode="first"), delay=0.05)
    with anyio.fail_after(1.0):
        async with aclosing(guarded.stream(REQ)) as events:  # type: ignore[type-var]
            async for event in events:
                assert event == TextDelta(text="a")
                break  # the caller has what it needs: the winner is closed mid-stream
    assert idle(a, b) and (a.cancelled, a.completed, b.cancelled) == (2, 0, 2)
    assert guarded.hedge is not None and guarded.hedge.statistics().hedge_wins == 1

    # A slow reader: the winner's stream waits, suspended in its scope, when the reader leaves.
    slow = holding_a_scope(FakeBackend("slow", [STALLED]))
    spare = holding_a_scope(FakeBackend("spare", [quick("a b c d e f")]))
    hedge = Hedge(slow, HedgePolicy(delay=0.05, max_extra_ratio=1.0), alternates=[spare])
    hedge.budget.deposit()
    with anyio.fail_after(1.0):
        async with aclosing(hedge.stream(REQ)) as events:  # type: ignore[type-var]
            async for _ in events:
                await anyio.sleep(0.03)
                break
    assert idle(slow, spare) and (slow.cancelled, spare.cancelled) == (1, 1)

    # Cancelled from outside while both attempts wait for a first token: both are closed.
    c = FakeBackend("c", [STALLED])
    d = FakeBackend("d", [STALLED])
    guarded = hedged(FanOut([c, d], mode="first"), delay=0.05)
    with anyio.fail_after(1.0), anyio.move_on_after(0.2) as scope:
        await collect_stream(guarded.stream(REQ))
    assert scope.cancelled_caught
    assert idle(c, d) and len(c.calls) == 2 and (c.cancelled, d.cancelled) == (2, 2)
    assert guarded.hedge is not None and guarded.hedge.statistics().hedges_sent == 1


@BOTH_LOOPS
@pytest.mark.anyio
async def test_a_winner_failing_mid_stream_raises_its_own_error(anyio_backend: str) -> None:
    error = BackendConnectionError("reset mid-stream", backend="alt")

    async def breaks_mid_stream(request: ChatRequest) -> AsyncIterator[StreamEvent]:
        with anyio.CancelScope():  # held across its events: this stream cannot change tasks
            await anyio.sleep(0.01)
            yield TextDelta(text="par")
            await anyio.sleep(0.02)
            raise error from OSError("connection reset by peer")

    primary = FakeBackend("p", [STALLED])
    alternate = FakeBackend("alt")
    alternate.stream = breaks_mid_stream  # type: ignore[method-assign]
    hedge = Hedge(primary, HedgePolicy(delay=0.05, max_extra_ratio=1.0), alternates=[alternate])
    hedge.budget.deposit()
    got: list[StreamEvent] = []
    with anyio.fail_after(1.0), pytest.raises(BackendConnectionError) as info:
        async for event in hedge.stream(REQ):
            got.append(event)
    assert info.value is error and isinstance(error.__cause__, OSError)  # as it was raised
    assert got == [TextDelta(text="par")]
    assert primary.in_flight == 0 and primary.cancelled == 1
    assert hedge.statistics().hedge_wins == 1

    # The same through a guarded fan-out: its NoAnswerError, after the token passed on.
    broken = FakeBackend("broken")
    broken.stream = breaks_mid_stream  # type: ignore[method-assign]
    other = FakeBackend("other", [quick("too late", ttft=0.3)])
    guarded = hedged(FanOut([broken, other], mode="first"), delay=0.5)
    got.clear()
    with anyio.fail_after(1.0), pytest.raises(NoAnswerError) as failed:
        async for event in guarded.stream(REQ):
            got.append(event)
    assert got == [TextDelta(text="par")]
    assert error in failed.value.errors
    assert other.in_flight == 0 and other.cancelled == 1


@BOTH_LOOPS
@pytest.mark.anyio
async def test_complete_on_the_first_token_closes_a_stream_that_holds_a_scope(
    anyio_backend: str,
) -> None:
    """``complete()`` with ``trigger="first_token"`` closes each attempt's stream, suspended
    in its scope at its last event, without a scope of its own around the close."""
    fake = holding_a_scope(FakeBackend("p", [STALLED, quick("whole answer")]))
    hedge = Hedge(fake, HedgePolicy(delay=0.05, max_extra_ratio=1.0, trigger="first_token"))
    hedge.budget.deposit()
    with anyio.fail_after(1.0):
        completion = await hedge.complete(REQ)
    assert completion.text == "whole answer" and hedge.statistics().hedge_wins == 1
    assert idle(fake) and (fake.cancelled, fake.completed) == (1, 1)
