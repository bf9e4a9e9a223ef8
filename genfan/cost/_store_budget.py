"""Where budgets keep their ledger: SQLite (the default), PostgreSQL or Redis when several
processes or hosts share a budget, or memory for one process.

A ledger holds, per scope and period window, what was spent and the reservations of the calls in
flight. `BudgetStore.reserve` is one atomic step: it drops expired reservations, and admits the
new one only if spent + reserved + amount stays within the limit. So every process sharing the
store sees every other's calls in flight, and the budget is passed at most by what the calls
already in flight cost beyond their reserve. The shared stores also have `lease`: one step that
settles a process's costs and holds room for several of its calls (a lease), which it then
hands out in memory.

* SQLite: a ``BEGIN IMMEDIATE`` transaction on one file (WAL mode), shared by the processes of
  one host. The transaction runs inline (tens of microseconds) when the file is free, and in a
  worker thread, waiting its turn, when another process holds it.
* PostgreSQL (psycopg 3, ``genfan[postgres]``): the scope's row is locked (``FOR UPDATE``) for
  the transaction; psycopg's sync API runs in worker threads (its async API does not run on
  trio).
* Redis: one Lua script per step (atomic on the server), over genfan's anyio RESP client.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import anyio

from .._errors import ConfigurationError, GenfanError, MissingExtraError
from .._redis import script_sha
from ._stores import RedisStore, SQLiteFile, store_from_url

__all__ = [
    "BudgetStore",
    "CostStoreError",
    "Ledger",
    "MemoryBudgetStore",
    "PostgresBudgetStore",
    "RedisBudgetStore",
    "SQLiteBudgetStore",
    "budget_store_from_url",
]

T = TypeVar("T")


class CostStoreError(GenfanError):
    """A budget or cache store could not be used: the database or Redis is down, unreachable,
    refuses the login, or the SQLite file cannot be opened or stays locked. The message names
    the store (never its password) and why."""


@dataclass(frozen=True, slots=True)
class Ledger:
    """A scope's ledger in one period window, as a store answers it.

    Attributes:
        admitted: whether the reservation was admitted (`BudgetStore.reserve` only).
        spent: USD recorded in the window (before this reservation).
        reserved: USD held by live reservations of calls in flight and leases (before this
            one; `lease` answers the others' and the lease's calls in flight).
        granted: USD of free budget a lease was granted (`lease` only).
    """

    admitted: bool
    spent: float
    reserved: float
    granted: float = 0.0


@runtime_checkable
class BudgetStore(Protocol):
    """Where a [`Budget`][genfan.cost.Budget] keeps its ledger. Each method is one atomic step.

    ``window`` names the period window (``"2026-12-06"``, ``"total"``...); ``now`` is Unix time
    (reservations whose ``expires`` has passed no longer count); ``keep_until`` is when the
    window's records may be dropped (``None``: keep them).

    A store may also implement ``lease(scope, window, *, lease, cost, hold, want, least, limit,
    expires, now, keep_until) -> Ledger``, one atomic step that lets a
    [`Budget`][genfan.cost.Budget] hand out many calls' reservations from one hold (the SQLite,
    PostgreSQL and Redis stores do): add ``cost`` to what the window spent, then hold ``hold``
    (the lease's calls in flight) plus a free part as the reservation ``lease``, expiring at
    ``expires``. The free part is ``want`` or what remains of the limit, if less; with ``least``
    set (a call waits for it), the lease is granted only if ``least`` fits as `reserve` would
    admit it, and then at least ``least``. The answer's ``granted`` is the free part,
    ``reserved`` the other reservations plus ``hold``.
    """

    async def reserve(
        self,
        scope: str,
        window: str,
        *,
        reservation: str,
        amount: float,
        limit: float,
        expires: float,
        now: float,
        keep_until: float | None,
    ) -> Ledger:
        """Admit ``amount`` if spent + reserved + amount <= limit (and spent + reserved <
        limit), holding it as ``reservation``; either way, answer the ledger as it was."""
        ...

    async def settle(
        self, scope: str, window: str, *, reservation: str, cost: float, keep_until: float | None
    ) -> None:
        """Drop ``reservation`` and add ``cost`` to what the window spent."""
        ...

    async def ledger(self, scope: str, window: str, *, now: float) -> Ledger:
        """What the window spent and holds in live reservations."""
        ...

    async def reset(self, scope: str, window: str) -> None:
        """Forget the window's spending and reservations."""
        ...

    async def aclose(self) -> None:
        """Close connections."""
        ...


#: USD sums are floats: 0.1 + 0.1 + 0.1 > 0.3. A billionth of a dollar of slack absorbs that.
EPSILON = 1e-9


def _admit(spent: float, reserved: float, amount: float, limit: float) -> bool:
    # `<` as well as `<=`: a reserve of 0 must not slip in once the limit is reached.
    return spent + reserved < limit - EPSILON and spent + reserved + amount <= limit + EPSILON


def _grant(
    spent: float, reserved: float, want: float, least: float | None, limit: float
) -> tuple[bool, float]:
    """A lease's free part: ``want``, or what remains of the limit if less; 0 (refused) when a
    call waits for ``least`` and it does not fit."""
    room = max(0.0, limit - spent - reserved)
    if least is None:
        return True, min(want, room)
    if not _admit(spent, reserved, least, limit):
        return False, 0.0
    return True, max(least, min(want, room))


# -- memory ------------------------------------------------------------------------------------


class MemoryBudgetStore:
    """A ledger in this process's memory: for one process, tests and benchmarks (nothing is
    persisted, and other processes do not see it)."""

    def __init__(self) -> None:
        self._spent: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}

    async def reserve(
        self,
        scope: str,
        window: str,
        *,
        reservation: str,
        amount: float,
        limit: float,
        expires: float,
        now: float,
        keep_until: float | None,
    ) -> Ledger:
        key = (scope, window)
        held = self._held.setdefault(key, {})
        for rid in [r for r, (_, exp) in held.items() if exp <= now]:
            del held[rid]
        spent = self._spent.get(key, 0.0)
        reserved = math.fsum(a for a, _ in held.values())
        ok = _admit(spent, reserved, amount, limit)
        if ok:
            held[reservation] = (amount, expires)
        return Ledger(ok, spent, reserved)

    async def settle(
        self, scope: str, window: str, *, reservation: str, cost: float, keep_until: float | None
    ) -> None:
        key = (scope, window)
        self._held.get(key, {}).pop(reservation, None)
        if cost:
            self._spent[key] = self._spent.get(key, 0.0) + cost

    async def ledger(self, scope: str, window: str, *, now: float) -> Ledger:
        key = (scope, window)
        live = [a for a, exp in self._held.get(key, {}).values() if exp > now]
        return Ledger(True, self._spent.get(key, 0.0), math.fsum(live))

    async def reset(self, scope: str, window: str) -> None:
        self._spent.pop((scope, window), None)
        self._held.pop((scope, window), None)

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return "MemoryBudgetStore()"


