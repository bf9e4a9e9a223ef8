"""PostgreSQL: the store for replicas on several hosts (psycopg 3, ``genfan[postgres]``).

Claims use ``SELECT ... FOR UPDATE SKIP LOCKED``, so replicas never wait on each other's rows.
psycopg's sync API runs in worker threads (unlike its async API it works under trio).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

from .._errors import ConfigurationError, MissingExtraError
from ._sql import SQL
from ._store import Pool, PooledStore

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
        self._sql = PostgresSQL(ns=f"{schema}.", ix="genfan_")
        self._pool = Pool(self._connect, pool_size)
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
