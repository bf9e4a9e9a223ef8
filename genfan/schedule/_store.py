"""The store: where a scheduler keeps schedules and run history, shared by its replicas.

:class:`Store` is the interface the scheduler uses: every operation is one transaction, whose
body is the dialect's ``SQL`` (``_sql``). ``PooledStore`` is what both SQL stores (``_sqlite``,
``_postgres``) share: a few blocking connections (stdlib ``sqlite3``, psycopg 3's sync API,
which unlike its async API works under trio) used in worker threads through
``anyio.to_thread``, and the tables created once, on first use.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from ._planning import check_backfill
from ._policy import Overlap, SchedulePolicy
from ._records import (
    BackfillResult,
    ClaimResult,
    Conflict,
    DueResult,
    Heartbeat,
    RunKey,
    RunRecord,
    RunStatus,
    ScheduleInfo,
)
from ._triggers import Trigger

if TYPE_CHECKING:
    from ._sql import SQL

__all__ = ["Pool", "PooledStore", "Store"]

T = TypeVar("T")


class Store:
    """Where a scheduler keeps schedules and run history (async; see :class:`SQLiteStore` and
    :class:`PostgresStore`).

    Several schedulers (replicas) may share one store; they coordinate through it alone.
    """

    _sql: SQL

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
        check_backfill(start, end, now, overlap, max_fires)
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


class Pool:
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


class PooledStore(Store):
    """What the SQL stores share: a connection pool, and the tables created once, on first use."""

    _pool: Pool
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
