"""The micro-batcher: many callers submit one item each; a handler sees them in batches.

A batch is flushed when it holds ``max_size`` items or when its oldest item has waited
``max_wait`` seconds, whichever comes first; with ``preferred_sizes``, as soon as the queue
holds one of those sizes (the largest that fits is taken, like Triton's
``preferred_batch_size``). Items are taken highest ``priority`` first, first come first served
within a priority. With ``max_queue_wait``, an item that is still queued (every batch slot busy,
or passed over for higher priorities) that many seconds after it entered the queue fails
unsent, like the queue policy of Triton's dynamic batcher (``timeout_action: REJECT``). Waiting
goes through anyio's clock, so trio's ``MockClock(autojump_threshold=0)`` runs hours of
batching logic in milliseconds.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, Literal, Self, TypeVar

import anyio
from anyio.abc import TaskGroup

from .. import telemetry
from .._errors import BulkheadFullError, ConfigurationError, GenfanError

__all__ = ["BatchHandler", "BatcherStatistics", "MicroBatcher", "OnFull"]

T = TypeVar("T")
R = TypeVar("R")

#: ``async (items) -> results``: one result (or an exception) per item, in the items' order.
BatchHandler = Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]
OnFull = Literal["wait", "reject"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BatcherStatistics:
    """A snapshot of a [`MicroBatcher`][genfan.batching.MicroBatcher]'s work so far.

    Attributes:
        batches: batches handed to the handler (per-item retries after a split not counted).
        items: items sent in those batches.
        max_size: the batcher's ``max_size``.
        mean_batch_size: ``items / batches``.
        fill_rate: ``mean_batch_size / max_size``, 0..1 (the usual target is 0.80-0.95).
        flushed_full: batches flushed because they reached ``max_size``.
        flushed_on_time: batches flushed because their oldest item waited ``max_wait``.
        flushed_preferred: batches flushed at once because the queue held one of the
            ``preferred_sizes`` (a preferred size equal to ``max_size`` counts as
            ``flushed_full``). The rest of ``batches`` were flushed early by closing the batcher.
        mean_wait: mean seconds an item waited in the queue before its batch was sent.
        max_wait_seen: the longest such wait.
        mean_batch_latency: mean seconds the handler took per batch.
        queued: items waiting now; ``in_flight_batches``: batches being handled now.
        rejected: submissions refused because the queue was full (``on_full="reject"``).
        timed_out: items failed unsent because they waited ``max_queue_wait`` in the queue.
        cancelled: callers that gave up (removed from the queue, or result dropped).
        failed_items: items that ended with an exception from the handler (or the batcher
            closing under them); ``rejected`` and ``timed_out`` items are not counted here.
        split_batches: batches whose failure was split into per-item retries.
    """

    batches: int
    items: int
    max_size: int
    mean_batch_size: float
    fill_rate: float
    flushed_full: int
    flushed_on_time: int
    flushed_preferred: int
    mean_wait: float
    max_wait_seen: float
    mean_batch_latency: float
    queued: int
    in_flight_batches: int
    rejected: int
    timed_out: int
    cancelled: int
    failed_items: int
    split_batches: int


class _Pending(Generic[T, R]):
    __slots__ = ("done", "enqueued", "error", "item", "priority", "result", "state")

    def __init__(self, item: T, enqueued: float, priority: int) -> None:
        self.item = item
        self.enqueued = enqueued
        self.priority = priority
        self.state: Literal["queued", "sent", "done", "abandoned"] = "queued"
        self.done = anyio.Event()
        self.result: R | None = None
        self.error: BaseException | None = None


def _preferred_sizes(sizes: Sequence[int], max_size: int) -> tuple[int, ...]:
    try:
        values = tuple(sizes)
    except TypeError:
        raise ConfigurationError(
            f"preferred_sizes must be a sequence of integers, got {sizes!r}"
        ) from None
    for size in values:
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= max_size:
            raise ConfigurationError(
                f"preferred_sizes must hold integers from 1 to max_size ({max_size}), got "
                f"{size!r} in {values!r}; lower it or raise max_size"
            )
    return tuple(sorted(set(values)))


def _check_priority(priority: int) -> None:
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ConfigurationError(
            f"priority must be an integer (higher is sent first), got {priority!r}"
        )


class MicroBatcher(Generic[T, R]):
    """Group single submissions into batches for a handler that works on many items at once.

    Each caller ``await batcher.submit(item)`` and gets its own result (or its own exception):
    a failure of one item fails only that item. When the handler raises for a whole batch, the
    batch is split and every item retried alone (``split_on_batch_error``), so one poison item
    cannot fail its neighbours. A caller that is cancelled while its item waits has the item
    removed (it is never sent); if the batch was already sent, its result is dropped and the
    other items are unaffected.

    **Priorities.** ``submit(item, priority=...)``: a higher number is sent first (``0`` by
    default; negative numbers for background work), first come first served within a priority.
    Priority decides which queued items a batch takes, not when a batch is due: ``max_wait``
    still counts from the oldest item of any priority. While higher-priority items keep the
    batches full, a lower-priority item can wait without bound; ``max_queue_wait`` bounds it
    (the item then fails with [`BulkheadFullError`][genfan.BulkheadFullError], unsent). Callers
    waiting for room under ``on_full="wait"`` are not ordered by priority.

    Use it as an async context manager: it runs its flusher in a task group, and on exit sends
    what is still queued and waits for batches in flight.

    Args:
        handler: ``async (items) -> results``; one result or exception per item, same order.
        max_size: the most items in one batch.
        max_wait: seconds the oldest queued item may wait before its batch is sent anyway.
        preferred_sizes: batch sizes to send at once, without waiting for ``max_wait``: when
            the queue holds at least one of them, a batch of the largest that fits is sent (the
            rest keep waiting); with fewer than the smallest queued, ``max_size`` and
            ``max_wait`` apply as usual. Each an integer from 1 to ``max_size``; batches then
            have a preferred size, or fewer items than the smallest, so list ``max_size`` too
            if full batches are wanted. ``()`` (the default): none.
        max_queue: the most items waiting to be sent; then ``on_full`` applies.
        on_full: ``"wait"`` (backpressure: ``submit`` waits for room) or ``"reject"`` (raise
            [`BulkheadFullError`][genfan.BulkheadFullError] at once).
        max_queue_wait: seconds an item may stay queued (counted from when it entered the
            queue) while every batch slot is busy or higher priorities fill the batches; then
            it fails with [`BulkheadFullError`][genfan.BulkheadFullError] and is never sent.
            ``None`` (the default): no limit. Must be ``>= max_wait``. An item already sent in
            a batch is never timed out by this.
        split_on_batch_error: when the handler raises for a batch of several items, retry each
            item alone (``True``), never (``False``), or when this predicate says so.
        max_concurrent_batches: batches handled at the same time.
        name: used in errors, events and as ``backend=`` of rejections.

    Example:
        ```python
        async def square(xs: list[int]) -> list[int]:
            return [x * x for x in xs]

        async with MicroBatcher(square, max_size=32, max_wait=0.01) as batcher:
            nine = await batcher.submit(3)
        ```
    """

    def __init__(
        self,
        handler: BatchHandler[T, R],
        *,
        max_size: int = 32,
        max_wait: float = 0.01,
        preferred_sizes: Sequence[int] = (),
        max_queue: int = 10_000,
        on_full: OnFull = "wait",
        max_queue_wait: float | None = None,
        split_on_batch_error: bool | Callable[[BaseException], bool] = True,
        max_concurrent_batches: int = 1,
        name: str = "batcher",
    ) -> None:
        if not isinstance(max_size, int) or max_size < 1:
            raise ConfigurationError(f"max_size must be an integer >= 1, got {max_size!r}")
        if not (isinstance(max_wait, int | float) and math.isfinite(max_wait) and max_wait >= 0):
            raise ConfigurationError(
                f"max_wait must be a finite number of seconds >= 0, got {max_wait!r}"
            )
        preferred = _preferred_sizes(preferred_sizes, max_size)
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ConfigurationError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        if on_full not in ("wait", "reject"):
            raise ConfigurationError(f"on_full must be 'wait' or 'reject', got {on_full!r}")
        if max_queue_wait is not None:
            if not (isinstance(max_queue_wait, int | float) and math.isfinite(max_queue_wait)):
                raise ConfigurationError(
                    "max_queue_wait must be a finite number of seconds or None, "
                    f"got {max_queue_wait!r}"
                )
            if max_queue_wait < max_wait:
                raise ConfigurationError(
                    f"max_queue_wait ({max_queue_wait!r}) must be >= max_wait ({max_wait!r}): "
                    "otherwise an item would time out before its batch is due; raise "
                    "max_queue_wait or lower max_wait"
                )
        if not isinstance(max_concurrent_batches, int) or max_concurrent_batches < 1:
            raise ConfigurationError(
                f"max_concurrent_batches must be an integer >= 1, got {max_concurrent_batches!r}"
            )
        self._handler = handler
        self.max_size = max_size
        self.max_wait = float(max_wait)
        #: the preferred sizes, ascending, without duplicates
        self.preferred_sizes: tuple[int, ...] = preferred
        self.max_queue = max_queue
        self.on_full: OnFull = on_full
        self.max_queue_wait = None if max_queue_wait is None else float(max_queue_wait)
        self._split = split_on_batch_error
        self.max_concurrent_batches = max_concurrent_batches
        self.name = name

        # One FIFO per priority present (an empty one is removed); items enter in time
        # order, so each FIFO's head is its oldest item.
        self._queues: dict[int, deque[_Pending[T, R]]] = {}
        self._queued = 0
        self._changed = anyio.Event()  # set (and replaced) whenever the queue changes
        self._room = anyio.Event()  # set (and replaced) whenever queue space frees up
        self._tg: TaskGroup | None = None
        self._slots: anyio.Semaphore | None = None
        self._closing = False
        self._closed = False
        # statistics
        self._batches = 0
        self._items = 0
        self._full = 0
        self._on_time = 0
        self._preferred = 0
        self._wait_total = 0.0
        self._wait_max = 0.0
        self._latency_total = 0.0
        self._in_flight = 0
        self._rejected = 0
        self._timed_out = 0
        self._cancelled = 0
        self._failed = 0
        self._splits = 0

    # -- life cycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._tg is not None or self._closed:
            raise ConfigurationError(f"{self.name}: a MicroBatcher can be entered only once")
        self._slots = anyio.Semaphore(self.max_concurrent_batches)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._flusher)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        self._closing = True
        self._notify()
        if exc is not None:
            self._tg.cancel_scope.cancel()
        try:
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            self._closed = True
            for queue in self._queues.values():  # only left when cancelled: nobody sends them
                for p in queue:
                    self._finish(p, GenfanError(f"{self.name} closed before the item was sent"))
            self._queues.clear()
            self._queued = 0

    # -- the callers' side ----------------------------------------------------------------------

    async def submit(self, item: T, *, priority: int = 0) -> R:
        """Queue ``item`` and wait for its result.

        Args:
            item: what the handler will see.
            priority: higher is sent first; first come first served within a priority.

        Raises:
            BulkheadFullError: the queue is full and ``on_full="reject"``, or the item waited
                ``max_queue_wait`` seconds in the queue without being sent.
            ConfigurationError: the batcher is not running (use ``async with``) or is closed,
                or ``priority`` is not an integer.
            Exception: whatever the handler returned or raised for this item.
        """
        _check_priority(priority)
        if self._tg is None or self._closing:
            state = "closed" if self._closing else "not started (use 'async with')"
            raise ConfigurationError(f"{self.name} is {state}; cannot submit")
        while self._queued >= self.max_queue:
            if self.on_full == "reject":
                self._rejected += 1
                telemetry.event("batcher_rejected", level="info", batcher=self.name)
                raise BulkheadFullError(
                    f"batch queue full ({self.max_queue} items waiting); item rejected",
                    backend=self.name,
                )
            await self._room.wait()
            if self._closing:
                raise ConfigurationError(f"{self.name} closed while the item waited for room")
        pending: _Pending[T, R] = _Pending(item, anyio.current_time(), priority)
        self._queues.setdefault(priority, deque()).append(pending)
        self._queued += 1
        self._notify()
        try:
            await pending.done.wait()
        except BaseException:
            # Cancelled (or interrupted) while waiting: never send a queued item; drop the
            # result of one already sent.
            if pending.state == "queued":
                self._unqueue(pending)
                self._free_room()
                self._notify()
                self._cancelled += 1
            elif pending.state == "sent":
                pending.state = "abandoned"
                self._cancelled += 1
            raise
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[return-value]

    async def submit_many(
        self, items: Sequence[T], *, priority: int = 0
    ) -> list[R | BaseException]:
        """Submit ``items`` concurrently (all at ``priority``); their results (or exceptions)
        in the same order."""
        _check_priority(priority)
        out: list[R | BaseException | None] = [None] * len(items)

        async def one(i: int, item: T) -> None:
            try:
                out[i] = await self.submit(item, priority=priority)
            except Exception as exc:
                out[i] = exc

        async with anyio.create_task_group() as tg:
            for i, item in enumerate(items):
                tg.start_soon(one, i, item)
        return out  # type: ignore[return-value]

    def statistics(self) -> BatcherStatistics:
        """Counters and means so far (a frozen snapshot)."""
        mean = self._items / self._batches if self._batches else 0.0
        return BatcherStatistics(
            batches=self._batches,
            items=self._items,
            max_size=self.max_size,
            mean_batch_size=mean,
            fill_rate=mean / self.max_size,
            flushed_full=self._full,
            flushed_on_time=self._on_time,
            flushed_preferred=self._preferred,
            mean_wait=self._wait_total / self._items if self._items else 0.0,
            max_wait_seen=self._wait_max,
            mean_batch_latency=self._latency_total / self._batches if self._batches else 0.0,
            queued=self._queued,
            in_flight_batches=self._in_flight,
            rejected=self._rejected,
            timed_out=self._timed_out,
            cancelled=self._cancelled,
            failed_items=self._failed,
            split_batches=self._splits,
        )

    # -- the queue (one FIFO per priority) ------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _free_room(self) -> None:
        self._room.set()
        self._room = anyio.Event()

    def _oldest(self) -> _Pending[T, R]:
        """The item queued longest, of any priority (the first due, the first to time out)."""
        return min((q[0] for q in self._queues.values()), key=lambda p: p.enqueued)

    def _unqueue(self, pending: _Pending[T, R]) -> None:
        queue = self._queues[pending.priority]
        queue.remove(pending)
        if not queue:
            del self._queues[pending.priority]
        self._queued -= 1

    def _take(self, size: int) -> list[_Pending[T, R]]:
        """Remove up to ``size`` items: highest priority first, oldest first within one."""
        batch: list[_Pending[T, R]] = []
        for priority in sorted(self._queues, reverse=True):
            queue = self._queues[priority]
            while queue and len(batch) < size:
                batch.append(queue.popleft())
            if not queue:
                del self._queues[priority]
            if len(batch) == size:
                break
        self._queued -= len(batch)
        return batch

    def _plan(self) -> tuple[int, str] | None:
        """The size of the batch due now and why it is due, or ``None`` when none is."""
        n = self._queued
        if n == 0:
            return None
        preferred = self.preferred_sizes
        if preferred and n >= preferred[0]:
            size = max(s for s in preferred if s <= n)
            return size, "size" if size == self.max_size else "preferred"
        if n >= self.max_size:
            return self.max_size, "size"
        if anyio.current_time() >= self._oldest().enqueued + self.max_wait:
            return n, "time"
        if self._closing:
            return n, "close"
        return None

    # -- the flusher ----------------------------------------------------------------------------

    async def _flusher(self) -> None:
        assert self._tg is not None and self._slots is not None
        while True:
            if not self._queued:
                if self._closing:
                    return
                await self._changed.wait()
                continue
            if self._plan() is None:
                changed = self._changed
                with anyio.move_on_at(self._oldest().enqueued + self.max_wait):
                    await changed.wait()
                continue
            # A batch is due: wait for a slot, then take what is due by then (the queue may
            # have grown, or shrunk as callers gave up, meanwhile).
            if not await self._acquire_slot():
                continue
            plan = self._plan()
            if plan is None:
                self._slots.release()
                continue
            size, reason = plan
            now = anyio.current_time()
            batch = self._take(size)
            for p in batch:
                p.state = "sent"
                waited = now - p.enqueued
                self._wait_total += waited
                self._wait_max = max(self._wait_max, waited)
            self._free_room()
            self._batches += 1
            self._items += len(batch)
            if reason == "size":
                self._full += 1
            elif reason == "time":
                self._on_time += 1
            elif reason == "preferred":
                self._preferred += 1
            self._in_flight += 1
            telemetry.event("batch_flushed", batcher=self.name, size=len(batch), reason=reason)
            self._tg.start_soon(self._dispatch, batch)

    async def _acquire_slot(self) -> bool:
        """Take a batch slot; ``False`` when the oldest item's queue wait ran out first (it is
        failed).

        A slot that is free now is always taken, so an item whose ``max_queue_wait`` ends at
        the very moment its batch can be sent is sent, not timed out.
        """
        assert self._slots is not None
        if self.max_queue_wait is None:
            await self._slots.acquire()
            return True
        try:
            self._slots.acquire_nowait()
            return True
        except anyio.WouldBlock:
            pass
        # Every item waits the same max_queue_wait, so the oldest is the first to run out.
        with anyio.move_on_at(self._oldest().enqueued + self.max_queue_wait):
            await self._slots.acquire()
            return True
        self._expire()
        return False

    def _expire(self) -> None:
        """Fail, unsent, every queued item that has waited ``max_queue_wait`` or more."""
        assert self.max_queue_wait is not None
        now = anyio.current_time()
        expired: list[_Pending[T, R]] = []
        for priority, queue in list(self._queues.items()):
            while queue and now >= queue[0].enqueued + self.max_queue_wait:
                expired.append(queue.popleft())
            if not queue:
                del self._queues[priority]
        if not expired:
            return
        self._queued -= len(expired)
        self._timed_out += len(expired)
        self._free_room()
        telemetry.event(
            "batcher_timed_out",
            level="info",
            batcher=self.name,
            items=len(expired),
            in_flight_batches=self._in_flight,
        )
        for p in expired:
            p.error = BulkheadFullError(
                f"item waited {now - p.enqueued:g}s in the batch queue and was not sent "
                f"(max_queue_wait={self.max_queue_wait:g}s, priority {p.priority}, "
                f"{self._in_flight} batches in flight); raise max_queue_wait, "
                "max_concurrent_batches or max_size, or submit less (higher priorities are "
                "sent first)",
                backend=self.name,
            )
            p.state = "done"
            p.done.set()

    async def _dispatch(self, batch: list[_Pending[T, R]]) -> None:
        assert self._slots is not None
        start = anyio.current_time()
        try:
            results = await self._call([p.item for p in batch])
            if isinstance(results, BaseException):
                if len(batch) > 1 and self._should_split(results):
                    self._splits += 1
                    telemetry.event(
                        "batch_split",
                        level="info",
                        batcher=self.name,
                        size=len(batch),
                        error=type(results).__name__,
                    )
                    await self._retry_each(batch)
                    return
                results = [results] * len(batch)
            for p, r in zip(batch, results, strict=True):
                self._finish(p, r)
        finally:
            self._latency_total += anyio.current_time() - start
            self._in_flight -= 1
            self._slots.release()

    async def _call(self, items: list[T]) -> Sequence[R | BaseException] | BaseException:
        try:
            results = await self._handler(items)
        except Exception as exc:
            return exc
        if len(results) != len(items):
            return GenfanError(
                f"{self.name}: the batch handler returned {len(results)} results "
                f"for {len(items)} items"
            )
        return results

    def _should_split(self, exc: BaseException) -> bool:
        return self._split(exc) if callable(self._split) else bool(self._split)

    async def _retry_each(self, batch: list[_Pending[T, R]]) -> None:
        async def one(p: _Pending[T, R]) -> None:
            if p.state == "abandoned":
                return
            result = await self._call([p.item])
            self._finish(p, result if isinstance(result, BaseException) else result[0])

        async with anyio.create_task_group() as tg:
            for p in batch:
                tg.start_soon(one, p)

    def _finish(self, pending: _Pending[T, R], result: R | BaseException) -> None:
        if isinstance(result, BaseException):
            pending.error = result
            self._failed += 1
        else:
            pending.result = result
        if pending.state != "abandoned":
            pending.state = "done"
        pending.done.set()

    def __repr__(self) -> str:
        return (
            f"MicroBatcher(name={self.name!r}, max_size={self.max_size}, "
            f"max_wait={self.max_wait}, queued={self._queued})"
        )
