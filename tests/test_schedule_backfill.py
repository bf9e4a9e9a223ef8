"""Backfill under trio's MockClock: the past fire times of a window, run once each.

Stores run inline (``threads=False``): a worker thread's time is invisible to the mock clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest
from trio.testing import MockClock

from genfan import ConfigurationError
from genfan.resilience import RetryPolicy
from genfan.schedule import (
    AnyioClock,
    CronTrigger,
    DateTrigger,
    IntervalTrigger,
    RunContext,
    SchedulePolicy,
    Scheduler,
    SQLiteStore,
)
from genfan.testing import capture_events

T0 = datetime(2026, 1, 1, tzinfo=UTC)
BERLIN = ZoneInfo("Europe/Berlin")


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


@dataclass
class Call:
    fire: datetime
    start: datetime
    attempt: int
    backfill: bool
    previous_success: datetime | None


class Job:
    """Records every call's context; can take time or fail its first calls."""

    def __init__(self, clock: AnyioClock, *, duration: float = 0.0, fail: int = 0) -> None:
        self.clock = clock
        self.duration = duration
        self.fail = fail
        self.calls: list[Call] = []

    async def __call__(self, context: RunContext) -> None:
        self.calls.append(
            Call(
                context.fire_time,
                self.clock.now(),
                context.attempt,
                context.backfill,
                context.previous_success,
            )
        )
        if self.duration:
            await anyio.sleep(self.duration)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("boom")

    @property
    def fires(self) -> list[datetime]:
        return [c.fire for c in self.calls]


@asynccontextmanager
async def scheduler(start: datetime, **kw: Any) -> AsyncIterator[tuple[Scheduler, AnyioClock]]:
    kw.setdefault("poll_interval", None)
    clock = AnyioClock(start=start)
    store = SQLiteStore(":memory:", threads=False)
    async with Scheduler(store, clock=clock, **kw) as s:
        yield s, clock
    await store.aclose()


def berlin(day: int, hour: int = 7) -> datetime:
    return datetime(2026, 1, day, hour, tzinfo=BERLIN)


@pytest.mark.anyio
async def test_backfill_runs_the_cron_fire_times_of_the_window_with_their_nominal_times() -> None:
    async with scheduler(T0 + timedelta(days=10)) as (s, clock):
        job = Job(clock)
        await s.add_schedule(job, CronTrigger(expr="0 7 * * *", timezone="Europe/Berlin"), id="d")
        queued_at = clock.now()
        with capture_events() as events:
            # [start, end): a fire time at start is in, one at end is out.
            result = await s.backfill("d", berlin(2), berlin(5), overlap="buffer_all")
        expected = (berlin(2), berlin(3), berlin(4))
        assert result.schedule_id == "d"
        assert result.fire_times == result.queued == expected
        assert result.existing == ()
        assert all(f.utcoffset() == timedelta(0) for f in result.fire_times)  # UTC, 06:00
        (event,) = [e for e in events if e["event"] == "schedule_backfill"]
        assert (event["fires"], event["queued"], event["existing"]) == (3, 3, 0)

        await anyio.sleep(7 * 3600)  # past the trigger's own fire of the day, 06:00 UTC
        history = sorted(await s.history("d"), key=lambda r: r.fire_time)

    assert job.fires == [*expected, berlin(11)]
    assert [c.backfill for c in job.calls] == [True, True, True, False]
    assert [c.start for c in job.calls] == [queued_at] * 3 + [berlin(11)]
    # Each backfill run's previous success is the last one before its own fire time.
    assert [c.previous_success for c in job.calls] == [None, berlin(2), berlin(3), berlin(4)]
    assert [(r.fire_time, r.status, r.backfill) for r in history] == [
        (berlin(2), "succeeded", True),
        (berlin(3), "succeeded", True),
        (berlin(4), "succeeded", True),
        (berlin(11), "succeeded", False),
    ]
    assert all(r.run_at == queued_at for r in history[:3])  # planned start: when queued


