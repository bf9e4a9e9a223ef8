"""Where the response cache keeps its entries: SQLite (the default, one file per host), Redis
(shared by hosts), or memory (one process).

An entry is opaque bytes (a completion as JSON) under a key (a hash of the request), with an
optional expiry in Unix time. A read of SQLite runs inline (a primary-key lookup in WAL mode
never waits for a writer); a write runs inline when the file is free, else in a worker thread.
"""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from .._errors import ConfigurationError
from ._store_budget import CostStoreError
from ._stores import RedisStore, SQLiteFile, store_from_url

__all__ = [
    "CacheStore",
    "MemoryCacheStore",
    "RedisCacheStore",
    "SQLiteCacheStore",
    "cache_store_from_url",
]


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
        self._file = SQLiteFile(
            self.path,
            what="the SQLite cache store",
            error=CostStoreError,
            timeout=self.timeout,
            schema=lambda: [
                f"CREATE TABLE IF NOT EXISTS {self.table} (key TEXT PRIMARY KEY,"
                " value BLOB NOT NULL, expires REAL)"
            ],
        )
        self._writes = 0

    async def get(self, key: str, *, now: float) -> bytes | None:
        conn = await self._file.inline()
        try:
            row = conn.execute(
                f"SELECT value, expires FROM {self.table} WHERE key = ?", (key,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise self._file.fail(exc) from exc
        if row is None or (row[1] is not None and row[1] <= now):
            return None
        return bytes(row[0])

    async def set(self, key: str, value: bytes, *, expires: float | None, now: float) -> None:
        self._writes += 1
        purge = self._writes % 1000 == 0

        def write(cur: sqlite3.Cursor) -> None:
            cur.execute(
                f"INSERT OR REPLACE INTO {self.table} (key, value, expires) VALUES (?, ?, ?)",
                (key, value, expires),
            )
            if purge:
                cur.execute(f"DELETE FROM {self.table} WHERE expires <= ?", (now,))

        await self._file.write(write)

    async def clear(self) -> None:
        await self._file.write(lambda cur: cur.execute(f"DELETE FROM {self.table}"))

    async def aclose(self) -> None:
        self._file.close()

    def __repr__(self) -> str:
        return f"SQLiteCacheStore({self.path!r})"


class RedisCacheStore(RedisStore):
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
        super().__init__(
            url,
            what="the Redis cache store",
            error=CostStoreError,
            key_prefix=key_prefix,
            timeout=timeout,
            max_connections=max_connections,
        )

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


def cache_store_from_url(url: str | Path) -> CacheStore:
    """A cache store from a URL: ``sqlite:///path.db`` or a plain path, ``redis://...``, or
    ``memory://``.

    Raises:
        ConfigurationError: another scheme (the message never shows a password).
    """
    sqlite: Callable[[str], CacheStore] = SQLiteCacheStore
    memory: Callable[[], CacheStore] = MemoryCacheStore
    redis: Callable[[str], CacheStore] = RedisCacheStore
    return store_from_url(
        url,
        what="cache store",
        sqlite=sqlite,
        default_path="genfan-cache.db",
        memory=memory,
        schemes={"redis": redis, "rediss": redis},
        forms="sqlite:///path.db, redis://host:port/db or memory://",
    )