# -- SQL (SQLite and PostgreSQL) ---------------------------------------------------------------


class _SQL:
    """The ledger's statements, written with ``?`` placeholders (PostgreSQL's are ``%s``)."""

    def __init__(self, prefix: str, param: str = "?", lock: str = "") -> None:
        self.spend = f"{prefix}budget_spend"
        self.held = f"{prefix}budget_reservations"
        self.param = param
        self.lock = lock
        self._reserves = 0
        self._queries: dict[str, str] = {}

    def q(self, text: str) -> str:
        query = self._queries.get(text)
        if query is None:
            query = self._queries[text] = text.replace("?", self.param)
        return query

    def ddl(self) -> list[str]:
        # SQLite: WITHOUT ROWID tables, one B-tree each (a reservation writes one page, not a
        # table's and an index's). PostgreSQL's tables are heaps with the key as an index.
        tail = "" if self.lock else " WITHOUT ROWID"
        return [
            f"CREATE TABLE IF NOT EXISTS {self.spend} (scope TEXT NOT NULL, win TEXT NOT NULL,"
            f" spent DOUBLE PRECISION NOT NULL DEFAULT 0, PRIMARY KEY (scope, win)){tail}",
            f"CREATE TABLE IF NOT EXISTS {self.held} (scope TEXT NOT NULL, win TEXT NOT NULL,"
            " id TEXT NOT NULL, amount DOUBLE PRECISION NOT NULL,"
            f" expires DOUBLE PRECISION NOT NULL, PRIMARY KEY (scope, win, id)){tail}",
        ]

    def reserve(
        self,
        cur: Any,
        scope: str,
        window: str,
        rid: str,
        amount: float,
        limit: float,
        expires: float,
        now: float,
    ) -> Ledger:
        q = self.q
        if not self.lock:
            # SQLite: the transaction holds the whole file; one read gives both sums (expired
            # reservations left out, and purged now and then).
            cur.execute(
                q(
                    f"SELECT (SELECT spent FROM {self.spend} WHERE scope = ? AND win = ?),"
                    f" (SELECT COALESCE(SUM(amount), 0) FROM {self.held}"
                    " WHERE scope = ? AND win = ? AND expires > ?)"
                ),
                (scope, window, scope, window, now),
            )
            row = cur.fetchone()
            spent, reserved = float(row[0] or 0.0), float(row[1])
            self._reserves += 1
            if self._reserves % 256 == 0:
                cur.execute(q(f"DELETE FROM {self.held} WHERE expires <= ?"), (now,))
        else:
            spent, reserved = self._locked_totals(cur, scope, window, now)
        ok = _admit(spent, reserved, amount, limit)
        if ok:
            cur.execute(
                q(
                    f"INSERT INTO {self.held} (scope, win, id, amount, expires)"
                    " VALUES (?, ?, ?, ?, ?)"
                ),
                (scope, window, rid, amount, expires),
            )
        return Ledger(ok, spent, reserved)

    def lease(
        self,
        cur: Any,
        scope: str,
        window: str,
        lid: str,
        cost: float,
        hold: float,
        want: float,
        least: float | None,
        limit: float,
        expires: float,
        now: float,
    ) -> Ledger:
        q = self.q
        if self.lock:
            cur.execute(
                q(
                    f"INSERT INTO {self.spend} (scope, win, spent) VALUES (?, ?, 0)"
                    " ON CONFLICT (scope, win) DO NOTHING"
                ),
                (scope, window),
            )
        cur.execute(
            q(
                f"SELECT (SELECT spent FROM {self.spend} WHERE scope = ? AND win = ?{self.lock}),"
                f" (SELECT COALESCE(SUM(amount), 0) FROM {self.held}"
                " WHERE scope = ? AND win = ? AND expires > ? AND id <> ?)"
            )
            if not self.lock
            else q(
                f"SELECT spent, (SELECT COALESCE(SUM(amount), 0) FROM {self.held}"
                " WHERE scope = ? AND win = ? AND expires > ? AND id <> ?)"
                f" FROM {self.spend} WHERE scope = ? AND win = ?{self.lock}"
            ),
            (scope, window, scope, window, now, lid)
            if not self.lock
            else (scope, window, now, lid, scope, window),
        )
        row = cur.fetchone()
        spent, others = float(row[0] or 0.0), float(row[1])
        if cost:
            cur.execute(
                q(
                    f"INSERT INTO {self.spend} (scope, win, spent) VALUES (?, ?, ?)"
                    f" ON CONFLICT (scope, win) DO UPDATE SET spent = {self.spend}.spent"
                    " + excluded.spent"
                ),
                (scope, window, cost),
            )
            spent += cost
        ok, granted = _grant(spent, others + hold, want, least, limit)
        if hold + granted > 0:
            # (the scope is locked: an UPDATE, else an INSERT, needs no conflict target)
            cur.execute(
                q(
                    f"UPDATE {self.held} SET amount = ?, expires = ?"
                    " WHERE scope = ? AND win = ? AND id = ?"
                ),
                (hold + granted, expires, scope, window, lid),
            )
            if cur.rowcount == 0:
                cur.execute(
                    q(
                        f"INSERT INTO {self.held} (scope, win, id, amount, expires)"
                        " VALUES (?, ?, ?, ?, ?)"
                    ),
                    (scope, window, lid, hold + granted, expires),
                )
        else:
            cur.execute(
                q(f"DELETE FROM {self.held} WHERE scope = ? AND win = ? AND id = ?"),
                (scope, window, lid),
            )
        return Ledger(ok, spent, others + hold, granted)

    def _locked_totals(self, cur: Any, scope: str, window: str, now: float) -> tuple[float, float]:
        q = self.q
        if self.lock:
            # The scope's row, locked for the transaction: reservations of one scope queue here.
            cur.execute(
                q(
                    f"INSERT INTO {self.spend} (scope, win, spent) VALUES (?, ?, 0)"
                    " ON CONFLICT (scope, win) DO NOTHING"
                ),
                (scope, window),
            )
        cur.execute(
            q(f"SELECT spent FROM {self.spend} WHERE scope = ? AND win = ?{self.lock}"),
            (scope, window),
        )
        row = cur.fetchone()
        spent = float(row[0]) if row else 0.0
        cur.execute(
            q(f"DELETE FROM {self.held} WHERE scope = ? AND win = ? AND expires <= ?"),
            (scope, window, now),
        )
        cur.execute(
            q(f"SELECT COALESCE(SUM(amount), 0) FROM {self.held} WHERE scope = ? AND win = ?"),
            (scope, window),
        )
        return spent, float(cur.fetchone()[0])

    def settle(self, cur: Any, scope: str, window: str, rid: str, cost: float) -> None:
        q = self.q
        cur.execute(
            q(f"DELETE FROM {self.held} WHERE scope = ? AND win = ? AND id = ?"),
            (scope, window, rid),
        )
        if cost:
            cur.execute(
                q(
                    f"INSERT INTO {self.spend} (scope, win, spent) VALUES (?, ?, ?)"
                    f" ON CONFLICT (scope, win) DO UPDATE SET spent = {self.spend}.spent"
                    " + excluded.spent"
                ),
                (scope, window, cost),
            )

    def ledger(self, cur: Any, scope: str, window: str, now: float) -> Ledger:
        q = self.q
        cur.execute(
            q(f"SELECT spent FROM {self.spend} WHERE scope = ? AND win = ?"), (scope, window)
        )
        row = cur.fetchone()
        cur.execute(
            q(
                f"SELECT COALESCE(SUM(amount), 0) FROM {self.held}"
                " WHERE scope = ? AND win = ? AND expires > ?"
            ),
            (scope, window, now),
        )
        return Ledger(True, float(row[0]) if row else 0.0, float(cur.fetchone()[0]))

    def reset(self, cur: Any, scope: str, window: str) -> None:
        for table in (self.spend, self.held):
            cur.execute(self.q(f"DELETE FROM {table} WHERE scope = ? AND win = ?"), (scope, window))


