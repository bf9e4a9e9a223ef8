"""Which store a URL names: ``sqlite:///path.db``, a plain path, or ``postgresql://host/db``."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .._errors import ConfigurationError
from ._postgres import PostgresStore
from ._sqlite import SQLiteStore
from ._store import Store

__all__ = ["store_from_url"]


def store_from_url(url: str | Path) -> Store:
    """A store from a URL: ``sqlite:///path.db``, a plain path, or
    ``postgresql://host/db?schema=name`` (``schema`` is genfan's; the rest goes to libpq)."""
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(text)
        query = dict(parse_qsl(parts.query))
        schema = query.pop("schema", "genfan")
        dsn = urlunsplit(parts._replace(query=urlencode(query)))
        return PostgresStore(dsn, schema=schema)
    if text.startswith("sqlite://"):
        path = text.removeprefix("sqlite://")
        path = path[1:] if path.startswith("/") else path
        return SQLiteStore(path or "genfan-schedules.db")
    if "://" in text:
        raise ConfigurationError(
            f"unknown store URL {text!r}; use sqlite:///path.db or postgresql://host/db"
        )
    return SQLiteStore(text)
