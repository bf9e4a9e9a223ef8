"""The bulkhead: at most N calls run at once; the rest wait their turn (or, when asked, at most
M wait and the others are shed at once)."""

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
from .._errors import BulkheadFullError
from .._types import ChatRequest, Completion, StreamEvent
from ._base import Guard, decision, metrics, set_span_attribute, time_left
from ._policies import BulkheadPolicy

__all__ = ["Bulkhead", "BulkheadStatistics"]


@dataclass(frozen=True, kw_only=True, slots=True)
class BulkheadStatistics:
    """A snapshot of a bulkhead (like ``anyio.CapacityLimiter.statistics()``).

    Attributes:
        max_concurrent: the limit.
        running: calls running now.
        queued: calls waiting for a slot now.
        rejected: calls shed so far (full queue, queue wait exceeded, or no time left).
        admitted: calls that got a slot so far.
    """

    max_concurrent: int
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
    :class:`~genfan.BulkheadFullError`, and the backend is not called, when the policy asks for
    shedding and the queue is full (``max_queued``) or its wait passes ``max_queue_wait``, or
    when no time is left before the deadline to wait at all.
    """

    def __init__(self, inner: Backend, policy: BulkheadPolicy | None = None) -> None:
        super().__init__(inner)
        self.policy = policy or BulkheadPolicy()
        self._running = 0
        self._queued = 0
        self._rejected = 0
        self._admitted = 0
        self._waiters: deque[_Waiter] = deque()

    def statistics(self) -> BulkheadStatistics:
        """Running, queued and rejected calls now."""
        return BulkheadStatistics(
            max_concurrent=self.policy.max_concurrent,
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
        if self._running < self.policy.max_concurrent and not self._queued:
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

    def release(self) -> None:
        """Give a slot back; the longest waiter (if any) gets it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if waiter.gone:
                continue
            waiter.granted = True
            self._queued -= 1
            self._admitted += 1
            metrics().bulkhead_queued.add(-1, {"genfan.backend": self.name})
            waiter.event.set()
            return
        self._running -= 1
        telemetry.instruments().bulkhead.add(-1, self._attrs)

    async def complete(self, request: ChatRequest) -> Completion:
        await self.acquire()
        try:
            return await self.inner.complete(request)
        finally:
            self.release()

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        await self.acquire()
        try:
            # Closed here, not by the garbage collector, so the slot is free only once it is.
            async with aclosing(self.inner.stream(request)) as events:  # type: ignore[type-var]
                async for event in events:
                    yield event
        finally:
            self.release()
