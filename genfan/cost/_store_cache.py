"""Where the response cache keeps its entries: SQLite (the default, one file per host), Redis
(shared by hosts), or memory (one process).

An entry is opaque bytes (a completion as JSON) under a key (a hash of the request), with an
optional expiry in Unix time. A read of SQLite runs inline (a primary-key lookup in WAL mode
never waits for a writer); a write runs inline when the file is free, else in a worker thread.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import anyio

from .._errors import ConfigurationError
from .._redis import RedisClient, parse_redis_url
from ._store_budget import CostStoreError

__all__ = [
    "CacheStore",
    "MemoryCacheStore",
    "RedisCacheStore",
    "SQLiteCacheStore",
    "cache_store_from_url",
]

T = TypeVar("T")


@runtime_checkable
class CacheStore(Protocol):
    """Where a [`ResponseCache`][genfan.cost.ResponseCache] keeps its entries."""

    async def get(self, key: str, *, now: float) -> bytes | None:
        """The entry under ``key`` unless missing or expired at ``now`` (Unix time)."""
        ...

    async def set(self, key: str, value: bytes, *, expires: float | None, now: float) -> None:
        """Store ``value`` under ``key`` until ``expires`` (``None``: no expiry)."""
        ...

    async def clear(self) -> None:
        """Drop every entry."""
        ...

    async def aclose(self) -> None:
        """Close connections."""
        ...


class MemoryCacheStore:
    """Entries in this process's memory, the least recently used dropped past ``max_entries``."""

    def __init__(self, max_entries: int = 10_000) -> None:
        if not (isinstance(max_entries, int) and max_entries >= 1):
            raise ConfigurationError(
                f"MemoryCacheStore.max_entries must be an integer >= 1, got {max_entries!r}"
            )
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()

    async def get(self, key: str, *, now: float) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] is not None and entry[1] <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[0]

    async def set(self, key: str, value: bytes, *, expires: float | None, now: float) -> None:
        self._entries[key] = (value, expires)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def clear(self) -> None:
        self._entries.clear()

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"MemoryCacheStore(max_entries={self.max_entries})"


