"""Where schedules and run history live: one store interface, SQLite and PostgreSQL behind it.

Every (schedule, fire time) is one row of the ``runs`` table (its primary key), created once by
whichever replica processes the schedule first. A replica *claims* a due run inside one
transaction (SQLite: ``BEGIN IMMEDIATE`` on the file; PostgreSQL: ``FOR UPDATE SKIP LOCKED``)
and holds it with a lease it renews while the run goes on. A replica that dies stops renewing;
once the lease has expired, another replica takes the run over and retries it if the schedule's
retry policy has attempts left. So a fire time runs exactly once while replicas stay alive, and
at least once (per policy) when one dies mid-run: make jobs idempotent.

Both stores use blocking drivers (stdlib ``sqlite3``, psycopg 3's sync API, which unlike its
async API works under trio) in worker threads through ``anyio.to_thread``.
"""

from __future__ import annotations

import hashlib
import json
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio

from .._errors import ConfigurationError, MissingExtraError
from ._policy import _OVERLAP, Overlap, SchedulePolicy
from ._triggers import DateTrigger, IntervalTrigger, Trigger, from_us, to_us, trigger_from_dict

__all__ = [
    "BackfillResult",
    "Claim",
    "PostgresStore",
    "RunKey",
    "RunRecord",
    "RunStatus",
    "SQLiteStore",
    "ScheduleInfo",
    "Store",
    "store_from_url",
]

T = TypeVar("T")

#: ``pending`` and ``running`` are live; the rest are final outcomes.
RunStatus = Literal[
    "pending", "running", "succeeded", "failed", "timeout", "cancelled", "skipped", "missed"
]
FINAL = ("succeeded", "failed", "timeout", "cancelled", "skipped", "missed")
#: The outcomes ``SchedulePolicy.keep_failed`` limits: every final one but ``succeeded``.
NOT_SUCCEEDED = FINAL[1:]
#: (schedule id, fire time in epoch microseconds)
RunKey = tuple[str, int]
Conflict = Literal["replace", "keep", "error"]

_ONE_US = timedelta(microseconds=1)
_BACKLOG_CAP = 1000  # fire times one processing round creates for coalesce="all"


@dataclass(frozen=True, kw_only=True)
class ScheduleInfo:
    """A schedule as stored."""

    id: str
    trigger: Trigger
    job: dict[str, Any]
    policy: SchedulePolicy
    paused: bool
    next_fire: datetime | None
    last_fire: datetime | None
    created: datetime

    @property
    def finished(self) -> bool:
        """The trigger has no more fire times."""
        return self.next_fire is None


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """One (schedule, fire time): its state and, once over, its outcome.

    ``manual``: queued by :meth:`Scheduler.trigger`; ``backfill``: queued by
    :meth:`Scheduler.backfill` for a past fire time (its ``run_at`` is when it was queued).
    """

    schedule_id: str
    fire_time: datetime
    run_at: datetime
    status: RunStatus
    attempts: int = 0
    owner: str | None = None
    lease_until: datetime | None = None
    started: datetime | None = None
    ended: datetime | None = None
    error: str | None = None
    manual: bool = False
    backfill: bool = False

    @property
    def key(self) -> RunKey:
        return (self.schedule_id, to_us(self.fire_time))

    @property
    def drift(self) -> float | None:
        """Seconds between the planned start (fire time + jitter) and the actual first start."""
        if self.started is None:
            return None
        return (self.started - self.run_at).total_seconds()


@dataclass(frozen=True, kw_only=True)
class BackfillResult:
    """What :meth:`Scheduler.backfill` did.

    Attributes:
        schedule_id: the schedule.
        fire_times: every fire time of its trigger in the window, oldest first.
        queued: those queued now as runs (any running scheduler picks them up).
        existing: those already in the history (run, running, pending, skipped or missed
            before): not run again.
    """

    schedule_id: str
    fire_times: tuple[datetime, ...]
    queued: tuple[datetime, ...]
    existing: tuple[datetime, ...]


@dataclass(frozen=True, kw_only=True)
class Claim:
    """A run this replica has claimed, with what it needs to execute it."""

    run: RunRecord
    job: dict[str, Any]
    policy: SchedulePolicy
    takeover: bool = False


@dataclass(frozen=True, kw_only=True)
class ClaimResult:
    claimed: list[Claim] = field(default_factory=list)
    #: running runs asked to cancel (overlap ``cancel_old``); their owners see it.
    cancel: list[RunKey] = field(default_factory=list)
    #: runs that ended without running in this round (missed, skipped, lost), for telemetry.
    ended: list[RunRecord] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class DueResult:
    created: int = 0
    #: the batch was full: more schedules may be due.
    more: bool = False
    #: schedule id -> number of fire times dropped (misfire grace or coalescing).
    dropped: dict[str, int] = field(default_factory=dict)
    missed: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Heartbeat:
    #: runs this owner still holds.
    held: set[RunKey]
    #: held runs that another replica asked to cancel (overlap ``cancel_old``).
    cancel: set[RunKey]


def jitter_us(schedule_id: str, fire_us: int, jitter: float) -> int:
    """A deterministic offset in ``[0, jitter]`` seconds: every replica computes the same one."""
    if jitter <= 0:
        return 0
    digest = hashlib.blake2b(f"{schedule_id}@{fire_us}".encode(), digest_size=8).digest()
    frac = int.from_bytes(digest, "big") / 2**64
    return int(frac * jitter * 1_000_000)


def _err_text(text: str | None) -> str | None:
    return None if text is None else text[:2000]


