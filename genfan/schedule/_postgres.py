"""PostgreSQL: the store for replicas on several hosts (psycopg 3, ``genfan[postgres]``).

Claims use ``SELECT ... FOR UPDATE SKIP LOCKED``, so replicas never wait on each other's rows.
psycopg's sync API runs in worker threads (unlike its async API it works under trio), on
connections kept by a ``psycopg_pool.ConnectionPool`` that checks each one before handing it out
(a connection the server dropped is replaced, not reused). Leases are on the server's clock
(``clock_timestamp()``, read once the transaction holds its row locks).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

from .._errors import ConfigurationError, MissingExtraError
from ._sql import SQL, TxClock
from ._store import PooledStore, StoreUnavailableError, one_line

__all__ = ["PostgresSQL", "PostgresStore"]

T = TypeVar("T")


class PostgresSQL(SQL):
    """PostgreSQL's dialect: ``%s`` placeholders, row locks that skip other replicas' rows,
    the catalog in ``information_schema``."""

    PARAM = "%s"
    LOCK_ROW = " FOR UPDATE"
    LOCK_SKIP = " FOR UPDATE SKIP LOCKED"
    LOCK_CLAIM = " FOR UPDATE OF r SKIP LOCKED"
    ADD_COLUMN = "ADD COLUMN IF NOT EXISTS "

    # clock_timestamp(), not now(): the time at this statement, after any lock wait.
    LEASE_NOW_SQL = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::bigint"

    def lease_now(self, cur: Any, clock: TxClock) -> int:
        cur.execute(f"SELECT {self.LEASE_NOW_SQL}")
        return int(cur.fetchone()[0])

    def fencing_ddl(self) -> list[str]:
        return [self.q("CREATE SEQUENCE IF NOT EXISTS {F}")]

    def next_tokens(self, cur: Any, n: int) -> list[int]:
        if n <= 0:
            return []
        cur.execute(self.q("SELECT nextval('{F}') FROM generate_series(1, ?)"), (n,))
        return sorted(int(r[0]) for r in cur.fetchall())

    def run_columns(self, cur: Any) -> set[str]:
        schema, _, table = f"{self.ns}runs".rpartition(".")
        cur.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = %s",
            (schema.lower(), table),  # the unquoted schema name was folded to lower case
        )
        return {r[0] for r in cur.fetchall()}


class PostgresStore(PooledStore):
    """PostgreSQL, for replicas on several hosts (psycopg 3, ``pip install 'genfan[postgres]'``).

    Claims use ``SELECT ... FOR UPDATE SKIP LOCKED``, so replicas never wait on each other's
    rows. The tables live in ``schema`` (created if missing).

    Connections come from a ``psycopg_pool`` pool that checks each before handing it out, so a
    connection the server dropped (a restart, ``pg_terminate_backend``, a network cut) is
    replaced; a transaction whose connection fails is retried on a fresh one. Leases are on the
    server's clock.

    Args:
        dsn: a libpq connection string or URL, e.g. ``"postgresql://127.0.0.1/app"``.
        schema: the schema for genfan's tables.
        pool_size: connections per store (each blocking call uses one in a worker thread).
        connect_timeout: seconds to wait for a connection (at start, and from the pool).
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "genfan",
        pool_size: int = 2,
        connect_timeout: float = 10.0,
    ) -> None:
        if not schema.replace("_", "").isalnum() or schema[0].isdigit():
            raise ConfigurationError(
                f"PostgresStore.schema must be letters, digits or _ (not first), got {schema!r}"
            )
        if not 1 <= pool_size <= 64:
            raise ConfigurationError(f"PostgresStore.pool_size must be 1..64, got {pool_size}")
        if not 0 < connect_timeout <= 600:
            raise ConfigurationError(
                f"PostgresStore.connect_timeout must be > 0 and <= 600 seconds, got "
                f"{connect_timeout!r}"
            )
        self.dsn = dsn
        self.schema = schema
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self._sql = PostgresSQL(ns=f"{schema}.", ix="genfan_")
        self._pool: Any = None
        self._limiter = anyio.CapacityLimiter(pool_size)
        self._ready = False

    def _open(self) -> None:
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            missing = "psycopg" if "psycopg_pool" not in str(exc) else "psycopg-pool"
            raise MissingExtraError(missing, "postgres", reason="PostgresStore") from exc
        if self._pool is not None:
            return
        # One connection first: if the store cannot be reached, say why (the pool would only
        # time out).
        try:
            psycopg.connect(self.dsn, connect_timeout=max(1, round(self.connect_timeout))).close()
        except psycopg.Error as exc:
            raise StoreUnavailableError(
                f"cannot connect to the PostgreSQL store {self!r}: {one_line(exc)}"
            ) from exc
        pool = ConnectionPool(
            self.dsn,
            min_size=1,
            max_size=self.pool_size,
            kwargs={"autocommit": True},
            check=ConnectionPool.check_connection,
            timeout=self.connect_timeout,
            name=f"genfan-{self.schema}",
            open=False,
        )
        try:
            pool.open(wait=True, timeout=self.connect_timeout)
        except psycopg.Error as exc:
            pool.close()
            raise StoreUnavailableError(
                f"cannot connect to the PostgreSQL store {self!r}: {one_line(exc)}"
            ) from exc
        self._pool = pool

    def _run(self, fn: Callable[[Any], T], write: bool) -> T:
        with self._pool.connection() as conn:
            with conn.transaction(), conn.cursor() as cur:
                return fn(cur)

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError | None:
        if isinstance(exc, StoreUnavailableError):
            return exc
        import psycopg

        # (a lost or refused connection, an administrator's shutdown, the pool's timeout)
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return StoreUnavailableError(f"the PostgreSQL store {self!r}: {one_line(exc)}")
        return None

    async def _call(self, fn: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(fn, limiter=self._limiter)

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        self._ready = False
        if pool is not None:
            await anyio.to_thread.run_sync(pool.close)

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