class SQLiteCacheStore:
    """Entries in one SQLite file (WAL mode), shared by the processes of one host.

    Expired entries are skipped on read and purged now and then on write.

    Args:
        path: the database file.
        table: the table's name.
        timeout: seconds a write waits for the file when another process holds it.
    """

    def __init__(
        self,
        path: str | Path = "genfan-cache.db",
        *,
        table: str = "genfan_cache",
        timeout: float = 30.0,
    ) -> None:
        if not table.replace("_", "").isalnum() or table[0].isdigit():
            raise ConfigurationError(
                f"SQLiteCacheStore.table must be letters, digits or _, got {table!r}"
            )
        if str(path) == ":memory:":
            raise ConfigurationError(
                "SQLiteCacheStore needs a file; for a cache in this process's memory use"
                " MemoryCacheStore()"
            )
        self.path = str(path)
        self.table = table
        self.timeout = float(timeout)
        self._inline: sqlite3.Connection | None = None
        self._threaded: sqlite3.Connection | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._lock = threading.Lock()
        self._writes = 0

    def _connect(self, busy_ms: int) -> sqlite3.Connection:
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=busy_ms / 1000, isolation_level=None, check_same_thread=False
            )
            conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
        except (OSError, sqlite3.Error) as exc:
            raise CostStoreError(f"the SQLite cache store {self.path}: {exc}") from exc
        return conn

    def _ready(self) -> None:
        if self._inline is not None:
            return
        with self._lock:
            if self._inline is not None:
                return
            threaded = self._connect(int(self.timeout * 1000))
            try:
                try:
                    threaded.execute("PRAGMA journal_mode = WAL")
                except sqlite3.OperationalError:
                    pass
                threaded.execute("PRAGMA synchronous = NORMAL")
                threaded.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.table} (key TEXT PRIMARY KEY,"
                    " value BLOB NOT NULL, expires REAL)"
                )
            except sqlite3.Error as exc:
                threaded.close()
                raise CostStoreError(f"the SQLite cache store {self.path}: {exc}") from exc
            inline = self._connect(0)
            inline.execute("PRAGMA synchronous = NORMAL")
            self._threaded, self._inline = threaded, inline

    async def _conn(self) -> sqlite3.Connection:
        if self._inline is None:
            await anyio.to_thread.run_sync(self._ready)
        assert self._inline is not None
        return self._inline

    async def get(self, key: str, *, now: float) -> bytes | None:
        conn = await self._conn()
        try:
            row = conn.execute(
                f"SELECT value, expires FROM {self.table} WHERE key = ?", (key,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise CostStoreError(f"the SQLite cache store {self.path}: {exc}") from exc
        if row is None or (row[1] is not None and row[1] <= now):
            return None
        return bytes(row[0])

    def _write(self, conn: sqlite3.Connection, fn: Callable[[Any], T]) -> T:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise _Busy from exc
            raise CostStoreError(f"the SQLite cache store {self.path}: {exc}") from exc
        try:
            out = fn(conn)
            conn.execute("COMMIT")
        except BaseException as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(exc, sqlite3.Error):
                raise CostStoreError(f"the SQLite cache store {self.path}: {exc}") from exc
            raise
        return out

    async def _run_write(self, fn: Callable[[Any], T]) -> T:
        conn = await self._conn()
        try:
            return self._write(conn, fn)
        except _Busy:
            pass
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        threaded = self._threaded
        assert threaded is not None
        try:
            return await anyio.to_thread.run_sync(self._write, threaded, fn, limiter=self._limiter)
        except _Busy:
            raise CostStoreError(
                f"the SQLite cache store {self.path} stayed locked for {self.timeout:g}s"
            ) from None

    async def set(self, key: str, value: bytes, *, expires: float | None, now: float) -> None:
        self._writes += 1
        purge = self._writes % 1000 == 0

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT OR REPLACE INTO {self.table} (key, value, expires) VALUES (?, ?, ?)",
                (key, value, expires),
            )
            if purge:
                conn.execute(f"DELETE FROM {self.table} WHERE expires <= ?", (now,))

        await self._run_write(write)

    async def clear(self) -> None:
        await self._run_write(lambda conn: conn.execute(f"DELETE FROM {self.table}"))

    async def aclose(self) -> None:
        inline, threaded = self._inline, self._threaded
        self._inline = self._threaded = None
        for conn in (inline, threaded):
            if conn is not None:
                conn.close()

    def __repr__(self) -> str:
        return f"SQLiteCacheStore({self.path!r})"


class _Busy(Exception):
    pass


class RedisCacheStore:
    """Entries in Redis (``SET ... PXAT``; Redis drops them when they expire), shared by hosts.

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
        key_prefix: str = "genfan:cache:",
        timeout: float = 1.0,
        max_connections: int = 8,
    ) -> None:
        self._client = RedisClient(
            url,
            error=CostStoreError,
            what="the Redis cache store",
            timeout=timeout,
            max_connections=max_connections,
        )
        self.key_prefix = key_prefix

    @property
    def url(self) -> str:
        """The URL, its password replaced by ``***``."""
        return self._client.url

    async def get(self, key: str, *, now: float) -> bytes | None:
        reply = await self._client.execute("GET", self.key_prefix + key)
        return reply if isinstance(reply, bytes) else None

    async def set(self, key: str, value: bytes, *, expires: float | None, now: float) -> None:
        if expires is None:
            await self._client.execute("SET", self.key_prefix + key, value)
        else:
            ms = max(1, round((expires - now) * 1000))
            await self._client.execute("SET", self.key_prefix + key, value, "PX", ms)

    async def clear(self) -> None:
        cursor: bytes = b"0"
        while True:
            reply = await self._client.execute(
                "SCAN", cursor, "MATCH", self.key_prefix + "*", "COUNT", 500
            )
            if not (isinstance(reply, list) and len(reply) == 2):
                raise CostStoreError(f"Redis at {self.url}: unexpected SCAN reply")
            cursor_value, keys = reply
            if isinstance(keys, list) and keys:
                await self._client.execute("DEL", *[k for k in keys if isinstance(k, bytes)])
            if cursor_value in (b"0", None):
                return
            assert isinstance(cursor_value, bytes)
            cursor = cursor_value

    async def aclose(self) -> None:
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"RedisCacheStore({self.url!r}, key_prefix={self.key_prefix!r})"


def cache_store_from_url(url: str | Path) -> CacheStore:
    """A cache store from a URL: ``sqlite:///path.db`` or a plain path, ``redis://...``, or
    ``memory://``.

    Raises:
        ConfigurationError: another scheme (the message never shows a password).
    """
    text = str(url)
    if text.startswith(("redis://", "rediss://")):
        parse_redis_url(text)
        return RedisCacheStore(text)
    if text == "memory://":
        return MemoryCacheStore()
    if text.startswith("sqlite://"):
        path = text.removeprefix("sqlite://")
        path = path[1:] if path.startswith("/") else path
        return SQLiteCacheStore(path or "genfan-cache.db")
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise ConfigurationError(
            f"unknown cache store URL scheme {scheme!r}; use sqlite:///path.db, redis://host:port/db"
            " or memory://"
        )
    return SQLiteCacheStore(text)
