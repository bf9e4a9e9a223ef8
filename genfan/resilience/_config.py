"""The TOML config's resilience tables: ``guards`` (`GuardsConfig`, turned into a guard
stack) and ``[rate_limit_stores.NAME]`` (`RateLimitStoreConfig`, one shared quota store
that guards name)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .._backend import Backend
from .._errors import ConfigurationError
from ._policies import (
    BreakerPolicy,
    BulkheadPolicy,
    HedgePolicy,
    RateLimitPolicy,
    RetryBudgetPolicy,
    RetryPolicy,
    TimeoutPolicy,
)
from ._shared import RedisQuota, parse_redis_url, redact_redis_url
from ._stack import GuardedBackend, guard

__all__ = ["GuardsConfig", "RateLimitStoreConfig"]

#: ``true`` (on, defaults), ``false`` (off), a table of policy fields, or unset (inherit).
GuardSetting: TypeAlias = bool | dict[str, Any] | None

_ON_BY_DEFAULT = {
    "bulkhead": True,
    "breaker": True,
    "retry": True,
    "timeout": True,
    "hedge": False,
    "rate_limit": False,
}


def _make(kind: str, value: GuardSetting) -> Any:
    """The policy for one guard setting (``None`` when the guard is off)."""
    if value is None:
        value = _ON_BY_DEFAULT[kind]
    if value is False:
        return None
    fields: dict[str, Any] = {} if value is True else dict(value)
    try:
        if kind == "bulkhead":
            return BulkheadPolicy(**fields)
        if kind == "breaker":
            return BreakerPolicy(**fields)
        if kind == "retry":
            budget = fields.pop("budget", True)
            if budget is False:
                fields["budget"] = None
            elif isinstance(budget, dict):
                fields["budget"] = RetryBudgetPolicy(**budget)
            return RetryPolicy(**fields)
        if kind == "timeout":
            return TimeoutPolicy(**fields)
        if kind == "hedge":
            return HedgePolicy(**fields)
        if "shared" in fields or "shared_env" in fields:
            raise ConfigurationError(
                "guards.rate_limit: a policy holds limits, not a Redis URL; define the store once"
                ' in a [rate_limit_stores.NAME] table and write rate_limit_store = "NAME" in the'
                " guards"
            )
        return RateLimitPolicy(**fields)
    except TypeError as exc:  # an unknown field name
        raise ConfigurationError(f"guards.{kind}: {exc}") from None


class RateLimitStoreConfig(BaseModel):
    """One ``[rate_limit_stores.NAME]`` table: a shared quota store (`RedisQuota`), built
    once per configuration build and named by the guards of every backend that shares it
    (``rate_limit_store = "NAME"``).

    Set ``url_env`` (the environment variable holding the URL: keeps a password out of the
    file) or ``url`` (a URL without a password), not both; the other fields are
    `RedisQuota`'s.

    Example:
        ```toml
        [rate_limit_stores.main]
        url_env = "GENFAN_REDIS_URL"
        key_prefix = "myapp:quota:"

        [backends.gpt.guards]
        rate_limit = { requests_per_minute = 500 }
        rate_limit_store = "main"
        ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    url: str | None = None
    url_env: Annotated[str, Field(min_length=1)] | None = None
    key_prefix: str = "genfan:quota:"
    timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    reconnect_interval: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    max_connections: Annotated[int, Field(ge=1)] = 8

    @model_validator(mode="after")
    def _one_url(self) -> RateLimitStoreConfig:
        if (self.url is None) == (self.url_env is None):
            raise ValueError(
                "set url_env (the environment variable holding the Redis URL) or url, one of them"
            )
        if self.url is not None:
            parse_redis_url(self.url)  # a ConfigurationError (a ValueError), without the password
        return self

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, redact_redis_url(value) if name == "url" and value is not None else value

    def build(self) -> RedisQuota:
        """The store (no connection is opened until it is used).

        Raises:
            ConfigurationError: ``url_env`` is not set, or holds a bad URL.
        """
        options: dict[str, Any] = {
            "key_prefix": self.key_prefix,
            "timeout": self.timeout,
            "reconnect_interval": self.reconnect_interval,
            "max_connections": self.max_connections,
        }
        if self.url_env is not None:
            return RedisQuota.from_env(self.url_env, **options)
        assert self.url is not None
        return RedisQuota(self.url, **options)


class GuardsConfig(BaseModel):
    """The guards of one backend, as written in the TOML config.

    Each guard is ``true`` (on, with defaults), ``false`` (off), or a table of its policy's
    fields; unset guards inherit ``[defaults.guards]`` (see `merged_over`), and after that
    the library defaults (bulkhead, breaker, retry and timeout on; hedge and rate limit off).
    ``timeout`` may also be a number of seconds. The bulkhead is the backend's one concurrency
    cap, fixed or adaptive (``bulkhead = { adaptive = "aimd" }``). ``rate_limit_store`` names a ``[rate_limit_stores.NAME]`` table whose shared quota the
    rate limit draws from (a policy never holds a Redis URL); a backend whose rate limit is off
    does not use it, so ``[defaults.guards]`` may name it for every backend.

    Example:
        ```toml
        [defaults.guards]
        timeout = 30
        retry = { attempts = 4, initial = 0.2 }

        [backends.gpt.guards]
        rate_limit = { requests_per_minute = 500, tokens_per_minute = 200000 }
        bulkhead = { adaptive = "aimd", max_concurrent = 128 }   # the cap follows 429s
        hedge = { percentile = 0.95 }
        breaker = { failure_ratio = 0.5, break_duration = 10 }

        [rate_limit_stores.main]   # one quota for every process, kept in Redis
        url_env = "GENFAN_REDIS_URL"

        [backends.shared-gpt.guards]
        rate_limit = { requests_per_minute = 500, on_store_error = "local" }
        rate_limit_store = "main"
        ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    bulkhead: GuardSetting = None
    breaker: GuardSetting = None
    retry: GuardSetting = None
    timeout: GuardSetting | float = None
    hedge: GuardSetting = None
    rate_limit: GuardSetting = None
    rate_limit_store: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _timeout_seconds(cls, data: Any) -> Any:
        if isinstance(data, dict):
            t = data.get("timeout")
            if isinstance(t, int | float) and not isinstance(t, bool):
                data = {**data, "timeout": {"timeout": float(t)}}
        return data

    @model_validator(mode="after")
    def _validate_policies(self) -> GuardsConfig:
        self.policies()  # raises ConfigurationError (a ValueError) naming the field
        return self

    def policies(self) -> dict[str, Any]:
        """The policy of each guard (``None`` when off)."""
        return {kind: _make(kind, getattr(self, kind)) for kind in _ON_BY_DEFAULT}

    def merged_over(self, defaults: GuardsConfig | None) -> GuardsConfig:
        """This config with unset guards (and unset fields of tables) taken from ``defaults``."""
        if defaults is None:
            return self
        merged: dict[str, Any] = {}
        for kind in _ON_BY_DEFAULT:
            mine, theirs = getattr(self, kind), getattr(defaults, kind)
            if mine is None:
                merged[kind] = theirs
            elif isinstance(mine, dict) and isinstance(theirs, dict):
                merged[kind] = {**theirs, **mine}
            else:
                merged[kind] = mine
        merged["rate_limit_store"] = self.rate_limit_store or defaults.rate_limit_store
        return GuardsConfig(**merged)

    def build(
        self, backend: Backend, *, stores: Mapping[str, RedisQuota] | None = None
    ) -> GuardedBackend:
        """Wrap ``backend`` in the guard stack this config describes.

        Args:
            backend: the provider backend.
            stores: the quota stores that ``rate_limit_store`` may name, built from the
                ``[rate_limit_stores.NAME]`` tables. They are handed over: the stack holds its
                store, and the last stack built with a store closes it when it is closed.

        Raises:
            ConfigurationError: ``rate_limit_store`` names no store in ``stores``.
        """
        p = self.policies()
        store = None
        name = self.rate_limit_store
        if name is not None and p["rate_limit"] is not None:
            if stores is None or name not in stores:
                known = sorted(stores or ())
                raise ConfigurationError(
                    f"guards.rate_limit_store = {name!r} names no [rate_limit_stores.{name}] table;"
                    f" defined: {known}"
                )
            store = stores[name]
        g = guard(
            backend,
            bulkhead=p["bulkhead"],
            breaker=p["breaker"],
            retry=p["retry"],
            timeout=p["timeout"],
            hedge=p["hedge"],
            rate_limit=p["rate_limit"],
            rate_limit_store=store,
        )
        if store is not None and g.rate_limiter is not None:
            g.rate_limiter._use_store(store, hold=True)
        return g
