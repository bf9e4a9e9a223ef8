"""The micro-batcher: flush by size, by time and at preferred sizes, order, priorities, error
isolation, cancellation, backpressure, queue timeouts."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from genfan import (
    BackendError,
    BulkheadFullError,
    ChatRequest,
    Completion,
    ConfigurationError,
    HTTPStatusError,
    MalformedResponseError,
)
from genfan.batching import BatchingBackend, BatchingEmbedder, MicroBatcher

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


class Recorder:
    """A handler that records each batch and the time it was called."""

    def __init__(self, latency: float = 0.0, fail_on: set[int] | None = None) -> None:
        self.batches: list[list[int]] = []
        self.times: list[float] = []
        self.latency = latency
        self.fail_on = fail_on or set()

    async def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.times.append(anyio.current_time())
        if self.latency:
            await anyio.sleep(self.latency)
        return [ValueError(f"bad {i}") if i in self.fail_on else i * 10 for i in items]


async def test_flushes_when_a_batch_is_full_without_waiting() -> None:
    rec = Recorder()
    results: dict[int, int] = {}
    async with MicroBatcher(rec, max_size=4, max_wait=60.0) as batcher:
        start = anyio.current_time()

        async def call(i: int) -> None:
            results[i] = await batcher.submit(i)

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(call, i)
    assert [len(b) for b in rec.batches] == [4, 4]
    assert all(t - start < 1.0 for t in rec.times)  # full batches never wait for max_wait
    assert results == {i: i * 10 for i in range(8)}
    stats = batcher.statistics()
    assert (stats.batches, stats.items, stats.flushed_full, stats.fill_rate) == (2, 8, 2, 1.0)


async def test_flushes_a_partial_batch_after_max_wait() -> None:
    rec = Recorder()
    async with MicroBatcher(rec, max_size=10, max_wait=2.5) as batcher:
        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(batcher.submit, i)
        waited = anyio.current_time() - start
    assert [sorted(b) for b in rec.batches] == [[0, 1, 2]]
    assert waited == pytest.approx(2.5)
    stats = batcher.statistics()
    assert stats.flushed_on_time == 1
    assert stats.fill_rate == pytest.approx(0.3)
    assert stats.mean_wait == pytest.approx(2.5)


async def test_max_wait_counts_from_the_oldest_item() -> None:
    rec = Recorder()
    async with MicroBatcher(rec, max_size=10, max_wait=1.0) as batcher:
        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.submit, 1)
            await anyio.sleep(0.6)
            tg.start_soon(batcher.submit, 2)  # joins the batch; does not restart the timer
    assert rec.batches == [[1, 2]]
    assert rec.times[0] - start == pytest.approx(1.0)


async def test_results_go_back_to_their_own_caller_in_order() -> None:
    async def reverse_aware(items: list[int]) -> list[str]:
        return [f"r{i}" for i in items]

    async with MicroBatcher(reverse_aware, max_size=7, max_wait=0.1) as batcher:
        out = await batcher.submit_many(list(range(50)))
    assert out == [f"r{i}" for i in range(50)]


async def test_one_failed_item_fails_only_that_item() -> None:
    rec = Recorder(fail_on={3})
    async with MicroBatcher(rec, max_size=5, max_wait=0.1) as batcher:
        out = await batcher.submit_many([1, 2, 3, 4])
        with pytest.raises(ValueError, match="bad 3"):
            await batcher.submit(3)
    assert out[:2] == [10, 20] and out[3] == 40
    assert isinstance(out[2], ValueError)
    assert batcher.statistics().failed_items == 2


async def test_batch_level_error_is_split_and_retried_per_item() -> None:
    calls: list[list[int]] = []

    async def poison(items: list[int]) -> list[int]:
        calls.append(list(items))
        if 13 in items:
            raise HTTPStatusError("bad input in batch", backend="x", status_code=400)
        return [i + 1 for i in items]

    async with MicroBatcher(poison, max_size=4, max_wait=0.1) as batcher:
        out = await batcher.submit_many([1, 13, 5, 7])
    assert out[0] == 2 and out[2] == 6 and out[3] == 8
    assert isinstance(out[1], HTTPStatusError)
    assert sorted(calls[0]) == [1, 5, 7, 13]
    assert sorted(map(tuple, calls[1:])) == [(1,), (5,), (7,), (13,)]
    assert batcher.statistics().split_batches == 1


async def test_split_policy_can_refuse_to_split() -> None:
    calls = 0

    async def down(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        raise BackendError("server down", backend="x")

    async with MicroBatcher(
        down, max_size=3, max_wait=0.1, split_on_batch_error=lambda e: False
    ) as batcher:
        out = await batcher.submit_many([1, 2, 3])
    assert calls == 1  # an outage is not multiplied by per-item retries
    assert all(isinstance(r, BackendError) for r in out)


async def test_wrong_result_count_is_a_typed_error_for_every_item() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1] if len(items) > 1 else []

    async with MicroBatcher(short, max_size=2, max_wait=0.1) as batcher:
        out = await batcher.submit_many([1, 2])
    assert all("returned 0 results for 1 items" in str(r) for r in out)


async def test_cancelled_waiting_caller_item_is_never_sent() -> None:
    rec = Recorder()
    async with MicroBatcher(rec, max_size=10, max_wait=5.0) as batcher:
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.submit, 1)
            with anyio.move_on_after(1.0):
                await batcher.submit(2)  # gives up before the batch is due
            tg.start_soon(batcher.submit, 3)
    assert rec.batches == [[1, 3]]
    assert batcher.statistics().cancelled == 1


async def test_cancelled_caller_after_send_drops_only_its_result() -> None:
    rec = Recorder(latency=10.0)
    got: dict[int, int] = {}
    async with MicroBatcher(rec, max_size=3, max_wait=0.1) as batcher:

        async def keep(i: int) -> None:
            got[i] = await batcher.submit(i)

        async with anyio.create_task_group() as tg:
            tg.start_soon(keep, 1)
            tg.start_soon(keep, 3)
            with anyio.move_on_after(5.0):  # batch already sent at 0.1 s, answers at 10.1 s
                await batcher.submit(2)
    assert [sorted(b) for b in rec.batches] == [[1, 2, 3]]
    assert got == {1: 10, 3: 30}
    assert batcher.statistics().cancelled == 1


async def test_full_queue_rejects_with_a_typed_error() -> None:
    rec = Recorder(latency=1.0)
    async with MicroBatcher(rec, max_size=5, max_wait=0.5, max_queue=2, on_full="reject") as b:
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.submit, 1)
            tg.start_soon(b.submit, 2)
            await anyio.wait_all_tasks_blocked()  # both queued, neither sent yet
            with pytest.raises(BulkheadFullError, match="queue full"):
                await b.submit(3)
    assert b.statistics().rejected == 1


async def test_full_queue_waits_for_room_with_backpressure() -> None:
    rec = Recorder(latency=1.0)
    async with MicroBatcher(rec, max_size=2, max_wait=10.0, max_queue=2) as b:
        out = await b.submit_many(list(range(7)))
        stats = b.statistics()
    assert out == [i * 10 for i in range(7)]
    assert max(len(x) for x in rec.batches) <= 2
    assert stats.rejected == 0 and stats.items == 7


async def test_concurrent_batches_overlap() -> None:
    rec = Recorder(latency=1.0)
    async with MicroBatcher(rec, max_size=2, max_wait=0.0, max_concurrent_batches=3) as b:
        start = anyio.current_time()
        await b.submit_many(list(range(6)))
        took = anyio.current_time() - start
    assert took == pytest.approx(1.0)  # three batches of two at once


async def test_closing_sends_what_is_queued() -> None:
    rec = Recorder()
    results: list[int] = []
    async with anyio.create_task_group() as tg:
        async with MicroBatcher(rec, max_size=10, max_wait=100.0) as b:

            async def call() -> None:
                results.append(await b.submit(4))

            tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
    assert results == [40]
    assert rec.times[0] < 1.0  # sent at close, not after max_wait
    stats = b.statistics()
    assert (stats.batches, stats.flushed_full, stats.flushed_on_time) == (1, 0, 0)


async def test_misuse_is_a_configuration_error() -> None:
    rec = Recorder()
    with pytest.raises(ConfigurationError, match="max_size"):
        MicroBatcher(rec, max_size=0)
    with pytest.raises(ConfigurationError, match="max_wait"):
        MicroBatcher(rec, max_wait=-1)
    with pytest.raises(ConfigurationError, match="on_full"):
        MicroBatcher(rec, on_full="drop")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="not started"):
        await MicroBatcher(rec).submit(1)
    with pytest.raises(ConfigurationError, match="max_queue_wait"):
        MicroBatcher(rec, max_queue_wait=float("inf"))
    with pytest.raises(ConfigurationError, match=r"max_queue_wait \(0.5\) must be >= max_wait"):
        MicroBatcher(rec, max_wait=1.0, max_queue_wait=0.5)
    with pytest.raises(ConfigurationError, match=r"preferred_sizes .* max_size \(4\), got 5"):
        MicroBatcher(rec, max_size=4, preferred_sizes=(2, 5))
    for bad in [(0,), (-2,), (2.0,), (True,), ("8",)]:
        with pytest.raises(ConfigurationError, match="preferred_sizes must hold integers"):
            MicroBatcher(rec, preferred_sizes=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="preferred_sizes must be a sequence"):
        MicroBatcher(rec, preferred_sizes=8)  # type: ignore[arg-type]
    for priority in [1.5, "high", None, True]:
        with pytest.raises(ConfigurationError, match="priority must be an integer"):
            await MicroBatcher(rec).submit(1, priority=priority)  # type: ignore[arg-type]
    async with MicroBatcher(rec) as running:
        with pytest.raises(ConfigurationError, match="priority must be an integer"):
            await running.submit_many([1, 2], priority="1")  # type: ignore[arg-type]
    assert rec.batches == []


async def test_queued_item_times_out_after_exactly_max_queue_wait() -> None:
    rec = Recorder(latency=10.0)  # the one batch slot is busy for 10 s at a time
    async with MicroBatcher(rec, max_size=1, max_wait=0.0, max_queue_wait=3.0) as b:
        failed_at: dict[int, float] = {}
        got: dict[int, tuple[int, float]] = {}

        async def call(i: int, at: float) -> None:
            await anyio.sleep(at)
            try:
                got[i] = (await b.submit(i), anyio.current_time())
            except BulkheadFullError as exc:
                assert exc.backend == "batcher" and "max_queue_wait=3s" in str(exc)
                failed_at[i] = anyio.current_time()

        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 1, 0.0)  # sent at once; answered at 10
            tg.start_soon(call, 2, 1.0)  # queued behind it: fails at 4
            tg.start_soon(call, 3, 5.0)  # fails at 8
            tg.start_soon(call, 4, 8.5)  # its wait would end at 11.5: the slot frees at 10
    assert {i: t - start for i, t in failed_at.items()} == pytest.approx({2: 4.0, 3: 8.0})
    assert {i: r for i, (r, _) in got.items()} == {1: 10, 4: 40}
    assert {i: t - start for i, (_, t) in got.items()} == pytest.approx({1: 10.0, 4: 20.0})
    assert rec.batches == [[1], [4]]  # timed-out items are never sent
    stats = b.statistics()
    assert (stats.timed_out, stats.items, stats.failed_items, stats.queued) == (2, 2, 0, 0)


async def test_an_item_in_a_running_batch_is_never_timed_out() -> None:
    rec = Recorder(latency=100.0)
    async with MicroBatcher(rec, max_size=4, max_wait=0.5, max_queue_wait=1.0) as b:
        start = anyio.current_time()
        out = await b.submit_many([1, 2, 3])
        took = anyio.current_time() - start
    assert out == [10, 20, 30] and took == pytest.approx(100.5)
    assert b.statistics().timed_out == 0


async def test_an_item_due_when_its_queue_wait_ends_is_sent_if_a_slot_is_free() -> None:
    rec = Recorder()
    async with MicroBatcher(rec, max_size=10, max_wait=2.0, max_queue_wait=2.0) as b:
        assert await b.submit(7) == 70
    assert b.statistics().timed_out == 0


async def test_a_timed_out_item_makes_room_for_a_waiting_submitter() -> None:
    rec = Recorder(latency=10.0)
    async with MicroBatcher(rec, max_size=1, max_wait=0.0, max_queue=1, max_queue_wait=2.0) as b:
        outcomes: dict[int, tuple[int | str, float]] = {}

        async def call(i: int) -> None:
            try:
                outcomes[i] = (await b.submit(i), anyio.current_time())
            except BulkheadFullError:
                outcomes[i] = ("timed out", anyio.current_time())

        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            for i in range(3):  # 0 runs; 1 is queued; 2 waits for room (not yet queued)
                tg.start_soon(call, i)
                await anyio.wait_all_tasks_blocked()
    # 1 times out at 2; 2 enters the queue then and times out at 4; 0 answers at 10.
    assert {i: r for i, (r, _) in outcomes.items()} == {0: 0, 1: "timed out", 2: "timed out"}
    assert {i: t - start for i, (_, t) in outcomes.items()} == pytest.approx(
        {0: 10.0, 1: 2.0, 2: 4.0}
    )
    assert b.statistics().timed_out == 2


async def test_a_batch_takes_the_highest_priorities_first_and_oldest_first_within_one() -> None:
    rec = Recorder(latency=10.0)
    async with MicroBatcher(rec, max_size=3, max_wait=1.0) as b:
        start = anyio.current_time()
        queued_at_5_5 = -1
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.submit, 100)  # sent alone at 1; the only slot is busy until 11
            await anyio.sleep(1.5)
            # item, priority: queued one by one (2.0 to 5.0) while the slot is busy
            for item, priority in [(1, 0), (2, 5), (3, 1), (4, 5), (5, 0), (6, -1), (7, 1)]:
                tg.start_soon(partial(b.submit, item, priority=priority))
                await anyio.sleep(0.5)
            queued_at_5_5 = b.statistics().queued
    assert queued_at_5_5 == 7
    assert rec.batches == [[100], [2, 4, 3], [7, 1, 5], [6]]
    assert [t - start for t in rec.times] == pytest.approx([1.0, 11.0, 21.0, 31.0])
    stats = b.statistics()
    assert (stats.batches, stats.flushed_full, stats.flushed_on_time) == (4, 2, 2)
    assert (stats.items, stats.queued) == (8, 0)


async def test_priority_orders_a_batch_but_does_not_make_it_due_sooner() -> None:
    rec = Recorder()
    async with MicroBatcher(rec, max_size=10, max_wait=2.0) as b:
        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(b.submit, 1, priority=-3))
            await anyio.sleep(1.5)
            tg.start_soon(partial(b.submit, 2, priority=9))
    assert rec.batches == [[2, 1]]
    assert rec.times[0] - start == pytest.approx(2.0)  # due when the oldest waited max_wait


@pytest.mark.parametrize("max_queue_wait", [None, 3.0])
async def test_a_low_priority_item_waits_while_higher_ones_keep_coming(
    max_queue_wait: float | None,
) -> None:
    """Documented starvation: one slot, one item a second, always a high-priority one queued."""
    rec = Recorder(latency=1.0)
    async with MicroBatcher(rec, max_size=1, max_wait=0.0, max_queue_wait=max_queue_wait) as b:
        start = anyio.current_time()
        low: list[tuple[object, float]] = []

        async def submit_low() -> None:
            try:
                low.append((await b.submit(0, priority=0), anyio.current_time() - start))
            except BulkheadFullError as exc:
                assert "priority 0" in str(exc)
                low.append(("timed out", anyio.current_time() - start))

        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(b.submit, 1, priority=1))  # sent at 0, answered at 1
            await anyio.sleep(0.25)
            tg.start_soon(submit_low)
            for i in range(2, 11):  # one more high-priority item half a second before each slot
                await anyio.sleep(0.25 if i == 2 else 1.0)
                tg.start_soon(partial(b.submit, i, priority=1))
    high = list(range(1, 11))
    if max_queue_wait is None:
        assert rec.batches == [[i] for i in high] + [[0]]
        assert low == [(0, pytest.approx(11.0))]  # sent when the high-priority load stopped
    else:
        assert rec.batches == [[i] for i in high]  # never sent
        assert low == [("timed out", pytest.approx(3.25))]  # bounded by max_queue_wait
        assert b.statistics().timed_out == 1


async def test_a_cancelled_caller_leaves_its_priority_queue_and_the_rest_unchanged() -> None:
    rec = Recorder()
    async with MicroBatcher(rec, max_size=10, max_wait=5.0) as b:
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(b.submit, 1, priority=1))
            with anyio.move_on_after(1.0):
                await b.submit(2, priority=7)  # the only item of its priority gives up
            tg.start_soon(partial(b.submit, 3, priority=7))
            tg.start_soon(partial(b.submit, 4, priority=0))
    assert rec.batches == [[3, 1, 4]]
    stats = b.statistics()
    assert (stats.cancelled, stats.items, stats.queued) == (1, 3, 0)


async def test_a_preferred_size_is_sent_at_once_without_waiting_for_max_wait() -> None:
    rec = Recorder()
    async with MicroBatcher(rec, max_size=16, max_wait=10.0, preferred_sizes=(8, 4)) as b:
        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(b.submit, i)
            await anyio.sleep(1.0)
            tg.start_soon(b.submit, 3)  # the queue now holds 4: sent at once
            await anyio.sleep(1.0)
            tg.start_soon(b.submit, 4)
            tg.start_soon(b.submit, 5)  # 2 < 4: these wait for max_wait
    assert [sorted(x) for x in rec.batches] == [[0, 1, 2, 3], [4, 5]]
    assert [t - start for t in rec.times] == pytest.approx([1.0, 12.0])
    stats = b.statistics()
    assert (stats.flushed_preferred, stats.flushed_on_time, stats.flushed_full) == (1, 1, 0)
    assert b.preferred_sizes == (4, 8)


async def test_the_largest_preferred_size_that_fits_is_sent_and_the_rest_waits() -> None:
    rec = Recorder(latency=5.0)
    async with MicroBatcher(rec, max_size=10, max_wait=100.0, preferred_sizes=(2, 4, 8)) as b:
        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.submit, 0)
            await anyio.sleep(0.1)
            tg.start_soon(b.submit, 1)  # 2 queued: sent at 0.1; the slot is busy until 5.1
            for i in range(2, 13):  # 11 queued by 5.1 (more than max_size)
                await anyio.sleep(0.1)
                tg.start_soon(partial(b.submit, i, priority=1 if i == 12 else 0))
    # 5.1: 8 of 11 (the largest preferred size, not max_size); 10.1: 2 of 3 (the newest,
    # priority 1, first); the last one alone when it has waited max_wait.
    assert rec.batches == [[0, 1], [12, 2, 3, 4, 5, 6, 7, 8], [9, 10], [11]]
    assert [t - start for t in rec.times] == pytest.approx([0.1, 5.1, 10.1, 101.1])
    stats = b.statistics()
    assert (stats.flushed_preferred, stats.flushed_on_time, stats.flushed_full) == (3, 1, 0)
    assert stats.fill_rate == pytest.approx(13 / 40)


async def test_a_preferred_size_equal_to_max_size_counts_as_a_full_batch() -> None:
    rec = Recorder(latency=5.0)
    async with MicroBatcher(rec, max_size=4, max_wait=60.0, preferred_sizes=(2, 4)) as b:
        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            for i in range(7):  # 0.0 to 0.6; 0 and 1 are sent at 0.1, the rest queue
                tg.start_soon(b.submit, i)
                await anyio.sleep(0.1)
    assert rec.batches == [[0, 1], [2, 3, 4, 5], [6]]
    assert [t - start for t in rec.times] == pytest.approx([0.1, 5.1, 60.6])
    stats = b.statistics()
    assert (stats.flushed_preferred, stats.flushed_full, stats.flushed_on_time) == (1, 1, 1)


def run_trio(fn: Callable[[], Awaitable[None]]) -> None:
    anyio.run(fn, backend="trio", backend_options={"clock": MockClock(autojump_threshold=0)})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    calls=st.integers(1, 300),
    max_size=st.integers(1, 8),
    max_wait=st.floats(0.0, 1.0),
    extra_wait=st.floats(0.0, 5.0),
    max_queue=st.integers(1, 64),
    max_concurrent_batches=st.integers(1, 3),
    failure_rate=st.floats(0.0, 0.5),
    levels=st.integers(1, 4),
    preferred=st.lists(st.integers(1, 8), max_size=3),
)
def test_every_item_ends_once_and_none_is_sent_after_its_queue_wait(
    seed: int,
    calls: int,
    max_size: int,
    max_wait: float,
    extra_wait: float,
    max_queue: int,
    max_concurrent_batches: int,
    failure_rate: float,
    levels: int,
    preferred: list[int],
) -> None:
    """Random arrivals, priorities, latencies and failures; queue timeouts and a full queue
    shed items; preferred sizes send some batches early.

    Every submission ends as exactly one result or one error, a timed-out item is never sent,
    every sent item was sent before its queue wait ran out, every batch took the highest
    priorities queued (oldest first within one), batch sizes follow ``preferred_sizes``, and
    the statistics add up.
    """
    rng = random.Random(seed)
    max_queue_wait = max_wait + extra_wait
    preferred_sizes = tuple(p for p in preferred if p <= max_size)
    priority = [rng.randrange(levels) - levels // 2 for _ in range(calls)]
    submitted: dict[int, float] = {}
    sent: dict[int, float] = {}
    ended: dict[int, float] = {}  # when a queued item left the queue unsent (timed out)
    batches: list[tuple[float, list[int]]] = []
    outcomes: list[list[object]] = [[] for _ in range(calls)]

    async def handler(items: list[int]) -> list[int | BaseException]:
        now = anyio.current_time()
        batches.append((now, list(items)))
        for i in items:
            assert i not in sent  # no item is sent twice
            sent[i] = now
        await anyio.sleep(rng.uniform(0.0, 3.0))
        return [ValueError(i) if rng.random() < failure_rate else i for i in items]

    async def main() -> None:
        async with MicroBatcher(
            handler,
            max_size=max_size,
            max_wait=max_wait,
            preferred_sizes=preferred_sizes,
            max_queue=max_queue,
            on_full="reject",
            max_queue_wait=max_queue_wait,
            max_concurrent_batches=max_concurrent_batches,
        ) as b:

            async def one(i: int) -> None:
                await anyio.sleep(rng.uniform(0.0, 20.0))
                submitted[i] = anyio.current_time()
                try:
                    outcomes[i].append(await b.submit(i, priority=priority[i]))
                except (BulkheadFullError, ValueError) as exc:
                    outcomes[i].append(exc)
                    if isinstance(exc, BulkheadFullError):
                        ended[i] = anyio.current_time()

            async with anyio.create_task_group() as tg:
                for i in range(calls):
                    tg.start_soon(one, i)
        stats = b.statistics()
        shed = [o[0] for o in outcomes if isinstance(o[0], BulkheadFullError)]
        timed_out = [e for e in shed if "max_queue_wait" in str(e)]
        assert stats.timed_out == len(timed_out)
        assert stats.rejected == len(shed) - len(timed_out)
        assert stats.items == len(sent) == calls - len(shed)
        assert stats.queued == 0 and stats.in_flight_batches == 0
        assert stats.batches == len(batches)
        # every caller had finished before the batcher closed: nothing was flushed by closing
        assert stats.batches == stats.flushed_full + stats.flushed_on_time + stats.flushed_preferred
        if not preferred_sizes:
            assert stats.flushed_preferred == 0

    run_trio(main)
    assert all(len(o) == 1 for o in outcomes)  # exactly one outcome per call
    for i, o in enumerate(outcomes):
        if isinstance(o[0], BulkheadFullError):
            assert i not in sent
        else:
            assert o[0] == i or (isinstance(o[0], ValueError) and o[0].args == (i,))
            assert sent[i] - submitted[i] <= max_queue_wait + 1e-9

    def order(i: int) -> tuple[int, float]:  # the order the queue gives: priority, then age
        return (-priority[i], submitted[i])

    left = {**ended, **sent}  # when each queued item left the queue
    for at, items in batches:
        assert len(items) <= max_size
        if preferred_sizes:
            assert len(items) in preferred_sizes or len(items) < preferred_sizes[0]
        assert [order(i) for i in items] == sorted(order(i) for i in items)
        # nothing still queued when the batch was formed came before any item it took
        last = max(order(i) for i in items)
        for y, gone in left.items():
            if submitted[y] < at < gone:
                assert order(y) >= last, (y, items)


class FakeEmbedder:
    def __init__(self) -> None:
        self.requests: list[list[str]] = []

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.requests.append(list(texts))
        await anyio.sleep(0.05)
        return [[float(len(t)), 1.0] for t in texts]


async def test_batching_embedder_turns_single_calls_into_few_requests() -> None:
    inner = FakeEmbedder()
    out: dict[str, list[float]] = {}
    async with BatchingEmbedder(inner, max_size=16, max_wait=0.01) as emb:

        async def one(text: str) -> None:
            out[text] = await emb.embed_one(text)

        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(one, "x" * i)
        stats = emb.statistics()
        many = await emb.embed(["a", "bb"])
    assert out["x" * 7] == [7.0, 1.0]
    assert many == [[1.0, 1.0], [2.0, 1.0]]
    assert len(inner.requests) == 8  # 100 single calls -> 7 requests, then one for embed()
    assert stats.batches == 7 and stats.fill_rate == pytest.approx(100 / 112)


async def test_batching_embedder_rejects_a_short_answer() -> None:
    class Short:
        async def embed(self, texts: Sequence[str]) -> list[list[float]]:
            return []

    async with BatchingEmbedder(Short(), name="emb") as emb:
        with pytest.raises(MalformedResponseError, match="asked for 1 embeddings"):
            await emb.embed_one("x")


class BatchEngine:
    name = "engine"

    def __init__(self) -> None:
        self.sizes: list[int] = []

    async def complete_batch(
        self, requests: Sequence[ChatRequest]
    ) -> list[Completion | BackendError]:
        self.sizes.append(len(requests))
        return [
            BackendError("refused", backend=self.name)
            if r.prompt == "no"
            else Completion(text=r.prompt.upper(), backend=self.name)
            for r in requests
        ]


async def test_batching_backend_is_a_backend_for_fan_out() -> None:
    from genfan import FanOut

    engine = BatchEngine()
    async with BatchingBackend(engine, max_size=8, max_wait=0.01) as backend:
        fan = FanOut([backend])
        results = await fan.map(["a", "b", "no", "c"], max_in_flight=4)
    assert [getattr(r, "text", None) for r in results] == ["A", "B", None, "C"]
    assert engine.sizes == [4]


class SlowEmbedder:
    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        await anyio.sleep(5.0)
        return [[1.0] for _ in texts]


async def test_batching_embedder_passes_max_queue_wait_to_its_batcher() -> None:
    async with BatchingEmbedder(
        SlowEmbedder(), max_size=1, max_concurrent_batches=1, max_queue_wait=1.0, name="emb"
    ) as emb:
        out: list[object] = []

        async def one(text: str) -> None:
            try:
                out.append(await emb.embed_one(text))
            except BulkheadFullError as exc:
                out.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "a")
            tg.start_soon(one, "b")
    # One text is sent; the other waits behind it and times out after 1 s, unsent.
    assert out[1] == [1.0]
    assert isinstance(out[0], BulkheadFullError) and out[0].backend == "emb"
    assert emb.statistics().timed_out == 1


class SlowEngine(BatchEngine):
    async def complete_batch(
        self, requests: Sequence[ChatRequest]
    ) -> list[Completion | BackendError]:
        await anyio.sleep(5.0)
        return await super().complete_batch(requests)


async def test_batching_backend_passes_max_queue_wait_to_its_batcher() -> None:
    out: list[object] = []
    async with BatchingBackend(SlowEngine(), max_size=1, max_queue_wait=2.5) as backend:

        async def one(prompt: str) -> None:
            try:
                out.append((await backend.complete(ChatRequest.from_prompt(prompt))).text)
            except BulkheadFullError as exc:
                out.append((exc.backend, anyio.current_time() - start))

        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "a")
            tg.start_soon(one, "b")
    assert out[0] == ("engine", pytest.approx(2.5)) and out[1] in ("A", "B")


async def test_batching_embedder_passes_priorities_and_preferred_sizes() -> None:
    inner = FakeEmbedder()
    async with BatchingEmbedder(inner, max_size=8, max_wait=60.0, preferred_sizes=(3,)) as emb:
        start = anyio.current_time()
        low: list[list[float]] = []
        async with anyio.create_task_group() as tg:

            async def background() -> None:
                low.append(await emb.embed_one("low", priority=-1))

            tg.start_soon(background)
            await anyio.sleep(1.0)
            urgent = await emb.embed(["xx", "yyy"], priority=3)  # the queue holds 3: sent now
            took = anyio.current_time() - start
    assert urgent == [[2.0, 1.0], [3.0, 1.0]] and low == [[3.0, 1.0]]
    assert took == pytest.approx(1.05)  # not max_wait: 1 s of waiting, 0.05 s to embed
    [request] = inner.requests
    assert sorted(request[:2]) == ["xx", "yyy"] and request[2] == "low"
    assert emb.statistics().flushed_preferred == 1
    with pytest.raises(ConfigurationError, match="preferred_sizes"):
        BatchingEmbedder(inner, max_size=4, preferred_sizes=(8,))


class RecordingEngine(BatchEngine):
    def __init__(self) -> None:
        super().__init__()
        self.prompts: list[list[str]] = []

    async def complete_batch(
        self, requests: Sequence[ChatRequest]
    ) -> list[Completion | BackendError]:
        self.prompts.append([r.prompt for r in requests])
        return await super().complete_batch(requests)


async def test_batching_backend_takes_priorities_from_the_call_or_the_request() -> None:
    engine = RecordingEngine()

    def from_metadata(request: ChatRequest) -> int:
        return int(request.metadata.get("priority", "0"))

    def req(prompt: str, priority: str) -> ChatRequest:
        return ChatRequest.from_prompt(prompt, metadata={"priority": priority})

    async with BatchingBackend(
        engine, max_size=8, max_wait=60.0, preferred_sizes=(4,), priority_of=from_metadata
    ) as backend:
        start = anyio.current_time()
        texts: list[str] = []
        async with anyio.create_task_group() as tg:

            async def one(request: ChatRequest, priority: int | None = None) -> None:
                texts.append((await backend.complete(request, priority=priority)).text or "")

            tg.start_soon(one, req("bg", "-1"))
            tg.start_soon(one, ChatRequest.from_prompt("plain"))  # no metadata: 0
            await anyio.sleep(1.0)
            tg.start_soon(one, req("urgent", "5"))
            await anyio.sleep(1.0)
            tg.start_soon(one, req("vip", "0"), 9)  # the call's priority wins
    assert engine.prompts == [["vip", "urgent", "plain", "bg"]]
    assert anyio.current_time() - start == pytest.approx(2.0)  # sent when 4 were queued
    assert sorted(texts) == ["BG", "PLAIN", "URGENT", "VIP"]
    with pytest.raises(ConfigurationError, match="priority_of"):
        BatchingBackend(engine, priority_of=5)  # type: ignore[arg-type]
