"""The TOML configuration file: backends, their overrides and guards, and the fan-out.

```toml
[fanout]
mode = "all"            # all | first | quorum
deadline = 30           # seconds for the whole fan-out
select = "first"        # a selector name (see genfan.select), or a table {name = "vote", ...}

[backends.gpt]
type = "openai"         # a registry prefix: openai, anthropic, vllm, fake, or a plug-in's
model = "gpt-4o-mini"
api_key_env = "OPENAI_API_KEY"   # the key is read from this variable, never from the file
temperature = 0.2       # per-backend overrides of the request
system = "Answer briefly."

[backends.gpt.options]  # passed to the backend's constructor (engine options, price, ...)
price = [0.15, 0.6]     # dollars per million input, output tokens

[backends.gpt.guards]   # its guard stack (see docs/resilience.md); the bulkhead caps concurrency
bulkhead = { max_concurrent = 32 }
rate_limit = { requests_per_minute = 500 }
rate_limit_store = "main"          # the quota is shared through this store

[rate_limit_stores.main]  # one shared quota store, built once, named by the guards
url_env = "GENFAN_REDIS_URL"
```

:func:`load_config` validates the file into :class:`GenfanConfig`; a bad file raises
:class:`~genfan.ConfigurationError` naming the key and what to write instead.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ._backend import Backend, create_backend
from ._errors import ConfigurationError
from ._fanout import FanOut, Target

__all__ = ["BackendConfig", "FanOutConfig", "GenfanConfig", "load_config", "parse_config"]

_strict = ConfigDict(extra="forbid", frozen=True, defer_build=True)
#: backend types built from other backends of the same file.
_COMPOSITES = ("pool", "fallback")


class BackendConfig(BaseModel):
    """One ``[backends.NAME]`` table."""

    model_config = _strict

    type: Annotated[str, Field(min_length=1)]
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: Annotated[float, Field(gt=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    system: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    guards: dict[str, Any] | None = None
    enabled: bool = True
    members: list[str] | None = None
    strategy: str | None = None
    weights: list[float] | None = None

    @model_validator(mode="after")
    def _composite(self) -> BackendConfig:
        if self.type in _COMPOSITES:
            if not self.members:
                raise ValueError(
                    f"a {self.type!r} backend needs members = [...] naming other backends"
                )
        elif self.members is not None or self.strategy is not None or self.weights is not None:
            raise ValueError(
                "members/strategy/weights are only for type = 'pool' or type = 'fallback'"
            )
        return self

    def constructor_options(self, name: str) -> dict[str, Any]:
        """Keyword options for the backend's constructor."""
        opts: dict[str, Any] = {"name": name}
        if self.base_url is not None:
            opts["base_url"] = self.base_url
        if self.api_key_env is not None:
            opts["api_key_env"] = self.api_key_env
        if self.headers:
            opts["headers"] = dict(self.headers)
        if self.timeout is not None:
            opts["timeout"] = self.timeout
        opts.update(self.options)
        return opts


class SelectConfig(BaseModel):
    """``select = {name = "vote", ...}``: a selector by name and its options."""

    model_config = ConfigDict(extra="allow", frozen=True, defer_build=True)

    name: str = "first"


class FanOutConfig(BaseModel):
    """The ``[fanout]`` table."""

    model_config = _strict

    mode: Literal["all", "first", "quorum"] = "all"
    quorum: Annotated[int, Field(ge=1)] | None = None
    deadline: Annotated[float, Field(gt=0)] | None = None
    select: str | SelectConfig = "first"
    backends: list[str] | None = None
    early_exit: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _early_exit_alone(self) -> FanOutConfig:
        if self.early_exit is not None and (self.mode != "all" or self.quorum is not None):
            raise ValueError(
                "early_exit = K already means 'stop once K answers agree' (a quorum on the "
                "vote's key): remove mode/quorum, or remove early_exit"
            )
        return self