@pytest.mark.anyio
async def test_backfill_of_an_interval_is_idempotent_and_skips_fires_already_run() -> None:
    minutes = [T0 + timedelta(minutes=m) for m in range(0, 135, 15)]
    async with scheduler(T0 + timedelta(hours=2)) as (s, clock):
        job = Job(clock)
        await s.add_schedule(
            job,
            IntervalTrigger(minutes=15, start=T0),
            id="i",
            # The fires before the 2-hour mark are past the grace time: never created.
            policy=SchedulePolicy(misfire_grace_time=60, overlap="allow"),
        )
        await anyio.sleep(1)  # the trigger's own fire at 2:00 runs
        first = await s.backfill("i", minutes[2], minutes[6])  # 0:30 .. 1:30, end excluded
        assert first.fire_times == first.queued == tuple(minutes[2:6])
        await anyio.sleep(1)
        again = await s.backfill("i", minutes[2], minutes[6])
        assert again.fire_times == again.existing == tuple(minutes[2:6]) and again.queued == ()
        # An overlapping window queues only what is not in the history yet.
        wider = await s.backfill("i", minutes[4], clock.now())
        assert wider.fire_times == tuple(minutes[4:9])
        assert wider.queued == (minutes[6], minutes[7])
        assert wider.existing == (minutes[4], minutes[5], minutes[8])  # backfilled; the trigger's
        await anyio.sleep(1)
        history = await s.history("i")
    # Every fire time of 0:30 .. 2:00 ran exactly once, backfilled ones hours past the grace.
    assert sorted(job.fires) == minutes[2:9]
    assert sorted(r.fire_time for r in history) == minutes[2:9]
    assert {r.status for r in history} == {"succeeded"}
    assert [r.fire_time for r in history if not r.backfill] == [minutes[8]]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("start", "end", "kw", "match"),
    [
        (datetime(2026, 1, 1), T0 + timedelta(hours=1), {}, "start .* has no timezone"),
        (T0, datetime(2026, 1, 1, 1), {}, "end .* has no timezone"),
        (T0 + timedelta(hours=1), T0 + timedelta(hours=1), {}, "window is empty"),
        (T0 + timedelta(hours=2), T0 + timedelta(hours=1), {}, "must be before end"),
        (T0, T0 + timedelta(days=2), {}, "is in the future"),
        (T0, T0 + timedelta(hours=1), {"max_fires": 3}, "more than 3 times .* narrow the window"),
        (T0, T0 + timedelta(hours=1), {"overlap": "queue"}, "overlap must be one of"),
        (T0, T0 + timedelta(hours=1), {"max_fires": 0}, "max_fires must be an int >= 1"),
    ],
)
async def test_backfill_rejects_a_bad_window_and_queues_nothing(
    start: datetime, end: datetime, kw: dict[str, Any], match: str
) -> None:
    async with scheduler(T0 + timedelta(days=1)) as (s, clock):
        await s.add_schedule(Job(clock), IntervalTrigger(minutes=15, start=T0), id="i", paused=True)
        with pytest.raises(ConfigurationError, match=match):
            await s.backfill("i", start, end, **kw)
        assert await s.history("i") == []
        with pytest.raises(ConfigurationError, match="no schedule with id 'nope'"):
            await s.backfill("nope", T0, T0 + timedelta(hours=1))