class _SQL:
    """The SQL and the decisions made inside transactions, shared by both dialects."""

    def __init__(self, *, ns: str, ix: str, postgres: bool) -> None:
        self.ns = ns  # table name prefix ("", "prefix_" or "schema.")
        self.ix = ix  # index name prefix
        self.pg = postgres
        self.lock = " FOR UPDATE SKIP LOCKED" if postgres else ""
        self._policies: dict[str, SchedulePolicy] = {}
        self._triggers: dict[str, Trigger] = {}

    def q(self, sql: str) -> str:
        sql = sql.replace("{S}", f"{self.ns}schedules").replace("{R}", f"{self.ns}runs")
        return sql.replace("?", "%s") if self.pg else sql

    def ddl(self) -> list[str]:
        return [
            self.q(
                "CREATE TABLE IF NOT EXISTS {S} ("
                " id TEXT PRIMARY KEY, trigger TEXT NOT NULL, job TEXT NOT NULL,"
                " policy TEXT NOT NULL, paused INTEGER NOT NULL DEFAULT 0,"
                " next_fire BIGINT, last_fire BIGINT, created BIGINT NOT NULL)"
            ),
            self.q(
                "CREATE TABLE IF NOT EXISTS {R} ("
                " schedule_id TEXT NOT NULL, fire_time BIGINT NOT NULL, run_at BIGINT NOT NULL,"
                " status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, owner TEXT,"
                " lease_until BIGINT, started BIGINT, ended BIGINT, error TEXT,"
                " manual INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0,"
                " backfill INTEGER NOT NULL DEFAULT 0, overlap TEXT,"
                " PRIMARY KEY (schedule_id, fire_time))"
            ),
            self.q(f"CREATE INDEX IF NOT EXISTS {self.ix}runs_status ON {{R}} (status, run_at)"),
            self.q(f"CREATE INDEX IF NOT EXISTS {self.ix}runs_owner ON {{R}} (owner, status)"),
            self.q(f"CREATE INDEX IF NOT EXISTS {self.ix}schedules_next ON {{S}} (next_fire)"),
        ]

    #: Columns added to ``runs`` after its first release: (name, SQL type and default).
    _ADDED = (("backfill", "INTEGER NOT NULL DEFAULT 0"), ("overlap", "TEXT"))

    def migrate(self, cur: Any) -> None:
        """Add the columns that tables created by an earlier version lack."""
        if self.pg:
            schema, _, table = f"{self.ns}runs".rpartition(".")
            cur.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = %s AND table_name = %s",
                (schema.lower(), table),  # the unquoted schema name was folded to lower case
            )
            have = {r[0] for r in cur.fetchall()}
        else:
            cur.execute(f"PRAGMA table_info({self.ns}runs)")
            have = {r[1] for r in cur.fetchall()}
        guard = "IF NOT EXISTS " if self.pg else ""
        for name, decl in self._ADDED:
            if name not in have:  # (checked first: ALTER TABLE locks the table)
                cur.execute(self.q(f"ALTER TABLE {{R}} ADD COLUMN {guard}{name} {decl}"))

    # -- rows -> records ------------------------------------------------------------------

    _SCHED_COLS = "id, trigger, job, policy, paused, next_fire, last_fire, created"
    _RUN_COLS = (
        "schedule_id, fire_time, run_at, status, attempts, owner, lease_until, started, ended,"
        " error, manual, backfill"
    )

    @staticmethod
    def sched(row: Sequence[Any]) -> ScheduleInfo:
        return ScheduleInfo(
            id=row[0],
            trigger=trigger_from_dict(json.loads(row[1])),
            job=json.loads(row[2]),
            policy=SchedulePolicy.from_dict(json.loads(row[3])),
            paused=bool(row[4]),
            next_fire=None if row[5] is None else from_us(row[5]),
            last_fire=None if row[6] is None else from_us(row[6]),
            created=from_us(row[7]),
        )

    @staticmethod
    def run(row: Sequence[Any]) -> RunRecord:
        def t(v: int | None) -> datetime | None:
            return None if v is None else from_us(v)

        return RunRecord(
            schedule_id=row[0],
            fire_time=from_us(row[1]),
            run_at=from_us(row[2]),
            status=row[3],
            attempts=row[4],
            owner=row[5],
            lease_until=t(row[6]),
            started=t(row[7]),
            ended=t(row[8]),
            error=row[9],
            manual=bool(row[10]),
            backfill=bool(row[11]),
        )

    # -- schedules --------------------------------------------------------------------------

    def put_schedule(
        self,
        cur: Any,
        *,
        id: str,
        trigger: Trigger,
        job: dict[str, Any],
        policy: SchedulePolicy,
        paused: bool,
        now: datetime,
        conflict: Conflict,
    ) -> ScheduleInfo:
        lock = " FOR UPDATE" if self.pg else ""
        cur.execute(self.q(f"SELECT {self._SCHED_COLS} FROM {{S}} WHERE id = ?{lock}"), (id,))
        row = cur.fetchone()
        if row is not None:
            trigger = _rebind(trigger, trigger_from_dict(json.loads(row[1])), from_us(row[7]))
        trigger = trigger.bind(now)
        tjson = json.dumps(trigger.to_dict(), sort_keys=True)
        jjson = json.dumps(job, sort_keys=True)
        pjson = json.dumps(policy.to_dict(), sort_keys=True)
        cur.execute(
            self.q(
                f"SELECT {self._SCHED_COLS} FROM {{S}} WHERE id = ?{self.lock.replace(' SKIP LOCKED', '')}"
            ),
            (id,),
        )
        row = cur.fetchone()
        if row is not None:
            if conflict == "error":
                raise ConfigurationError(f"a schedule with id {id!r} already exists")
            if conflict == "keep":
                return self.sched(row)
            # replace: keep the position in time when the trigger is unchanged (a restart, or
            # another replica adding the same schedules from the same config).
            if json.loads(row[1]) == json.loads(tjson):
                cur.execute(
                    self.q("UPDATE {S} SET job = ?, policy = ? WHERE id = ?"),
                    (jjson, pjson, id),
                )
                return self.sched((row[0], row[1], jjson, pjson, *row[4:]))
            first = trigger.first_fire(now)
            nf = None if first is None else to_us(first)
            cur.execute(
                self.q(
                    "UPDATE {S} SET trigger = ?, job = ?, policy = ?, paused = ?, next_fire = ?"
                    " WHERE id = ?"
                ),
                (tjson, jjson, pjson, int(paused), nf, id),
            )
            return self.sched((id, tjson, jjson, pjson, int(paused), nf, row[6], row[7]))
        first = trigger.first_fire(now)
        nf = None if first is None else to_us(first)
        created = to_us(now)
        cur.execute(
            self.q(
                f"INSERT INTO {{S}} ({self._SCHED_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO NOTHING"
            ),
            (id, tjson, jjson, pjson, int(paused), nf, None, created),
        )
        if not cur.rowcount:  # another replica inserted it a moment ago
            return self.put_schedule(
                cur,
                id=id,
                trigger=trigger,
                job=job,
                policy=policy,
                paused=paused,
                now=now,
                conflict=conflict,
            )
        return self.sched((id, tjson, jjson, pjson, int(paused), nf, None, created))

    def get_schedule(self, cur: Any, id: str) -> ScheduleInfo | None:
        cur.execute(self.q(f"SELECT {self._SCHED_COLS} FROM {{S}} WHERE id = ?"), (id,))
        row = cur.fetchone()
        return None if row is None else self.sched(row)

    def list_schedules(self, cur: Any) -> list[ScheduleInfo]:
        cur.execute(self.q(f"SELECT {self._SCHED_COLS} FROM {{S}} ORDER BY id"))
        return [self.sched(r) for r in cur.fetchall()]

    def remove_schedule(self, cur: Any, id: str) -> bool:
        cur.execute(self.q("DELETE FROM {R} WHERE schedule_id = ? AND status = 'pending'"), (id,))
        cur.execute(self.q("DELETE FROM {S} WHERE id = ?"), (id,))
        return bool(cur.rowcount)

    def pause(self, cur: Any, id: str) -> bool:
        cur.execute(self.q("UPDATE {S} SET paused = 1 WHERE id = ?"), (id,))
        return bool(cur.rowcount)

    def resume(self, cur: Any, id: str, now: datetime) -> bool:
        info = self.get_schedule(cur, id)
        if info is None:
            return False
        nxt = info.next_fire
        if nxt is not None and nxt < now:
            # Fire times that fell while paused are not made up; a one-off date that passed
            # while paused still runs (subject to the misfire grace time).
            nxt = info.trigger.next_after(now - _ONE_US) or nxt
        cur.execute(
            self.q("UPDATE {S} SET paused = 0, next_fire = ? WHERE id = ?"),
            (None if nxt is None else to_us(nxt), id),
        )
        return True

    def add_manual_run(self, cur: Any, id: str, now: datetime) -> RunRecord:
        if self.get_schedule(cur, id) is None:
            raise ConfigurationError(f"no schedule with id {id!r}")
        fire = to_us(now)
        cur.execute(
            self.q(
                "INSERT INTO {R} (schedule_id, fire_time, run_at, status, manual)"
                " VALUES (?, ?, ?, 'pending', 1) ON CONFLICT DO NOTHING"
            ),
            (id, fire, fire),
        )
        return RunRecord(
            schedule_id=id,
            fire_time=from_us(fire),
            run_at=from_us(fire),
            status="pending",
            manual=True,
        )

    def backfill(
        self,
        cur: Any,
        id: str,
        start: datetime,
        end: datetime,
        now: datetime,
        overlap: str | None,
        max_fires: int,
    ) -> BackfillResult:
        info = self.get_schedule(cur, id)
        if info is None:
            raise ConfigurationError(f"no schedule with id {id!r}")
        fires: list[datetime] = []
        f = info.trigger.next_after(start - _ONE_US)
        while f is not None and f < end:
            if len(fires) == max_fires:
                raise ConfigurationError(
                    f"schedule {id!r} ({info.trigger}) fires more than {max_fires} times in "
                    f"[{start.isoformat()}, {end.isoformat()}); narrow the window (backfill it "
                    "in parts) or raise max_fires"
                )
            fires.append(f)
            f = info.trigger.next_after(f)
        queued: list[datetime] = []
        existing: list[datetime] = []
        now_us = to_us(now)
        insert = self.q(
            "INSERT INTO {R} (schedule_id, fire_time, run_at, status, backfill, overlap)"
            " VALUES (?, ?, ?, 'pending', 1, ?) ON CONFLICT DO NOTHING"
        )
        for f in fires:
            # The (schedule, fire time) primary key is what keeps a fire time from running
            # twice, across replicas and repeated backfills, exactly as for the trigger's fires.
            cur.execute(insert, (id, to_us(f), now_us, overlap))
            (queued if cur.rowcount == 1 else existing).append(f)
        return BackfillResult(
            schedule_id=id, fire_times=tuple(fires), queued=tuple(queued), existing=tuple(existing)
        )

    def last_success(self, cur: Any, schedule_id: str, before: datetime | None) -> RunRecord | None:
        where = "" if before is None else " AND fire_time < ?"
        cur.execute(
            self.q(
                f"SELECT {self._RUN_COLS} FROM {{R}} WHERE schedule_id = ?"
                f" AND status = 'succeeded'{where} ORDER BY fire_time DESC LIMIT 1"
            ),
            (schedule_id,) if before is None else (schedule_id, to_us(before)),
        )
        row = cur.fetchone()
        return None if row is None else self.run(row)

    # -- processing due schedules -------------------------------------------------------------

    def process_due(self, cur: Any, now: datetime, limit: int) -> DueResult:
        now_us = to_us(now)
        cur.execute(
            self.q(
                "SELECT id, trigger, policy, next_fire FROM {S}"
                " WHERE paused = 0 AND next_fire IS NOT NULL AND next_fire <= ?"
                f" ORDER BY next_fire LIMIT ?{self.lock}"
            ),
            (now_us, limit),
        )
        rows = cur.fetchall()
        created = 0
        dropped: dict[str, int] = {}
        missed: dict[str, int] = {}
        inserts: list[tuple[Any, ...]] = []
        updates: list[tuple[Any, ...]] = []
        for sid, tjson, pjson, next_fire in rows:
            trigger = self.trigger(tjson)
            policy = self.policy(pjson)
            fires, nxt, n_missed = _due_fires(trigger, policy, from_us(next_fire), now)
            chosen = _coalesce(fires, policy)
            if n_missed:
                missed[sid] = n_missed
            if len(fires) > len(chosen):
                dropped[sid] = len(fires) - len(chosen)
            for f in chosen:
                fus = to_us(f)
                inserts.append((sid, fus, fus + jitter_us(sid, fus, policy.jitter)))
            last = to_us(fires[-1]) if fires else None
            updates.append((None if nxt is None else to_us(nxt), last, sid))
            created += len(chosen)
        if inserts:
            cur.executemany(
                self.q(
                    "INSERT INTO {R} (schedule_id, fire_time, run_at, status)"
                    " VALUES (?, ?, ?, 'pending') ON CONFLICT DO NOTHING"
                ),
                inserts,
            )
        if updates:
            cur.executemany(
                self.q(
                    "UPDATE {S} SET next_fire = ?, last_fire = COALESCE(?, last_fire) WHERE id = ?"
                ),
                updates,
            )
        return DueResult(created=created, more=len(rows) >= limit, dropped=dropped, missed=missed)

    # -- claiming runs --------------------------------------------------------------------------

    def policy(self, text: str) -> SchedulePolicy:
        """Parse a stored policy (cached: every run of a schedule shares it)."""
        got = self._policies.get(text)
        if got is None:
            if len(self._policies) > 10_000:
                self._policies.clear()
            got = self._policies[text] = SchedulePolicy.from_dict(json.loads(text))
        return got

    def trigger(self, text: str) -> Trigger:
        got = self._triggers.get(text)
        if got is None:
            if len(self._triggers) > 10_000:
                self._triggers.clear()
            got = self._triggers[text] = trigger_from_dict(json.loads(text))
        return got

    def _running_of(self, cur: Any, sids: Sequence[str]) -> dict[str, set[int]]:
        running: dict[str, set[int]] = {}
        unique = sorted(set(sids))
        for i in range(0, len(unique), 500):
            chunk = unique[i : i + 500]
            cur.execute(
                self.q(
                    "SELECT schedule_id, fire_time FROM {R} WHERE status = 'running'"
                    f" AND schedule_id IN ({', '.join('?' for _ in chunk)})"
                ),
                chunk,
            )
            for sid, fus in cur.fetchall():
                running.setdefault(sid, set()).add(fus)
        return running

    def claim(self, cur: Any, owner: str, now: datetime, lease: float, limit: int) -> ClaimResult:
        now_us = to_us(now)
        lease_us = now_us + int(lease * 1_000_000)
        cols = ", ".join(f"r.{c.strip()}" for c in self._RUN_COLS.split(","))
        lock = " FOR UPDATE OF r SKIP LOCKED" if self.pg else ""
        # Backfill runs come after the schedules' own due runs, so a long backfill waiting
        # behind itself (buffer_all) never holds the others up; a schedule's runs start oldest
        # fire time first.
        cur.execute(
            self.q(
                f"SELECT {cols}, r.overlap, s.job, s.policy"
                " FROM {R} r JOIN {S} s ON s.id = r.schedule_id"
                " WHERE (r.status = 'pending' AND r.run_at <= ?)"
                " OR (r.status = 'running' AND r.lease_until <= ?)"
                f" ORDER BY r.backfill, r.run_at, r.schedule_id, r.fire_time LIMIT ?{lock}"
            ),
            (now_us, now_us, max(limit * 2, 64)),
        )
        rows = cur.fetchall()
        claimed: list[Claim] = []
        ended: list[RunRecord] = []
        cancel: list[RunKey] = []
        starts: list[tuple[Any, ...]] = []
        takeovers: list[tuple[Any, ...]] = []
        running = self._running_of(cur, [r[0] for r in rows if r[3] == "pending"])
        jobs: dict[str, dict[str, Any]] = {}
        prune: dict[str, SchedulePolicy] = {}  # schedules with runs ended here, and limits
        for row in rows:
            if len(claimed) >= limit:
                break
            run = self.run(row[:12])
            job = jobs.get(row[13])
            if job is None:
                job = jobs[row[13]] = json.loads(row[13])
            policy = self.policy(row[14])
            overlap = row[12] or policy.overlap  # a backfill may override the schedule's
            sid, fus = run.key
            if run.status == "running":  # lease expired: the replica running it is gone
                if run.attempts >= policy.retry.attempts:
                    err = (
                        f"lease expired: the replica running it ({run.owner}) was lost after "
                        f"attempt {run.attempts} of {policy.retry.attempts}"
                    )
                    self._end(cur, sid, fus, "failed", now_us, err)
                    ended.append(_with(run, status="failed", ended=now, error=err))
                    if policy.prunes_history:
                        prune[sid] = policy
                    continue
                takeovers.append((owner, lease_us, sid, fus))
                claimed.append(
                    Claim(
                        run=_with(run, owner=owner, attempts=run.attempts + 1),
                        job=job,
                        policy=policy,
                        takeover=True,
                    )
                )
                continue
            grace = policy.misfire_grace_time
            late = (now_us - to_us(run.run_at)) / 1e6
            if grace is not None and not (run.manual or run.backfill) and late > grace:
                err = f"started {late:.3f}s late, past the misfire grace time of {grace}s"
                self._end(cur, sid, fus, "missed", None, err)
                ended.append(_with(run, status="missed", error=err))
                if policy.prunes_history:
                    prune[sid] = policy
                continue
            others = running.get(sid, set()) - {fus}
            if others and overlap != "allow":
                if overlap == "skip":
                    err = "skipped: the previous run was still going (overlap=skip)"
                    self._end(cur, sid, fus, "skipped", None, err)
                    ended.append(_with(run, status="skipped", error=err))
                    if policy.prunes_history:
                        prune[sid] = policy
                elif overlap == "buffer_one":
                    # Is an earlier run already waiting? (Runs started in this round are
                    # still 'pending' in the table: they do not count.)
                    ra = to_us(run.run_at)
                    cur.execute(
                        self.q(
                            "SELECT fire_time FROM {R} WHERE schedule_id = ? AND status = 'pending'"
                            " AND (run_at < ? OR (run_at = ? AND fire_time < ?)) LIMIT ?"
                        ),
                        (sid, ra, ra, fus, len(others) + 1),
                    )
                    if any(f not in others for (f,) in cur.fetchall()):
                        err = "skipped: a run was already waiting (overlap=buffer_one)"
                        self._end(cur, sid, fus, "skipped", None, err)
                        ended.append(_with(run, status="skipped", error=err))
                        if policy.prunes_history:
                            prune[sid] = policy
                elif overlap == "cancel_old":
                    cancel.extend((sid, f) for f in others)
                    cur.executemany(
                        self.q(
                            "UPDATE {R} SET cancel_requested = 1 WHERE schedule_id = ?"
                            " AND fire_time = ? AND status = 'running'"
                        ),
                        [(sid, f) for f in others],
                    )
                # buffer_all, buffer_one (the first waiting), cancel_old: wait for the end.
                continue
            running.setdefault(sid, set()).add(fus)
            starts.append((owner, lease_us, now_us, sid, fus))
            claimed.append(
                Claim(
                    run=_with(
                        run,
                        status="running",
                        owner=owner,
                        attempts=run.attempts + 1,
                        started=run.started or now,
                        lease_until=from_us(lease_us),
                    ),
                    job=job,
                    policy=policy,
                )
            )
        if starts:
            cur.executemany(
                self.q(
                    "UPDATE {R} SET status = 'running', owner = ?, lease_until = ?,"
                    " attempts = attempts + 1, started = COALESCE(started, ?)"
                    " WHERE schedule_id = ? AND fire_time = ?"
                ),
                starts,
            )
        if takeovers:
            cur.executemany(
                self.q(
                    "UPDATE {R} SET owner = ?, lease_until = ?, attempts = attempts + 1,"
                    " cancel_requested = 0 WHERE schedule_id = ? AND fire_time = ?"
                ),
                takeovers,
            )
        for sid in sorted(prune):
            self.prune(cur, sid, prune[sid])
        return ClaimResult(claimed=claimed, cancel=cancel, ended=ended)

    def _end(
        self, cur: Any, sid: str, fus: int, status: str, ended: int | None, error: str | None
    ) -> None:
        cur.execute(
            self.q(
                "UPDATE {R} SET status = ?, ended = ?, error = ?, lease_until = NULL"
                " WHERE schedule_id = ? AND fire_time = ?"
            ),
            (status, ended, _err_text(error), sid, fus),
        )

    def finish(
        self,
        cur: Any,
        key: RunKey,
        owner: str,
        status: str,
        now: datetime,
        error: str | None,
        attempts: int,
    ) -> bool:
        cur.execute(
            self.q(
                "UPDATE {R} SET status = ?, ended = ?, error = ?, attempts = ?, lease_until = NULL"
                " WHERE schedule_id = ? AND fire_time = ? AND owner = ? AND status = 'running'"
            ),
            (status, to_us(now), _err_text(error), attempts, key[0], key[1], owner),
        )
        return bool(cur.rowcount)

    def cycle(
        self, cur: Any, owner: str, now: datetime, lease: float, limit: int, batch: int
    ) -> tuple[DueResult, ClaimResult, datetime | None]:
        """One scheduler step in one transaction: create due runs, claim, find the next wakeup."""
        due = self.process_due(cur, now, batch)
        claims = self.claim(cur, owner, now, lease, limit) if limit > 0 else ClaimResult()
        return due, claims, self.next_wakeup(cur, owner, now)

    def finish_many(
        self, cur: Any, owner: str, items: Sequence[tuple[RunKey, str, datetime, str | None, int]]
    ) -> list[bool]:
        out = []
        for key, status, now, error, attempts in items:
            out.append(self.finish(cur, key, owner, status, now, error, attempts))
        self.prune_schedules(cur, {k[0] for (k, *_), ok in zip(items, out, strict=True) if ok})
        return out

    # -- history limits -------------------------------------------------------------------------

    def prune_schedules(self, cur: Any, sids: set[str]) -> None:
        """Apply the history limits of these schedules (those that have any)."""
        unique = sorted(sids)
        for i in range(0, len(unique), 500):
            chunk = unique[i : i + 500]
            cur.execute(
                self.q(
                    f"SELECT id, policy FROM {{S}} WHERE id IN ({', '.join('?' for _ in chunk)})"
                ),
                chunk,
            )
            for sid, pjson in cur.fetchall():
                policy = self.policy(pjson)
                if policy.prunes_history:
                    self.prune(cur, sid, policy)

    def prune(self, cur: Any, sid: str, policy: SchedulePolicy) -> int:
        """Delete the schedule's ended runs beyond its ``keep_succeeded``/``keep_failed``,
        oldest planned start first. Returns how many rows went."""
        deleted = 0
        for statuses, keep in (
            (("succeeded",), policy.keep_succeeded),
            (NOT_SUCCEEDED, policy.keep_failed),
        ):
            if keep is None:
                continue
            marks = ", ".join("?" for _ in statuses)
            cur.execute(
                self.q(
                    f"DELETE FROM {{R}} WHERE schedule_id = ? AND status IN ({marks})"
                    " AND fire_time NOT IN ("
                    f"SELECT fire_time FROM {{R}} WHERE schedule_id = ? AND status IN ({marks})"
                    " ORDER BY run_at DESC, fire_time DESC LIMIT ?)"
                ),
                (sid, *statuses, sid, *statuses, keep),
            )
            deleted += max(cur.rowcount, 0)
        return deleted

    def record_attempt(self, cur: Any, key: RunKey, owner: str, attempts: int) -> bool:
        cur.execute(
            self.q(
                "UPDATE {R} SET attempts = ? WHERE schedule_id = ? AND fire_time = ?"
                " AND owner = ? AND status = 'running'"
            ),
            (attempts, key[0], key[1], owner),
        )
        return bool(cur.rowcount)

    def heartbeat(self, cur: Any, owner: str, now: datetime, lease: float) -> Heartbeat:
        until = to_us(now) + int(lease * 1_000_000)
        cur.execute(
            self.q("UPDATE {R} SET lease_until = ? WHERE owner = ? AND status = 'running'"),
            (until, owner),
        )
        cur.execute(
            self.q(
                "SELECT schedule_id, fire_time, cancel_requested FROM {R}"
                " WHERE owner = ? AND status = 'running'"
            ),
            (owner,),
        )
        held: set[RunKey] = set()
        cancel: set[RunKey] = set()
        for sid, fus, cr in cur.fetchall():
            held.add((sid, fus))
            if cr:
                cancel.add((sid, fus))
        return Heartbeat(held=held, cancel=cancel)

    def release(self, cur: Any, owner: str, keys: Sequence[RunKey]) -> None:
        cur.executemany(
            self.q(
                "UPDATE {R} SET status = 'pending', owner = NULL, lease_until = NULL,"
                " attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END"
                " WHERE schedule_id = ? AND fire_time = ? AND owner = ? AND status = 'running'"
            ),
            [(k[0], k[1], owner) for k in keys],
        )

    def next_wakeup(self, cur: Any, owner: str, now: datetime) -> datetime | None:
        now_us = to_us(now)
        cur.execute(
            self.q("SELECT MIN(next_fire) FROM {S} WHERE paused = 0 AND next_fire IS NOT NULL")
        )
        a = cur.fetchone()[0]
        cur.execute(
            self.q("SELECT MIN(run_at) FROM {R} WHERE status = 'pending' AND run_at > ?"),
            (now_us,),
        )
        b = cur.fetchone()[0]
        cur.execute(
            self.q(
                "SELECT MIN(lease_until) FROM {R} WHERE status = 'running' AND owner <> ?"
                " AND lease_until > ?"
            ),
            (owner, now_us),
        )
        c = cur.fetchone()[0]
        vals = [v for v in (a, b, c) if v is not None]
        return from_us(min(vals)) if vals else None

    def history(
        self, cur: Any, schedule_id: str | None, limit: int, statuses: Sequence[str] | None
    ) -> list[RunRecord]:
        where = []
        params: list[Any] = []
        if schedule_id is not None:
            where.append("schedule_id = ?")
            params.append(schedule_id)
        if statuses:
            where.append(f"status IN ({', '.join('?' for _ in statuses)})")
            params.extend(statuses)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        cur.execute(
            self.q(
                f"SELECT {self._RUN_COLS} FROM {{R}}{clause}"
                " ORDER BY fire_time DESC, schedule_id LIMIT ?"
            ),
            (*params, limit),
        )
        return [self.run(r) for r in cur.fetchall()]