def _check_prefix(owner: str, prefix: str) -> None:
    if not isinstance(prefix, str) or (prefix and not prefix.replace("_", "").isalnum()):
        raise ConfigurationError(f"{owner}.prefix must be letters, digits or _, got {prefix!r}")


class _SQLLedger:
    """The steps of a ledger in SQL tables (SQLite, PostgreSQL): each is one transaction that
    `_step` runs on a cursor."""

    _sql: _SQL

    async def _step(self, fn: Callable[[Any], T]) -> T:
        raise NotImplementedError

    async def reserve(
        self,
        scope: str,
        window: str,
        *,
        reservation: str,
        amount: float,
        limit: float,
        expires: float,
        now: float,
        keep_until: float | None,
    ) -> Ledger:
        return await self._step(
            lambda cur: self._sql.reserve(
                cur, scope, window, reservation, amount, limit, expires, now
            )
        )

    async def settle(
        self, scope: str, window: str, *, reservation: str, cost: float, keep_until: float | None
    ) -> None:
        await self._step(lambda cur: self._sql.settle(cur, scope, window, reservation, cost))

    async def lease(
        self,
        scope: str,
        window: str,
        *,
        lease: str,
        cost: float,
        hold: float,
        want: float,
        least: float | None,
        limit: float,
        expires: float,
        now: float,
        keep_until: float | None,
    ) -> Ledger:
        """Settle ``cost`` and hold the lease ``lease`` again (see `BudgetStore`)."""
        return await self._step(
            lambda cur: self._sql.lease(
                cur, scope, window, lease, cost, hold, want, least, limit, expires, now
            )
        )

    async def ledger(self, scope: str, window: str, *, now: float) -> Ledger:
        return await self._step(lambda cur: self._sql.ledger(cur, scope, window, now))

    async def reset(self, scope: str, window: str) -> None:
        await self._step(lambda cur: self._sql.reset(cur, scope, window))


