"""SQLite: the default store, one file shared by the processes on one host.

A claim is a ``BEGIN IMMEDIATE`` transaction on the file (one writer at a time), and the file
runs in WAL mode. The blocking ``sqlite3`` calls run in a worker thread. The store's clock is
the host's: the caller's time, advanced by the time the transaction waited for the file.
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio

from .._errors import ConfigurationError
from ._sql import SQL
from ._store import Pool, PooledStore, StoreUnavailableError, one_line

__all__ = ["SQLiteSQL", "SQLiteStore"]

T = TypeVar("T")

# sqlite3.OperationalError messages that mean the file could not be used, not a bad statement.
_UNAVAILABLE = ("locked", "busy", "unable to open", "disk i/o", "readonly", "disk is full")


class SQLiteSQL(SQL):
    """SQLite's dialect: ``?`` placeholders; no row locks (the transaction holds the file)."""

    def run_columns(self, cur: Any) -> set[str]:
        cur.execute(f"PRAGMA table_info({self.ns}runs)")
        return {r[1] for r in cur.fetchall()}


class SQLiteStore(PooledStore):
    """The default store: one SQLite file, created on first use.

    Several processes on one host may share the file; claims are ``BEGIN IMMEDIATE``
    transactions, and the file runs in WAL mode. Use [`PostgresStore`][genfan.schedule.PostgresStore] across hosts.

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
        self._follow = threads
        self._sql = SQLiteSQL(ns=prefix, ix=f"{prefix}genfan_")
        self._pool = Pool(self._connect, 1)
        self._limiter: anyio.CapacityLimiter | None = None
        self._ready = False

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreUnavailableError(
                    f"cannot create the folder of the SQLite store {self.path}: "
                    f"{exc.strerror or exc}"
                ) from exc
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

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError | None:
        if isinstance(exc, StoreUnavailableError):
            return exc
        if isinstance(exc, sqlite3.OperationalError) and any(
            m in str(exc).lower() for m in _UNAVAILABLE
        ):
            return StoreUnavailableError(f"the SQLite store {self.path}: {one_line(exc)}")
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EROFS, errno.ENOSPC):
            return StoreUnavailableError(f"the SQLite store {self.path}: {one_line(exc)}")
        return None

    async def _call(self, fn: Callable[[], T]) -> T:
        if not self.threads:
            return fn()
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(fn, limiter=self._limiter)

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"
