"""The store: where a scheduler keeps schedules and run history, shared by its replicas.

[`Store`][genfan.schedule.Store] is the interface the scheduler uses: every operation is one transaction, whose
body is the dialect's ``SQL`` (``_sql``). ``PooledStore`` is what both SQL stores (``_sqlite``,
``_postgres``) share: a few blocking connections (stdlib ``sqlite3``; psycopg 3's sync API,
which unlike its async API works under trio, through a ``psycopg_pool`` pool that checks each
connection before handing it out) used in worker threads through ``anyio.to_thread``, the tables
created once, on first use, and transactions retried (genfan's one retry engine) when the
connection to the store failed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from .. import telemetry
from .._errors import GenfanError
from ..resilience import Retrier, RetryPolicy
from ._planning import check_backfill
from ._policy import Overlap, SchedulePolicy
from ._records import (
    BackfillResult,
    ClaimResult,
    Conflict,
    DueResult,
    Heartbeat,
    Outcome,
    Renewal,
    RunKey,
    RunRecord,
    RunStatus,
    ScheduleInfo,
)
from ._sql import TxClock
from ._triggers import Trigger

if TYPE_CHECKING:
    from ._sql import SQL

__all__ = ["Pool", "PooledStore", "Store", "StoreUnavailableError"]

T = TypeVar("T")

#: How a transaction that lost its connection is retried: three tries within about a second
#: (a dead pooled connection is replaced at once; a store that stays down is reported).
TX_RETRY = RetryPolicy(attempts=3, initial=0.1, multiplier=4, max_delay=1.0, jitter="full")


class StoreUnavailableError(GenfanError):
    """The scheduler's store could not be reached or used (the database is down, unreachable,
    refuses the login, or the SQLite file cannot be opened or stays locked); the message says
    which store and why. A running scheduler logs it and tries again; at start it is raised."""


class Store:
    """Where a scheduler keeps schedules and run history (async; see [`SQLiteStore`][genfan.schedule.SQLiteStore] and
    [`PostgresStore`][genfan.schedule.PostgresStore]).

    Several schedulers (replicas) may share one store; they coordinate through it alone. Leases
    are measured on the store's clock, read inside each transaction once it holds its locks:
    PostgreSQL's server clock; for SQLite, whose replicas share one host, that host's clock
    (the ``now`` a caller passes, advanced by the time the transaction waited for the file).
    """

    _sql: SQL
    #: the blocking calls run in worker threads, so a transaction's time follows the real time
    #: it waited (see `TxClock`)
    _follow: bool = True

    async def setup(self) -> None:
        """Create the tables if needed (safe to call from several replicas at once)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close the connections."""
        raise NotImplementedError

    async def _tx(self, fn: Callable[[Any], T], *, write: bool = True) -> T:
        raise NotImplementedError

    def _clock(self, now: datetime) -> TxClock:
        return TxClock(now, follow=self._follow)

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
        the history yet (see `Scheduler.backfill`)."""
        check_backfill(start, end, now, overlap, max_fires)
        return await self._tx(
            lambda c: self._sql.backfill(c, id, start, end, now, overlap, max_fires)
        )

    async def process_due(self, now: datetime, limit: int = 500) -> DueResult:
        """Create the runs of every due schedule (misfire grace and coalescing applied)."""
        clock = self._clock(now)
        return await self._tx(lambda c: self._sql.process_due(c, clock, limit))

    async def claim(
        self,
        owner: str,
        now: datetime,
        lease: float,
        limit: int,
        *,
        mine: Mapping[RunKey, int] | None = None,
    ) -> ClaimResult:
        """Claim up to ``limit`` due runs for ``owner`` (overlap and grace applied), each with a
        lease of ``lease`` seconds on the store's clock and a new fencing token. ``mine``: the
        runs ``owner`` is running, by fencing token (renewed, never taken over)."""
        clock = self._clock(now)
        return await self._tx(lambda c: self._sql.claim(c, owner, clock, lease, limit, mine))

    async def cycle(
        self,
        owner: str,
        now: datetime,
        lease: float,
        limit: int,
        batch: int = 500,
        *,
        mine: Mapping[RunKey, int] | None = None,
    ) -> tuple[DueResult, ClaimResult, datetime | None]:
        """`process_due`, `claim` and `next_wakeup` in one transaction."""
        clock = self._clock(now)
        return await self._tx(lambda c: self._sql.cycle(c, owner, clock, lease, limit, batch, mine))

    async def finish(
        self,
        key: RunKey,
        owner: str,
        status: RunStatus,
        now: datetime,
        error: str | None,
        attempts: int,
        *,
        token: int | None = None,
        started: datetime | None = None,
    ) -> bool:
        """Record a run's outcome; ``False`` (refused) if ``owner`` no longer holds it (under
        ``token``, when given: a replica that lost its lease cannot record a result). The
        schedule's history limits are applied in the same transaction."""
        outcome = Outcome(key, status, now, error, attempts, token, started)
        return (await self.finish_many(owner, [outcome]))[0]

    async def finish_many(
        self,
        owner: str,
        items: Sequence[Outcome | tuple[RunKey, RunStatus, datetime, str | None, int]],
    ) -> list[bool]:
        """`finish` for several runs in one transaction."""
        outcomes = [i if isinstance(i, Outcome) else Outcome(*i) for i in items]
        return await self._tx(lambda c: self._sql.finish_many(c, owner, outcomes))

    async def record_attempt(
        self, key: RunKey, owner: str, attempts: int, *, token: int | None = None
    ) -> bool:
        return await self._tx(lambda c: self._sql.record_attempt(c, key, owner, attempts, token))

    async def heartbeat(self, owner: str, now: datetime, lease: float) -> Heartbeat:
        """Renew every lease ``owner`` holds; say which runs it holds and which to cancel."""
        clock = self._clock(now)
        return await self._tx(lambda c: self._sql.heartbeat(c, owner, clock, lease))

    async def renew(
        self, owner: str, now: datetime, lease: float, items: Sequence[Renewal]
    ) -> Heartbeat:
        """Renew the leases of ``items`` that ``owner`` still holds under their fencing tokens;
        say which are held and which another replica asked to cancel."""
        clock = self._clock(now)
        return await self._tx(lambda c: self._sql.renew(c, owner, clock, lease, items))

    async def release(self, owner: str, keys: Sequence[RunKey]) -> None:
        """Hand runs back unfinished (scheduler shutdown): they become pending again."""
        if keys:
            await self._tx(lambda c: self._sql.release(c, owner, keys))

    async def next_wakeup(
        self, owner: str, now: datetime, lease: float | None = None
    ) -> datetime | None:
        """The next time something is due: a fire time, a jittered run, a lease expiry."""
        clock = self._clock(now)
        return await self._tx(lambda c: self._sql.next_wakeup(c, owner, clock, lease), write=False)

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