class GenfanConfig(BaseModel):
    """A whole configuration file."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    backends: dict[str, BackendConfig] = Field(default_factory=dict)
    fanout: FanOutConfig = Field(default_factory=FanOutConfig)
    defaults: dict[str, Any] = Field(default_factory=dict)
    schedules: dict[str, Any] = Field(default_factory=dict)
    batch: dict[str, Any] = Field(default_factory=dict)
    #: ``[rate_limit_stores.NAME]``: shared quota stores (``RateLimitStoreConfig``), named by
    #: ``rate_limit_store = "NAME"`` in guards tables.
    rate_limit_stores: dict[str, Any] = Field(default_factory=dict)
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _store_tables(cls, data: Any) -> Any:
        tables = data.get("rate_limit_stores") if isinstance(data, dict) else None
        if not tables:
            return data
        if not isinstance(tables, dict):
            raise ValueError("rate_limit_stores must hold [rate_limit_stores.NAME] tables")
        from .resilience import RateLimitStoreConfig

        stores: dict[str, Any] = {}
        for name, table in tables.items():
            if isinstance(table, RateLimitStoreConfig):
                stores[name] = table
                continue
            try:
                stores[name] = RateLimitStoreConfig.model_validate(table)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'the table'}:"
                    f" {e['msg'].removeprefix('Value error, ')}"
                    for e in exc.errors()
                )
                raise ValueError(f"rate_limit_stores.{name}: {problems}") from None
        return {**data, "rate_limit_stores": stores}

    @model_validator(mode="after")
    def _check_names(self) -> GenfanConfig:
        defaults = self.defaults.get("guards")
        default_limit = defaults.get("rate_limit") if isinstance(defaults, dict) else None
        # (where, table, the rate limit it inherits): composites inherit no defaults
        guards_tables = [("defaults.guards", defaults, None)] + [
            (f"backends.{name}.guards", b.guards, None if b.type in _COMPOSITES else default_limit)
            for name, b in self.backends.items()
        ]
        for i, (where, table, inherited) in enumerate(guards_tables):
            store = table.get("rate_limit_store") if isinstance(table, dict) else None
            if not isinstance(store, str):
                continue
            if store not in self.rate_limit_stores:
                raise ValueError(
                    f"{where}.rate_limit_store names {store!r}, which has no"
                    f" [rate_limit_stores.{store}] table; defined stores:"
                    f" {sorted(self.rate_limit_stores)}"
                )
            assert isinstance(table, dict)
            if i and table.get("rate_limit", inherited) in (None, False):
                raise ValueError(
                    f"{where}.rate_limit_store = {store!r} needs a rate limit: set"
                    f" {where}.rate_limit (true, or a table of its limits)"
                )
        for name, b in self.backends.items():
            unknown_members = [m for m in b.members or () if m not in self.backends]
            if unknown_members:
                raise ValueError(
                    f"backends.{name}.members names {unknown_members}, which have no "
                    f"[backends.NAME] table; defined backends: {sorted(self.backends)}"
                )
        if self.fanout.backends is not None:
            unknown = [b for b in self.fanout.backends if b not in self.backends]
            if unknown:
                raise ValueError(
                    f"fanout.backends names {unknown}, which have no [backends.NAME] table; "
                    f"defined backends: {sorted(self.backends)}"
                )
        return self

    def selected_backends(self, names: list[str] | None = None) -> dict[str, BackendConfig]:
        """The backend tables a fan-out uses: ``names``, or ``fanout.backends``, or all enabled."""
        wanted = names or self.fanout.backends
        if wanted is None:
            return {n: b for n, b in self.backends.items() if b.enabled}
        missing = [n for n in wanted if n not in self.backends]
        if missing:
            raise ConfigurationError(
                f"no backend named {missing} in the config; defined: {sorted(self.backends)}"
            )
        return {n: self.backends[n] for n in wanted}

    def build_backend(
        self,
        name: str,
        *,
        _path: tuple[str, ...] = (),
        _stores: dict[str, Any] | None = None,
    ) -> Backend:
        """Create the backend ``name`` inside its guard stack.

        ``type = "pool"`` and ``type = "fallback"`` are built from their ``members`` (each
        guarded on its own, so a pool skips replicas whose breaker is open); a composite gets
        guards of its own only when its table sets ``guards``. A ``[rate_limit_stores.NAME]``
        store its guards name is built once per build (one for every backend of
        :meth:`build_targets`) and closed with the last backend that uses it.
        """
        stores: dict[str, Any] = {} if _stores is None else _stores
        if name in _path:
            cycle = " -> ".join((*_path, name))
            raise ConfigurationError(f"backend members form a cycle: {cycle}")
        cfg = self.backends[name]
        if cfg.type in _COMPOSITES:
            from .resilience import Fallback, Pool

            members = [
                self.build_backend(m, _path=(*_path, name), _stores=stores)
                for m in cfg.members or ()
            ]
            composite: Backend
            if cfg.type == "pool":
                composite = Pool(
                    members,
                    strategy=cfg.strategy or "p2c_peak_ewma",  # type: ignore[arg-type]
                    weights=cfg.weights,
                    name=name,
                )
            else:
                composite = Fallback(members, name=name)
            if cfg.guards is None:
                return composite
            return self._apply_guards(composite, None, cfg.guards, stores)
        spec = f"{cfg.type}:{cfg.model or ''}"
        backend = create_backend(spec, **cfg.constructor_options(name))
        return self._apply_guards(backend, self.defaults.get("guards"), cfg.guards, stores)

    def _apply_guards(
        self,
        backend: Backend,
        defaults: Mapping[str, Any] | None,
        own: Mapping[str, Any] | None,
        stores: dict[str, Any],
    ) -> Backend:
        from .resilience import GuardsConfig

        try:
            # Per guard, the backend's fields are merged over [defaults.guards]' fields.
            guards = GuardsConfig.model_validate(own or {}).merged_over(
                GuardsConfig.model_validate(defaults or {})
            )
        except ValidationError as exc:
            raise ConfigurationError(f"guards of backend {backend.name!r}: {exc}") from None
        store = guards.rate_limit_store
        if store is not None and store not in stores and store in self.rate_limit_stores:
            try:
                stores[store] = self.rate_limit_stores[store].build()
            except ConfigurationError as exc:
                raise ConfigurationError(f"rate_limit_stores.{store}: {exc}") from None
        return guards.build(backend, stores=stores)

    def build_targets(self, names: list[str] | None = None) -> list[Target]:
        """Fan-out targets for the selected backends, with their request overrides."""
        targets = []
        stores: dict[str, Any] = {}  # each shared quota store once, for every target
        for name, cfg in self.selected_backends(names).items():
            overrides = {"top_p": cfg.top_p} if cfg.top_p is not None else {}
            targets.append(
                Target(
                    backend=self.build_backend(name, _stores=stores),
                    name=name,
                    temperature=cfg.temperature,
                    system=cfg.system,
                    max_tokens=cfg.max_tokens,
                    overrides=overrides,
                )
            )
        if not targets:
            raise ConfigurationError(
                "the config defines no enabled backend; add a [backends.NAME] table"
            )
        return targets

    def build_fanout(
        self,
        *,
        backends: list[str] | None = None,
        select: str | None = None,
        mode: str | None = None,
        quorum: int | None = None,
        deadline: float | None = None,
        early_exit: int | None = None,
    ) -> FanOut:
        """A :class:`FanOut` as the config describes it (arguments override the file).

        ``early_exit=K`` (or ``[fanout] early_exit = K``) stops the fan-out once K answers agree
        under a majority-vote key (the vote selector's ``extract`` when ``select`` is ``vote``)
        and cancels the calls still running.
        """
        fan = self.fanout
        sel: str | SelectConfig = select if select is not None else fan.select
        m = mode or fan.mode
        k = early_exit if early_exit is not None else fan.early_exit
        agree = None
        if k is not None:
            if mode not in (None, "all", "quorum") or quorum is not None:
                raise ConfigurationError("early exit sets the mode itself: drop --mode/--quorum")
            m, quorum, agree = "quorum", k, _agreement_key(sel)
        return FanOut(
            self.build_targets(backends),
            mode=m,  # type: ignore[arg-type]
            quorum=quorum if quorum is not None else (fan.quorum if m == "quorum" else None),
            agree=agree,
            deadline=deadline if deadline is not None else fan.deadline,
            select=_selector(sel),
        )


def _name_options(sel: str | SelectConfig) -> tuple[str, dict[str, Any]]:
    """A ``select`` setting as (selector name, its options)."""
    return (sel, {}) if isinstance(sel, str) else (sel.name, dict(sel.model_extra or {}))


def _agreement_key(sel: str | SelectConfig) -> Any:
    from .select import MajorityVote

    name, options = _name_options(sel)
    extract = {"extract": options["extract"]} if name == "vote" and "extract" in options else {}
    try:
        return MajorityVote(**extract).agreement_key
    except TypeError as exc:
        raise ConfigurationError(f"bad extract for early exit: {exc}") from exc


def _selector(sel: str | SelectConfig) -> Any:
    name, options = _name_options(sel)
    if name == "first" and not options:
        return None
    from .select import selector_from_name

    return selector_from_name(name, **options)


def _describe(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key: remove it or check its spelling"
        elif e["type"] == "missing":
            msg = "this key is required"
        got = e.get("input")
        got_s = (
            ""
            if e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict)
            else f" (got {got!r})"
        )
        lines.append(f"  {loc or '<top level>'}: {msg}{got_s}")
    return f"{source}: invalid configuration:\n" + "\n".join(lines)


def parse_config(data: Mapping[str, Any], *, source: str = "<config>") -> GenfanConfig:
    """Validate an already-parsed mapping (for example from ``tomllib``)."""
    try:
        return GenfanConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc, source)) from None


def load_config(path: str | Path) -> GenfanConfig:
    """Read and validate a TOML configuration file.

    Raises:
        ConfigurationError: the file is missing, is not valid TOML, or has invalid keys; the
            message names the key and the fix.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(
            f"config file {p} not found; create it or pass --config PATH"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{p}: not valid TOML: {exc}") from None
    cfg = parse_config(data, source=str(p))
    return cfg.model_copy(update={"source": p})