@pytest.mark.anyio
async def test_backfill_runs_go_through_the_job_policy() -> None:
    async with scheduler(T0 + timedelta(days=1)) as (s, clock):
        job = Job(clock, fail=1)
        await s.add_schedule(
            job,
            DateTrigger(at=T0),
            id="once",
            paused=True,  # the trigger's own fire never runs; a backfill still does
            policy=SchedulePolicy(
                misfire_grace_time=10,
                retry=RetryPolicy(attempts=2, initial=5, max_delay=300, jitter="none"),
            ),
        )
        result = await s.backfill("once", T0 - timedelta(days=1), T0 + timedelta(hours=1))
        assert result.queued == (T0,)
        await anyio.sleep(60)
        (run,) = await s.history("once")
    now = T0 + timedelta(days=1)
    assert [(c.fire, c.start, c.attempt) for c in job.calls] == [
        (T0, now, 1),
        (T0, now + timedelta(seconds=5), 2),  # retried after the policy's wait
    ]
    assert run.status == "succeeded" and run.attempts == 2 and run.backfill


async def _backfill_slow(overlap: str | None) -> tuple[Job, list[tuple[float, str]]]:
    """Backfill the four 15-minute fires of the first hour of a job that takes 100 s."""
    async with scheduler(T0 + timedelta(days=1)) as (s, clock):
        job = Job(clock, duration=100)
        await s.add_schedule(
            job,
            IntervalTrigger(minutes=15, start=T0),
            id="slow",
            paused=True,
            policy=SchedulePolicy(overlap="skip"),
        )
        await s.backfill("slow", T0, T0 + timedelta(hours=1), overlap=overlap)  # type: ignore[arg-type]
        await anyio.sleep(1000)
        history = sorted(await s.history("slow"), key=lambda r: r.fire_time)
    return job, [((r.fire_time - T0).total_seconds() / 60, r.status) for r in history]


def _offsets(job: Job) -> list[tuple[float, float]]:
    start = T0 + timedelta(days=1)
    return [
        ((c.fire - T0).total_seconds() / 60, (c.start - start).total_seconds()) for c in job.calls
    ]


@pytest.mark.anyio
async def test_backfill_overlap_defaults_to_the_schedules_skip() -> None:
    job, history = await _backfill_slow(None)
    assert _offsets(job) == [(0, 0)]
    assert history == [(0, "succeeded"), (15, "skipped"), (30, "skipped"), (45, "skipped")]


@pytest.mark.anyio
async def test_backfill_overlap_buffer_all_runs_them_one_after_another_in_order() -> None:
    job, history = await _backfill_slow("buffer_all")
    assert _offsets(job) == [(0, 0), (15, 100), (30, 200), (45, 300)]
    assert {status for _, status in history} == {"succeeded"}


@pytest.mark.anyio
async def test_backfill_overlap_buffer_one_runs_the_first_two() -> None:
    job, history = await _backfill_slow("buffer_one")
    assert _offsets(job) == [(0, 0), (15, 100)]
    assert history == [(0, "succeeded"), (15, "succeeded"), (30, "skipped"), (45, "skipped")]


@pytest.mark.anyio
async def test_backfill_overlap_allow_runs_them_all_at_once() -> None:
    job, _ = await _backfill_slow("allow")
    assert sorted(_offsets(job)) == [(0, 0), (15, 0), (30, 0), (45, 0)]


@pytest.mark.anyio
async def test_a_long_backfill_does_not_hold_up_other_schedules() -> None:
    # 200 buffered runs of a slow job wait in the store; another schedule still runs on time.
    now = T0 + timedelta(days=1)
    async with scheduler(now, max_concurrent_runs=2) as (s, clock):
        slow = Job(clock, duration=60)
        other = Job(clock)
        await s.add_schedule(slow, IntervalTrigger(minutes=1, start=T0), id="slow", paused=True)
        await s.add_schedule(other, DateTrigger(at=now + timedelta(seconds=10)), id="other")
        result = await s.backfill("slow", T0, T0 + timedelta(minutes=200), overlap="buffer_all")
        assert len(result.queued) == 200
        await anyio.sleep(150)
    assert [c.start for c in other.calls] == [now + timedelta(seconds=10)]
    assert [c.start for c in slow.calls] == [
        now,
        now + timedelta(seconds=60),
        now + timedelta(seconds=120),
    ]
