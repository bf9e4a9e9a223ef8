"""``create_backend``: a backend from a ``"provider:model"`` spec, inside its guard stack.

Every backend genfan builds for you is guarded the same way, whether it comes from code or from
a config file: [`create_backend`][genfan.create_backend] and the TOML config both turn a ``guards`` setting into a
stack here (`guarded`, through ``GuardsConfig.build``), so the defaults cannot drift
apart. ``guards=False`` is the explicit way out.

This module stands on floor 4, beside ``genfan._fanout``: above ``genfan.resilience`` (the
guards), which the registry (``genfan._backend``, floor 2) may not import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

from ._backend import Backend, build_backend
from ._errors import ConfigurationError

if TYPE_CHECKING:
    from .resilience import GuardsConfig, RedisQuota

__all__ = ["Guards", "create_backend", "guarded"]

#: What ``create_backend(..., guards=...)`` takes: ``True`` (the default stack), ``False`` or
#: ``None`` (no guards), a ``GuardsConfig``, or a mapping in the shape of a TOML ``guards``
#: table (``{"retry": {"attempts": 5}, "hedge": True, "timeout": 30}``).
Guards: TypeAlias = "bool | GuardsConfig | Mapping[str, Any] | None"


def _guards_config(guards: Guards) -> GuardsConfig | None:
    """The validated guard configuration for a ``guards`` setting (``None``: no guards)."""
    if guards is None or guards is False:
        return None
    from .resilience import GuardsConfig

    if guards is True:
        return GuardsConfig()
    if isinstance(guards, GuardsConfig):
        return guards
    if isinstance(guards, Mapping):
        from pydantic import ValidationError

        try:
            return GuardsConfig.model_validate(dict(guards))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) + ': ' if e['loc'] else ''}"
                f"{e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors()
            )
            raise ConfigurationError(f"create_backend(guards=...): {problems}") from None
    raise ConfigurationError(
        "create_backend(guards=...) takes True (the default guards), False (none), a "
        "GuardsConfig or a mapping like a TOML guards table ({'retry': {'attempts': 5}}); for "
        "policy objects, a shared retry budget or quota store use "
        "genfan.resilience.guard(create_backend(spec, guards=False), ...); "
        f"got {type(guards).__name__}"
    )


def guarded(
    backend: Backend,
    guards: Guards = True,
    *,
    stores: Mapping[str, RedisQuota] | None = None,
) -> Backend:
    """``backend`` inside the guard stack that ``guards`` describes (the one way genfan guards
    the backends it builds: [`create_backend`][genfan.create_backend] and the TOML config both end here).

    Args:
        backend: the provider's backend.
        guards: see `Guards`.
        stores: the shared quota stores a ``rate_limit_store`` may name (the TOML config's
            ``[rate_limit_stores.NAME]`` tables).
    """
    config = _guards_config(guards)
    return backend if config is None else config.build(backend, stores=stores)


def create_backend(spec: str, /, *, guards: Guards = True, **options: Any) -> Backend:
    """Create a backend from ``"prefix:model"``, **guarded**, e.g.
    ``create_backend("openai:gpt-4o-mini")``.

    The backend is wrapped in the default guard stack, the same one a config file's backends
    get: bulkhead (1,000 calls at once, the rest queue), circuit breaker, retries with a budget, a
    60 s timeout per attempt (see ``genfan.resilience.guard``). A 503 is retried; a burst
    queues.

    Args:
        spec: ``"provider:model"`` (``"openai:gpt-4o-mini"``, ``"anthropic:claude-sonnet-4-5"``,
            ``"vllm:"``, or a plug-in's prefix).
        guards: ``True`` (default): the default guards. ``False`` (or ``None``): the provider's
            backend as it is, unguarded. A mapping shaped like a TOML ``guards`` table changes
            some guards and keeps the others' defaults: ``guards={"retry": {"attempts": 5},
            "hedge": True, "timeout": 30}``; a ``genfan.resilience.GuardsConfig`` works too.
            For policy objects, a shared retry budget or a shared quota store, use
            ``guard(create_backend(spec, guards=False), ...)``.
        **options: the backend constructor's keyword arguments (``name=``, ``base_url=``,
            ``api_key=``, ...).

    Returns:
        A ``genfan.resilience.GuardedBackend`` (its ``provider`` is the provider's backend), or
        with ``guards=False`` the provider's backend itself.

    Raises:
        ConfigurationError: the spec is malformed or names an unknown prefix, a bad ``guards``
            setting, or the backend's own options are wrong (a hosted API without its key...).
    """
    config = _guards_config(guards)  # checked first: building a backend may start an engine
    backend = build_backend(spec, **options)
    return backend if config is None else config.build(backend)
