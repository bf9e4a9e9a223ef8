"""The SQL both stores share: the tables, and each store operation as the body of one transaction.

Every (schedule, fire time) is one row of the ``runs`` table (its primary key), created once by
whichever replica processes the schedule first. A replica *claims* a due run inside one
transaction and holds it with a lease it renews while the run goes on. Leases are on the store's
clock, read inside the transaction once it holds its locks (`SQL.lease_now`), so a claim
that waited on a lock still commits a full lease. Each claim gets a fencing token from one
counter of the store (strictly increasing); renewals and outcomes name it, so a replica whose
run was taken over can neither renew it nor record its result. A replica that dies stops
renewing; once the lease has expired, and stayed expired for half a lease more after a claim
first saw it (the replica may only have been cut off from the store), another replica takes the
run over and retries it if the schedule's retry policy has attempts left.

The decisions (what is due, what a claim does with each run) are the pure functions of
``_planning``; this module reads the rows they need and writes what they decided. A dialect
(``_sqlite``, ``_postgres``) subclasses `SQL` with its placeholders, row locks and
schema introspection.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, ClassVar

from .._errors import ConfigurationError
from ._planning import (
    backfill_fires,
    buffer_one,
    confirm_us,
    history_limits,
    plan_claim,
    plan_due,
    plan_expired,
    rebind,
    resume_fire,
)
from ._policy import SchedulePolicy
from ._records import (
    BackfillResult,
    Claim,
    ClaimResult,
    Conflict,
    DueResult,
    Heartbeat,
    Outcome,
    Renewal,
    RunKey,
    RunRecord,
    ScheduleInfo,
)
from ._triggers import Trigger, from_us, to_us, trigger_from_dict

__all__ = ["SQL", "TxClock"]


def _err_text(text: str | None) -> str | None:
    return None if text is None else text[:2000]


def _us(value: datetime | None) -> int | None:
    return None if value is None else to_us(value)


class TxClock:
    """The time inside one store transaction.

    ``now()`` is the caller's clock at the call, advanced by the real time that has passed
    since (``follow``: the transaction runs in a worker thread and may wait for a lock), so a
    value read once the transaction holds its locks is the time then, not the time it was
    asked for. Run inline (tests under a mock clock), it is the caller's time, exactly.
    """

    __slots__ = ("_at", "_follow", "_mono")

    def __init__(self, at: datetime, *, follow: bool) -> None:
        self._at = at
        self._follow = follow
        self._mono = time.monotonic()

    def now(self) -> datetime:
        if not self._follow:
            return self._at
        return self._at + timedelta(seconds=time.monotonic() - self._mono)


class SQL:
    """The statements and transaction bodies, written once for both dialects.

    Each operation takes a DB-API cursor inside a transaction the store opened. Statements are
    written with ``?`` placeholders and ``{S}``/``{R}`` for the two tables; `q` turns them
    into the dialect's.

    Args:
        ns: table name prefix (``""``, ``"prefix_"`` or ``"schema."``).
        ix: index name prefix.
    """

    #: the driver's placeholder
    PARAM: ClassVar[str] = "?"
    #: locks the rows a statement selects, for this transaction
    LOCK_ROW: ClassVar[str] = ""
    #: the same, skipping rows another transaction has locked (another replica's)
    LOCK_SKIP: ClassVar[str] = ""
    #: the claim's lock on the runs it joins to their schedules
    LOCK_CLAIM: ClassVar[str] = ""
    #: what ``ALTER TABLE ... ADD COLUMN`` takes to be idempotent
    ADD_COLUMN: ClassVar[str] = "ADD COLUMN "
    #: the store's clock in epoch microseconds as an SQL expression (``None``: the dialect has
    #: no server clock, `lease_now` is passed as a parameter)
    LEASE_NOW_SQL: ClassVar[str | None] = None

    #: Columns added to ``runs`` after its first release: (name, SQL type and default).
    ADDED: ClassVar[tuple[tuple[str, str], ...]] = (
        ("backfill", "INTEGER NOT NULL DEFAULT 0"),
        ("overlap", "TEXT"),
        ("token", "BIGINT"),
        ("expired_seen", "BIGINT"),
    )

    _SCHED_COLS = "id, trigger, job, policy, paused, next_fire, last_fire, created"
    _RUN_COLS = (
        "schedule_id, fire_time, run_at, status, attempts, owner, lease_until, started, ended,"
        " error, manual, backfill, token"
    )
    _N_RUN = 13

    def __init__(self, *, ns: str, ix: str) -> None:
        self.ns = ns
        self.ix = ix
        self._policies: dict[str, SchedulePolicy] = {}
        self._triggers: dict[str, Trigger] = {}

    def q(self, sql: str) -> str:
        sql = sql.replace("{S}", f"{self.ns}schedules").replace("{R}", f"{self.ns}runs")
        sql = sql.replace("{F}", f"{self.ns}fencing")
        return sql if self.PARAM == "?" else sql.replace("?", self.PARAM)

    # -- the store's clock and the fencing counter (the dialects') ----------------------------

    def lease_now(self, cur: Any, clock: TxClock) -> int:
        """Now on the store's clock, in epoch microseconds: what leases are measured on. SQLite
        has no server: its clock is the host's, which the replicas on that host share."""
        return to_us(clock.now())

    def fencing_ddl(self) -> list[str]:
        """The counter that fencing tokens come from."""
        return [
            self.q(
                "CREATE TABLE IF NOT EXISTS {F} (id INTEGER PRIMARY KEY, value BIGINT NOT NULL)"
            ),
            self.q("INSERT INTO {F} (id, value) VALUES (0, 0) ON CONFLICT DO NOTHING"),
        ]

    def next_tokens(self, cur: Any, n: int) -> list[int]:
        """``n`` new fencing tokens, each larger than every token handed out before."""
        if n <= 0:
            return []
        cur.execute(self.q("UPDATE {F} SET value = value + ? WHERE id = 0 RETURNING value"), (n,))
        last = int(cur.fetchone()[0])
        return list(range(last - n + 1, last + 1))

    # -- tables -------------------------------------------------------------------------------

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
                " backfill INTEGER NOT NULL DEFAULT 0, overlap TEXT, token BIGINT,"
                " expired_seen BIGINT, PRIMARY KEY (schedule_id, fire_time))"
            ),
            self.q(f"CREATE INDEX IF NOT EXISTS {self.ix}runs_status ON {{R}} (status, run_at)"),
            self.q(f"CREATE INDEX IF NOT EXISTS {self.ix}runs_owner ON {{R}} (owner, status)"),
            self.q(f"CREATE INDEX IF NOT EXISTS {self.ix}schedules_next ON {{S}} (next_fire)"),
            *self.fencing_ddl(),
        ]

    def run_columns(self, cur: Any) -> set[str]:
        """The columns the ``runs`` table has now (the dialect reads its catalog)."""
        raise NotImplementedError

    def migrate(self, cur: Any) -> None:
        """Add the columns that tables created by an earlier version lack."""
        have = self.run_columns(cur)
        for name, decl in self.ADDED:
            if name not in have:  # (checked first: ALTER TABLE locks the table)
                cur.execute(self.q(f"ALTER TABLE {{R}} {self.ADD_COLUMN}{name} {decl}"))

    # -- rows -> records ----------------------------------------------------------------------

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
            fencing_token=row[12],
        )

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

    # -- schedules ----------------------------------------------------------------------------

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
        select = self.q(f"SELECT {self._SCHED_COLS} FROM {{S}} WHERE id = ?{self.LOCK_ROW}")
        cur.execute(select, (id,))
        row = cur.fetchone()
        if row is not None:
            trigger = rebind(trigger, trigger_from_dict(json.loads(row[1])), from_us(row[7]))
        trigger = trigger.bind(now)
        tjson = json.dumps(trigger.to_dict(), sort_keys=True)
        jjson = json.dumps(job, sort_keys=True)
        pjson = json.dumps(policy.to_dict(), sort_keys=True)
        cur.execute(select, (id,))
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
        nxt = resume_fire(info.trigger, info.next_fire, now)
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
        fires = backfill_fires(id, info.trigger, start, end, max_fires)
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

    def process_due(self, cur: Any, clock: TxClock, limit: int) -> DueResult:
        now = clock.now()
        cur.execute(
            self.q(
                "SELECT id, trigger, policy, next_fire FROM {S}"
                " WHERE paused = 0 AND next_fire IS NOT NULL AND next_fire <= ?"
                f" ORDER BY next_fire LIMIT ?{self.LOCK_SKIP}"
            ),
            (to_us(now), limit),
        )
        rows = cur.fetchall()
        created = 0
        dropped: dict[str, int] = {}
        missed: dict[str, int] = {}
        inserts: list[tuple[Any, ...]] = []
        updates: list[tuple[Any, ...]] = []
        for sid, tjson, pjson, next_fire in rows:
            plan = plan_due(sid, self.trigger(tjson), self.policy(pjson), from_us(next_fire), now)
            if plan.missed:
                missed[sid] = plan.missed
            if plan.dropped:
                dropped[sid] = plan.dropped
            inserts.extend((sid, fire, run_at) for fire, run_at in plan.runs)
            updates.append((plan.next_fire, plan.last_fire, sid))
            created += len(plan.runs)
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

    # -- claiming runs ------------------------------------------------------------------------

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

    def _one_waits(self, cur: Any, run: RunRecord, others: set[int]) -> bool:
        """Whether an earlier run of ``run``'s schedule is already waiting (overlap
        ``buffer_one``). Runs started in this claim are still 'pending' in the table: they do
        not count."""
        sid, fus = run.key
        ra = to_us(run.run_at)
        cur.execute(
            self.q(
                "SELECT fire_time FROM {R} WHERE schedule_id = ? AND status = 'pending'"
                " AND (run_at < ? OR (run_at = ? AND fire_time < ?)) LIMIT ?"
            ),
            (sid, ra, ra, fus, len(others) + 1),
        )
        return any(f not in others for (f,) in cur.fetchall())

    def claim(
        self,
        cur: Any,
        owner: str,
        clock: TxClock,
        lease: float,
        limit: int,
        mine: Mapping[RunKey, int] | None = None,
    ) -> ClaimResult:
        """Claim up to ``limit`` due runs for ``owner``.

        ``mine``: the runs ``owner`` is running now, with their fencing tokens; one of them
        whose lease expired (a renewal came late) is renewed, never taken over from itself.
        """
        mine = mine or {}
        cols = ", ".join(f"r.{c.strip()}" for c in self._RUN_COLS.split(","))
        n = self._N_RUN
        # Backfill runs come after the schedules' own due runs, so a long backfill waiting
        # behind itself (buffer_all) never holds the others up; a schedule's runs start oldest
        # fire time first.
        expiry: tuple[Any, ...] = ()
        if self.LEASE_NOW_SQL is None:
            expiry = (self.lease_now(cur, clock),)
        cur.execute(
            self.q(
                f"SELECT {cols}, r.overlap, s.job, s.policy, r.expired_seen"
                " FROM {R} r JOIN {S} s ON s.id = r.schedule_id"
                " WHERE (r.status = 'pending' AND r.run_at <= ?)"
                f" OR (r.status = 'running' AND r.lease_until <= {self.LEASE_NOW_SQL or '?'})"
                " ORDER BY r.backfill, r.run_at, r.schedule_id, r.fire_time"
                f" LIMIT ?{self.LOCK_CLAIM}"
            ),
            (to_us(clock.now()), *expiry, max(limit * 2, 64)),
        )
        rows = cur.fetchall()
        # The rows are locked now: the times of this claim are read after any wait for them.
        now = clock.now()
        now_us = to_us(now)
        lease_now = self.lease_now(cur, clock)
        lease_us = lease_now + int(lease * 1_000_000)
        confirm = confirm_us(lease)
        ended: list[RunRecord] = []
        cancel: list[RunKey] = []
        chosen: list[tuple[RunRecord, dict[str, Any], SchedulePolicy, bool]] = []
        renewed: list[RunKey] = []
        marks: list[tuple[Any, ...]] = []
        running = self._running_of(cur, [r[0] for r in rows if r[3] == "pending"])
        jobs: dict[str, dict[str, Any]] = {}
        prune: dict[str, SchedulePolicy] = {}  # schedules with runs ended here, and limits
        for row in rows:
            if len(chosen) >= limit:
                break
            run = self.run(row[:n])
            job = jobs.get(row[n + 1])
            if job is None:
                job = jobs[row[n + 1]] = json.loads(row[n + 1])
            policy = self.policy(row[n + 2])
            overlap = row[n] or policy.overlap  # a backfill may override the schedule's
            sid, fus = run.key
            if run.status == "running":
                decision = plan_expired(
                    run,
                    policy,
                    mine=run.owner == owner and mine.get(run.key, -1) == run.fencing_token,
                    expired_seen=row[n + 3],
                    lease_now=lease_now,
                    confirm=confirm,
                )
            else:
                others = running.get(sid, set()) - {fus}
                decision = plan_claim(run, policy, overlap, now_us, others)
                if decision.action == "buffer_one":
                    decision = buffer_one(self._one_waits(cur, run, others))
            action = decision.action
            if action == "start":
                running.setdefault(sid, set()).add(fus)
                chosen.append((run, job, policy, False))
            elif action == "takeover":
                chosen.append((run, job, policy, True))
            elif action == "renew":
                renewed.append(run.key)
            elif action == "suspect":
                if row[n + 3] is None:
                    marks.append((lease_now, sid, fus))
            elif action in ("failed", "missed", "skipped"):
                lost = action == "failed"  # a lost run ends now; the others never started
                self._end(cur, sid, fus, action, now_us if lost else None, decision.error)
                ended.append(
                    replace(
                        run,
                        status=action,
                        ended=now if lost else run.ended,
                        error=decision.error,
                    )
                )
                if policy.prunes_history:
                    prune[sid] = policy
            elif action == "cancel_old":
                others = running.get(sid, set()) - {fus}
                cancel.extend((sid, f) for f in others)
                cur.executemany(
                    self.q(
                        "UPDATE {R} SET cancel_requested = 1 WHERE schedule_id = ?"
                        " AND fire_time = ? AND status = 'running'"
                    ),
                    [(sid, f) for f in others],
                )
            # "wait" (buffer_all, buffer_one's first waiting run): until the running one ends.
        claimed: list[Claim] = []
        starts: list[tuple[Any, ...]] = []
        takeovers: list[tuple[Any, ...]] = []
        tokens = self.next_tokens(cur, len(chosen))
        for (run, job, policy, takeover), token in zip(chosen, tokens, strict=True):
            sid, fus = run.key
            taken = replace(
                run,
                status="running",
                owner=owner,
                attempts=run.attempts + 1,
                started=run.started or now,
                lease_until=from_us(lease_us),
                fencing_token=token,
            )
            if takeover:
                takeovers.append((owner, lease_us, token, sid, fus))
            else:
                starts.append((owner, lease_us, now_us, token, sid, fus))
            claimed.append(
                Claim(
                    run=taken,
                    job=job,
                    policy=policy,
                    takeover=takeover,
                    first_start=run.started is None,
                )
            )
        if starts:
            cur.executemany(
                self.q(
                    "UPDATE {R} SET status = 'running', owner = ?, lease_until = ?,"
                    " attempts = attempts + 1, started = COALESCE(started, ?), token = ?,"
                    " expired_seen = NULL WHERE schedule_id = ? AND fire_time = ?"
                ),
                starts,
            )
        if takeovers:
            cur.executemany(
                self.q(
                    "UPDATE {R} SET owner = ?, lease_until = ?, attempts = attempts + 1,"
                    " cancel_requested = 0, token = ?, expired_seen = NULL"
                    " WHERE schedule_id = ? AND fire_time = ?"
                ),
                takeovers,
            )
        if renewed:
            cur.executemany(
                self.q(
                    "UPDATE {R} SET lease_until = ?, expired_seen = NULL"
                    " WHERE schedule_id = ? AND fire_time = ? AND owner = ? AND status = 'running'"
                ),
                [(lease_us, sid, fus, owner) for sid, fus in renewed],
            )
        if marks:
            cur.executemany(
                self.q(
                    "UPDATE {R} SET expired_seen = ? WHERE schedule_id = ? AND fire_time = ?"
                    " AND expired_seen IS NULL"
                ),
                marks,
            )
        for sid in sorted(prune):
            self.prune(cur, sid, prune[sid])
        return ClaimResult(claimed=claimed, renewed=renewed, cancel=cancel, ended=ended)

    def _end(
        self, cur: Any, sid: str, fus: int, status: str, ended: int | None, error: str | None
    ) -> None:
        cur.execute(
            self.q(
                "UPDATE {R} SET status = ?, ended = ?, error = ?, lease_until = NULL,"
                " expired_seen = NULL WHERE schedule_id = ? AND fire_time = ?"
            ),
            (status, ended, _err_text(error), sid, fus),
        )

    def cycle(
        self,
        cur: Any,
        owner: str,
        clock: TxClock,
        lease: float,
        limit: int,
        batch: int,
        mine: Mapping[RunKey, int] | None = None,
    ) -> tuple[DueResult, ClaimResult, datetime | None]:
        """One scheduler step in one transaction: create due runs, claim, find the next wakeup."""
        due = self.process_due(cur, clock, batch)
        claims = self.claim(cur, owner, clock, lease, limit, mine) if limit > 0 else ClaimResult()
        return due, claims, self.next_wakeup(cur, owner, clock, lease)

    # -- running runs -------------------------------------------------------------------------

    def finish(self, cur: Any, owner: str, outcome: Outcome) -> bool:
        """Record ``outcome``; ``False`` (refused) when ``owner`` no longer holds the run under
        the outcome's token. Recording the same outcome again (a retried transaction whose
        first commit went through) is not a refusal."""
        (sid, fus), token = outcome.key, outcome.token
        where = " WHERE schedule_id = ? AND fire_time = ? AND owner = ?"
        params: tuple[Any, ...] = (sid, fus, owner)
        if token is not None:
            where += " AND token = ?"
            params += (token,)
        ended = to_us(outcome.ended)
        cur.execute(
            self.q(
                "UPDATE {R} SET status = ?, ended = ?, error = ?, attempts = ?,"
                " lease_until = NULL, expired_seen = NULL, started = COALESCE(?, started)"
                + where
                + " AND status = 'running'"
            ),
            (
                outcome.status,
                ended,
                _err_text(outcome.error),
                outcome.attempts,
                _us(outcome.started),
                *params,
            ),
        )
        if cur.rowcount:
            return True
        if token is None:
            return False
        cur.execute(self.q("SELECT status, ended FROM {R}" + where), params)
        row = cur.fetchone()
        return row is not None and (row[0], row[1]) == (outcome.status, ended)

    def finish_many(self, cur: Any, owner: str, items: Sequence[Outcome]) -> list[bool]:
        out = [self.finish(cur, owner, item) for item in items]
        self.prune_schedules(cur, {i.key[0] for i, ok in zip(items, out, strict=True) if ok})
        return out

    def record_attempt(
        self, cur: Any, key: RunKey, owner: str, attempts: int, token: int | None = None
    ) -> bool:
        where = "" if token is None else " AND token = ?"
        cur.execute(
            self.q(
                "UPDATE {R} SET attempts = ? WHERE schedule_id = ? AND fire_time = ?"
                f" AND owner = ? AND status = 'running'{where}"
            ),
            (attempts, key[0], key[1], owner) + (() if token is None else (token,)),
        )
        return bool(cur.rowcount)

    def heartbeat(self, cur: Any, owner: str, clock: TxClock, lease: float) -> Heartbeat:
        """Renew every lease ``owner`` holds, whatever its token (the store API's simple form;
        the scheduler renews run by run, see `renew`)."""
        until = self.lease_now(cur, clock) + int(lease * 1_000_000)
        cur.execute(
            self.q(
                "UPDATE {R} SET lease_until = ?, expired_seen = NULL"
                " WHERE owner = ? AND status = 'running'"
            ),
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

    def renew(
        self, cur: Any, owner: str, clock: TxClock, lease: float, items: Sequence[Renewal]
    ) -> Heartbeat:
        """Renew the leases of ``items`` that ``owner`` still holds under their tokens (and
        write the real start of a first attempt); say which are held, and which of those another
        replica asked to cancel."""
        until = self.lease_now(cur, clock) + int(lease * 1_000_000)
        held: set[RunKey] = set()
        for item in items:
            sid, fus = item.key
            cur.execute(
                self.q(
                    "UPDATE {R} SET lease_until = ?, expired_seen = NULL,"
                    " started = COALESCE(?, started) WHERE schedule_id = ? AND fire_time = ?"
                    " AND owner = ? AND token = ? AND status = 'running'"
                ),
                (until, _us(item.started), sid, fus, owner, item.token),
            )
            if cur.rowcount:
                held.add(item.key)
        cancel: set[RunKey] = set()
        if held:
            cur.execute(
                self.q(
                    "SELECT schedule_id, fire_time FROM {R}"
                    " WHERE owner = ? AND status = 'running' AND cancel_requested = 1"
                ),
                (owner,),
            )
            cancel = {(sid, fus) for sid, fus in cur.fetchall()} & held
        return Heartbeat(held=held, cancel=cancel)

    def release(self, cur: Any, owner: str, keys: Sequence[RunKey]) -> None:
        cur.executemany(
            self.q(
                "UPDATE {R} SET status = 'pending', owner = NULL, lease_until = NULL,"
                " expired_seen = NULL,"
                " attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END"
                " WHERE schedule_id = ? AND fire_time = ? AND owner = ? AND status = 'running'"
            ),
            [(k[0], k[1], owner) for k in keys],
        )

    def next_wakeup(
        self, cur: Any, owner: str, clock: TxClock, lease: float | None = None
    ) -> datetime | None:
        """The next time something is due, on the caller's clock: a fire time, a pending run's
        start, another replica's lease expiry, or the end of a suspected lease's confirmation
        (``lease``: the caller's lease time, which sets that confirmation)."""
        now = clock.now()
        now_us = to_us(now)
        lease_now = self.lease_now(cur, clock)
        cur.execute(
            self.q("SELECT MIN(next_fire) FROM {S} WHERE paused = 0 AND next_fire IS NOT NULL")
        )
        a = cur.fetchone()[0]
        cur.execute(
            self.q("SELECT MIN(run_at) FROM {R} WHERE status = 'pending' AND run_at > ?"),
            (now_us,),
        )
        b = cur.fetchone()[0]
        vals = [v for v in (a, b) if v is not None]
        # Lease times are on the store's clock: how far ahead they are is what counts here.
        # Another replica's lease may expire, or a suspected one be confirmed (``lease``).
        confirm = None if lease is None else confirm_us(lease)
        cur.execute(
            self.q(
                "SELECT MIN(CASE WHEN expired_seen IS NULL AND lease_until > ?"
                " THEN lease_until END), MIN(CASE WHEN expired_seen > ? THEN expired_seen END)"
                " FROM {R} WHERE status = 'running' AND owner <> ?"
            ),
            (lease_now, lease_now - (confirm or 0), owner),
        )
        c, d = cur.fetchone()
        if c is not None:
            vals.append(now_us + (c - lease_now))
        if d is not None and confirm is not None:
            vals.append(now_us + (d + confirm - lease_now))
        return from_us(min(vals)) if vals else None

    # -- history ------------------------------------------------------------------------------

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
        for statuses, keep in history_limits(policy):
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
