"""Virtual API keys and the spend ledger: SQLite by default, PostgreSQL for replicas on several
hosts.

A key reads ``gf-<id>-<secret>``: the ``id`` (12 hex digits) is stored as is and names the
key in lists, logs and the ledger; the whole key is stored only as its SHA-256
(``sha256:<hex>``), so a copy of the database cannot be used to call the gateway. Each key may
carry a model allow-list, requests and tokens per minute, and a USD budget; every answered
request adds a row to the ledger and its cost to the key's running total, which the budget
check reads (so every replica sharing the database shares the budget).

The blocking database calls (stdlib ``sqlite3``; psycopg 3's sync API, which unlike its async
API works under trio) run in worker threads.
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread

from .._errors import ConfigurationError, GenfanError, MissingExtraError

__all__ = ["KeyStore", "KeyStoreError", "LedgerEntry", "VirtualKey"]

T = TypeVar("T")

_KEY = re.compile(r"^gf-([0-9a-f]{12})-([A-Za-z0-9_-]{20,64})$")
_NAME = re.compile(r"^[A-Za-z0-9_.@:-]{1,64}$")


class KeyStoreError(GenfanError):
    """The key database could not be used (unreachable, locked, unwritable), or a key
    operation named something that is not there."""


@dataclass(frozen=True, kw_only=True, slots=True)
class VirtualKey:
    """A virtual API key as stored (never its secret).

    Attributes:
        id: the key's public id (the 12 hex digits after ``gf-``).
        name: a unique label.
        models: the models it may call (``None``: every model).
        rpm, tpm: requests and tokens per minute (``None``: unlimited).
        budget_usd: the most it may spend per ``budget_period``, in USD (``None``: unlimited).
        budget_period: ``"total"`` (never resets), ``"hour"``, ``"day"``, ``"week"`` or
            ``"month"`` (calendar periods in UTC).
        spent_usd: what it has spent so far, over all periods (the ledger's total).
        created: when it was made (Unix seconds).
        revoked: when it was revoked (``None``: it is live).
    """

    id: str
    name: str
    models: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None
    budget_period: str = "total"
    spent_usd: float = 0.0
    created: float = 0.0
    revoked: float | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, kw_only=True, slots=True)
class LedgerEntry:
    """One answered request in the spend ledger."""

    key_id: str
    at: float
    model: str
    request_id: str
    input_tokens: int
    output_tokens: int
    cost_usd: float


def hash_key(secret: str) -> str:
    """What is stored for a key: ``sha256:<hex>`` of the whole key."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def key_id_of(secret: str) -> str | None:
    """The public id of a well-formed key (``None``: not a genfan key)."""
    m = _KEY.match(secret)
    return m.group(1) if m else None


_COLUMNS = "id, name, models, rpm, tpm, budget_usd, spent_usd, created, revoked, budget_period"
_PERIODS = ("total", "hour", "day", "week", "month")


def _row_key(row: Sequence[Any]) -> VirtualKey:
    models = json.loads(row[2]) if row[2] is not None else None
    return VirtualKey(
        id=row[0],
        name=row[1],
        models=tuple(models) if models is not None else None,
        rpm=row[3],
        tpm=row[4],
        budget_usd=row[5],
        spent_usd=float(row[6] or 0.0),
        created=float(row[7]),
        revoked=row[8],
        budget_period=row[9] or "total",
    )


class KeyStore:
    """Virtual keys, their limits and the spend ledger, in SQLite or PostgreSQL.

    Use `open` with a URL (``sqlite:///path.db``, a plain path, or
    ``postgresql://host/db``), then ``async with`` or `aclose`. Replicas on one host can
    share a SQLite file (WAL mode); replicas on several hosts need PostgreSQL.

    Args:
        url: where the keys live.
        prefix: table-name prefix (letters, digits, ``_``).
    """

    def __init__(self, url: str | Path, *, prefix: str = "genfan_") -> None:
        if not prefix.replace("_", "").isalnum() and prefix:
            raise ConfigurationError(
                f"KeyStore prefix must be letters, digits or _, got {prefix!r}"
            )
        text = str(url)
        self.postgres = text.startswith(("postgresql://", "postgres://"))
        if text.startswith("sqlite://"):
            text = text.removeprefix("sqlite://")
            text = text[1:] if text.startswith("/") else text
        elif "://" in text and not self.postgres:
            raise ConfigurationError(
                f"unknown key store URL {_redact(text)!r}; use sqlite:///path.db or "
                "postgresql://host/db"
            )
        self.url = text
        self.prefix = prefix
        self._ph = "%s" if self.postgres else "?"
        self._conn: sqlite3.Connection | None = None
        self._pool: Any = None
        self._limiter = anyio.CapacityLimiter(1 if not self.postgres else 4)
        self._ready = False

    @classmethod
    def open(cls, url: str | Path, *, prefix: str = "genfan_") -> KeyStore:
        """A store for ``url`` (nothing is opened until first use)."""
        return cls(url, prefix=prefix)

    def __repr__(self) -> str:
        return f"KeyStore({_redact(self.url)!r})"

    @property
    def location(self) -> str:
        """The database as a store URL, for stores kept beside the keys (budgets). It may
        hold a password: never log it."""
        if self.postgres:
            return self.url
        return "memory://" if self.url == ":memory:" else self.url

    async def __aenter__(self) -> KeyStore:
        await self.setup()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the connection ---------------------------------------------------------------------

    def _sqlite(self) -> sqlite3.Connection:
        if self._conn is None:
            if self.url != ":memory:":
                Path(self.url).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.url, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA busy_timeout = 30000")
            if self.url != ":memory:":
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                except sqlite3.OperationalError:  # another process is switching it now
                    pass
                conn.execute("PRAGMA synchronous = NORMAL")
            self._conn = conn
        return self._conn

    def _postgres_pool(self) -> Any:
        if self._pool is None:
            try:
                import psycopg
                from psycopg_pool import ConnectionPool
            except ImportError as exc:
                raise MissingExtraError("psycopg", "postgres", reason="KeyStore") from exc
            try:
                psycopg.connect(self.url, connect_timeout=5).close()
            except psycopg.Error as exc:
                raise KeyStoreError(
                    f"cannot connect to the key store {_redact(self.url)}: {_line(exc)}"
                ) from None
            pool = ConnectionPool(
                self.url,
                min_size=1,
                max_size=4,
                kwargs={"autocommit": True},
                check=ConnectionPool.check_connection,
                timeout=10.0,
                open=False,
            )
            pool.open(wait=True, timeout=10.0)
            self._pool = pool
        return self._pool

    def _run(self, fn: Callable[[Any], T], *, write: bool = False) -> T:
        """Run ``fn(cursor)`` in one transaction (blocking)."""
        try:
            if self.postgres:
                with self._postgres_pool().connection() as conn:
                    with conn.transaction(), conn.cursor() as cur:
                        return fn(cur)
            conn = self._sqlite()
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
        except (KeyStoreError, ConfigurationError):
            raise
        except (sqlite3.Error, OSError) as exc:
            raise KeyStoreError(f"the key store {_redact(self.url)}: {_line(exc)}") from None
        except Exception as exc:
            if type(exc).__module__.startswith("psycopg"):
                raise KeyStoreError(f"the key store {_redact(self.url)}: {_line(exc)}") from None
            raise

    async def _call(self, fn: Callable[[Any], T], *, write: bool = False) -> T:
        if not self._ready:
            await anyio.to_thread.run_sync(self._setup_blocking, limiter=self._limiter)
        return await anyio.to_thread.run_sync(
            lambda: self._run(fn, write=write), limiter=self._limiter
        )

    def _setup_blocking(self) -> None:
        if self._ready:
            return
        p = self.prefix
        serial = "BIGSERIAL" if self.postgres else "INTEGER"

        def create(cur: Any) -> None:
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {p}keys (id TEXT PRIMARY KEY, name TEXT NOT NULL"
                " UNIQUE, hash TEXT NOT NULL, models TEXT, rpm INTEGER, tpm INTEGER,"
                " budget_usd DOUBLE PRECISION, spent_usd DOUBLE PRECISION NOT NULL DEFAULT 0,"
                " created DOUBLE PRECISION NOT NULL, revoked DOUBLE PRECISION, budget_period TEXT)"
            )
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {p}spend (seq {serial} PRIMARY KEY, key_id TEXT NOT"
                " NULL, at DOUBLE PRECISION NOT NULL, model TEXT NOT NULL, request_id TEXT NOT"
                " NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,"
                " cost_usd DOUBLE PRECISION NOT NULL)"
            )
            cur.execute(f"CREATE INDEX IF NOT EXISTS {p}spend_key ON {p}spend (key_id, at)")

        if self.postgres:
            # Serialize DDL between replicas starting at once.
            def locked(cur: Any) -> None:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (0x6E6B657973,))
                create(cur)

            self._run(locked)
        else:
            self._run(create, write=True)
        self._ready = True

    async def setup(self) -> None:
        """Create the tables if they are missing (also done on first use).

        Raises:
            KeyStoreError: the database cannot be used.
        """
        await anyio.to_thread.run_sync(self._setup_blocking, limiter=self._limiter)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        pool, self._pool = self._pool, None
        self._ready = False
        if conn is not None:
            conn.close()
        if pool is not None:
            await anyio.to_thread.run_sync(pool.close)

    # -- keys -------------------------------------------------------------------------------

    async def create(
        self,
        name: str,
        *,
        models: Sequence[str] | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        budget_usd: float | None = None,
        budget_period: str = "total",
    ) -> tuple[str, VirtualKey]:
        """Make a key; returns ``(the key itself, its record)``. The key is shown only here.

        Raises:
            ConfigurationError: a bad name or limit, or the name is taken.
        """
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigurationError(
                f"key name must be 1-64 letters, digits or _.@:-, got {name!r}"
            )
        for field, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigurationError(f"{field} must be a whole number >= 1, got {value!r}")
        if budget_usd is not None and not (budget_usd >= 0 and budget_usd < float("inf")):
            raise ConfigurationError(f"budget must be a number of USD >= 0, got {budget_usd!r}")
        if budget_period not in _PERIODS:
            raise ConfigurationError(
                f"budget period must be one of {', '.join(_PERIODS)}, got {budget_period!r}"
            )
        if models is not None:
            models = [m for m in models if m]
            if not models:
                raise ConfigurationError("models must name at least one model (or be left out)")
        key_id = secrets.token_hex(6)
        secret = f"gf-{key_id}-{secrets.token_urlsafe(24)}"
        record = VirtualKey(
            id=key_id,
            name=name,
            models=tuple(models) if models is not None else None,
            rpm=rpm,
            tpm=tpm,
            budget_usd=budget_usd,
            budget_period=budget_period,
            created=time.time(),
        )
        ph = self._ph

        def insert(cur: Any) -> bool:
            cur.execute(f"SELECT 1 FROM {self.prefix}keys WHERE name = {ph}", (name,))
            if cur.fetchone() is not None:
                return False
            cur.execute(
                f"INSERT INTO {self.prefix}keys (id, name, hash, models, rpm, tpm, budget_usd,"
                f" spent_usd, created, budget_period) VALUES ({', '.join([ph] * 10)})",
                (
                    key_id,
                    name,
                    hash_key(secret),
                    json.dumps(list(models)) if models is not None else None,
                    rpm,
                    tpm,
                    budget_usd,
                    0.0,
                    record.created,
                    budget_period,
                ),
            )
            return True

        if not await self._call(insert, write=True):
            raise ConfigurationError(f"a key named {name!r} exists; pick another name")
        return secret, record

    async def list(self, *, include_revoked: bool = False) -> list[VirtualKey]:
        """Every key, oldest first."""
        where = "" if include_revoked else " WHERE revoked IS NULL"

        def select(cur: Any) -> list[VirtualKey]:
            cur.execute(f"SELECT {_COLUMNS} FROM {self.prefix}keys{where} ORDER BY created, id")
            return [_row_key(r) for r in cur.fetchall()]

        return await self._call(select)

    async def get(self, key_id: str) -> VirtualKey | None:
        """The key with this id (revoked ones too), or ``None``."""

        def select(cur: Any) -> VirtualKey | None:
            cur.execute(
                f"SELECT {_COLUMNS} FROM {self.prefix}keys WHERE id = {self._ph}", (key_id,)
            )
            row = cur.fetchone()
            return _row_key(row) if row else None

        return await self._call(select)

    async def revoke(self, id_or_name: str) -> VirtualKey:
        """Revoke a key by id or name; it stops working (within the gateway's key cache time).

        Raises:
            KeyStoreError: no live key has this id or name.
        """
        ph = self._ph

        def update(cur: Any) -> VirtualKey | None:
            cur.execute(
                f"SELECT {_COLUMNS} FROM {self.prefix}keys WHERE (id = {ph} OR name = {ph})"
                " AND revoked IS NULL",
                (id_or_name, id_or_name),
            )
            row = cur.fetchone()
            if row is None:
                return None
            now = time.time()
            cur.execute(
                f"UPDATE {self.prefix}keys SET revoked = {ph} WHERE id = {ph}", (now, row[0])
            )
            return dataclasses.replace(_row_key(row), revoked=now)

        key = await self._call(update, write=True)
        if key is None:
            raise KeyStoreError(f"no live key has the id or name {id_or_name!r}")
        return key

    async def authenticate(self, secret: str) -> VirtualKey | None:
        """The live key ``secret`` is, or ``None`` (unknown, malformed or revoked)."""
        key_id = key_id_of(secret)
        if key_id is None:
            return None
        want = hash_key(secret)

        def select(cur: Any) -> tuple[str, VirtualKey] | None:
            cur.execute(
                f"SELECT {_COLUMNS}, hash FROM {self.prefix}keys WHERE id = {self._ph}",
                (key_id,),
            )
            row = cur.fetchone()
            return (row[10], _row_key(row)) if row else None

        found = await self._call(select)
        if found is None or not hmac.compare_digest(found[0], want) or found[1].revoked:
            return None
        return found[1]

    # -- the ledger -------------------------------------------------------------------------

    async def spent(self, key_id: str) -> float:
        """What the key has spent so far, in USD (every replica's requests)."""

        def select(cur: Any) -> float:
            cur.execute(f"SELECT spent_usd FROM {self.prefix}keys WHERE id = {self._ph}", (key_id,))
            row = cur.fetchone()
            return float(row[0]) if row else 0.0

        return await self._call(select)

    async def record(self, entry: LedgerEntry) -> float:
        """Add ``entry`` to the ledger and its cost to the key's total; returns the new total."""
        ph = self._ph

        def insert(cur: Any) -> float:
            cur.execute(
                f"INSERT INTO {self.prefix}spend (key_id, at, model, request_id, input_tokens,"
                f" output_tokens, cost_usd) VALUES ({', '.join([ph] * 7)})",
                (
                    entry.key_id,
                    entry.at,
                    entry.model,
                    entry.request_id,
                    entry.input_tokens,
                    entry.output_tokens,
                    entry.cost_usd,
                ),
            )
            cur.execute(
                f"UPDATE {self.prefix}keys SET spent_usd = spent_usd + {ph} WHERE id = {ph}",
                (entry.cost_usd, entry.key_id),
            )
            cur.execute(f"SELECT spent_usd FROM {self.prefix}keys WHERE id = {ph}", (entry.key_id,))
            row = cur.fetchone()
            return float(row[0]) if row else 0.0

        return await self._call(insert, write=True)

    async def record_many(self, entries: Sequence[LedgerEntry]) -> None:
        """Add ``entries`` to the ledger, and their costs to their keys' totals, in one
        transaction (the gateway writes its ledger in batches, off the request path)."""
        if not entries:
            return
        ph = self._ph
        totals: dict[str, float] = {}
        for e in entries:
            totals[e.key_id] = totals.get(e.key_id, 0.0) + e.cost_usd
        rows = [
            (e.key_id, e.at, e.model, e.request_id, e.input_tokens, e.output_tokens, e.cost_usd)
            for e in entries
        ]

        def insert(cur: Any) -> None:
            cur.executemany(
                f"INSERT INTO {self.prefix}spend (key_id, at, model, request_id, input_tokens,"
                f" output_tokens, cost_usd) VALUES ({', '.join([ph] * 7)})",
                rows,
            )
            for key_id, cost in sorted(totals.items()):
                cur.execute(
                    f"UPDATE {self.prefix}keys SET spent_usd = spent_usd + {ph} WHERE id = {ph}",
                    (cost, key_id),
                )

        await self._call(insert, write=True)

    async def ledger(self, key_id: str, *, limit: int = 100) -> builtins.list[LedgerEntry]:
        """The key's latest ledger entries, newest first."""
        ph = self._ph

        def select(cur: Any) -> builtins.list[LedgerEntry]:
            cur.execute(
                f"SELECT key_id, at, model, request_id, input_tokens, output_tokens, cost_usd"
                f" FROM {self.prefix}spend WHERE key_id = {ph} ORDER BY seq DESC LIMIT {ph}",
                (key_id, limit),
            )
            return [
                LedgerEntry(
                    key_id=r[0],
                    at=float(r[1]),
                    model=r[2],
                    request_id=r[3],
                    input_tokens=int(r[4]),
                    output_tokens=int(r[5]),
                    cost_usd=float(r[6]),
                )
                for r in cur.fetchall()
            ]

        return await self._call(select)


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _redact(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<url>"
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url
