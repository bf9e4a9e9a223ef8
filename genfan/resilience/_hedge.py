"""Hedged requests (The Tail at Scale): a second request when the first is slow."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._backend import Backend
from .._errors import BackendError, MalformedResponseError
from .._types import ChatRequest, Completion, StreamEnd, StreamEvent
from ._base import Guard, decision, metrics, set_span_attribute, time_left, tried_replicas
from ._policies import HedgePolicy, RetryBudgetPolicy
from ._retry import RetryBudget

__all__ = ["Hedge", "HedgeStatistics", "LatencyTracker"]

_T = TypeVar("_T")


class LatencyTracker:
    """Recent latencies of one backend and a cached percentile of them."""

    __slots__ = ("_cache", "_dirty", "_samples")

    def __init__(self, window: int) -> None:
        self._samples: deque[float] = deque(maxlen=window)
        self._cache: dict[float, float] = {}
        self._dirty = 0

    def add(self, latency: float) -> None:
        self._samples.append(latency)
        self._dirty += 1
        # Re-sorting on every call would cost O(n log n) per call; refresh every 16 samples.
        if self._dirty >= 16 or len(self._samples) < 64:
            self._cache.clear()
            self._dirty = 0

    def __len__(self) -> int:
        return len(self._samples)

    def percentile(self, q: float) -> float:
        """The ``q`` quantile (nearest rank) of the recent latencies; ``nan`` when empty."""
        if not self._samples:
            return math.nan
        cached = self._cache.get(q)
        if cached is None:
            ordered = sorted(self._samples)
            rank = max(0, math.ceil(q * len(ordered)) - 1)
            cached = self._cache[q] = ordered[rank]
        return cached


@dataclass(frozen=True, kw_only=True, slots=True)
class HedgeStatistics:
    """What hedging cost and what it won.

    Attributes:
        calls: calls made through the guard (one primary request each).
        hedges_sent: extra requests sent.
        hedge_wins: calls answered by a hedge.
        primary_wins: calls answered by the primary request.
        budget_refused: hedges not sent because the extra-load budget was spent.
        delay: the hedge delay for whole answers now (``None`` while still learning).
        first_token_delay: the hedge delay for first tokens (streams) now (``None`` while
            still learning).
    """

    calls: int
    hedges_sent: int
    hedge_wins: int
    primary_wins: int
    budget_refused: int
    delay: float | None
    first_token_delay: float | None = None

    @property
    def extra_ratio(self) -> float:
        """Extra requests per call (0.05: 5% more requests than without hedging)."""
        return self.hedges_sent / self.calls if self.calls else 0.0


class Hedge(Guard):
    """Send the request again (to an alternate, or the same backend) when it is slow.

    After ``delay`` (fixed, or the learned ``percentile`` of recent latencies) without an answer,
    a hedge is sent; up to ``max_hedges`` of them, one ``delay`` apart. The first good answer
    wins and the others are cancelled. A failed attempt starts the next hedge at once (if any
    remain). Hedges are spent from a budget of ``max_extra_ratio`` of calls, and none is started
    when the deadline leaves less than the backend's median latency.

    Streams are hedged on their **first token**: the delay is the learned percentile of times to
    first token, the first attempt to produce an event wins, and the caller then reads that one
    stream (tokens, once passed on, are never taken back, so nothing is hedged after the first
    token). Each hedged attempt's stream is read from start to end by one task of its own, which
    passes its events on through a memory object stream (a stream may hold a cancel scope or a
    task group across its events, as a fan-out's does, and so cannot change tasks); the losers'
    streams are closed as soon as the race is decided. With
    ``HedgePolicy(trigger="first_token")``, `complete` reads the backend's stream and
    hedges both a late first token (at the learned first-token delay) and, once a token has
    come, a late answer (at the answer delay); the first whole answer wins.

    Args:
        inner: the primary backend.
        policy: the hedge policy.
        alternates: backends for hedges, used in turn (default: the primary itself).
    """

    def __init__(
        self,
        inner: Backend,
        policy: HedgePolicy | None = None,
        *,
        alternates: Sequence[Backend] = (),
    ) -> None:
        super().__init__(inner)
        self.policy = policy or HedgePolicy()
        self.alternates = tuple(alternates)
        #: Whole-answer latencies (``complete()`` calls and finished streams).
        self.latencies = LatencyTracker(self.policy.window)
        #: Times to the first stream event.
        self.first_token_latencies = LatencyTracker(self.policy.window)
        self.budget = RetryBudget(
            RetryBudgetPolicy(
                ratio=self.policy.max_extra_ratio, min_per_second=0.0, ttl=self.policy.budget_ttl
            )
        )
        self._calls = 0
        self._hedges = 0
        self._hedge_wins = 0
        self._primary_wins = 0
        self._refused = 0

    def _learned(self, tracker: LatencyTracker) -> float | None:
        if self.policy.delay is not None:
            return self.policy.delay
        if len(tracker) < self.policy.min_samples:
            return None
        return tracker.percentile(self.policy.percentile)

    def current_delay(self) -> float | None:
        """The delay before a hedge of a whole answer now (``None``: still learning)."""
        return self._learned(self.latencies)

    def current_first_token_delay(self) -> float | None:
        """The delay before a hedge of a stream's first token now (``None``: still learning)."""
        return self._learned(self.first_token_latencies)

    def statistics(self) -> HedgeStatistics:
        return HedgeStatistics(
            calls=self._calls,
            hedges_sent=self._hedges,
            hedge_wins=self._hedge_wins,
            primary_wins=self._primary_wins,
            budget_refused=self._refused,
            delay=self.current_delay(),
            first_token_delay=self.current_first_token_delay(),
        )

    def _target(self, attempt: int) -> Backend:
        if attempt == 0 or not self.alternates:
            return self.inner
        return self.alternates[(attempt - 1) % len(self.alternates)]

    def _may_hedge(self, attempt: int) -> bool:
        left = time_left()
        if left != math.inf:
            typical = self.latencies if len(self.latencies) else self.first_token_latencies
            if len(typical) and left <= typical.percentile(0.5):
                decision("hedge_skipped", backend=self.name, reason="deadline", time_left=left)
                return False
        if not self.budget.try_withdraw():
            self._refused += 1
            decision("hedge_skipped", backend=self.name, reason="budget", attempt=attempt)
            return False
        return True

    def _won(self, attempt: int) -> None:
        if attempt:
            self._hedge_wins += 1
            set_span_attribute("genfan.hedge.winner", attempt)
            decision("hedge_won", backend=self.name, attempt=attempt)
        else:
            self._primary_wins += 1

    async def complete(self, request: ChatRequest) -> Completion:
        self._calls += 1
        self.budget.deposit()
        if self.policy.trigger == "first_token":
            return await self._complete_over_stream(request)
        delay = self.current_delay()
        if delay is None:
            start = anyio.current_time()
            completion = await self.inner.complete(request)
            self.latencies.add(anyio.current_time() - start)
            self._primary_wins += 1
            return completion
        attempt, completion = await self._race(
            lambda backend, _: backend.complete(request), self.latencies, delay
        )
        self._won(attempt)
        return completion

    async def _complete_over_stream(self, request: ChatRequest) -> Completion:
        """``complete()`` with ``trigger="first_token"``: each attempt reads the backend's stream.

        A hedge is sent when no attempt has a first token after the first-token delay, or no
        answer after the answer delay once one has; the first whole answer wins (nothing has
        been passed to the caller yet, so a slow stream can still be overtaken).
        """

        async def attempt(backend: Backend, first_token: Callable[[], None]) -> Completion:
            start = anyio.current_time()
            ttft: float | None = None
            completion: Completion | None = None
            with anyio.CancelScope() as scope:  # entered before the stream: see _close_in
                events = backend.stream(request)
                try:
                    async for event in events:
                        if ttft is None:
                            ttft = anyio.current_time() - start
                            self.first_token_latencies.add(ttft)
                            first_token()
                        if isinstance(event, StreamEnd):
                            completion = event.completion
                            break
                finally:
                    if ttft is None:  # failed or cancelled first: a lower bound of its ttft
                        self.first_token_latencies.add(anyio.current_time() - start)
                    await _close_in(scope, events)
            if completion is None:
                raise MalformedResponseError(
                    "stream ended without a final event (truncated)", backend=backend.name
                )
            return (
                completion
                if completion.ttft is not None
                else completion.model_copy(update={"ttft": ttft})
            )

        attempt_no, completion = await self._race(
            attempt,
            self.latencies,
            self.current_first_token_delay(),
            delay_after_first_token=self.current_delay(),
        )
        self._won(attempt_no)
        return completion

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        self._calls += 1
        self.budget.deposit()
        start = anyio.current_time()
        delay = self.current_first_token_delay()
        if delay is None:
            # Nothing to hedge yet: the stream is read here, in the caller's task.
            first, events = await _first_event(self.inner, request)
            self.first_token_latencies.add(anyio.current_time() - start)
            self._primary_wins += 1
            async with aclosing(events):  # type: ignore[type-var,unused-ignore]
                event = first
                while True:
                    if isinstance(event, StreamEnd):
                        self.latencies.add(anyio.current_time() - start)
                    yield event
                    try:
                        event = await anext(events)
                    except StopAsyncIteration:
                        return
        # Hedged: each attempt's stream is read by a task of ``pumps``, held for the life of
        # this stream (a stream cannot move between tasks: it may hold a cancel scope).
        pumps = anyio.create_task_group()
        await pumps.__aenter__()
        opened: list[_Pumped] = []
        try:
            attempt, (first, pumped) = await self._race(
                lambda backend, _: _Pumped.open(pumps, opened, backend, request),
                self.first_token_latencies,
                delay,
                discard=_let_go,
            )
            self._won(attempt)
            next_event: StreamEvent | None = first
            while next_event is not None:
                if isinstance(next_event, StreamEnd):
                    self.latencies.add(anyio.current_time() - start)
                yield next_event
                next_event = await pumped.receive()
        except BaseException as exc:
            # Failed, cancelled, or closed by the caller (early, or at its StreamEnd): every
            # pump still running is let go and has closed its stream before this one ends. The
            # error goes out as it is, not wrapped in the task group's ExceptionGroup.
            for each in opened:
                each.let_go()
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                if await pumps.__aexit__(type(exc), exc, exc.__traceback__):
                    return
                raise
            await pumps.__aexit__(None, None, None)
            raise
        for each in opened:  # the losers were let go when the race was decided
            each.let_go()
        await pumps.__aexit__(None, None, None)

    async def _race(
        self,
        run: Callable[[Backend, Callable[[], None]], Awaitable[_T]],
        tracker: LatencyTracker,
        delay: float | None,
        *,
        delay_after_first_token: float | None = None,
        discard: Callable[[_T], Awaitable[None]] | None = None,
    ) -> tuple[int, _T]:
        """Run ``run`` on the primary, and on hedges while it is slow, until one succeeds.

        A hedge is sent ``delay`` after the last attempt started, or, once an attempt has called
        its ``first_token`` callback, ``delay_after_first_token`` after (``None``: no hedge in
        that phase). Returns the winning attempt's index and result; the other attempts are
        cancelled (and a result that arrived too late is passed to ``discard``). ``tracker``
        learns each attempt's latency (a cancelled loser's elapsed time, a lower bound of it).
        """
        max_attempts = 1 + self.policy.max_hedges
        outcomes: deque[tuple[int, float, _T | BaseException]] = deque()
        arrived = [anyio.Event()]
        starts: list[float] = []
        errors: list[BaseException] = []
        finished: set[int] = set()
        winner: tuple[int, _T] | None = None
        first_token = [False]

        def on_first_token() -> None:
            if not first_token[0]:
                first_token[0] = True
                arrived[0].set()

        async def attempt(i: int, backend: Backend) -> None:
            start = anyio.current_time()
            try:
                outcome: _T | BaseException = await run(backend, on_first_token)
            except Exception as exc:
                outcome = exc
            outcomes.append((i, anyio.current_time() - start, outcome))
            arrived[0].set()

        def launch(tg: anyio.abc.TaskGroup, after: float | None) -> None:
            i = len(starts)
            starts.append(anyio.current_time())
            backend = self._target(i)
            if i:
                self._hedges += 1
                set_span_attribute("genfan.hedge.sent", i)
                metrics().hedges.add(1, self._attrs)
                decision("hedge_sent", backend=self.name, attempt=i, to=backend.name, delay=after)
            tg.start_soon(attempt, i, backend)

        replicas = tried_replicas.set(set())  # shared by the attempts: each a new replica
        try:
            async with anyio.create_task_group() as tg:
                launch(tg, None)
                pending = 1
                hedging = True
                while pending and winner is None:
                    after = delay_after_first_token if first_token[0] else delay
                    if not outcomes:
                        if hedging and after is not None and len(starts) < max_attempts:
                            with anyio.move_on_after(starts[-1] + after - anyio.current_time()):
                                await arrived[0].wait()
                        else:
                            await arrived[0].wait()
                    if not outcomes:
                        if arrived[0].is_set():  # a first token: the next delay applies
                            arrived[0] = anyio.Event()
                            continue
                        # The delay passed without an answer: hedge, if allowed.
                        if self._may_hedge(len(starts)):
                            launch(tg, after)
                            pending += 1
                        else:
                            hedging = False
                        continue
                    arrived[0] = anyio.Event()
                    while outcomes:
                        i, latency, outcome = outcomes.popleft()
                        pending -= 1
                        finished.add(i)
                        tracker.add(latency)
                        if not isinstance(outcome, BaseException):
                            winner = (i, outcome)
                            break
                        errors.append(outcome)
                        retryable = isinstance(outcome, BackendError) and outcome.retryable
                        if (
                            hedging
                            and retryable
                            and len(starts) < max_attempts
                            and self._may_hedge(len(starts))
                        ):
                            launch(tg, 0.0)
                            pending += 1
                if pending:
                    now = anyio.current_time()
                    for j, started in enumerate(starts):
                        if j not in finished:
                            # A loser is cancelled: its elapsed time is a lower bound.
                            tracker.add(now - started)
                    tg.cancel_scope.cancel()
        except BaseException:
            # Cancelled from outside after a winner was chosen: its result is let go too.
            if winner is not None and discard is not None:
                with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                    await discard(winner[1])
            raise
        finally:
            tried_replicas.reset(replicas)
            # Results that arrived beside the winner's are let go.
            leftovers = [o for _, _, o in outcomes if not isinstance(o, BaseException)]
            outcomes.clear()
            if discard is not None and leftovers:
                with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                    for leftover in leftovers:
                        await discard(leftover)
        if winner is not None:
            return winner
        raise errors[-1]


#: Seconds allowed for closing a losing stream (shielded from the cancellation that ended it).
_CLOSE_TIMEOUT = 5.0
#: Events a hedged attempt's pump may read ahead of its reader (a slow reader slows the stream
#: down beyond that, as it would without the pump).
_READ_AHEAD = 16


async def _first_event(
    backend: Backend, request: ChatRequest
) -> tuple[StreamEvent, AsyncIterator[StreamEvent]]:
    """Open ``backend``'s stream and wait for its first event; close it if that fails."""
    events = backend.stream(request)
    try:
        return await anext(events), events
    except StopAsyncIteration:
        raise MalformedResponseError(
            "stream ended before its first event", backend=backend.name
        ) from None
    except BaseException:
        await _close_stream(events)
        raise


class _Pumped:
    """One hedged stream attempt, read to its end by a task of its own (its pump), which passes
    the events on through a memory object stream: a backend's stream never changes tasks."""

    __slots__ = ("done", "error", "events", "reading", "scope")

    def __init__(self, events: MemoryObjectReceiveStream[StreamEvent]) -> None:
        self.events = events
        #: The pump's scope, entered before its stream is read (see `_close_in`).
        self.scope = anyio.CancelScope()
        #: What the stream raised (passed on once its events are).
        self.error: Exception | None = None
        #: Waiting on the stream (not on its reader): only a cancellation stops it then.
        self.reading = True
        self.done = False

    @classmethod
    async def open(
        cls,
        pumps: anyio.abc.TaskGroup,
        opened: list[_Pumped],
        backend: Backend,
        request: ChatRequest,
    ) -> tuple[StreamEvent, _Pumped]:
        """Start ``backend``'s stream in a new task of ``pumps`` (kept in ``opened``) and wait
        for its first event; the attempt is let go (its stream closed) if that fails or is
        cancelled."""
        send, receive = anyio.create_memory_object_stream[StreamEvent](_READ_AHEAD)
        pumped = cls(receive)
        opened.append(pumped)
        pumps.start_soon(pumped._pump, backend, request, send, name=f"hedge {backend.name}")
        try:
            first = await pumped.receive()
        except BaseException:
            pumped.let_go()
            raise
        if first is None:
            raise MalformedResponseError(
                "stream ended before its first event", backend=backend.name
            )
        return first, pumped

    async def _pump(
        self, backend: Backend, request: ChatRequest, send: MemoryObjectSendStream[StreamEvent]
    ) -> None:
        scope = self.scope
        try:
            with scope, send:
                if scope.cancel_called:  # let go before it started: nothing to open
                    return
                events = backend.stream(request)
                try:
                    try:
                        async for event in events:
                            try:
                                try:
                                    send.send_nowait(event)  # no checkpoint: the stream had one
                                except anyio.WouldBlock:
                                    self.reading = False
                                    await send.send(event)
                                    self.reading = True
                            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                                return  # the reader let it go: the stream is closed below
                    finally:
                        await _close_in(scope, events)
                except Exception as exc:  # passed on, after the events before it
                    self.error = exc
        finally:
            self.done = True

    async def receive(self) -> StreamEvent | None:
        """The next event; ``None`` at the end of the stream, or its error raised as it is."""
        try:
            try:
                return self.events.receive_nowait()  # read ahead: no checkpoint needed
            except anyio.WouldBlock:
                return await self.events.receive()
        except anyio.EndOfStream:
            pass
        error, self.error = self.error, None
        if error is not None:
            raise error  # outside the except clause: its __context__ is left as it was
        return None

    def let_go(self) -> None:
        """Stop reading: the pump closes its stream (cancelled first if it is waiting on it;
        waiting on its reader, it is woken by the reader's end closing)."""
        self.events.close()
        if self.reading and not self.done:
            self.scope.cancel()  # costly on asyncio (it formats the task): only when needed


async def _let_go(result: tuple[StreamEvent, _Pumped]) -> None:
    result[1].let_go()


async def _close_in(scope: anyio.CancelScope, events: AsyncIterator[StreamEvent]) -> None:
    """Close ``events`` in ``scope``, a scope entered before they were read: shielded from the
    cancellation that ended them, for at most ``_CLOSE_TIMEOUT`` seconds.

    A stream may hold cancel scopes of its own across its events (a fan-out's holds a task
    group): a scope entered around its close (``move_on_after(shield=True)``) would not nest
    with those and the close would fail; ``scope``, entered before them, does.
    """
    aclose = getattr(events, "aclose", None)
    # An async generator read to its end (``ag_frame`` is None) has nothing left to close.
    if aclose is not None and getattr(events, "ag_frame", True) is not None:
        scope.shield = True
        scope.deadline = anyio.current_time() + _CLOSE_TIMEOUT
        await aclose()


async def _close_stream(events: AsyncIterator[StreamEvent]) -> None:
    """Close a stream that has ended (failed or cancelled inside): nothing of it is left open."""
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            await aclose()
