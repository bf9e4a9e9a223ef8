"""The ``[serve]`` table of ``genfan.toml``: the gateway's own settings, its extra fan-outs and
cascades.

```toml
[serve]
keys = "sqlite:///genfan-keys.db"   # or keys_env = "GENFAN_KEYS_URL" (postgresql://...)
rate_limit_store = "main"            # per-key RPM/TPM shared through [rate_limit_stores.main]
max_body_bytes = 1048576
drain_seconds = 30

[serve.fanouts.best]                 # another fan-out model: build_fanout()'s arguments
backends = ["gpt", "claude"]
select = "vote"

[serve.cascades.frugal]              # a cascade model: tiers of backends, cheapest first
tiers = [["small"], ["gpt", "claude"]]
threshold = 0.8
```

The rest of the file is genfan's configuration ([`GenfanConfig`][genfan.GenfanConfig]).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .._config import GenfanConfig, load_config
from .._errors import ConfigurationError

__all__ = ["CascadeSettings", "FanOutSettings", "ServeSettings", "load_gateway_config"]

_strict = ConfigDict(extra="forbid", frozen=True)


class FanOutSettings(BaseModel):
    """``[serve.fanouts.NAME]``: a fan-out model, with `GenfanConfig.build_fanout`'s arguments."""

    model_config = _strict

    backends: list[str] | None = None
    select: str | None = None
    mode: Literal["all", "first", "quorum"] | None = None
    quorum: Annotated[int, Field(ge=1)] | None = None
    deadline: Annotated[float, Field(gt=0)] | None = None
    early_exit: Annotated[int, Field(ge=1)] | None = None
    judge: str | None = None


class CascadeSettings(BaseModel):
    """``[serve.cascades.NAME]``: tiers of backends, cheapest first, and the confidence needed
    to stop at a tier."""

    model_config = _strict

    tiers: Annotated[list[list[str]], Field(min_length=1)]
    threshold: float | list[float] = 0.5
    select: str = "auto"
    carry: bool = False


class EmbeddingSettings(BaseModel):
    """``[serve.embeddings]``: how ``/v1/embeddings`` batches concurrent requests."""

    model_config = _strict

    max_size: Annotated[int, Field(ge=1, le=2048)] = 64
    max_wait: Annotated[float, Field(ge=0, le=1)] = 0.002
    max_concurrent_batches: Annotated[int, Field(ge=1, le=64)] = 4


class ServeSettings(BaseModel):
    """The ``[serve]`` table.

    Attributes:
        host, port, workers: where to listen (``genfan serve --host/--port/--workers`` win).
        keys: the key store: ``sqlite:///path.db``, a path, or ``postgresql://...``; with
            ``keys_env``, the name of a variable holding it (keeps a password out of the file).
            Neither: no keys, every request is let in (for a gateway on a private network).
        rate_limit_store: a ``[rate_limit_stores.NAME]`` store through which every replica
            shares each key's RPM/TPM (default: each process counts its own).
        budget_store: where the keys' USD budgets are kept (a `genfan.cost.Budget` store URL:
            ``sqlite:///...``, ``postgresql://...``, ``redis://...``); default: the key store's
            database.
        key_cache_seconds: how long a replica trusts a key it looked up (a revoked key works
            at most this long on a replica that saw it).
        max_body_bytes: larger request bodies get 413.
        drain_seconds: on SIGTERM, the longest to wait for requests in flight to finish.
        fanout_model: the model name of the ``[fanout]`` table's fan-out.
        transport: the HTTP client of every backend that takes a ``transport`` option and
            whose table does not set one. ``auto`` (when aiohttp is installed): aiohttp on
            asyncio (about a third of httpx's CPU per call, which is most of what the gateway
            adds), httpx on trio; ``httpx``: leave the backends' default.
        models: which models to serve (default: every backend, the fan-out, and every
            ``[serve.fanouts]`` and ``[serve.cascades]`` entry).
    """

    model_config = _strict

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    keys: str | None = None
    keys_env: str | None = None
    rate_limit_store: str | None = None
    budget_store: str | None = None
    key_cache_seconds: Annotated[float, Field(ge=0, le=3600)] = 2.0
    max_body_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024
    drain_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    fanout_model: str = "fanout"
    transport: Literal["auto", "aiohttp", "httpx"] = "auto"
    models: list[str] | None = None
    fanouts: dict[str, FanOutSettings] = Field(default_factory=dict)
    cascades: dict[str, CascadeSettings] = Field(default_factory=dict)
    embeddings: EmbeddingSettings = Field(default_factory=EmbeddingSettings)

    @model_validator(mode="after")
    def _one_key_source(self) -> ServeSettings:
        if self.keys is not None and self.keys_env is not None:
            raise ValueError("give keys or keys_env, not both")
        return self

    def keys_url(self) -> str | None:
        """Where the keys live (``None``: no key store; every request is let in).

        Raises:
            ConfigurationError: ``keys_env`` names an unset variable.
        """
        if self.keys_env is None:
            return self.keys
        value = os.environ.get(self.keys_env)
        if not value:
            raise ConfigurationError(
                f"serve.keys_env names {self.keys_env}, which is not set; set it to "
                "sqlite:///path.db or postgresql://host/db"
            )
        return value


def load_gateway_config(path: str | Path) -> tuple[GenfanConfig, ServeSettings]:
    """Read ``genfan.toml``: genfan's configuration and its ``[serve]`` table.

    Raises:
        ConfigurationError: one line per problem, naming the file and the key.
    """
    config = load_config(path)
    return config, parse_serve(config.serve, source=str(path), config=config)


def parse_serve(table: Any, *, source: str, config: GenfanConfig) -> ServeSettings:
    """Validate a ``[serve]`` table against the configuration it belongs to."""
    try:
        settings = ServeSettings.model_validate(table)
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key: remove it or check its spelling"
            lines.append(f"{source}: serve.{loc}: {msg}" if loc else f"{source}: serve: {msg}")
        raise ConfigurationError("\n".join(lines)) from None
    store = settings.rate_limit_store
    if store is not None and store not in config.rate_limit_stores:
        raise ConfigurationError(
            f"{source}: serve.rate_limit_store names {store!r}, which has no "
            f"[rate_limit_stores.{store}] table; defined: {sorted(config.rate_limit_stores)}"
        )
    names = set(config.backends)
    for kind, entries in (("fanouts", settings.fanouts), ("cascades", settings.cascades)):
        for name, entry in entries.items():
            if name in names:
                raise ConfigurationError(
                    f"{source}: serve.{kind}.{name}: a backend has this name; pick another"
                )
            used = (
                entry.backends or []
                if isinstance(entry, FanOutSettings)
                else [b for tier in entry.tiers for b in tier]
            )
            unknown = sorted({b for b in used if b not in config.backends})
            if unknown:
                raise ConfigurationError(
                    f"{source}: serve.{kind}.{name} names {unknown}, which have no "
                    f"[backends.NAME] table; defined: {sorted(config.backends)}"
                )
            names.add(name)
    return settings
