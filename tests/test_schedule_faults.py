"""Fault injection: three real replica processes per store, a replica SIGKILLed, one SIGSTOPped
past its lease, and the store stalled past the lease time; dead PostgreSQL connections; a sync
job that must be stopped.

The replica scenarios are ``benchmarks/schedule_faults.py``'s (which gives docs/benchmarks.md its
figures), kept short here: a 2 s lease, ten schedules firing every second, about 30 s a store.
Every fire time is counted from the job's own log and the run history: none may run twice while
its replica was alive, no replica may start a run after losing its lease or have its result
recorded, and none may be lost without a history row that says why.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from benchmarks.schedule_faults import Result, _stall, run_scenario
from genfan.schedule import (
    IntervalTrigger,
    PostgresStore,
    RunContext,
    SchedulePolicy,
    Scheduler,
    SQLiteStore,
)
from genfan.testing import capture_events
from tests._services import port_open, require_service

pytestmark = pytest.mark.faults

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def _pg() -> None:
    require_service("PostgreSQL", port_open("127.0.0.1", 5432), "nothing listens on 127.0.0.1:5432")


def _check(r: Result) -> None:
    detail = "\n".join([*r.timeline, *r.problems[:20]])
    assert not [p for p in r.problems if p.startswith(("replica", "the store could not"))], detail
    assert r.fires_expected >= 150, detail
    assert r.duplicates_while_alive == 0, detail
    assert r.stale_starts == 0, detail
    assert r.stale_results == 0, detail
    assert r.lost == 0, detail
    # The killed replica exits by SIGKILL; the frozen one, continued, stops cleanly.
    assert sorted(r.exit_codes) == [-9, 0, 0], detail


@pytest.mark.postgres
def test_a_stall_that_postgres_ends_in_a_deadlock_takes_its_locks_again() -> None:
    """The stall locks both tables; a transaction that holds one and then waits for the other
    (as a replica's may) is a deadlock, and PostgreSQL ends the side that waited first: the
    stall. It takes the locks again, so a run never passes as stalled when it was not."""
    _pg()
    import threading

    import psycopg

    schema = f"genfan_stall_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_DSN, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        admin.execute(f"CREATE TABLE {schema}.runs (id int)")
        admin.execute(f"CREATE TABLE {schema}.schedules (id int)")
    try:
        holder_done = threading.Event()

        def replica_like() -> None:
            # holds schedules, then (once the stall holds runs and waits) asks for runs
            with psycopg.connect(PG_DSN) as conn, conn.transaction():
                conn.execute(f"LOCK TABLE {schema}.schedules IN SHARE MODE")
                time.sleep(0.5)
                conn.execute(f"LOCK TABLE {schema}.runs IN SHARE MODE")
            holder_done.set()

        holder = threading.Thread(target=replica_like)
        holder.start()
        time.sleep(0.1)
        began = _stall(f"{PG_DSN}?schema={schema}", 0.5)
        holder.join(30)
        assert holder_done.is_set()  # the replica-like side finished: it was not the victim
        assert time.time() - began >= 0.5  # and the stall was then held as long as asked
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_three_replicas_under_a_stall_a_freeze_and_a_kill(store: str, tmp_path: Path) -> None:
    if store == "postgres":
        _pg()
    r = run_scenario(
        store, ("stall", "stop", "kill"), tmp=tmp_path, schedules=10, lease=2.0, seconds=20
    )
    _check(r)


# -- a kept connection pool: connections the server drops are replaced ---------------------------

_ticks: list[datetime] = []


async def tick(context: RunContext) -> None:
    _ticks.append(context.fire_time)


@pytest.mark.postgres
@pytest.mark.anyio
async def test_scheduler_carries_on_when_the_server_kills_its_connections() -> None:
    _pg()
    import psycopg

    app = f"genfan_kill_{uuid.uuid4().hex[:8]}"
    schema = f"genfan_t_{uuid.uuid4().hex[:10]}"
    store = PostgresStore(f"{PG_DSN}?application_name={app}", schema=schema, pool_size=2)
    _ticks.clear()
    killed = 0

    def kill_all() -> int:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                (app,),
            ).fetchall()
        return len(rows)

    try:
        with capture_events() as events:
            async with Scheduler(store, poll_interval=0.05, lease_time=3) as s:
                await s.add_schedule(
                    "tests.test_schedule_faults:tick",
                    IntervalTrigger(seconds=0.1),
                    id="tick",
                    policy=SchedulePolicy(overlap="allow"),
                )
                for _ in range(3):  # mid-run, idle and busy connections alike
                    await anyio.sleep(1.2)
                    killed += await anyio.to_thread.run_sync(kill_all)
                cut = datetime.now(UTC)
                await anyio.sleep(2.0)
                runs = await s.history("tick", limit=1000)
    finally:
        await store.drop()
        await store.aclose()
    assert killed >= 3
    after = [t for t in _ticks if t > cut]
    assert len(after) >= 5, "the scheduler stopped running jobs after its connections died"
    assert all(r.status in ("succeeded", "pending", "running") for r in runs)
    assert len({r.fire_time for r in runs if r.status == "succeeded"}) == len(
        [r for r in runs if r.status == "succeeded"]
    )
    # Dead connections were replaced, not handed out again: nothing failed for good.
    assert not [e for e in events if e["event"] == "schedule_store_unavailable"]


# -- a hard timeout: a sync job in a process that is killed --------------------------------------


def stubborn(path: str, seconds: float) -> None:
    """A sync job that writes its pid, ignores everything for ``seconds``, then writes
    ``path``."""
    Path(path + ".pid").write_text(str(os.getpid()))
    time.sleep(seconds)
    Path(path).write_text("finished")


async def _until(s: Scheduler, sid: str, status: str) -> None:
    """Wait (20 s at most) until the schedule's run has ended with ``status``."""
    for _ in range(400):
        if [r for r in await s.history(sid) if r.status == status]:
            return
        await anyio.sleep(0.05)
    raise AssertionError(f"no {status} run of {sid} after 20 s")


@pytest.mark.anyio
async def test_a_timed_out_sync_job_in_a_process_is_killed(tmp_path: Path) -> None:
    marker = tmp_path / "finished"
    store = SQLiteStore(tmp_path / "s.db")
    async with Scheduler(store, poll_interval=0.05) as s:
        await s.add_schedule(
            "tests.test_schedule_faults:stubborn",
            IntervalTrigger(hours=1, start=datetime.now(UTC)),
            id="slow",
            kwargs={"path": str(marker), "seconds": 4.0},
            policy=SchedulePolicy(timeout=1.0, isolation="process"),
        )
        await _until(s, "slow", "timeout")
        (run,) = await s.history("slow")
    await store.aclose()
    assert run.status == "timeout" and "longer than 1.0s" in (run.error or "")
    assert run.ended is not None and run.started is not None
    assert (run.ended - run.started) < timedelta(seconds=3.5)  # not the job's 4 s
    pid = int(await anyio.Path(f"{marker}.pid").read_text())
    with pytest.raises(ProcessLookupError):  # the job's process is gone
        os.kill(pid, 0)
    await anyio.sleep(
        max(0.0, (run.started + timedelta(seconds=4.5) - datetime.now(UTC)).total_seconds())
    )
    assert not marker.exists()  # past the job's own end: it was killed, it never got there


@pytest.mark.anyio
async def test_a_job_in_a_process_reports_its_error_and_gets_its_context(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    out = tmp_path / "ctx.txt"
    async with Scheduler(store, poll_interval=0.05) as s:
        await s.add_schedule(
            "tests.test_schedule_faults:write_context",
            IntervalTrigger(hours=1, start=datetime.now(UTC)),
            id="ctx",
            kwargs={"path": str(out)},
            policy=SchedulePolicy(isolation="process"),
        )
        await _until(s, "ctx", "failed")
        (run,) = await s.history("ctx")
    await store.aclose()
    # The job ran in another process, with its context, and its error came back as it was.
    pid, token, key = out.read_text().split()
    assert int(pid) != os.getpid()
    assert int(token) == run.fencing_token
    assert key == f"ctx@{run.fire_time.isoformat()}"
    assert run.error == "ValueError: the job failed on purpose"


def write_context(path: str, context: RunContext) -> None:
    Path(path).write_text(f"{os.getpid()} {context.fencing_token} {context.idempotency_key}")
    raise ValueError("the job failed on purpose")