class Pool:
    """A few blocking connections, used one per worker thread (the SQLite store's)."""

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
        finally:
            self._idle.put(conn)

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        while True:
            try:
                self._idle.get_nowait()
            except queue.Empty:
                break
        for c in conns:
            try:
                c.close()
            except Exception:  # pragma: no cover - closing a broken connection
                pass


class PooledStore(Store):
    """What the SQL stores share: connections in worker threads, the tables created once, on
    first use, and a transaction retried when its connection to the store failed."""

    _pool: Any
    _ready: bool

    def _create(self, cur: Any) -> None:
        """Create the tables, or add what an earlier version's lack (in the one transaction
        `setup` runs)."""
        for stmt in self._sql.ddl():
            cur.execute(stmt)
        self._sql.migrate(cur)

    def _open(self) -> None:
        """Open the connections (blocking; the PostgreSQL store opens its pool here)."""

    async def setup(self) -> None:
        if self._ready:
            return
        self._ready = True
        try:
            await self._call(self._open)
            # Not retried: a store that cannot be used at start is reported at once.
            await self._retried(self._create, True, retry=False)
        except BaseException:
            self._ready = False
            raise

    async def _call(self, fn: Callable[[], T]) -> T:
        """``fn`` in a worker thread, as the store's transactions run."""
        raise NotImplementedError

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError | None:
        """The error to raise for a driver error that means the store could not be used (a
        transaction retried), or ``None`` for any other error (raised as it is)."""
        return None

    async def _retried(self, fn: Callable[[Any], T], write: bool, *, retry: bool = True) -> T:
        """Run the transaction ``fn``; a connection that failed is retried with a fresh one
        (three tries), then [`StoreUnavailableError`][genfan.schedule.StoreUnavailableError]."""

        async def once() -> T:
            try:
                return await self._call(lambda: self._run(fn, write))
            except Exception as exc:
                mapped = self._unavailable(exc)
                if mapped is None:
                    raise
                raise mapped from exc

        def retrying(state: Any) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            telemetry.event(
                "schedule_store_retry",
                level="warning",
                store=repr(self),
                attempt=state.attempt_number,
                error=str(error),
            )

        if not retry:
            return await once()
        retrier = Retrier(
            TX_RETRY,
            name=repr(self),
            kind="store",
            retry_on=lambda e: isinstance(e, StoreUnavailableError),
            on_retry=retrying,
        )
        return await retrier(once)

    def _run(self, fn: Callable[[Any], T], write: bool) -> T:
        raise NotImplementedError

    async def _tx(self, fn: Callable[[Any], T], *, write: bool = True) -> T:
        if not self._ready:
            await self.setup()
        return await self._retried(fn, write)

    async def aclose(self) -> None:
        self._pool.close()
        self._ready = False


def one_line(exc: BaseException) -> str:
    """A driver's error message on one line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
