"""``GuardsConfig``: the ``guards`` table of the TOML config, turned into a guard stack."""

from __future__ import annotations

from typing import Any, TypeAlias

from pydantic import BaseModel, ConfigDict, model_validator

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
from ._shared import redact_redis_url
from ._stack import GuardedBackend, guard

__all__ = ["GuardsConfig"]

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
        return RateLimitPolicy(**fields)
    except TypeError as exc:  # an unknown field name
        raise ConfigurationError(f"guards.{kind}: {exc}") from None


class GuardsConfig(BaseModel):
    """The guards of one backend, as written in the TOML config.

    Each guard is ``true`` (on, with defaults), ``false`` (off), or a table of its policy's
    fields; unset guards inherit ``[defaults.guards]`` (see :meth:`merged_over`), and after that
    the library defaults (bulkhead, breaker, retry and timeout on; hedge and rate limit off).
    ``timeout`` may also be a number of seconds.

    Example:
        ```toml
        [defaults.guards]
        timeout = 30
        retry = { attempts = 4, initial = 0.2 }

        [backends.gpt.guards]
        rate_limit = { requests_per_minute = 500, tokens_per_minute = 200000 }
        hedge = { percentile = 0.95 }
        breaker = { failure_ratio = 0.5, break_duration = 10 }

        [backends.shared-gpt.guards]  # one quota for every process, kept in Redis
        rate_limit = { requests_per_minute = 500, shared_env = "GENFAN_REDIS_URL" }
        ```
    """

    # Inputs may hold a Redis URL with a password (rate_limit.shared): keep them out of errors.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    bulkhead: GuardSetting = None
    breaker: GuardSetting = None
    retry: GuardSetting = None
    timeout: GuardSetting | float = None
    hedge: GuardSetting = None
    rate_limit: GuardSetting = None

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

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name == "rate_limit" and isinstance(value, dict) and "shared" in value:
                value = {**value, "shared": redact_redis_url(str(value["shared"]))}
            yield name, value

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
        return GuardsConfig(**merged)

    def build(self, backend: Backend) -> GuardedBackend:
        """Wrap ``backend`` in the guard stack this config describes."""
        p = self.policies()
        return guard(
            backend,
            bulkhead=p["bulkhead"],
            breaker=p["breaker"],
            retry=p["retry"],
            timeout=p["timeout"],
            hedge=p["hedge"],
            rate_limit=p["rate_limit"],
        )