def _rebind(new: Trigger, old: Trigger, created: datetime) -> Trigger:
    """Keep the stored binding of a trigger relative to "now" when it is re-added, so a
    restarted process re-adding its schedules does not move them.

    An interval without a start keeps the stored start. A ``delay`` keeps the stored fire time
    when it was bound from the same delay, so it neither fires again after it has fired nor is
    postponed (rows written before ``bound_delay`` existed are recognised by
    ``at == created + delay``). A different delay, or a switch from ``at=``, binds anew.
    """
    from dataclasses import replace

    if (
        isinstance(new, IntervalTrigger)
        and isinstance(old, IntervalTrigger)
        and new.start is None
        and old.start is not None
    ):
        return replace(new, start=old.start)
    if (
        isinstance(new, DateTrigger)
        and isinstance(old, DateTrigger)
        and isinstance(new.delay, float)
        and old.at is not None
        and (
            old.bound_delay == new.delay
            or (old.bound_delay is None and old.at == created + timedelta(seconds=new.delay))
        )
    ):
        return old
    return new


def _with(run: RunRecord, **changes: Any) -> RunRecord:
    from dataclasses import replace

    return replace(run, **changes)


def _due_fires(
    trigger: Trigger, policy: SchedulePolicy, first: datetime, now: datetime
) -> tuple[list[datetime], datetime | None, int]:
    """The fire times due at ``now`` from ``first`` on, the next one after them, and how many
    fell out of the misfire grace time (at least 1 when any did).

    A huge backlog (a long downtime on a frequent trigger) is not walked: ``coalesce="all"``
    takes it in slices of ``_BACKLOG_CAP``, ``earliest`` and ``latest`` jump to their fire time.
    """
    fires: list[datetime] = []
    missed = 0
    f: datetime | None = first
    grace = policy.misfire_grace_time
    if grace is not None and f is not None:
        oldest = now - timedelta(seconds=grace)
        if f < oldest:
            missed = 1
            f = trigger.next_after(oldest - _ONE_US)
    cap = _BACKLOG_CAP if policy.coalesce == "all" else 100
    while f is not None and f <= now and len(fires) < cap:
        fires.append(f)
        f = trigger.next_after(f)
    if f is not None and f <= now and policy.coalesce != "all":
        last = _latest_at_or_before(trigger, now, f)
        fires.append(last)  # (the fire times in between are dropped by coalescing)
        f = trigger.next_after(last)
    return fires, f, missed