class SQLiteBudgetStore(_SQLLedger):
    """The default ledger: one SQLite file, created on first use, shared by the processes of
    one host (WAL mode; each step is a ``BEGIN IMMEDIATE`` transaction).

    A step runs inline when the file is free (no thread hop: tens of microseconds), and in a
    worker thread, waiting up to ``timeout`` seconds for its turn, when another process holds
    the file.

    Args:
        path: the database file.
        prefix: table name prefix (tables ``{prefix}budget_spend``, ``{prefix}budget_reservations``).
        timeout: seconds to wait for the file when another process holds it.
    """

    def __init__(
        self,
        path: str | Path = "genfan-budgets.db",
        *,
        prefix: str = "genfan_",
        timeout: float = 30.0,
    ) -> None:
        _check_prefix("SQLiteBudgetStore", prefix)
        if str(path) == ":memory:":
            raise ConfigurationError(
                "SQLiteBudgetStore needs a file; for a budget in this process's memory use"
                " MemoryBudgetStore()"
            )
        if not (isinstance(timeout, int | float) and 0 < timeout <= 3600):
            raise ConfigurationError(
                f"SQLiteBudgetStore.timeout must be seconds in (0, 3600], got {timeout!r}"
            )
        self.path = str(path)
        self.timeout = float(timeout)
        self._sql = _SQL(prefix)
        self._file = SQLiteFile(
            self.path,
            what="the SQLite budget store",
            error=CostStoreError,
            timeout=self.timeout,
            schema=self._sql.ddl,
        )

    async def _step(self, fn: Callable[[Any], T]) -> T:
        return await self._file.write(fn)

    async def aclose(self) -> None:
        self._file.close()

    def __repr__(self) -> str:
        return f"SQLiteBudgetStore({self.path!r})"


