"""The bulkhead: at most N calls run at once; the rest wait their turn (or, when asked, at most
M wait and the others are shed at once). N is fixed, or adapts to what the backend answers."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import anyio
import anyio.lowlevel

from .. import telemetry
from .._backend import Backend
from .._errors import BackendTimeoutError, BulkheadFullError, HTTPStatusError, RateLimitError
from .._types import ChatRequest, Completion, StreamEvent
from ._adaptive import AIMD, AdaptiveLimit, Gradient2, Vegas
from ._base import Guard, decision, metrics, set_span_attribute, time_left
from ._policies import BulkheadPolicy

__all__ = ["Bulkhead", "BulkheadStatistics", "is_overload"]

#: HTTP statuses that say "overloaded" (besides 429): unavailable, Anthropic's overloaded.
_OVERLOAD_STATUSES = frozenset({503, 529})


def is_overload(exc: BaseException) -> bool:
    """Whether a failed call tells an adaptive cap to shrink: a 429 ([`RateLimitError`][genfan.RateLimitError]),
    a 503 or 529 overload, or a timeout ([`BackendTimeoutError`][genfan.BackendTimeoutError])."""
    if isinstance(exc, RateLimitError | BackendTimeoutError):
        return True
    return isinstance(exc, HTTPStatusError) and exc.status_code in _OVERLOAD_STATUSES


def adaptive_limit(policy: BulkheadPolicy) -> AdaptiveLimit | None:
    """The algorithm behind an adaptive cap (``None`` for a fixed one)."""
    if policy.adaptive is None:
        return None
    kinds: dict[str, type[AIMD | Gradient2 | Vegas]] = {
        "aimd": AIMD,
        "gradient": Gradient2,
        "vegas": Vegas,
    }
    return kinds[policy.adaptive](
        initial=policy.start_concurrent,
        min_limit=policy.min_concurrent,
        max_limit=policy.max_concurrent,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class BulkheadStatistics:
    """A snapshot of a bulkhead (like ``anyio.CapacityLimiter.statistics()``).

    Attributes:
        max_concurrent: the policy's cap (an adaptive cap's ceiling).
        limit: the cap in force now: ``max_concurrent``, or where an adaptive cap stands.
        running: calls running now (more than ``limit`` for a while after an adaptive cap
            fell).
        queued: calls waiting for a slot now.
        rejected: calls shed so far (full queue, queue wait exceeded, or no time left).
        admitted: calls that got a slot so far.
    """

    max_concurrent: int
    limit: int
    running: int
    queued: int
    rejected: int
    admitted: int


class _Waiter:
    __slots__ = ("event", "gone", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False
        self.gone = False


class Bulkhead(Guard):
    """Bound the calls running for one backend; the others wait in a FIFO queue.

    By default the queue has no length limit and a call waits until it gets a slot or its
    deadline passes (a burst is served, only later). A call fails with
    [`BulkheadFullError`][genfan.BulkheadFullError], and the backend is not called, when the policy asks for
    shedding and the queue is full (``max_queued``) or its wait passes ``max_queue_wait``, or
    when no time is left before the deadline to wait at all.

    With ``BulkheadPolicy(adaptive=...)`` the cap moves: every call's outcome (its duration, and
    whether the backend refused it for overload, see `is_overload`) is fed to an
    `AdaptiveLimit`, and the cap in force is its limit. In a guard
    stack (`guard`) the samples are each attempt's, taken just outside
    the timeout, so a retried 429 is seen as a 429 and backoff and queueing are not latency.
    A drop cuts the cap once per round trip: drops of calls started before the last cut were
    sent under the old cap and are not counted again (TCP's one cut per window).
    """

    def __init__(self, inner: Backend, policy: BulkheadPolicy | None = None) -> None:
        super().__init__(inner)
        self.policy = policy or BulkheadPolicy()
        self._running = 0
        self._queued = 0
        self._rejected = 0
        self._admitted = 0
        self._waiters: deque[_Waiter] = deque()
        self._adaptive = adaptive_limit(self.policy)
        self._limit = self.policy.start_concurrent
        self._cuts = 0  # drop-driven cuts so far: a drop counts only if sent after the last
        self._samples_here = self._adaptive is not None  # False: an attempt sampler feeds it

    @property
    def adaptive_limit(self) -> AdaptiveLimit | None:
        """The algorithm behind an adaptive cap (``None`` when the cap is fixed)."""
        return self._adaptive

    def statistics(self) -> BulkheadStatistics:
        """Running, queued and rejected calls now."""
        return BulkheadStatistics(
            max_concurrent=self.policy.max_concurrent,
            limit=self._limit,
            running=self._running,
            queued=self._queued,
            rejected=self._rejected,
            admitted=self._admitted,
        )

    def _reject(self, why: str) -> BulkheadFullError:
        self._rejected += 1
        set_span_attribute("genfan.bulkhead.rejected", True)
        decision(
            "bulkhead_rejected",
            backend=self.name,
            level="info",
            reason=why,
            running=self._running,
            queued=self._queued,
        )
        return BulkheadFullError(
            f"bulkhead full ({why}): {self._running} running, {self._queued} queued",
            backend=self.name,
        )

    def _grant(self) -> None:
        self._running += 1
        self._admitted += 1
        telemetry.instruments().bulkhead.add(1, self._attrs)

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if allowed.

        Raises:
            BulkheadFullError: no slot, and no room or time to wait for one.
        """
        if self._running < self._limit and not self._queued:
            self._grant()
            return
        max_queued = self.policy.max_queued
        if max_queued is not None and self._queued >= max_queued:
            raise self._reject("queue full" if max_queued else "no free slot")
        wait = self.policy.max_queue_wait
        budget = time_left()
        limit = min(math.inf if wait is None else wait, budget)
        if limit <= 0:
            await anyio.lowlevel.checkpoint_if_cancelled()  # cancelled: say so, not "full"
            raise self._reject("no time left to queue")
        waiter = _Waiter()
        self._waiters.append(waiter)
        self._queued += 1
        metrics().bulkhead_queued.add(1, {"genfan.backend": self.name})
        try:
            with anyio.move_on_after(limit):
                await waiter.event.wait()
        except BaseException:
            if waiter.granted:  # granted, then cancelled before we resumed: pass it on
                self.release()
            else:
                self._leave(waiter)
            raise
        if not waiter.granted:
            self._leave(waiter)
            raise self._reject(f"waited {limit:g}s in the queue")

    def _leave(self, waiter: _Waiter) -> None:
        waiter.gone = True
        self._queued -= 1
        metrics().bulkhead_queued.add(-1, {"genfan.backend": self.name})

    def _hand_over(self) -> bool:
        """Give a running call's slot to the longest waiter, if any."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if waiter.gone:
                continue
            waiter.granted = True
            self._queued -= 1
            self._admitted += 1
            metrics().bulkhead_queued.add(-1, {"genfan.backend": self.name})
            waiter.event.set()
            return True
        return False

    def release(self) -> None:
        """Give a slot back; the longest waiter (if any) gets it, unless the cap fell."""
        if self._running <= self._limit and self._hand_over():
            return
        self._running -= 1
        telemetry.instruments().bulkhead.add(-1, self._attrs)

    # -- the adaptive cap ----------------------------------------------------------------------

    def _sample_start(self) -> tuple[float, int, int]:
        """What a call's sample needs from its start: the time, the calls in flight, the cuts."""
        return anyio.current_time(), self._running, self._cuts

    def _sample_end(self, start: tuple[float, int, int], error: BaseException | None) -> None:
        """Feed one call's outcome to the adaptive cap; other failures teach nothing."""
        adaptive = self._adaptive
        if adaptive is None:
            return
        began, in_flight, cuts = start
        if error is None:
            dropped = False
        elif is_overload(error):
            if cuts != self._cuts:  # sent under a higher cap, which was already cut
                return
            dropped = True
        else:
            return
        old = self._limit
        new = adaptive.update(anyio.current_time() - began, in_flight, dropped)
        self._limit = new
        if new > old:
            while self._running < new and self._hand_over():
                self._running += 1
                telemetry.instruments().bulkhead.add(1, self._attrs)
        elif new < old and dropped:
            self._cuts += 1
            decision(
                "bulkhead_limit_cut",
                backend=self.name,
                level="info",
                reason=type(error).__name__,
                limit=new,
                running=self._running,
            )

    async def complete(self, request: ChatRequest) -> Completion:
        await self.acquire()
        try:
            if not self._samples_here:
                return await self.inner.complete(request)
            start = self._sample_start()
            try:
                completion = await self.inner.complete(request)
            except BaseException as exc:
                self._sample_end(start, exc)
                raise
            self._sample_end(start, None)
            return completion
        finally:
            self.release()

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        await self.acquire()
        try:
            start = self._sample_start() if self._samples_here else None
            # Closed here, not by the garbage collector, so the slot is free only once it is.
            async with aclosing(self.inner.stream(request)) as events:  # type: ignore[type-var]
                try:
                    async for event in events:
                        yield event
                except BaseException as exc:
                    if start is not None:
                        self._sample_end(start, exc)
                    raise
            if start is not None:
                self._sample_end(start, None)
        finally:
            self.release()


class AttemptSampler(Guard):
    """Feeds each attempt's outcome to an adaptive bulkhead above it; `guard` puts it just
    outside the timeout, so that retries, backoff, quota waits and breaker refusals are not
    samples. Not a guard of its own: it changes no call."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.bulkhead: Bulkhead | None = None

    def feed(self, bulkhead: Bulkhead) -> None:
        """Sample for ``bulkhead`` (which stops sampling its own calls)."""
        self.bulkhead = bulkhead
        bulkhead._samples_here = False

    async def complete(self, request: ChatRequest) -> Completion:
        bulkhead = self.bulkhead
        if bulkhead is None:
            return await self.inner.complete(request)
        start = bulkhead._sample_start()
        try:
            completion = await self.inner.complete(request)
        except BaseException as exc:
            bulkhead._sample_end(start, exc)
            raise
        bulkhead._sample_end(start, None)
        return completion

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        bulkhead = self.bulkhead
        start = bulkhead._sample_start() if bulkhead is not None else None
        async with aclosing(self.inner.stream(request)) as events:  # type: ignore[type-var]
            try:
                async for event in events:
                    yield event
            except BaseException as exc:
                if bulkhead is not None and start is not None:
                    bulkhead._sample_end(start, exc)
                raise
        if bulkhead is not None and start is not None:
            bulkhead._sample_end(start, None)