def _latest_at_or_before(trigger: Trigger, now: datetime, known: datetime) -> datetime:
    """The last fire time <= ``now``, given one (``known``) that is."""
    for seconds in (1, 60, 3600, 86400, 31 * 86400, 366 * 86400):
        probe = max(known, now - timedelta(seconds=seconds))
        g = trigger.next_after(probe - _ONE_US)
        if g is not None and g <= now:
            known = g
            break
    while (h := trigger.next_after(known)) is not None and h <= now:
        known = h
    return known


def _check_backfill(
    start: datetime, end: datetime, now: datetime, overlap: str | None, max_fires: int
) -> None:
    for name, value in (("start", start), ("end", end)):
        if not isinstance(value, datetime):
            raise ConfigurationError(f"backfill {name} must be a datetime, got {value!r}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ConfigurationError(
                f"backfill {name} {value.isoformat()} has no timezone: pass a timezone-aware "
                "datetime, e.g. datetime(2026, 1, 1, tzinfo=UTC) or '2026-01-01T00:00:00+00:00'"
            )
    if start >= end:
        raise ConfigurationError(
            f"backfill window is empty: start {start.isoformat()} must be before end "
            f"{end.isoformat()} (the window is [start, end))"
        )
    if end > now:
        raise ConfigurationError(
            f"backfill end {end.isoformat()} is in the future (now is {now.isoformat()}): a "
            "backfill runs past fire times; the trigger fires the later ones itself"
        )
    if overlap is not None and overlap not in _OVERLAP:
        raise ConfigurationError(
            f"backfill overlap must be one of {', '.join(_OVERLAP)} (or None: the schedule's), "
            f"got {overlap!r}"
        )
    if not isinstance(max_fires, int) or isinstance(max_fires, bool) or not max_fires >= 1:
        raise ConfigurationError(f"backfill max_fires must be an int >= 1, got {max_fires!r}")


