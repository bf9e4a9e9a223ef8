"""What the budget and cache stores share: one SQLite file with an inline and a threaded
connection, a Redis client, opening a store from its URL, and a config table's
``store``/``store_env``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import anyio

from .._errors import ConfigurationError
from .._redis import RedisClient

T = TypeVar("T")

_BUSY = ("locked", "busy")


class _Busy(Exception):
    """The SQLite file is held by another connection (try again in a thread, waiting)."""


class SQLiteFile:
    """One SQLite file in WAL mode, opened on first use, with two connections.

    A write (`write`) is a ``BEGIN IMMEDIATE`` transaction: it runs inline when the file is
    free (no thread hop: tens of microseconds), and in a worker thread, waiting up to
    ``timeout`` seconds for its turn, when another process holds the file. A read may use the
    inline connection (`inline`) directly: in WAL mode it never waits for a writer.

    Args:
        path: the database file.
        what: how messages name the store (``"the SQLite budget store"``).
        error: the exception type raised when the file cannot be used (called with a message).
        timeout: seconds a write waits for the file.
        schema: the statements that create the tables (run once, in a transaction).
    """

    def __init__(
        self,
        path: str,
        *,
        what: str,
        error: Callable[[str], Exception],
        timeout: float,
        schema: Callable[[], list[str]],
    ) -> None:
        self.path = path
        self.what = what
        self.timeout = timeout
        self._error = error
        self._schema = schema
        self._inline: sqlite3.Connection | None = None
        self._threaded: sqlite3.Connection | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._lock = threading.Lock()

    def fail(self, exc: BaseException) -> Exception:
        """The store's error for ``exc``, naming the file."""
        return self._error(f"{self.what} {self.path}: {exc}")

    def _connect(self, busy_ms: int) -> sqlite3.Connection:
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=busy_ms / 1000, isolation_level=None, check_same_thread=False
            )
            conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
        except (OSError, sqlite3.Error) as exc:
            raise self.fail(exc) from exc
        return conn

    def _ready(self) -> None:
        """Open the connections and create the tables (once; the first step pays for it)."""
        if self._inline is not None:
            return
        with self._lock:
            if self._inline is not None:
                return
            threaded = self._connect(int(self.timeout * 1000))
            try:
                try:
                    threaded.execute("PRAGMA journal_mode = WAL")
                except sqlite3.OperationalError:  # another process is switching it right now
                    pass
                threaded.execute("PRAGMA synchronous = NORMAL")
                self._tx(threaded, lambda cur: [cur.execute(s) for s in self._schema()])
            except _Busy as exc:
                threaded.close()
                raise self._locked(exc) from None
            except sqlite3.Error as exc:
                threaded.close()
                raise self.fail(exc) from exc
            except BaseException:
                threaded.close()
                raise
            inline = self._connect(0)
            inline.execute("PRAGMA synchronous = NORMAL")
            self._threaded, self._inline = threaded, inline

    def _tx(self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Cursor], T]) -> T:
        cur = conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._classify(exc) from exc
        try:
            out = fn(cur)
            cur.execute("COMMIT")
        except BaseException as exc:
            try:
                cur.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(exc, sqlite3.Error):
                raise self._classify(exc) from exc
            raise
        return out

    def _classify(self, exc: sqlite3.Error) -> Exception:
        if any(m in str(exc).lower() for m in _BUSY):
            return _Busy(str(exc))
        return self.fail(exc)

    def _locked(self, exc: _Busy) -> Exception:
        return self._error(f"{self.what} {self.path} stayed locked for {self.timeout:g}s ({exc})")

    async def inline(self) -> sqlite3.Connection:
        """The inline connection (for reads), opening the file first if need be."""
        if self._inline is None:
            await anyio.to_thread.run_sync(self._ready)
        assert self._inline is not None
        return self._inline

    async def write(self, fn: Callable[[sqlite3.Cursor], T]) -> T:
        """Run ``fn`` in a ``BEGIN IMMEDIATE`` transaction: inline when the file is free, else
        in a worker thread that waits its turn."""
        inline = await self.inline()
        try:
            return self._tx(inline, fn)  # the file is free: no thread hop
        except _Busy:
            pass
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        threaded = self._threaded
        assert threaded is not None
        try:
            return await anyio.to_thread.run_sync(self._tx, threaded, fn, limiter=self._limiter)
        except _Busy as exc:
            raise self._locked(exc) from None

    def close(self) -> None:
        """Close the connections (the next step opens them again)."""
        inline, threaded = self._inline, self._threaded
        self._inline = self._threaded = None
        for conn in (inline, threaded):
            if conn is not None:
                conn.close()


class RedisStore:
    """A store kept in Redis: its client, its key prefix, and closing it.

    Args:
        url: ``redis://[[username]:password@]host[:port][/db]``.
        what: how messages name the store (``"the Redis budget store"``).
        error: the exception type raised when Redis cannot be used (called with a message).
        key_prefix: prepended to every key.
        timeout: seconds for one command, connecting included.
        max_connections: connections open at once.
    """

    def __init__(
        self,
        url: str,
        *,
        what: str,
        error: Callable[[str], Exception],
        key_prefix: str,
        timeout: float,
        max_connections: int,
    ) -> None:
        self._client = RedisClient(
            url, error=error, what=what, timeout=timeout, max_connections=max_connections
        )
        self.key_prefix = key_prefix

    @property
    def url(self) -> str:
        """The URL, its password replaced by ``***``."""
        return self._client.url

    async def aclose(self) -> None:
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, key_prefix={self.key_prefix!r})"


def store_from_url(
    url: str | Path,
    *,
    what: str,
    sqlite: Callable[[str], T],
    default_path: str,
    memory: Callable[[], T],
    schemes: Mapping[str, Callable[[str], T]],
    forms: str,
) -> T:
    """A store from its URL: a plain path or ``sqlite:///path`` (``sqlite``), ``memory://``,
    or a URL whose scheme ``schemes`` names.

    Raises:
        ConfigurationError: another scheme (``what``: ``"budget store"``; ``forms``: the URLs
            to use instead), or what the store raises for its URL.
    """
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return sqlite(text)
    if scheme in schemes:
        return schemes[scheme](text)
    if text == "memory://":
        return memory()
    if scheme == "sqlite":
        path = rest[1:] if rest.startswith("/") else rest
        return sqlite(path or default_path)
    raise ConfigurationError(f"unknown {what} URL scheme {scheme!r}; use {forms}")


def check_store_fields(
    store: str | None, store_env: str | None, check: Callable[[str], Any]
) -> None:
    """A config table's ``store`` and ``store_env``: one of them at most, and ``store`` a URL
    that ``check`` accepts.

    Raises:
        ValueError: both are set; ConfigurationError (a ValueError): a bad URL.
    """
    if store is not None and store_env is not None:
        raise ValueError("set store or store_env (the variable holding the URL), not both")
    if store is not None:
        check(store)


def store_url(store: str | None, store_env: str | None, *, what: str) -> str | None:
    """A config table's store URL: ``store``, or the value of the variable ``store_env``.

    Raises:
        ConfigurationError: ``store_env`` is not set (``what``: ``"the budget store's URL
            (sqlite:///..., ...)"``).
    """
    if store_env is None:
        return store
    url = os.environ.get(store_env)
    if not url:
        raise ConfigurationError(
            f"the environment variable {store_env} is not set; set it to {what}"
        )
    return url
