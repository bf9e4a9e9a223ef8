"""Both stores under the real clock (asyncio and trio): claims, history, the store URL."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from genfan import ConfigurationError
from genfan.resilience import RetryPolicy
from genfan.schedule import (
    DateTrigger,
    IntervalTrigger,
    PostgresStore,
    RunContext,
    RunRecord,
    ScheduleInfo,
    SchedulePolicy,
    Scheduler,
    SQLiteStore,
    Store,
    store_from_url,
)
from tests._services import port_open, require_service

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"

_seen: list[tuple[str, datetime]] = []


async def record(context: RunContext) -> None:
    _seen.append((context.schedule_id, context.fire_time))


def _pg_available() -> None:
    require_service("PostgreSQL", port_open("127.0.0.1", 5432), "nothing listens on 127.0.0.1:5432")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s: Store = SQLiteStore(tmp_path / "s.db")
        yield s
        await s.aclose()
        return
    _pg_available()
    pg = PostgresStore(PG_DSN, schema=f"genfan_t_{uuid.uuid4().hex[:10]}")
    try:
        yield pg
    finally:
        await pg.drop()
        await pg.aclose()


def _twin(store: Store, tmp_path: Path) -> Store:
    """A second connection to the same store (another replica)."""
    if isinstance(store, PostgresStore):
        return PostgresStore(PG_DSN, schema=store.schema)
    return SQLiteStore(tmp_path / "s.db")


@pytest.mark.anyio
async def test_three_workers_two_due_runs_the_third_gets_nothing(
    store: Store, tmp_path: Path
) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    job = {"kind": "call", "func": "os:getpid", "args": [], "kwargs": {}}
    for sid in ("a", "b"):
        await store.put_schedule(
            id=sid, trigger=DateTrigger(at=now), job=job, policy=SchedulePolicy(), now=now
        )
    replicas = [store, _twin(store, tmp_path), _twin(store, tmp_path)]
    claimed: dict[str, list[str]] = {}

    async def worker(i: int, s: Store) -> None:
        await s.process_due(now)
        res = await s.claim(f"w{i}", now, 30, 10)
        claimed[f"w{i}"] = [c.run.schedule_id for c in res.claimed]

    async with anyio.create_task_group() as tg:
        for i, s in enumerate(replicas):
            tg.start_soon(worker, i, s)
    for s in replicas[1:]:
        await s.aclose()
    got = sorted(x for v in claimed.values() for x in v)
    assert got == ["a", "b"]  # each run claimed exactly once across the three workers
    runs = await store.history()
    assert sorted((r.schedule_id, r.status, r.attempts) for r in runs) == [
        ("a", "running", 1),
        ("b", "running", 1),
    ]


@pytest.mark.anyio
async def test_schedule_crud_history_and_heartbeat(store: Store) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    job = {"kind": "call", "func": "os:getpid", "args": [], "kwargs": {}}
    info = await store.put_schedule(
        id="x", trigger=IntervalTrigger(minutes=1), job=job, policy=SchedulePolicy(), now=now
    )
    assert info.next_fire == now and not info.paused
    assert [s.id for s in await store.list_schedules()] == ["x"]
    assert await store.pause("x")
    assert (await store.process_due(now + timedelta(minutes=5))).created == 0
    assert await store.resume("x", now + timedelta(minutes=5, seconds=30))
    resumed = await store.get_schedule("x")
    assert resumed is not None and resumed.next_fire == now + timedelta(minutes=6)
    due = await store.process_due(now + timedelta(minutes=6))
    assert due.created == 1
    (claim,) = (await store.claim("me", now + timedelta(minutes=6), 30, 5)).claimed
    hb = await store.heartbeat("me", now + timedelta(minutes=6, seconds=10), 30)
    assert hb.held == {claim.run.key} and not hb.cancel
    token = claim.run.fencing_token
    assert token is not None
    # A result under another claim's token is refused (that claim lost the run).
    assert not await store.finish(claim.run.key, "me", "succeeded", now, None, 1, token=token - 1)
    done_at = now + timedelta(minutes=6, seconds=1)
    started = now + timedelta(minutes=6)  # the job's real start, written with its outcome
    assert await store.finish(
        claim.run.key, "me", "succeeded", done_at, None, 1, token=token, started=started
    )
    # The same outcome again (a retried transaction whose commit went through): not refused.
    assert await store.finish(claim.run.key, "me", "succeeded", done_at, None, 1, token=token)
    assert not await store.finish(claim.run.key, "me", "failed", now, "late", 1)  # not running
    last = await store.last_success("x")
    assert last is not None and last.fire_time == now + timedelta(minutes=6)
    assert last.drift == 0.0 and last.owner == "me"
    assert await store.remove_schedule("x")
    assert await store.get_schedule("x") is None
    assert len(await store.history("x")) == 1  # history outlives the schedule


@pytest.mark.anyio
async def test_scheduler_end_to_end_on_the_real_clock(store: Store) -> None:
    _seen.clear()
    async with Scheduler(store, poll_interval=0.2, lease_time=5) as s:
        info = await s.add_schedule(
            "tests.test_schedule_store:record", IntervalTrigger(seconds=0.2), id="tick"
        )
        await anyio.sleep(1.1)
    fires = sorted(f for sid, f in _seen if sid == "tick")
    assert len(fires) >= 3
    assert len(set(fires)) == len(fires)
    assert fires[0] == info.next_fire
    assert all(
        (b - a) % timedelta(seconds=0.2) == timedelta(0) for a, b in itertools.pairwise(fires)
    )
    done = await store.history("tick", statuses=["succeeded"])
    assert len(done) == len(fires)


@pytest.mark.anyio
async def test_sync_job_by_import_path_with_args(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    async with Scheduler(SQLiteStore(tmp_path / "s.db"), poll_interval=0.05) as s:
        info = await s.add_schedule(
            "pathlib:Path.touch", DateTrigger(delay="0.1s"), args=[str(out)]
        )
        assert info.id == "pathlib:Path.touch"
        with anyio.fail_after(10):
            while not (await s.history(info.id, statuses=["succeeded"])):  # noqa: ASYNC110
                await anyio.sleep(0.05)
    assert out.exists()


_JOB = {"kind": "call", "func": "os:getpid", "args": [], "kwargs": {}}
_T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _at(seconds: float) -> datetime:
    return _T0 + timedelta(seconds=seconds)


@pytest.mark.anyio
async def test_a_re_added_delay_trigger_keeps_its_fire_time_across_restarts(
    store: Store, tmp_path: Path
) -> None:
    async def add(s: Store, delay: str, now: datetime) -> ScheduleInfo:
        return await s.put_schedule(
            id="once", trigger=DateTrigger(delay=delay), job=_JOB, policy=SchedulePolicy(), now=now
        )

    first = await add(store, "10m", _T0)
    assert first.next_fire == _at(600)
    # A restarted process (a fresh store on the same database) re-adds it before the fire.
    restarted = _twin(store, tmp_path)
    try:
        again = await add(restarted, "10m", _at(300))
        assert again.next_fire == _at(600) and again.trigger == first.trigger
        assert (await restarted.process_due(_at(600))).created == 1
        (claim,) = (await restarted.claim("a", _at(600), 30, 5)).claimed
        assert await restarted.finish(claim.run.key, "a", "succeeded", _at(601), None, 1)
    finally:
        await restarted.aclose()
    # Re-added after it fired: it stays done.
    done = await add(store, "10m", _at(900))
    assert done.next_fire is None and done.last_fire == _at(600)
    assert (await store.process_due(_at(100_000))).created == 0
    assert [(r.fire_time, r.status) for r in await store.history("once")] == [
        (_at(600), "succeeded")
    ]
    # A different delay is a changed trigger: bound anew, from now.
    changed = await add(store, "20m", _at(1000))
    assert changed.next_fire == _at(2200)
    assert (await add(store, "20m", _at(1500))).next_fire == _at(2200)


@pytest.mark.anyio
async def test_delay_rows_stored_before_bound_delay_existed_keep_their_time(store: Store) -> None:
    async def add(sid: str, trigger: DateTrigger, now: datetime) -> ScheduleInfo:
        return await store.put_schedule(
            id=sid, trigger=trigger, job=_JOB, policy=SchedulePolicy(), now=now
        )

    # Earlier versions stored a bound delay as a plain ``at``: the time added plus the delay.
    await add("legacy", DateTrigger(at=_at(600)), _T0)
    assert (await add("legacy", DateTrigger(delay=600), _at(300))).next_fire == _at(600)
    # A schedule whose ``at`` is some other time, switched to a delay, is bound from now.
    await add("switched", DateTrigger(at=_at(5000)), _T0)
    assert (await add("switched", DateTrigger(delay=600), _at(300))).next_fire == _at(900)


def test_store_from_url(tmp_path: Path) -> None:
    s = store_from_url(f"sqlite:///{tmp_path}/a.db")
    assert isinstance(s, SQLiteStore) and s.path == f"{tmp_path}/a.db"
    rel = store_from_url("sqlite:///rel.db")
    assert isinstance(rel, SQLiteStore) and rel.path == "rel.db"
    plain = store_from_url(tmp_path / "b.db")
    assert isinstance(plain, SQLiteStore)
    pg = store_from_url("postgresql://user:secret@db.example/app?schema=jobs&sslmode=require")
    assert isinstance(pg, PostgresStore) and pg.schema == "jobs"
    assert "schema" not in pg.dsn and "sslmode=require" in pg.dsn
    assert "secret" not in repr(pg)
    with pytest.raises(ConfigurationError, match="unknown store URL"):
        store_from_url("redis://x")
    with pytest.raises(ConfigurationError, match="schema"):
        PostgresStore(PG_DSN, schema="bad-name;drop")


async def _finish_next(store: Store, now: datetime, status: str) -> None:
    """Create and claim what is due at ``now``, and record ``status`` for it."""
    await store.process_due(now)
    (claim,) = (await store.claim("w", now, 30, 10)).claimed
    assert await store.finish(claim.run.key, "w", status, now, None, 1)  # type: ignore[arg-type]


def _minutes(runs: list[RunRecord]) -> list[tuple[float, str]]:
    return sorted(((r.fire_time - _T0).total_seconds() / 60, r.status) for r in runs)


@pytest.mark.anyio
async def test_history_limits_prune_each_schedule_after_a_run_is_recorded(store: Store) -> None:
    every_minute = IntervalTrigger(minutes=1, start=_T0)
    limited = SchedulePolicy(overlap="allow", keep_succeeded=2, keep_failed=1)
    await store.put_schedule(id="lim", trigger=every_minute, job=_JOB, policy=limited, now=_T0)
    await store.put_schedule(
        id="all", trigger=every_minute, job=_JOB, policy=SchedulePolicy(overlap="allow"), now=_T0
    )
    outcomes = ["succeeded", "failed", "succeeded", "timeout", "succeeded", "succeeded"]
    for minute, status in enumerate(outcomes):
        now = _at(60 * minute)
        await store.process_due(now)
        res = await store.claim("w", now, 30, 10)
        assert len(res.claimed) == 2
        assert await store.finish_many(
            "w",
            [(c.run.key, status, now, None, 1) for c in res.claimed],  # type: ignore[misc]
        ) == [True, True]
    # The newest 2 successes and the newest other outcome (timeout counts as failed) stay.
    assert _minutes(await store.history("lim")) == [
        (3, "timeout"),
        (4, "succeeded"),
        (5, "succeeded"),
    ]
    # Without limits (the default) every run stays, as it always has.
    assert len(await store.history("all")) == len(outcomes)
    assert await store.pause("all")
    # A run still going is never pruned, however many are kept.
    await store.process_due(_at(360))
    await store.claim("w", _at(360), 3600, 1)
    await _finish_next(store, _at(420), "failed")
    assert _minutes(await store.history("lim")) == [
        (4, "succeeded"),
        (5, "succeeded"),
        (6, "running"),
        (7, "failed"),
    ]


@pytest.mark.anyio
async def test_history_limits_also_prune_runs_skipped_when_claimed(store: Store) -> None:
    policy = SchedulePolicy(overlap="skip", keep_failed=0, keep_succeeded=1)
    await store.put_schedule(
        id="s", trigger=IntervalTrigger(minutes=1, start=_T0), job=_JOB, policy=policy, now=_T0
    )
    await store.process_due(_T0)
    (running,) = (await store.claim("w", _T0, 3600, 10)).claimed
    for minute in (1, 2, 3):
        await store.process_due(_at(60 * minute))
        res = await store.claim("w", _at(60 * minute), 3600, 10)
        assert [r.status for r in res.ended] == ["skipped"]  # reported, then pruned
    assert _minutes(await store.history("s")) == [(0, "running")]
    assert await store.finish(running.run.key, "w", "succeeded", _at(200), None, 1)
    await _finish_next(store, _at(240), "succeeded")
    assert _minutes(await store.history("s")) == [(4, "succeeded")]


def test_history_limits_are_validated_and_stored_only_when_set() -> None:
    with pytest.raises(ConfigurationError, match="keep_succeeded must be an int >= 1"):
        SchedulePolicy(keep_succeeded=0)
    with pytest.raises(ConfigurationError, match="keep_failed must be an int >= 0"):
        SchedulePolicy(keep_failed=-1)
    with pytest.raises(ConfigurationError, match="keep_failed"):
        SchedulePolicy(keep_failed=True)  # type: ignore[arg-type]
    assert "keep_succeeded" not in SchedulePolicy().to_dict()
    kept = SchedulePolicy(keep_succeeded=3, keep_failed=0)
    assert SchedulePolicy.from_dict(kept.to_dict()) == kept
    assert SchedulePolicy.from_dict(SchedulePolicy().to_dict()) == SchedulePolicy()


def test_the_retry_policy_round_trips_through_the_stored_form() -> None:
    policy = SchedulePolicy(
        retry=RetryPolicy(attempts=4, initial=2, multiplier=3, max_delay=50, jitter="full")
    )
    stored = json.loads(json.dumps(policy.to_dict(), sort_keys=True))
    assert stored["retry"] == {
        "attempts": 4,
        "initial": 2,
        "multiplier": 3,
        "max_delay": 50,
        "jitter": "full",
    }
    assert SchedulePolicy.from_dict(stored) == policy
    # The default (no jitter) is left out, so replicas of an older genfan read the policy.
    assert SchedulePolicy().to_dict()["retry"] == {
        "attempts": 1,
        "initial": 1.0,
        "multiplier": 2.0,
        "max_delay": 300.0,
    }
    # Stored by an older genfan, which allowed an initial wait above max_delay (it waited
    # max_delay): read, and it still waits max_delay.
    old = SchedulePolicy.from_dict({"retry": {"attempts": 3, "initial": 5, "max_delay": 1}})
    assert old.retry.base_delay(1) == old.retry.base_delay(2) == 1
    # What a schedule does not store is the same for every schedule.
    retry = SchedulePolicy(retry=RetryPolicy(attempts=3)).retry
    assert (retry.retry_on, retry.budget, retry.respect_retry_after) == ((Exception,), None, False)
    with pytest.raises(ConfigurationError, match="invalid schedule policy"):
        SchedulePolicy.from_dict({"retry": {"attempts": 2, "budget": 1}})


@pytest.mark.anyio
async def test_replicas_backfilling_the_same_window_queue_each_fire_time_once(
    store: Store, tmp_path: Path
) -> None:
    now = _at(86400)
    await store.put_schedule(
        id="b",
        trigger=IntervalTrigger(hours=1, start=_T0),
        job=_JOB,
        policy=SchedulePolicy(),
        now=now,
        paused=True,
    )
    replicas = [store, _twin(store, tmp_path), _twin(store, tmp_path)]
    results = []

    async def backfill(s: Store) -> None:
        results.append(await s.backfill("b", start=_T0, end=_at(12 * 3600), now=now))

    async with anyio.create_task_group() as tg:
        for s in replicas:
            tg.start_soon(backfill, s)
    for s in replicas[1:]:
        await s.aclose()
    fires = [_at(3600 * h) for h in range(12)]
    assert all(r.fire_times == tuple(fires) for r in results)
    queued = sorted(f for r in results for f in r.queued)
    assert queued == fires  # each fire time queued by exactly one replica
    assert all(sorted(r.queued + r.existing) == fires for r in results)
    runs = await store.history("b")
    assert sorted(r.fire_time for r in runs) == fires
    assert all(r.status == "pending" and r.backfill and r.run_at == now for r in runs)
    # Claimed like any run (the misfire grace time does not apply), oldest fire time first.
    claims = (await store.claim("w", now, 30, 100)).claimed
    assert [c.run.fire_time for c in claims] == [_T0]  # overlap=skip: the rest are skipped


_OLD_DDL = [
    "CREATE TABLE {S} (id TEXT PRIMARY KEY, trigger TEXT NOT NULL, job TEXT NOT NULL,"
    " policy TEXT NOT NULL, paused INTEGER NOT NULL DEFAULT 0, next_fire BIGINT,"
    " last_fire BIGINT, created BIGINT NOT NULL)",
    "CREATE TABLE {R} (schedule_id TEXT NOT NULL, fire_time BIGINT NOT NULL,"
    " run_at BIGINT NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
    " owner TEXT, lease_until BIGINT, started BIGINT, ended BIGINT, error TEXT,"
    " manual INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0,"
    " PRIMARY KEY (schedule_id, fire_time))",
    "INSERT INTO {R} (schedule_id, fire_time, run_at, status) VALUES ('old', 0, 0, 'succeeded')",
]


@pytest.mark.anyio
async def test_tables_of_an_earlier_version_get_the_backfill_columns(
    store: Store, tmp_path: Path
) -> None:
    if isinstance(store, PostgresStore):
        import psycopg

        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {store.schema}")
            for stmt in _OLD_DDL:
                conn.execute(stmt.format(S=f"{store.schema}.schedules", R=f"{store.schema}.runs"))
    else:
        import sqlite3

        with sqlite3.connect(tmp_path / "s.db") as conn:
            for stmt in _OLD_DDL:
                conn.execute(stmt.format(S="schedules", R="runs"))
        conn.close()
    (old,) = await store.history()
    assert (old.schedule_id, old.status, old.backfill) == ("old", "succeeded", False)
    await store.put_schedule(
        id="b",
        trigger=IntervalTrigger(hours=1, start=_T0),
        job=_JOB,
        policy=SchedulePolicy(),
        now=_at(7200),
    )
    done = await store.backfill("b", start=_T0, end=_at(7200), now=_at(7200), overlap="allow")
    assert done.queued == (_T0, _at(3600))
    await store.process_due(_at(7200))
    claims = (await store.claim("w", _at(7200), 30, 10)).claimed
    # The schedule's own run first, then the backfill's (overlap=allow: beside it).
    assert [(c.run.fire_time, c.run.backfill) for c in claims] == [
        (_at(7200), False),
        (_T0, True),
        (_at(3600), True),
    ]
    again = _twin(store, tmp_path)
    await again.setup()  # setting up again finds the columns there
    await again.aclose()