def _coalesce(fires: list[datetime], policy: SchedulePolicy) -> list[datetime]:
    if len(fires) <= 1 or policy.coalesce == "all":
        return fires
    return [fires[0]] if policy.coalesce == "earliest" else [fires[-1]]


class Store:
    """Where a scheduler keeps schedules and run history (async; see :class:`SQLiteStore` and
    :class:`PostgresStore`).

    Several schedulers (replicas) may share one store; they coordinate through it alone.
    """

    _sql: _SQL

    async def setup(self) -> None:
        """Create the tables if needed (safe to call from several replicas at once)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close the connections."""
        raise NotImplementedError

    async def _tx(self, fn: Callable[[Any], T], *, write: bool = True) -> T:
        raise NotImplementedError

    async def __aenter__(self) -> Store:
        await self.setup()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # The public operations, all through _tx.

    async def put_schedule(
        self,
        *,
        id: str,
        trigger: Trigger,
        job: dict[str, Any],
        policy: SchedulePolicy,
        now: datetime,
        paused: bool = False,
        conflict: Conflict = "replace",
    ) -> ScheduleInfo:
        """Add a schedule, or update it (``conflict``: replace, keep or error)."""
        return await self._tx(
            lambda c: self._sql.put_schedule(
                c,
                id=id,
                trigger=trigger,
                job=job,
                policy=policy,
                paused=paused,
                now=now,
                conflict=conflict,
            )
        )

    async def get_schedule(self, id: str) -> ScheduleInfo | None:
        return await self._tx(lambda c: self._sql.get_schedule(c, id), write=False)

    async def list_schedules(self) -> list[ScheduleInfo]:
        return await self._tx(self._sql.list_schedules, write=False)

    async def remove_schedule(self, id: str) -> bool:
        return await self._tx(lambda c: self._sql.remove_schedule(c, id))

    async def pause(self, id: str) -> bool:
        return await self._tx(lambda c: self._sql.pause(c, id))

    async def resume(self, id: str, now: datetime) -> bool:
        return await self._tx(lambda c: self._sql.resume(c, id, now))

    async def add_manual_run(self, id: str, now: datetime) -> RunRecord:
        return await self._tx(lambda c: self._sql.add_manual_run(c, id, now))

    async def backfill(
        self,
        id: str,
        *,
        start: datetime,
        end: datetime,
        now: datetime,
        overlap: Overlap | None = None,
        max_fires: int = 1000,
    ) -> BackfillResult:
        """Queue a run for each fire time of schedule ``id`` in ``[start, end)`` that is not in
        the history yet (see :meth:`Scheduler.backfill`)."""
        _check_backfill(start, end, now, overlap, max_fires)
        return await self._tx(
            lambda c: self._sql.backfill(c, id, start, end, now, overlap, max_fires)
        )

    async def process_due(self, now: datetime, limit: int = 500) -> DueResult:
        """Create the runs of every due schedule (misfire grace and coalescing applied)."""
        return await self._tx(lambda c: self._sql.process_due(c, now, limit))

    async def claim(self, owner: str, now: datetime, lease: float, limit: int) -> ClaimResult:
        """Claim up to ``limit`` due runs for ``owner`` (overlap and grace applied)."""
        return await self._tx(lambda c: self._sql.claim(c, owner, now, lease, limit))

    async def cycle(
        self, owner: str, now: datetime, lease: float, limit: int, batch: int = 500
    ) -> tuple[DueResult, ClaimResult, datetime | None]:
        """:meth:`process_due`, :meth:`claim` and :meth:`next_wakeup` in one transaction."""
        return await self._tx(lambda c: self._sql.cycle(c, owner, now, lease, limit, batch))

    async def finish(
        self,
        key: RunKey,
        owner: str,
        status: RunStatus,
        now: datetime,
        error: str | None,
        attempts: int,
    ) -> bool:
        """Record a run's outcome; ``False`` if ``owner`` no longer held it. The schedule's
        history limits are applied in the same transaction."""
        return (await self.finish_many(owner, [(key, status, now, error, attempts)]))[0]

    async def finish_many(
        self, owner: str, items: Sequence[tuple[RunKey, RunStatus, datetime, str | None, int]]
    ) -> list[bool]:
        """:meth:`finish` for several runs in one transaction."""
        return await self._tx(lambda c: self._sql.finish_many(c, owner, items))

    async def record_attempt(self, key: RunKey, owner: str, attempts: int) -> bool:
        return await self._tx(lambda c: self._sql.record_attempt(c, key, owner, attempts))

    async def heartbeat(self, owner: str, now: datetime, lease: float) -> Heartbeat:
        """Renew ``owner``'s leases; say which runs it still holds and which to cancel."""
        return await self._tx(lambda c: self._sql.heartbeat(c, owner, now, lease))

    async def release(self, owner: str, keys: Sequence[RunKey]) -> None:
        """Hand runs back unfinished (scheduler shutdown): they become pending again."""
        if keys:
            await self._tx(lambda c: self._sql.release(c, owner, keys))

    async def next_wakeup(self, owner: str, now: datetime) -> datetime | None:
        """The next time something is due: a fire time, a jittered run, a lease expiry."""
        return await self._tx(lambda c: self._sql.next_wakeup(c, owner, now), write=False)

    async def history(
        self,
        schedule_id: str | None = None,
        *,
        limit: int = 100,
        statuses: Sequence[RunStatus] | None = None,
    ) -> list[RunRecord]:
        """Runs, newest fire time first."""
        return await self._tx(
            lambda c: self._sql.history(c, schedule_id, limit, statuses), write=False
        )

    async def last_success(
        self, schedule_id: str, *, before: datetime | None = None
    ) -> RunRecord | None:
        """The schedule's newest successful run (with a fire time before ``before``)."""
        return await self._tx(lambda c: self._sql.last_success(c, schedule_id, before), write=False)


