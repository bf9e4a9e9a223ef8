"""The scheduler under trio's MockClock: exact times for months of schedule in milliseconds.

Stores run inline (``threads=False``): a worker thread's time is invisible to the mock clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
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
    parse_schedules,
)
from genfan.schedule._planning import jitter_us
from genfan.schedule._triggers import to_us
from genfan.testing import capture_events

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


class Recorder:
    """A job that records (fire time, start offset, attempt) and can sleep or fail."""

    def __init__(self, clock: AnyioClock, *, duration: float = 0.0, fail: int = 0) -> None:
        self.clock = clock
        self.duration = duration
        self.fail = fail
        self.calls: list[tuple[float, float, int]] = []
        self.cancelled: list[float] = []

    def at(self, t: datetime) -> float:
        return (t - T0).total_seconds()

    async def __call__(self, context: RunContext) -> None:
        self.calls.append((self.at(context.fire_time), self.at(self.clock.now()), context.attempt))
        try:
            if self.duration:
                await anyio.sleep(self.duration)
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(self.at(self.clock.now()))
            raise
        if self.fail:
            self.fail -= 1
            raise RuntimeError("boom")

    @property
    def starts(self) -> list[float]:
        return [c[1] for c in self.calls]

    @property
    def fires(self) -> list[float]:
        return [c[0] for c in self.calls]


@asynccontextmanager
async def scheduler(
    path: str | Path = ":memory:",
    *,
    start: datetime = T0,
    clock: AnyioClock | None = None,
    **kw: Any,
) -> AsyncIterator[Scheduler]:
    kw.setdefault("poll_interval", None)
    store = SQLiteStore(path, threads=False)
    async with Scheduler(store, clock=clock or AnyioClock(start=start), **kw) as s:
        yield s
    await store.aclose()


def rec(s: Scheduler, **kw: Any) -> Recorder:
    assert isinstance(s.clock, AnyioClock)
    return Recorder(s.clock, **kw)


@pytest.mark.anyio
async def test_cron_over_three_months_across_dst_starts_exactly_on_time() -> None:
    ny = ZoneInfo("America/New_York")
    async with scheduler(start=datetime(2026, 2, 1, tzinfo=UTC)) as s:
        job = rec(s)
        await s.add_schedule(job, CronTrigger(expr="30 2 * * *", timezone="America/New_York"))
        await anyio.sleep(timedelta(days=90).total_seconds())
    assert len(job.calls) == 90
    assert all(fire == start for fire, start, _ in job.calls)  # zero drift
    local = [(T0 + timedelta(seconds=f)).astimezone(ny) for f in job.fires]
    assert [t.strftime("%H:%M") for t in local].count("03:30") == 1  # the spring-gap day
    assert local[0].date().isoformat() == "2026-02-01"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("coalesce", "fires"),
    [("all", [0, 60, 120, 180]), ("earliest", [0]), ("latest", [180])],
)
async def test_coalescing_when_3min5s_behind_on_a_1min_interval(
    coalesce: str, fires: list[float]
) -> None:
    async with scheduler(start=T0 + timedelta(seconds=185)) as s:
        job = rec(s)
        await s.add_schedule(
            job,
            IntervalTrigger(minutes=1, start=T0),
            policy=SchedulePolicy(coalesce=coalesce, overlap="allow"),  # type: ignore[arg-type]
        )
        await anyio.sleep(10)  # until 195 s: nothing else is due
    assert sorted(job.fires) == fires  # (runs starting at the same instant start in any order)
    assert job.starts == [185.0] * len(fires)


@pytest.mark.anyio
async def test_misfire_grace_time_drops_fires_too_late_to_run() -> None:
    async with scheduler(start=T0 + timedelta(seconds=185)) as s:
        job = rec(s)
        await s.add_schedule(
            job,
            IntervalTrigger(minutes=1, start=T0),
            policy=SchedulePolicy(coalesce="all", misfire_grace_time=30, overlap="allow"),
        )
        await anyio.sleep(60)
    # 0, 60, 120 are more than 30 s late; 180 is 5 s late and runs; 240 on time.
    assert sorted(job.fires) == [180, 240]
    assert job.starts == [185, 240]


@pytest.mark.anyio
async def test_run_claimed_too_late_is_recorded_as_missed() -> None:
    async with scheduler(max_concurrent_runs=1) as s:
        slow = rec(s, duration=50)
        late = rec(s)
        await s.add_schedule(slow, DateTrigger(at=T0), id="slow")
        await s.add_schedule(
            late,
            DateTrigger(at=T0 + timedelta(seconds=1)),
            id="late",
            policy=SchedulePolicy(misfire_grace_time=10),
        )
        await anyio.sleep(100)
        history = {r.schedule_id: r for r in await s.history()}
    assert slow.starts == [0] and late.calls == []
    assert history["late"].status == "missed"
    assert "misfire grace" in (history["late"].error or "")


async def _overlap(policy: str, *, until: float = 300) -> tuple[Recorder, Scheduler, list[Any]]:
    async with scheduler() as s:
        job = rec(s, duration=150)
        await s.add_schedule(
            job,
            IntervalTrigger(minutes=1),
            id="j",
            policy=SchedulePolicy(overlap=policy),  # type: ignore[arg-type]
        )
        await anyio.sleep(until)
        hist = sorted(await s.history("j"), key=lambda r: r.fire_time)
    return job, s, hist


@pytest.mark.anyio
async def test_overlap_skip() -> None:
    job, _, hist = await _overlap("skip")
    assert job.calls == [(0, 0, 1), (180, 180, 1)]
    assert [r.status for r in hist][:4] == ["succeeded", "skipped", "skipped", "running"]


@pytest.mark.anyio
async def test_overlap_allow_runs_them_side_by_side() -> None:
    job, _, _ = await _overlap("allow", until=241)
    assert job.calls == [(0, 0, 1), (60, 60, 1), (120, 120, 1), (180, 180, 1), (240, 240, 1)]


@pytest.mark.anyio
async def test_overlap_buffer_one_waits_and_skips_the_rest() -> None:
    job, _, hist = await _overlap("buffer_one", until=301)
    # 60 waits for the first run to end at 150; 120 is skipped (one already waits);
    # 180 waits for the run that ends at 300; 240 is skipped.
    assert job.calls == [(0, 0, 1), (60, 150, 1), (180, 300, 1)]
    by_fire = {(r.fire_time - T0).total_seconds(): r.status for r in hist}
    assert by_fire[120] == "skipped" and by_fire[240] == "skipped"


@pytest.mark.anyio
async def test_overlap_buffer_all_runs_every_fire_in_order() -> None:
    job, _, _ = await _overlap("buffer_all", until=451)
    assert job.calls == [(0, 0, 1), (60, 150, 1), (120, 300, 1), (180, 450, 1)]


@pytest.mark.anyio
async def test_overlap_cancel_old_replaces_the_running_run() -> None:
    job, _, hist = await _overlap("cancel_old", until=200)
    assert job.calls == [(0, 0, 1), (60, 60, 1), (120, 120, 1), (180, 180, 1)]
    assert job.cancelled == [60, 120, 180, 200]  # 200: the scheduler stopped
    statuses = [r.status for r in hist]
    assert statuses == ["cancelled", "cancelled", "cancelled", "running"]


@pytest.mark.anyio
async def test_retries_back_off_exponentially_then_succeed() -> None:
    async with scheduler() as s:
        job = rec(s, fail=3)
        with capture_events() as events:
            await s.add_schedule(
                job,
                DateTrigger(at=T0 + timedelta(seconds=10)),
                id="r",
                policy=SchedulePolicy(
                    retry=RetryPolicy(
                        attempts=5, initial=2, multiplier=3, max_delay=300, jitter="none"
                    )
                ),
            )
            await anyio.sleep(100)
        (run,) = await s.history("r")
    # attempts at 10, 10+2, 12+6, 18+18
    assert job.calls == [(10, 10, 1), (10, 12, 2), (10, 18, 3), (10, 36, 4)]
    assert run.status == "succeeded" and run.attempts == 4
    retries = [e for e in events if e["event"] == "schedule_run_retry"]
    assert [e["delay"] for e in retries] == [2, 6, 18]


@pytest.mark.anyio
async def test_retries_exhausted_is_a_failure_with_the_error() -> None:
    async with scheduler() as s:
        job = rec(s, fail=10)
        await s.add_schedule(
            job,
            DateTrigger(at=T0),
            id="r",
            policy=SchedulePolicy(
                retry=RetryPolicy(attempts=3, initial=1, max_delay=1.5, jitter="none")
            ),
        )
        await anyio.sleep(100)
        (run,) = await s.history("r")
    assert [c[1] for c in job.calls] == [0, 1, 2.5]
    assert run.status == "failed" and run.attempts == 3
    assert run.error == "RuntimeError: boom"
    assert run.ended == T0 + timedelta(seconds=2.5)


@pytest.mark.anyio
async def test_timeout_per_attempt() -> None:
    async with scheduler() as s:
        job = rec(s, duration=100)
        await s.add_schedule(
            job,
            DateTrigger(at=T0),
            id="t",
            policy=SchedulePolicy(
                timeout=10,
                retry=RetryPolicy(attempts=2, initial=5, max_delay=300, jitter="none"),
            ),
        )
        await anyio.sleep(200)
        (run,) = await s.history("t")
    assert job.starts == [0, 15]
    assert run.status == "timeout" and run.attempts == 2
    assert run.ended == T0 + timedelta(seconds=25)


@pytest.mark.anyio
async def test_lease_expiry_takeover_at_one_and_a_half_lease_times(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    clock = AnyioClock(start=T0)
    ghost = SQLiteStore(db, threads=False)
    # A replica claims the run at 0 and dies without a word.
    async with scheduler(db, clock=clock, identity="b", lease_time=30) as b:
        job = rec(b)
        ghost_store_ready = await ghost.put_schedule(
            id="x",
            trigger=DateTrigger(at=T0),
            job={"kind": "call", "func": None, "args": [], "kwargs": {}},
            policy=SchedulePolicy(retry=RetryPolicy(attempts=2)),
            now=clock.now(),
        )
        assert ghost_store_ready.next_fire == T0
        await ghost.process_due(clock.now())
        claimed = await ghost.claim("ghost", clock.now(), 30, 10)
        assert [c.run.key for c in claimed.claimed] == [("x", to_us(T0))]
        b._local_jobs["x"] = job  # b can run it: the same code is deployed on every replica
        await anyio.sleep(30.001)
        # Expired at 30 s: first only suspected (the ghost may just be cut off from the store).
        (suspected,) = await b.history("x")
        assert suspected.status == "running" and suspected.owner == "ghost"
        await anyio.sleep(44.999 - 30.001)
        assert job.calls == []
        await anyio.sleep(0.002)
        # Still expired half a lease later: taken over, as attempt 2, with a newer token.
        assert job.calls == [(0, 45, 2)]
        (run,) = await b.history("x")
    await ghost.aclose()
    assert run.status == "succeeded" and run.owner == "b" and run.attempts == 2
    first = claimed.claimed[0].run.fencing_token
    assert first is not None and run.fencing_token is not None and run.fencing_token > first


@pytest.mark.anyio
async def test_lost_run_without_attempts_left_is_failed_once_its_expiry_is_confirmed(
    tmp_path: Path,
) -> None:
    db = tmp_path / "s.db"
    clock = AnyioClock(start=T0)
    ghost = SQLiteStore(db, threads=False)
    async with scheduler(db, clock=clock, identity="b", lease_time=20) as b:
        await ghost.put_schedule(
            id="x",
            trigger=DateTrigger(at=T0),
            job={"kind": "call", "func": "os:getpid", "args": [], "kwargs": {}},
            policy=SchedulePolicy(),
            now=clock.now(),
        )
        await ghost.process_due(clock.now())
        await ghost.claim("ghost", clock.now(), 20, 10)
        b._wake.set()
        await anyio.sleep(35)
        (run,) = await b.history("x")
    await ghost.aclose()
    assert run.status == "failed"
    assert run.ended == T0 + timedelta(seconds=30)  # expired at 20, confirmed 10 s later
    assert "lease expired" in (run.error or "") and "ghost" in (run.error or "")


@pytest.mark.anyio
async def test_live_replica_keeps_its_lease_so_no_one_takes_over(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    clock = AnyioClock(start=T0)
    async with (
        scheduler(db, clock=clock, identity="a", lease_time=30, poll_interval=5) as a,
        scheduler(db, clock=clock, identity="b", lease_time=30, poll_interval=5) as b,
    ):
        job = rec(a, duration=100)
        await a.add_schedule("tests.test_schedule_scheduler:shared_job", DateTrigger(at=T0), id="x")
        _shared.append(job)
        await anyio.sleep(150)
        (run,) = await b.history("x")
    _shared.clear()
    assert len(job.calls) == 1
    assert run.status == "succeeded" and run.attempts == 1
    assert run.ended == run.started + timedelta(seconds=100)  # type: ignore[operator]


_shared: list[Recorder] = []


async def shared_job(context: RunContext) -> None:
    await _shared[0](context)


@pytest.mark.anyio
async def test_restart_resumes_where_it_was(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    clock = AnyioClock(start=T0)
    trig = IntervalTrigger(minutes=1)
    async with scheduler(db, clock=clock) as s:
        _shared.append(rec(s))
        await s.add_schedule("tests.test_schedule_scheduler:shared_job", trig, id="x")
        await anyio.sleep(150)
    await anyio.sleep(600)  # down for 10 minutes
    async with scheduler(db, clock=clock) as s:
        # Re-adding the same schedule (as a config would) keeps its place in time.
        await s.add_schedule("tests.test_schedule_scheduler:shared_job", trig, id="x")
        await anyio.sleep(60)
    job = _shared.pop()
    # 0, 60, 120; then down from 150 to 750; the latest missed fire (720) runs at 750; then 780.
    assert job.calls == [(0, 0, 1), (60, 60, 1), (120, 120, 1), (720, 750, 1), (780, 780, 1)]


def _config_entry(toml: str) -> tuple[str, Any, Any, SchedulePolicy]:
    """The one schedule of a ``[schedules]`` TOML text, as ``genfan schedule run`` adds it."""
    import tomllib

    cfg = parse_schedules(tomllib.loads(toml)["schedules"])
    ((sid, entry),) = cfg.entries.items()
    return sid, entry.job(None), entry.trigger(), entry.policy()


_ONCE = """
[schedules.once]
func = "tests.test_schedule_scheduler:shared_job"
delay = "10m"
"""


async def _live(db: Path, clock: AnyioClock, seconds: float) -> None:
    """One process life: start, add the configured schedule, run ``seconds``, stop."""
    sid, job, trigger, policy = _config_entry(_ONCE)
    async with scheduler(db, clock=clock) as s:
        info = await s.add_schedule(job, trigger, id=sid, policy=policy)
        assert info.next_fire in (T0 + timedelta(minutes=10), None)
        await anyio.sleep(seconds)


@pytest.mark.anyio
async def test_restarts_neither_postpone_nor_repeat_a_delay_trigger(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    clock = AnyioClock(start=T0)
    _shared.append(Recorder(clock))
    await _live(db, clock, 300)  # added at 0: due at 600; stops at 300
    await anyio.sleep(100)
    await _live(db, clock, 600)  # restarted at 400: still due at 600, not at 1000
    await anyio.sleep(200)
    await _live(db, clock, 7200)  # restarted at 1200, after the fire: nothing more runs
    job = _shared.pop()
    assert job.calls == [(600, 600, 1)]
    async with scheduler(db, clock=clock, process_runs=False) as admin:
        info = await admin.get_schedule("once")
        runs = await admin.history("once")
    assert (
        info is not None and info.next_fire is None and info.last_fire == T0 + timedelta(minutes=10)
    )
    assert [(r.fire_time, r.status) for r in runs] == [(T0 + timedelta(minutes=10), "succeeded")]


@pytest.mark.anyio
async def test_a_delay_due_while_the_process_was_down_runs_on_restart(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    clock = AnyioClock(start=T0)
    _shared.append(Recorder(clock))
    await _live(db, clock, 300)  # added at 0: due at 600; down from 300 to 900
    await anyio.sleep(600)
    await _live(db, clock, 3600)  # restarted at 900: runs the missed fire now, not at 1500
    job = _shared.pop()
    assert job.calls == [(600, 900, 1)]


@pytest.mark.anyio
async def test_pause_resume_and_trigger() -> None:
    async with scheduler() as s:
        job = rec(s)
        await s.add_schedule(job, IntervalTrigger(minutes=1), id="p")
        await anyio.sleep(90)
        assert await s.pause("p")
        assert (await s.get_schedule("p")).paused  # type: ignore[union-attr]
        await anyio.sleep(110)  # 120 and 180 pass while paused
        manual = await s.trigger("p")
        await anyio.sleep(0.5)
        assert await s.resume("p")
        await anyio.sleep(50)
        assert not await s.pause("nope")
        with pytest.raises(ConfigurationError, match="no schedule"):
            await s.trigger("nope")
    assert manual.manual
    # paused at 90; a manual run at 200; resumed at 200.5: next fire 240, not 120/180.
    assert job.calls == [(0, 0, 1), (60, 60, 1), (200, 200, 1), (240, 240, 1)]


@pytest.mark.anyio
async def test_jitter_is_deterministic_and_within_bounds() -> None:
    async with scheduler() as s:
        job = rec(s)
        await s.add_schedule(
            job, IntervalTrigger(minutes=1), id="j", policy=SchedulePolicy(jitter=20)
        )
        await anyio.sleep(300)
        hist = await s.history("j", statuses=["succeeded"])
    offsets = [start - fire for fire, start, _ in job.calls]
    assert len(offsets) == 5 and all(0 <= o <= 20 for o in offsets)
    assert len(set(offsets)) > 1
    expected = [jitter_us("j", to_us(T0 + timedelta(seconds=f)), 20) / 1e6 for f in job.fires]
    assert offsets == pytest.approx(expected, abs=1e-6)
    assert all(r.drift == 0 for r in hist)  # drift is measured from the jittered start


@pytest.mark.anyio
async def test_max_concurrent_runs_caps_this_scheduler() -> None:
    async with scheduler(max_concurrent_runs=2) as s:
        job = rec(s, duration=10)
        for i in range(5):
            await s.add_schedule(job, DateTrigger(at=T0), id=f"d{i}")
        await anyio.sleep(60)
    assert sorted(job.starts) == [0, 0, 10, 10, 20]


@pytest.mark.anyio
async def test_failure_is_recorded_with_events() -> None:
    async with scheduler() as s:
        job = rec(s, fail=1)
        with capture_events() as events:
            await s.add_schedule(job, DateTrigger(at=T0), id="f")
            await anyio.sleep(1)
    names = [e["event"] for e in events]
    assert "schedule_run_started" in names
    finished = [e for e in events if e["event"] == "schedule_run_finished"]
    assert finished[0]["outcome"] == "failed" and finished[0]["error"] == "RuntimeError: boom"


@pytest.mark.anyio
async def test_job_not_importable_on_this_replica_fails_with_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    async with scheduler(db) as a:
        await a.add_schedule(lambda: None, DateTrigger(at=T0 + timedelta(seconds=5)), id="l")
    async with scheduler(db) as b:  # another process: it does not have the lambda
        await anyio.sleep(10)
        (run,) = await b.history("l")
    assert run.status == "failed" and "local callable" in (run.error or "")


@pytest.mark.anyio
async def test_add_schedule_conflicts_and_validation() -> None:
    async with scheduler() as s:
        await s.add_schedule("os:getpid", IntervalTrigger(minutes=1), id="c")
        kept = await s.add_schedule(
            "os:getpid", IntervalTrigger(minutes=5), id="c", conflict="keep"
        )
        assert kept.trigger == IntervalTrigger(minutes=1, start=T0)
        with pytest.raises(ConfigurationError, match="already exists"):
            await s.add_schedule("os:getpid", IntervalTrigger(minutes=5), id="c", conflict="error")
        replaced = await s.add_schedule("os:getpid", IntervalTrigger(minutes=5), id="c")
        assert replaced.trigger.interval == 300  # type: ignore[attr-defined]
        with pytest.raises(ConfigurationError, match="import path"):
            await s.add_schedule("not a path", IntervalTrigger(minutes=1))
        with pytest.raises(ConfigurationError, match="JSON"):
            await s.add_schedule("os:getpid", IntervalTrigger(minutes=1), args=[object()])
        assert await s.remove_schedule("c")
        assert await s.list_schedules() == []


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SchedulePolicy(coalesce="some"), "coalesce must be one of"),  # type: ignore[arg-type]
        (lambda: SchedulePolicy(overlap="queue"), "overlap must be one of"),  # type: ignore[arg-type]
        (lambda: SchedulePolicy(misfire_grace_time=-1), "misfire_grace_time must be >= 0"),
        (lambda: SchedulePolicy(timeout=0), "timeout must be > 0"),
        (lambda: SchedulePolicy(jitter=-1), "jitter must be >= 0"),
        (lambda: RetryPolicy(attempts=0), "attempts must be"),
        (lambda: SchedulePolicy(retry={"multiplier": 0.5}), "multiplier must be >= 1"),  # type: ignore[arg-type]
        (lambda: RetryPolicy(multiplier=0.5), "RetryPolicy.multiplier must be"),
        (
            lambda: SchedulePolicy(retry=RetryPolicy(attempts=101)),
            r"SchedulePolicy\.retry\.attempts must be an int >= 1 and <= 100, got 101",
        ),
        (
            lambda: SchedulePolicy(retry=RetryPolicy(initial=86401, max_delay=86401)),
            r"SchedulePolicy\.retry\.initial must be >= 0 and <= 86400, got 86401",
        ),
        (
            lambda: SchedulePolicy(retry=RetryPolicy(multiplier=11)),
            r"SchedulePolicy\.retry\.multiplier must be >= 1 and <= 10, got 11",
        ),
        (
            lambda: SchedulePolicy(retry=RetryPolicy(max_delay=86401)),
            r"SchedulePolicy\.retry\.max_delay must be >= 0 and <= 86400, got 86401",
        ),
        (
            lambda: SchedulePolicy(retry=RetryPolicy(retry_on=(ValueError,))),
            r"SchedulePolicy\.retry\.retry_on must be None",
        ),
        (lambda: SchedulePolicy(retry={"attempt": 2}), r"SchedulePolicy\.retry: .*'attempt'"),  # type: ignore[arg-type]
        (lambda: SchedulePolicy(retry=3), "SchedulePolicy.retry must be a"),  # type: ignore[arg-type]
        (lambda: Scheduler(":memory:", max_concurrent_runs=0), "max_concurrent_runs"),
        (lambda: Scheduler(":memory:", lease_time=0), "lease_time"),
        (lambda: Scheduler("redis://x"), "unknown store URL"),
    ],
)
def test_policies_validate(make: Callable[[], object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        make()


class _SlowFinishStore(SQLiteStore):
    """Writing outcomes takes 5 s: the scheduler stops while outcomes are still being written."""

    async def finish_many(self, owner: str, items: Any) -> list[bool]:
        await anyio.sleep(5)
        return await super().finish_many(owner, items)


@pytest.mark.anyio
async def test_stopping_while_outcomes_are_being_written_records_them_all() -> None:
    store = _SlowFinishStore(":memory:", threads=False)
    clock = AnyioClock(start=T0)
    with anyio.fail_after(60):  # a hang fails the test instead of blocking it
        async with Scheduler(store, clock=clock, poll_interval=None) as s:
            job = Recorder(clock)
            for i in range(3):
                await s.add_schedule(job, DateTrigger(at=T0 + timedelta(seconds=i)), id=f"d{i}")
            await anyio.sleep(2.5)  # d0's outcome is being written; d1's waits its turn
    # the context exits (no hang) once every outcome is written
    runs = {r.schedule_id: r.status for r in await store.history()}
    await store.aclose()
    assert len(job.calls) == 3
    assert runs == {"d0": "succeeded", "d1": "succeeded", "d2": "succeeded"}


@pytest.mark.anyio
async def test_span_per_run_and_metrics_for_runs_retries_and_drift(
    monkeypatch: pytest.MonkeyPatch, spans: InMemorySpanExporter
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from genfan import telemetry

    exporter = spans
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    # A local meter provider (the global one can be set once per process).
    monkeypatch.setattr(telemetry, "get_meter", lambda: meter_provider.get_meter("t"))
    instruments = telemetry._Instruments()
    monkeypatch.setattr(telemetry, "instruments", lambda: instruments)

    async with scheduler() as s:
        job = rec(s, fail=1)
        await s.add_schedule(
            job,
            DateTrigger(at=T0 + timedelta(seconds=3)),
            id="m",
            policy=SchedulePolicy(
                retry=RetryPolicy(attempts=2, initial=1, max_delay=300, jitter="none")
            ),
        )
        await anyio.sleep(10)

    (span,) = [sp for sp in exporter.get_finished_spans() if sp.name == "genfan.schedule.run"]
    attrs = dict(span.attributes or {})
    assert attrs["genfan.schedule.id"] == "m"
    assert attrs["genfan.schedule.outcome"] == "succeeded"
    assert attrs["genfan.schedule.attempts"] == 2
    assert attrs["genfan.schedule.drift"] == 0.0
    data = reader.get_metrics_data()
    points: dict[str, list[Any]] = {}
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    outcomes = {
        p.attributes["genfan.schedule.outcome"]: p.value for p in points["genfan.schedule.runs"]
    }
    assert outcomes == {"retry": 1, "succeeded": 1}
    (drift,) = points["genfan.schedule.drift"]
    assert drift.count == 1 and drift.sum == 0.0


@pytest.mark.anyio
@pytest.mark.parametrize("coalesce", ["earliest", "latest", "all"])
async def test_a_month_of_downtime_on_a_per_second_cron_is_caught_up_quickly(
    coalesce: str,
) -> None:
    start = T0 + timedelta(days=31)
    async with scheduler(start=start) as s:
        job = rec(s)
        await s.add_schedule(
            job,
            CronTrigger(expr="* * * * * *", start=T0),
            id="sec",
            policy=SchedulePolicy(
                coalesce=coalesce,  # type: ignore[arg-type]
                misfire_grace_time=2 if coalesce == "all" else None,
                overlap="allow",
            ),
        )
        await anyio.sleep(1.5)
    late = 31 * 86400
    if coalesce == "earliest":
        assert sorted(job.fires) == [0, late + 1]
    elif coalesce == "latest":
        assert sorted(job.fires) == [late, late + 1]
    else:  # a grace time of 2 s keeps only the last fire times
        assert sorted(job.fires) == [late - 2, late - 1, late, late + 1]


@pytest.mark.anyio
async def test_stopping_during_a_retry_wait_hands_the_run_back_with_the_attempt_counted() -> None:
    # A deadline around the scheduler (it stops at 20 s) cuts the 60 s wait before attempt 2
    # short: the run goes back to pending for the next scheduler, its failed attempt counted,
    # instead of being recorded as failed.
    store = SQLiteStore(":memory:", threads=False)
    clock = AnyioClock(start=T0)
    job = Recorder(clock, fail=1)
    with capture_events() as events, anyio.move_on_after(20):
        async with Scheduler(store, clock=clock, poll_interval=None) as s:
            await s.add_schedule(
                job,
                DateTrigger(at=T0),
                id="r",
                policy=SchedulePolicy(
                    retry=RetryPolicy(attempts=3, initial=60, max_delay=300, jitter="none")
                ),
            )
            await anyio.sleep_forever()
    (run,) = await store.history("r")
    await store.aclose()
    assert job.calls == [(0, 0, 1)]
    assert run.status == "pending" and run.attempts == 1 and run.owner is None
    retries = [e for e in events if e["event"] == "schedule_run_retry"]
    assert [(e["attempt"], e["delay"]) for e in retries] == [(1, 60)]


# -- leases lost, fencing tokens, drift at the job's start ----------------------------------------

_tokens: list[tuple[int | None, float]] = []


async def fenced_job(context: RunContext) -> None:
    """The first call (the replica that will lose its lease) runs on for 60 s, deaf to
    cancellation, as a job blocked in a thread would; later calls return at once."""
    _tokens.append((context.fencing_token, 0))
    if len(_tokens) == 1:
        with anyio.CancelScope(shield=True):
            await anyio.sleep(60)


def _frozen_until(s: Scheduler, method: str, until: datetime, *, since: float = 0) -> None:
    """``s``'s store answers ``method``, called ``since`` seconds in or later, only from
    ``until`` on (a replica cut off from the store, or frozen)."""
    real = getattr(s.store, method)

    async def late(*args: Any, **kwargs: Any) -> Any:
        if s.clock.now() >= T0 + timedelta(seconds=since):
            await s.clock.sleep_until(until)
        return await real(*args, **kwargs)

    setattr(s.store, method, late)


@pytest.mark.anyio
async def test_a_result_from_a_replica_that_lost_its_lease_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    clock = AnyioClock(start=T0)
    _tokens.clear()
    with capture_events() as events:
        async with scheduler(db, clock=clock, identity="a", lease_time=30, poll_interval=5) as a:
            # After its first claim, a cannot renew its lease nor claim before 1000 s (cut off
            # from the store, as by a partition).
            _frozen_until(a, "renew", T0 + timedelta(seconds=1000))
            _frozen_until(a, "cycle", T0 + timedelta(seconds=1000), since=0.5)
            await a.add_schedule(
                "tests.test_schedule_scheduler:fenced_job",
                DateTrigger(at=T0),
                id="x",
                policy=SchedulePolicy(retry=RetryPolicy(attempts=2)),
            )
            await anyio.sleep(0.25)  # a claims the run and starts it
            async with scheduler(
                db, clock=clock, identity="b", lease_time=30, poll_interval=5
            ) as b:
                await anyio.sleep(100)
                (run,) = await b.history("x")
    first, second = (t for t, _ in _tokens)
    assert first is not None and second is not None and second > first
    # b took the run over at 45 s (lease 30 s, confirmed 15 s later) and its result counts.
    assert (run.status, run.owner, run.fencing_token) == ("succeeded", "b", second)
    assert run.ended == T0 + timedelta(seconds=45)
    # a's job ended at 60 s: the store refused its result, and a said so, as a warning.
    (refused,) = [e for e in events if e["event"] == "schedule_run_refused"]
    assert refused["log_level"] == "warning" and refused["token"] == first
    finished = [e for e in events if e["event"] == "schedule_run_finished"]
    assert [(e["token"], e["outcome"]) for e in finished] == [(second, "succeeded")]


@pytest.mark.anyio
async def test_a_replica_never_starts_a_run_after_losing_its_lease(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    clock = AnyioClock(start=T0)
    _tokens.clear()
    with capture_events() as events:
        async with scheduler(db, clock=clock, identity="a", lease_time=30, poll_interval=5) as a:
            # a claims the run at 0 and freezes before it starts the job, until 50 s.
            frozen = T0 + timedelta(seconds=50)
            _frozen_until(a, "renew", frozen)
            _frozen_until(a, "last_success", frozen)
            _frozen_until(a, "cycle", frozen, since=0.5)
            _tokens.append((None, 0))  # (so that no call of the job blocks)
            await a.add_schedule(
                "tests.test_schedule_scheduler:fenced_job",
                DateTrigger(at=T0),
                id="x",
                policy=SchedulePolicy(retry=RetryPolicy(attempts=2)),
            )
            await anyio.sleep(0.25)  # a has claimed the run
            async with scheduler(
                db, clock=clock, identity="b", lease_time=30, poll_interval=5
            ) as b:
                await anyio.sleep(100)
                (run,) = await b.history("x")
    # Only b ran it (at 45 s); at 50 s a checked its lease, found it lost, and did not start.
    assert [t for t, _ in _tokens[1:]] == [run.fencing_token]
    assert (run.status, run.owner, run.attempts) == ("succeeded", "b", 2)
    (lost,) = [e for e in events if e["event"] == "schedule_lease_lost"]
    assert lost["identity"] == "a" and lost["started"] is False
    assert lost["log_level"] == "warning"


@pytest.mark.anyio
async def test_every_run_gets_a_larger_fencing_token() -> None:
    seen: dict[str, list[int]] = {"t": [], "u": []}

    async def job(context: RunContext) -> None:
        assert context.fencing_token is not None
        seen[context.schedule_id].append(context.fencing_token)

    async with scheduler() as s:
        await s.add_schedule(job, IntervalTrigger(seconds=10), id="t")
        await s.add_schedule(job, IntervalTrigger(seconds=15), id="u")
        await anyio.sleep(95)
        runs = await s.history(limit=100)
    assert (len(seen["t"]), len(seen["u"])) == (10, 7)
    for tokens in seen.values():  # strictly increasing per schedule
        assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    assert len(set(seen["t"]) | set(seen["u"])) == 17  # (one counter for the store)
    assert sorted(r.fencing_token or 0 for r in runs) == sorted(seen["t"] + seen["u"])


@pytest.mark.anyio
async def test_drift_is_measured_at_the_jobs_real_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from genfan import telemetry

    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    monkeypatch.setattr(telemetry, "get_meter", lambda: meter_provider.get_meter("t"))
    instruments = telemetry._Instruments()
    monkeypatch.setattr(telemetry, "instruments", lambda: instruments)
    async with scheduler() as s:
        job = rec(s)
        # Reading the last success (the job takes a context) takes 2.5 s: the job starts late.
        _frozen_until(s, "last_success", T0 + timedelta(seconds=12.5))
        await s.add_schedule(job, DateTrigger(at=T0 + timedelta(seconds=10)), id="d")
        await anyio.sleep(20)
        (run,) = await s.history("d")
    assert job.starts == [12.5]
    assert run.drift == 2.5 and run.started == T0 + timedelta(seconds=12.5)
    data = reader.get_metrics_data()
    drifts = [
        p
        for rm in (data.resource_metrics if data else [])
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "genfan.schedule.drift"
        for p in m.data.data_points
    ]
    assert [(p.count, p.sum) for p in drifts] == [(1, 2.5)]


@pytest.mark.anyio
async def test_one_replica_never_takes_a_run_over_from_itself() -> None:
    # Its renewals are late (cut for 1000 s), so its lease expires while the job still runs:
    # its own claims renew the run instead of taking it over and starting it a second time.
    with capture_events() as events:
        async with scheduler(lease_time=30, poll_interval=5) as s:
            job = rec(s, duration=100)
            _frozen_until(s, "renew", T0 + timedelta(seconds=1000))
            await s.add_schedule(
                job,
                DateTrigger(at=T0),
                id="x",
                policy=SchedulePolicy(retry=RetryPolicy(attempts=3)),
            )
            await anyio.sleep(150)
            (run,) = await s.history("x")
    assert job.calls == [(0, 0, 1)]
    assert (run.status, run.attempts) == ("succeeded", 1)
    assert not [
        e for e in events if e["event"] in ("schedule_run_reclaimed", "schedule_lease_lost")
    ]