class PostgresBudgetStore(_SQLLedger):
    """A ledger in PostgreSQL, shared by processes on several hosts (psycopg 3,
    ``pip install 'genfan[postgres]'``).

    Each step is one transaction that locks the scope's row (``FOR UPDATE``), so the
    reservations of one scope queue there while other scopes go on. psycopg's sync API runs in
    worker threads, on at most ``pool_size`` connections; a connection that fails is dropped
    and the step fails with [`CostStoreError`][genfan.cost.CostStoreError] (the next one
    connects again).

    Args:
        dsn: a libpq connection string or URL, e.g. ``"postgresql://127.0.0.1/app"``.
        prefix: table name prefix (a ``schema.`` prefix is allowed: ``"billing.genfan_"``,
            the schema must exist).
        pool_size: connections at most.
        connect_timeout: seconds to wait for a connection.
    """

    def __init__(
        self,
        dsn: str,
        *,
        prefix: str = "genfan_",
        pool_size: int = 4,
        connect_timeout: float = 10.0,
    ) -> None:
        schema, dot, table_prefix = prefix.rpartition(".")
        _check_prefix("PostgresBudgetStore", table_prefix)
        if dot and not schema.replace("_", "").isalnum():
            raise ConfigurationError(
                f"PostgresBudgetStore.prefix's schema must be letters, digits or _, got {schema!r}"
            )
        if not (isinstance(pool_size, int) and 1 <= pool_size <= 64):
            raise ConfigurationError(
                f"PostgresBudgetStore.pool_size must be 1..64, got {pool_size!r}"
            )
        if not (isinstance(connect_timeout, int | float) and 0 < connect_timeout <= 600):
            raise ConfigurationError(
                "PostgresBudgetStore.connect_timeout must be seconds in (0, 600],"
                f" got {connect_timeout!r}"
            )
        self.dsn = dsn
        self.prefix = prefix
        self.connect_timeout = float(connect_timeout)
        self._sql = _SQL(prefix, param="%s", lock=" FOR UPDATE")
        self._idle: list[Any] = []
        self._limiter = anyio.CapacityLimiter(pool_size)
        self._created = False
        self._lock = threading.Lock()

    def _connection(self) -> Any:
        try:
            import psycopg
        except ImportError as exc:
            raise MissingExtraError("psycopg", "postgres", reason="PostgresBudgetStore") from exc
        with self._lock:
            if self._idle:
                return self._idle.pop()
        try:
            conn = psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=max(1, round(self.connect_timeout))
            )
        except psycopg.Error as exc:
            raise CostStoreError(f"cannot connect to {self!r}: {_one_line(exc)}") from exc
        if not self._created:
            try:
                with conn.transaction(), conn.cursor() as cur:
                    # Serialize the DDL of processes starting at once.
                    cur.execute("SELECT pg_advisory_xact_lock(7301946217)")
                    for statement in self._sql.ddl():
                        cur.execute(statement)
            except psycopg.Error as exc:
                conn.close()
                raise CostStoreError(f"{self!r}: {_one_line(exc)}") from exc
            self._created = True
        return conn

    def _tx(self, fn: Callable[[Any], T]) -> T:
        import psycopg

        conn = self._connection()
        try:
            with conn.transaction(), conn.cursor() as cur:
                out = fn(cur)
        except psycopg.Error as exc:
            conn.close()
            raise CostStoreError(f"{self!r}: {_one_line(exc)}") from exc
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._idle.append(conn)
        return out

    async def _step(self, fn: Callable[[Any], T]) -> T:
        return await anyio.to_thread.run_sync(self._tx, fn, limiter=self._limiter)

    async def drop(self) -> None:
        """Drop the ledger's tables (tests, teardown)."""
        sql = self._sql
        await self._step(
            lambda cur: [cur.execute(f"DROP TABLE IF EXISTS {t}") for t in (sql.spend, sql.held)]
        )
        self._created = False

    async def aclose(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __repr__(self) -> str:
        # Never the DSN: it may hold a password.
        return f"PostgresBudgetStore(prefix={self.prefix!r})"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# -- Redis -------------------------------------------------------------------------------------

#: One script for every step, atomic on the server. Amounts travel as strings (%.17g): Redis
#: would truncate a Lua number in a reply to an integer.
_SCRIPT = """
-- KEYS: spent (string), reservations' expiry (zset id -> expires), amounts (hash id -> USD)
-- ARGV[1] op: reserve | settle | ledger | reset
-- reserve: ARGV[2] id, [3] amount, [4] limit, [5] expires, [6] now, [7] keep the window's
--          spending this many ms more ("" for ever)
-- settle:  ARGV[2] id, [3] cost (INCRBYFLOAT keeps the key's expiry)
-- ledger:  ARGV[6] now
-- lease:   ARGV[2] id, [3] cost to add to spent, [4] limit, [5] expires, [6] now, [7] keep,
--          [8] hold (the lease's calls in flight), [9] free USD wanted, [10] least ("": none)
local op = ARGV[1]
local function fmt(x) return string.format('%.17g', x) end
-- a key's expiry is only ever pushed back: another process's reservation may outlive ours
local function expire_after(key, ms)
  local left = redis.call('PTTL', key)
  if left >= 0 and left < tonumber(ms) then redis.call('PEXPIRE', key, ms) end
  if left == -1 then redis.call('PEXPIRE', key, ms) end
end
if op == 'reset' then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  return {1, '0', '0'}
end
if op == 'settle' then
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('HDEL', KEYS[3], ARGV[2])
  local cost = tonumber(ARGV[3])
  if cost ~= 0 then redis.call('INCRBYFLOAT', KEYS[1], ARGV[3]) end
  return {1, '0', '0'}
end
local now = tonumber(ARGV[6])
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
local reserved = 0
if op == 'ledger' then
  local live = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[6], '+inf')
  for i = 1, #live do reserved = reserved + tonumber(redis.call('HGET', KEYS[3], live[i]) or '0') end
  return {1, fmt(spent), fmt(reserved)}
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[6])
for i = 1, #expired do
  redis.call('ZREM', KEYS[2], expired[i])
  redis.call('HDEL', KEYS[3], expired[i])
end
local amounts = redis.call('HVALS', KEYS[3])
for i = 1, #amounts do reserved = reserved + tonumber(amounts[i]) end
local limit = tonumber(ARGV[4])
local function hold(id, amount)
  redis.call('ZADD', KEYS[2], ARGV[5], id)
  redis.call('HSET', KEYS[3], id, fmt(amount))
  -- reservations outlive no process by more than their expiry
  local ttl = string.format('%d', math.ceil((tonumber(ARGV[5]) - now) * 1000) + 1000)
  expire_after(KEYS[2], ttl)
  expire_after(KEYS[3], ttl)
  if ARGV[7] ~= '' then
    redis.call('SET', KEYS[1], '0', 'NX')
    redis.call('PEXPIRE', KEYS[1], ARGV[7])
  end
end
if op == 'lease' then
  reserved = reserved - tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0')
  local cost = tonumber(ARGV[3])
  if cost ~= 0 then
    if ARGV[7] ~= '' then redis.call('SET', KEYS[1], '0', 'NX', 'PX', ARGV[7]) end
    redis.call('INCRBYFLOAT', KEYS[1], ARGV[3])
    spent = spent + cost
  end
  local held, want = tonumber(ARGV[8]), tonumber(ARGV[9])
  local used = spent + reserved + held
  local room = math.max(0, limit - used)
  local ok, granted = 1, math.min(want, room)
  if ARGV[10] ~= '' then
    local least = tonumber(ARGV[10])
    if used < limit - 1e-9 and used + least <= limit + 1e-9 then
      granted = math.max(least, granted)
    else
      ok, granted = 0, 0
    end
  end
  if held + granted > 0 then
    hold(ARGV[2], held + granted)
  else
    redis.call('ZREM', KEYS[2], ARGV[2])
    redis.call('HDEL', KEYS[3], ARGV[2])
  end
  return {ok, fmt(spent), fmt(reserved + held), fmt(granted)}
end
local amount = tonumber(ARGV[3])
if spent + reserved < limit - 1e-9 and spent + reserved + amount <= limit + 1e-9 then
  hold(ARGV[2], amount)
  return {1, fmt(spent), fmt(reserved)}
end
return {0, fmt(spent), fmt(reserved)}
"""
_SHA = script_sha(_SCRIPT)


class RedisBudgetStore(RedisStore):
    """A ledger in Redis, shared by processes on several hosts; each step is one Lua script
    (atomic on the server), sent by genfan's anyio RESP client (asyncio and trio).

    Keys: ``{key_prefix}{{scope}}:{window}:spent``, ``...:held``, ``...:amounts`` (the braces
    keep a scope in one Redis Cluster slot). Reservations expire with their call's
    ``reservation_ttl``, and a periodic window's spending once the window is over.

    Args:
        url: ``redis://[[username]:password@]host[:port][/db]``.
        key_prefix: prepended to every key.
        timeout: seconds for one command, connecting included.
        max_connections: connections open at once.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        key_prefix: str = "genfan:budget:",
        timeout: float = 1.0,
        max_connections: int = 8,
    ) -> None:
        super().__init__(
            url,
            what="the Redis budget store",
            error=CostStoreError,
            key_prefix=key_prefix,
            timeout=timeout,
            max_connections=max_connections,
        )

    def _keys(self, scope: str, window: str) -> list[str]:
        base = f"{self.key_prefix}{{{scope}}}:{window}"
        return [f"{base}:spent", f"{base}:held", f"{base}:amounts"]

    async def _call(self, scope: str, window: str, args: list[str]) -> Ledger:
        reply = await self._client.script(_SCRIPT, _SHA, self._keys(scope, window), args)
        if not (
            isinstance(reply, list)
            and len(reply) in (3, 4)
            and all(isinstance(x, bytes) for x in reply[1:])
        ):
            raise CostStoreError(f"Redis at {self.url}: unexpected script reply {reply!r:.80}")
        granted = float(reply[3]) if len(reply) == 4 else 0.0  # type: ignore[arg-type]
        return Ledger(reply[0] == 1, float(reply[1]), float(reply[2]), granted)  # type: ignore[arg-type]

    async def reserve(
        self,
        scope: str,
        window: str,
        *,
        reservation: str,
        amount: float,
        limit: float,
        expires: float,
        now: float,
        keep_until: float | None,
    ) -> Ledger:
        args = _hold_args("reserve", reservation, amount, limit, expires, now, keep_until)
        return await self._call(scope, window, args)

    async def settle(
        self, scope: str, window: str, *, reservation: str, cost: float, keep_until: float | None
    ) -> None:
        await self._call(scope, window, ["settle", reservation, repr(float(cost)), "", "", "", ""])

    async def lease(
        self,
        scope: str,
        window: str,
        *,
        lease: str,
        cost: float,
        hold: float,
        want: float,
        least: float | None,
        limit: float,
        expires: float,
        now: float,
        keep_until: float | None,
    ) -> Ledger:
        """Settle ``cost`` and hold the lease ``lease`` again (see `BudgetStore`)."""
        args = _hold_args("lease", lease, cost, limit, expires, now, keep_until)
        args += [repr(float(hold)), repr(float(want)), "" if least is None else repr(float(least))]
        return await self._call(scope, window, args)

    async def ledger(self, scope: str, window: str, *, now: float) -> Ledger:
        return await self._call(scope, window, ["ledger", "", "", "", "", repr(float(now)), ""])

    async def reset(self, scope: str, window: str) -> None:
        await self._call(scope, window, ["reset", "", "", "", "", "", ""])


def _hold_args(
    op: str,
    rid: str,
    amount: float,
    limit: float,
    expires: float,
    now: float,
    keep_until: float | None,
) -> list[str]:
    """The script's ARGV[1..7] for a step that holds a reservation (reserve, lease)."""
    keep = "" if keep_until is None else str(max(1, math.ceil((keep_until - now) * 1000)))
    return [op, rid, *(repr(float(x)) for x in (amount, limit, expires, now)), keep]


def budget_store_from_url(url: str | Path) -> BudgetStore:
    """A ledger from a URL: ``sqlite:///path.db`` or a plain path, ``postgresql://host/db``,
    ``redis://host:port/db``, or ``memory://``.

    Raises:
        ConfigurationError: another scheme (the message never shows a password).
    """
    sqlite: Callable[[str], BudgetStore] = SQLiteBudgetStore
    memory: Callable[[], BudgetStore] = MemoryBudgetStore
    schemes: dict[str, Callable[[str], BudgetStore]] = {
        "postgresql": PostgresBudgetStore,
        "postgres": PostgresBudgetStore,
        "redis": RedisBudgetStore,
        "rediss": RedisBudgetStore,
    }
    return store_from_url(
        url,
        what="budget store",
        sqlite=sqlite,
        default_path="genfan-budgets.db",
        memory=memory,
        schemes=schemes,
        forms="sqlite:///path.db, postgresql://host/db, redis://host:port/db or memory://",
    )