class _Pool:
    """A few blocking connections, used one per worker thread."""

    def __init__(self, connect: Callable[[], Any], size: int) -> None:
        self._connect = connect
        self._size = size
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    @contextmanager
    def connection(self) -> Iterator[Any]:
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = self._connect()
            with self._lock:
                self._all.append(conn)
        try:
            yield conn
        except BaseException:
            raise
        finally:
            self._idle.put(conn)

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for c in conns:
            try:
                c.close()
            except Exception:  # pragma: no cover - closing a broken connection
                pass


class _PooledStore(Store):
    """What the SQL stores share: a connection pool, and the tables created once, on first use."""

    _pool: _Pool
    _ready: bool

    def _create(self, cur: Any) -> None:
        """Create the tables, or add what an earlier version's lack (in the one transaction
        :meth:`setup` runs)."""
        for stmt in self._sql.ddl():
            cur.execute(stmt)
        self._sql.migrate(cur)

    async def setup(self) -> None:
        if self._ready:
            return
        self._ready = True
        try:
            await self._tx(self._create)
        except BaseException:
            self._ready = False
            raise

    async def aclose(self) -> None:
        self._pool.close()
        self._ready = False


class SQLiteStore(_PooledStore):
    """The default store: one SQLite file, created on first use.

    Several processes on one host may share the file; claims are ``BEGIN IMMEDIATE``
    transactions, and the file runs in WAL mode. Use :class:`PostgresStore` across hosts.

    Args:
        path: the database file (``":memory:"`` for a private, in-process store).
        prefix: table name prefix.
        threads: run the blocking calls in worker threads (default). ``False`` runs them inline
            in the event loop: tests under trio's ``MockClock`` use it, since a thread's work is
            invisible to the mock clock, which would jump ahead during it.
    """

    def __init__(
        self, path: str | Path = "genfan-schedules.db", *, prefix: str = "", threads: bool = True
    ) -> None:
        if prefix and not prefix.replace("_", "").isalnum():
            raise ConfigurationError(
                f"SQLiteStore.prefix must be letters, digits or _, got {prefix!r}"
            )
        self.path = str(path)
        self.threads = threads
        self._sql = _SQL(ns=prefix, ix=f"{prefix}genfan_", postgres=False)
        self._pool = _Pool(self._connect, 1)
        self._limiter: anyio.CapacityLimiter | None = None
        self._ready = False

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA busy_timeout = 30000")
        if self.path != ":memory:":
            try:
                conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError:  # another process is switching it right now
                pass
            conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _run(self, fn: Callable[[Any], T], write: bool) -> T:
        with self._pool.connection() as conn:
            cur = conn.cursor()
            if not write:
                return fn(cur)
            cur.execute("BEGIN IMMEDIATE")
            try:
                out = fn(cur)
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")
            return out

    async def _tx(self, fn: Callable[[Any], T], *, write: bool = True) -> T:
        if not self._ready:
            await self.setup()
        if not self.threads:
            return self._run(fn, write)
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(self._run, fn, write, limiter=self._limiter)

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"


class PostgresStore(_PooledStore):
    """PostgreSQL, for replicas on several hosts (psycopg 3, ``pip install 'genfan[postgres]'``).

    Claims use ``SELECT ... FOR UPDATE SKIP LOCKED``, so replicas never wait on each other's
    rows. The tables live in ``schema`` (created if missing).

    Args:
        dsn: a libpq connection string or URL, e.g. ``"postgresql://127.0.0.1/app"``.
        schema: the schema for genfan's tables.
        pool_size: connections per store (each blocking call uses one in a worker thread).
    """

    def __init__(self, dsn: str, *, schema: str = "genfan", pool_size: int = 2) -> None:
        if not schema.replace("_", "").isalnum() or schema[0].isdigit():
            raise ConfigurationError(
                f"PostgresStore.schema must be letters, digits or _ (not first), got {schema!r}"
            )
        if not 1 <= pool_size <= 64:
            raise ConfigurationError(f"PostgresStore.pool_size must be 1..64, got {pool_size}")
        self.dsn = dsn
        self.schema = schema
        self._sql = _SQL(ns=f"{schema}.", ix="genfan_", postgres=True)
        self._pool = _Pool(self._connect, pool_size)
        self._limiter = anyio.CapacityLimiter(pool_size)
        self._ready = False

    def _connect(self) -> Any:
        try:
            import psycopg
        except ImportError as exc:
            raise MissingExtraError("psycopg", "postgres", reason="PostgresStore") from exc
        return psycopg.connect(self.dsn, autocommit=True)

    def _run(self, fn: Callable[[Any], T], write: bool) -> T:
        with self._pool.connection() as conn:
            with conn.transaction(), conn.cursor() as cur:
                return fn(cur)

    async def _tx(self, fn: Callable[[Any], T], *, write: bool = True) -> T:
        if not self._ready:
            await self.setup()
        return await anyio.to_thread.run_sync(self._run, fn, write, limiter=self._limiter)

    def _create(self, cur: Any) -> None:
        key = int.from_bytes(hashlib.blake2b(self.schema.encode(), digest_size=7).digest(), "big")
        # Serialize DDL between replicas starting at once.
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
        super()._create(cur)

    async def drop(self) -> None:
        """Drop the schema and everything in it (tests, teardown)."""
        await self._tx(lambda c: c.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE"))
        self._ready = False

    def __repr__(self) -> str:
        # Never show the DSN: it may hold a password.
        return f"PostgresStore(schema={self.schema!r})"


def store_from_url(url: str | Path) -> Store:
    """A store from a URL: ``sqlite:///path.db``, a plain path, or
    ``postgresql://host/db?schema=name`` (``schema`` is genfan's; the rest goes to libpq)."""
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(text)
        query = dict(parse_qsl(parts.query))
        schema = query.pop("schema", "genfan")
        dsn = urlunsplit(parts._replace(query=urlencode(query)))
        return PostgresStore(dsn, schema=schema)
    if text.startswith("sqlite://"):
        path = text.removeprefix("sqlite://")
        path = path[1:] if path.startswith("/") else path
        return SQLiteStore(path or "genfan-schedules.db")
    if "://" in text:
        raise ConfigurationError(
            f"unknown store URL {text!r}; use sqlite:///path.db or postgresql://host/db"
        )
    return SQLiteStore(text)
