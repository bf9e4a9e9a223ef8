"""The TOML configuration file: backends, their overrides and guards, and the fan-out.

```toml
[fanout]
mode = "all"            # all | first | quorum
deadline = 30           # seconds for the whole fan-out
max_cost = 0.05         # USD cap per run: calls that would pass it are not started
select = "auto"         # a selector name (see genfan.select), or a table {name = "vote", ...}

[backends.gpt]
type = "openai"         # a registry prefix: openai, anthropic, vllm, fake, or a plug-in's
model = "gpt-4o-mini"
api_key_env = "OPENAI_API_KEY"   # the key is read from this variable, never from the file
temperature = 0.2       # per-backend overrides of the request
system = "Answer briefly."
price = [0.15, 0.6]     # USD per 1M input, output tokens (default: the genai-prices table's)

[backends.gpt.options]  # passed to the backend's constructor (typos are named, with the valid
max_concurrency = 8     # options)

[backends.gpt.guards]   # its guard stack (see docs/resilience.md); the bulkhead caps concurrency
bulkhead = { max_concurrent = 32 }
rate_limit = { requests_per_minute = 500 }
rate_limit_store = "main"          # the quota is shared through this store

[rate_limit_stores.main]  # one shared quota store, built once, named by the guards
url_env = "GENFAN_REDIS_URL"
```

[`load_config`][genfan.load_config] validates the file into [`GenfanConfig`][genfan.GenfanConfig]; a bad file raises
[`ConfigurationError`][genfan.ConfigurationError] naming the key and what to write instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator, with_config
from typing_extensions import TypedDict  # pydantic reads typing.TypedDict on 3.12+ only

from ._backend import Backend, backend_options, build_backend, unknown_option_message
from ._create import guarded
from ._errors import ConfigurationError
from ._fanout import FanOut, Target
from .cost import BudgetedBackend, CachedBackend

if TYPE_CHECKING:
    from ._types import ChatRequest
    from .cost import Budget
    from .select import Candidate, MajorityVote, Selection, Selector

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
    #: USD per million input tokens and per million output tokens (fills each answer's cost).
    price: tuple[Annotated[float, Field(ge=0)], Annotated[float, Field(ge=0)]] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    system: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    guards: dict[str, Any] | None = None
    #: a ``[budgets.NAME]`` every call of this backend is charged to (see docs/budgets.md)
    budget: str | None = None
    #: a ``[caches.NAME]`` that answers this backend's repeated requests (docs/caching.md)
    cache: str | None = None
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
        if self.price is not None and "price" in self.options:
            raise ValueError("price is set twice: keep price = [in, out] and drop options.price")
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
        if self.price is not None:
            opts["price"] = self.price
        opts.update(self.options)
        return opts


class SelectConfig(BaseModel):
    """``select = {name = "vote", ...}``: a selector by name and its options."""

    model_config = ConfigDict(extra="allow", frozen=True, defer_build=True)

    name: str = "auto"


class FanOutConfig(BaseModel):
    """The ``[fanout]`` table."""

    model_config = _strict

    mode: Literal["all", "first", "quorum"] = "all"
    quorum: Annotated[int, Field(ge=1)] | None = None
    deadline: Annotated[float, Field(gt=0)] | None = None
    select: str | SelectConfig = "auto"
    backends: list[str] | None = None
    early_exit: Annotated[int, Field(ge=1)] | None = None
    max_cost: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    prompt_cache: Literal["warm-first"] | None = None

    @model_validator(mode="after")
    def _early_exit_alone(self) -> FanOutConfig:
        if self.early_exit is not None and (self.mode != "all" or self.quorum is not None):
            raise ValueError(
                "early_exit = K already means 'stop once K answers agree' (a quorum on the "
                "vote's key): remove mode/quorum, or remove early_exit"
            )
        return self


@with_config(ConfigDict(extra="forbid"))
class _Defaults(TypedDict, total=False):
    """The ``[defaults]`` table: what every backend starts from."""

    #: ``[defaults.guards]``: every backend's guards, merged under its own ``guards``.
    guards: dict[str, Any]


class GenfanConfig(BaseModel):
    """A whole configuration file."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    backends: dict[str, BackendConfig] = Field(default_factory=dict)
    fanout: FanOutConfig = Field(default_factory=FanOutConfig)
    defaults: _Defaults = Field(default_factory=lambda: _Defaults())
    schedules: dict[str, Any] = Field(default_factory=dict)
    batch: dict[str, Any] = Field(default_factory=dict)
    #: ``[serve]``: the gateway's table (``genfan.serve.ServeSettings``), validated by
    #: ``genfan serve``.
    serve: dict[str, Any] = Field(default_factory=dict)
    #: ``[rate_limit_stores.NAME]``: shared quota stores (``RateLimitStoreConfig``), named by
    #: ``rate_limit_store = "NAME"`` in guards tables.
    rate_limit_stores: dict[str, Any] = Field(default_factory=dict)
    #: ``[budgets.NAME]``: spend budgets (``genfan.cost.BudgetConfig``), named by
    #: ``budget = "NAME"`` in backend tables.
    budgets: dict[str, Any] = Field(default_factory=dict)
    #: ``[caches.NAME]``: response caches (``genfan.cost.CacheConfig``), named by
    #: ``cache = "NAME"`` in backend tables.
    caches: dict[str, Any] = Field(default_factory=dict)
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

    @model_validator(mode="before")
    @classmethod
    def _cost_tables(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        from .cost import BudgetConfig, CacheConfig  # pydantic models: built when a file has them

        out = dict(data)
        for key, model in (("budgets", BudgetConfig), ("caches", CacheConfig)):
            tables = data.get(key)
            if not tables:
                continue
            if not isinstance(tables, dict):
                raise ValueError(f"{key} must hold [{key}.NAME] tables")
            built: dict[str, Any] = {}
            for name, table in tables.items():
                if isinstance(table, model):
                    built[name] = table
                    continue
                try:
                    built[name] = model.model_validate(table)
                except ValidationError as exc:
                    problems = "; ".join(
                        f"{'.'.join(str(p) for p in e['loc']) or 'the table'}:"
                        f" {e['msg'].removeprefix('Value error, ')}"
                        for e in exc.errors()
                    )
                    raise ValueError(f"{key}.{name}: {problems}") from None
            out[key] = built
        return out

    @model_validator(mode="after")
    def _check_cost_names(self) -> GenfanConfig:
        for name, b in self.backends.items():
            for key, tables in (("budget", self.budgets), ("cache", self.caches)):
                wanted = getattr(b, key)
                if wanted is not None and wanted not in tables:
                    raise ValueError(
                        f"backends.{name}.{key} names {wanted!r}, which has no [{key}s.{wanted}]"
                        f" table; defined: {sorted(tables)}"
                    )
        return self

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

    @model_validator(mode="after")
    def _check_selection(self) -> GenfanConfig:
        name, options = _name_options(self.fanout.select)
        if name == "judge" and "judge" in options:
            _judge_table(options["judge"], "fanout.select.judge", self.backends)
        return self

    def _where(self, path: str) -> str:
        """``path`` (a dotted key) prefixed with the file and line it is on, when known."""
        if self.source is None:
            return path
        try:
            text = self.source.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError):
            text = ""
        line = _locate(text, path.split("."))
        return f"{self.source}:{line}: {path}" if line else f"{self.source}: {path}"

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
        `build_targets`) and closed with the last backend that uses it.
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
                    owns_backends=True,  # the config built the members: closing it closes them
                )
            else:
                composite = Fallback(members, name=name, owns_backends=True)
            if cfg.guards is None:
                return self._with_cost(cfg, composite, stores)
            guarded_composite = self._apply_guards(composite, None, cfg.guards, stores)
            return self._with_cost(cfg, guarded_composite, stores)
        return self._with_cost(cfg, self._build_leaf(name, cfg, stores, f"backends.{name}"), stores)

    def _with_cost(self, cfg: BackendConfig, backend: Backend, stores: dict[str, Any]) -> Backend:
        """``backend`` charged to its budget and answered from its cache (the cache outermost:
        a hit spends nothing). Each budget and cache is built once per build, shared by the
        backends that name it, and closed with the last of them."""
        node = backend
        if cfg.budget is not None:
            budget_cfg = self.budgets[cfg.budget]
            budget = stores.get(f"\x00budget:{cfg.budget}")
            if budget is None:
                try:
                    budget = stores[f"\x00budget:{cfg.budget}"] = budget_cfg.build()
                except ConfigurationError as exc:
                    raise ConfigurationError(f"budgets.{cfg.budget}: {exc}") from None
            budget._hold()
            node = _OwnedBudgeted(node, budget, scope=budget_cfg.scope or cfg.budget)
        if cfg.cache is not None:
            cache = stores.get(f"\x00cache:{cfg.cache}")
            if cache is None:
                try:
                    cache = stores[f"\x00cache:{cfg.cache}"] = self.caches[cfg.cache].build()
                except ConfigurationError as exc:
                    raise ConfigurationError(f"caches.{cfg.cache}: {exc}") from None
            cache._holders += 1
            node = _OwnedCached(node, cache)
        return node

    def _build_leaf(
        self, name: str, cfg: BackendConfig, stores: dict[str, Any], where: str
    ) -> Backend:
        """A provider's backend from its table (at ``where`` in the file), in its guard stack."""
        spec = f"{cfg.type}:{cfg.model or ''}"
        options = cfg.constructor_options(name)
        valid = backend_options(spec)
        for key in options:
            if key == "model" or (valid is not None and key not in valid):
                in_options = key in cfg.options
                path = f"{where}.options.{key}" if in_options else f"{where}.{key}"
                why = unknown_option_message(spec, key, valid)
                near = difflib.get_close_matches(key, _BACKEND_KEYS, n=1) if in_options else []
                if near and near[0] not in cfg.options:
                    why += f"; did you mean {where}.{near[0]} (a key of the table, not an option)?"
                raise ConfigurationError(f"{self._where(path)}: {why}")
        backend = build_backend(spec, **options)
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
        return guarded(backend, guards, stores=stores)  # as create_backend() does

    def build_targets(
        self, names: list[str] | None = None, *, _stores: dict[str, Any] | None = None
    ) -> list[Target]:
        """Fan-out targets for the selected backends, with their request overrides."""
        targets = []
        # each shared quota store once, for every target (and the judge)
        stores: dict[str, Any] = {} if _stores is None else _stores
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
        judge: str | Mapping[str, Any] | None = None,
        max_cost: float | None = None,
    ) -> FanOut:
        """A [`FanOut`][genfan.FanOut] as the config describes it (arguments override the file).

        ``early_exit=K`` (or ``[fanout] early_exit = K``) stops the fan-out once K answers agree
        under a majority-vote key (the vote selector's ``extract`` when ``select`` is ``vote``)
        and cancels the calls still running; the answer is then always one of those that agree
        (the vote picks it, or another selector picks among them).

        ``judge=`` names the judge of ``select="judge"`` (and implies it when ``select`` is not
        given): a backend of this config, a ``"provider:model"`` spec, or a table like a
        ``[backends.NAME]`` one (``{"spec": "openai:gpt-4o-mini", "base_url": ...}``). The
        judge is built (guarded) with the fan-out and closed with it.
        """
        fan = self.fanout
        sel: str | SelectConfig = select if select is not None else fan.select
        if judge is not None:
            name, options = _name_options(sel)
            if name != "judge":
                if select is not None:
                    raise ConfigurationError(
                        f"--judge names the judge of --select judge, not of --select {name}: "
                        "drop --judge or use --select judge"
                    )
                options = {}  # --judge alone: judge instead of the file's selector
            sel = SelectConfig(name="judge", **{**options, "judge": judge})
        m = mode or fan.mode
        k = early_exit if early_exit is not None else fan.early_exit
        agree = None
        if k is not None and (mode not in (None, "all", "quorum") or quorum is not None):
            raise ConfigurationError("early exit sets the mode itself: drop --mode/--quorum")
        stores: dict[str, Any] = {}  # one shared quota store for the targets and the judge
        targets = self.build_targets(backends, _stores=stores)
        owned: list[Backend] = []
        selector = self._selector(sel, stores, owned)
        if k is not None:
            # The selector's own answer key when it has one (auto), else the vote's.
            agree = getattr(selector, "agreement_key", None) or _agreement_vote(sel).agreement_key
            m, quorum = "quorum", k
            selector = _AmongAgreeing(selector, agree)
        settings: dict[str, Any] = {
            "mode": m,
            "quorum": quorum if quorum is not None else (fan.quorum if m == "quorum" else None),
            "agree": agree,
            "deadline": deadline if deadline is not None else fan.deadline,
            "select": selector,
            "owns_backends": True,
            "max_cost": max_cost if max_cost is not None else fan.max_cost,
            "prompt_cache": fan.prompt_cache,
        }
        budgets = [b for k, b in stores.items() if k.startswith("\x00budget:")]
        if owned or budgets:
            return _ConfigFanOut(targets, judges=owned, budgets=budgets, **settings)
        return FanOut(targets, **settings)

    def _selector(
        self, sel: str | SelectConfig, stores: dict[str, Any], owned: list[Backend]
    ) -> Any:
        """The selector ``sel`` names (a judge it needs is built and added to ``owned``)."""
        name, options = _name_options(sel)
        if name == "judge":
            options["judge"] = self._build_judge(options.get("judge"), stores, owned)
        from .select import as_selector, selector_from_name

        if name == "first" and not options:
            return as_selector(None)
        return selector_from_name(name, **options)

    def _build_judge(self, value: Any, stores: dict[str, Any], owned: list[Backend]) -> Any:
        """The judge backend a judge setting names (built guarded; the fan-out closes it)."""
        if value is None:
            raise ConfigurationError(
                "the judge selector needs a judge: pass --judge NAME (a backend of the config) "
                'or --judge provider:model, or write select = { name = "judge", judge = '
                '"NAME" } in [fanout]'
            )
        if not isinstance(value, str | Mapping):
            return value  # a backend object given in code
        name, table = _judge_table(value, "judge", self.backends)
        if table is None:
            backend = self.build_backend(name, _stores=stores)
        else:
            backend = self._build_leaf(name, table, stores, "fanout.select.judge")
        owned.append(backend)
        return backend


class _OwnedBudgeted(BudgetedBackend):
    """A config-built backend's budget: opening the backend (``async with``) starts the
    budget's leases (once for all the backends sharing it), closing it stops them, closes the
    backend, and the budget with the last backend that holds it."""

    _opened = False
    _closed = False

    async def __aenter__(self) -> Self:
        if not self._opened and not self._closed:
            await self.budget._start_leasing()
            self._opened = True
        return self

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.inner.aclose()
        finally:
            try:
                if self._opened:
                    self._opened = False
                    await self.budget._stop_leasing()
            finally:
                await self.budget._release()


class _OwnedCached(CachedBackend):
    """A config-built backend's cache: closing it closes the backend, and the cache with the
    last backend that holds it."""

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            cache: Any = self.cache
            cache._holders -= 1
            if cache._holders <= 0:
                await cache.aclose()


class _ConfigFanOut(FanOut):
    """A fan-out built from a config with a judge or budgets it built: closing it closes the
    judge too; opening it (``async with``) starts the budgets' leases, closing it stops them."""

    def __init__(
        self,
        targets: Sequence[Target],
        *,
        judges: Sequence[Backend],
        budgets: Sequence[Budget] = (),
        **kw: Any,
    ) -> None:
        super().__init__(targets, **kw)
        self._judges = tuple(judges)
        self._budgets = tuple(budgets)
        self._leasing: list[Budget] = []

    async def __aenter__(self) -> Self:
        if not self._leasing:
            for budget in self._budgets:
                await budget._start_leasing()
                self._leasing.append(budget)
        return self

    async def aclose(self) -> None:
        failure: Exception | None = None
        while self._leasing:  # in reverse: each started a flusher in this task
            try:
                await self._leasing.pop()._stop_leasing()
            except Exception as exc:  # the others stop all the same; the first failure is raised
                failure = failure or exc
        try:
            await super().aclose()
        finally:
            for judge in self._judges:
                await judge.aclose()
        if failure is not None:
            raise failure

    def __repr__(self) -> str:
        return f"FanOut(name={self.name!r})"


class _AmongAgreeing:
    """Early exit's selector: the answer is always one of those that agree (the group that
    stopped the fan-out). The selector's own choice stands when it is one of them; otherwise
    it chooses again among them alone, and the others are marked rejected."""

    def __init__(self, inner: Selector, agree: Any) -> None:
        self.inner = inner
        self.agree = agree

    @property
    def scorers(self) -> Any:
        """The inner selector's scorers (a judge among them, say), as a ``Select`` shows them."""
        return getattr(self.inner, "scorers", ())

    async def select(self, request: ChatRequest, candidates: Sequence[Candidate]) -> Selection:
        bind = getattr(self.agree, "for_request", None)
        key = bind(request) if callable(bind) else self.agree
        groups: dict[Any, list[int]] = {}
        for c in candidates:
            if c.ok and c.completion is not None and (k := key(c.completion)) is not None:
                groups.setdefault(k, []).append(c.index)
        top = max((len(g) for g in groups.values()), default=0)
        selection = await self.inner.select(request, candidates)
        agreeing = {i for g in groups.values() if len(g) == top for i in g}
        if top < 2 or selection.chosen in agreeing:
            return selection  # nothing agreed (a deadline), or the choice is one that agrees
        why = f"agreement: disagrees with the {top} answers that agree"
        others = {c.index: why for c in candidates if c.ok and c.index not in agreeing}
        among = [
            dataclasses.replace(c, status="cancelled", completion=None) if c.index in others else c
            for c in candidates
        ]
        selection = await self.inner.select(request, among)
        return dataclasses.replace(
            selection,
            rejected={**selection.rejected, **others},
            reasons={**selection.reasons, **others},
            explanation=f"{selection.explanation} (among the {top} answers that agree)",
        )

    def __repr__(self) -> str:
        return f"_AmongAgreeing({self.inner!r})"


#: The keys of a ``[backends.NAME]`` table (what an option's typo may have meant).
_BACKEND_KEYS = [k for k in BackendConfig.model_fields if k not in ("options", "guards")]


def _name_options(sel: str | SelectConfig) -> tuple[str, dict[str, Any]]:
    """A ``select`` setting as (selector name, its options)."""
    return (sel, {}) if isinstance(sel, str) else (sel.name, dict(sel.model_extra or {}))


def _agreement_vote(sel: str | SelectConfig) -> MajorityVote:
    """The vote whose key decides early exit (the vote selector's ``extract``, if it has one)."""
    from .select import MajorityVote

    name, options = _name_options(sel)
    extract = {"extract": options["extract"]} if name == "vote" and "extract" in options else {}
    try:
        return MajorityVote(**extract)
    except TypeError as exc:
        raise ConfigurationError(f"bad extract for early exit: {exc}") from exc


def _judge_table(
    value: Any, where: str, backends: Mapping[str, BackendConfig]
) -> tuple[str, BackendConfig | None]:
    """A judge setting as (its name, its backend table); the table is ``None`` for a backend
    of the config, which is built from its own ``[backends.NAME]`` table."""
    if isinstance(value, str):
        if value in backends:
            return value, None
        prefix, colon, model = value.partition(":")
        if colon and prefix:
            return value, BackendConfig(type=prefix, model=model or None)
        raise ConfigurationError(
            f"{where} = {value!r} is neither a backend of the config "
            f"(defined: {', '.join(sorted(backends)) or 'none'}) nor a 'provider:model' spec "
            "like 'openai:gpt-4o-mini'"
        )
    if isinstance(value, Mapping):
        table = dict(value)
        spec = table.pop("spec", None)
        if spec is not None:
            if not (isinstance(spec, str) and ":" in spec and not spec.startswith(":")):
                raise ConfigurationError(
                    f"{where}.spec must be a 'provider:model' spec like 'openai:gpt-4o-mini', "
                    f"got {spec!r}"
                )
            if "type" in table or "model" in table:
                raise ConfigurationError(f"{where}: give spec, or type and model, not both")
            prefix, _, model = spec.partition(":")
            table = {"type": prefix, **({"model": model} if model else {}), **table}
        elif "type" not in table:
            raise ConfigurationError(
                f"{where} needs spec = 'provider:model' (or type and model, as in a "
                "[backends.NAME] table)"
            )
        try:
            cfg = BackendConfig.model_validate(table)
        except ValidationError as exc:
            raise ConfigurationError(
                "; ".join(
                    f"{where}.{path}: {msg}"
                    for path, msg in _problems(exc, ["spec", *BackendConfig.model_fields])
                )
            ) from None
        return spec or f"{cfg.type}:{cfg.model or ''}", cfg
    raise ConfigurationError(
        f"{where} must be a backend name, a 'provider:model' spec, or a table like "
        f"{{ spec = 'openai:gpt-4o-mini', base_url = '...' }}; got {value!r}"
    )


def _valid_keys(loc: Sequence[str]) -> list[str] | None:
    """The keys the table holding ``loc`` takes, when it is one of the file's fixed tables."""
    fields: list[str] | None = None
    if len(loc) == 1:
        fields = [k for k in GenfanConfig.model_fields if k != "source"]
    elif loc[0] == "backends" and len(loc) == 3:
        fields = list(BackendConfig.model_fields)
    elif loc[0] == "fanout" and len(loc) == 2:
        fields = list(FanOutConfig.model_fields)
    elif loc[0] == "defaults" and len(loc) == 2:
        fields = list(_Defaults.__annotations__)
    return fields


def _problems(err: ValidationError, keys: list[str] | None = None) -> list[tuple[str, str]]:
    """Each error of ``err`` as (the dotted key, what is wrong and how to fix it); ``keys``:
    the valid keys of the table validated, when it is not the whole file."""
    out = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if not str(p).startswith("function-")]
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key: remove it or check its spelling"
            valid = keys if keys is not None and len(loc) == 1 else _valid_keys(loc)
            near = difflib.get_close_matches(loc[-1], valid or [], n=1)
            if near:
                msg += f" (did you mean {near[0]!r}?)"
            elif valid:
                msg += f"; valid keys here: {', '.join(valid)}"
        elif e["type"] == "missing":
            msg = "this key is required"
        got = e.get("input")
        if not (e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) or not loc):
            msg += f" (got {got!r})"
        out.append((".".join(loc), msg))
    return out


_HEADER = re.compile(r"^\s*\[\[?([^\]]+)\]\]?\s*(?:#.*)?$")
_KEY = re.compile(
    r"""^\s*((?:"[^"]*"|'[^']*'|[\w-]+)(?:\s*\.\s*(?:"[^"]*"|'[^']*'|[\w-]+))*)\s*="""
)
_PATH_IN_MESSAGE = re.compile(r"^([\w-]+(?:\.[\w-]+)+)\b")


def _split_key(key: str) -> list[str]:
    return [part.strip().strip("\"'") for part in key.split(".")]


def _locate(text: str, path: Sequence[str]) -> int | None:
    """The line of ``text`` (TOML) that sets ``path``, else the line of the closest table or key
    above it (best effort: for pointing at a mistake, not for parsing)."""
    table: list[str] = []
    best: tuple[int, int] | None = None  # (depth, line) of the deepest enclosing key or table
    for n, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            table = _split_key(header.group(1))
            full = table
        else:
            key = _KEY.match(line)
            if key is None:
                continue
            full = table + _split_key(key.group(1))
        if list(path) == full:
            return n
        depth = len(full)
        if depth < len(path) and list(path[:depth]) == full:
            inline = re.search(rf"[{{,]\s*[\"']?{re.escape(path[-1])}[\"']?\s*=", line)
            if inline and depth == len(path) - 1:
                return n
            if best is None or depth > best[0]:
                best = (depth, n)
    return None if best is None else best[1]


def _describe(err: ValidationError, source: str, text: str = "") -> str:
    """One line per problem: ``FILE:LINE: the.key: what to fix``."""
    lines = []
    for path, msg in _problems(err):
        if not path:  # a check of the whole file: its message starts with the key
            found = _PATH_IN_MESSAGE.match(msg)
            line = _locate(text, found.group(1).split(".")) if found and text else None
            lines.append(f"{source}:{line}: {msg}" if line else f"{source}: {msg}")
            continue
        line = _locate(text, path.split(".")) if text else None
        lines.append(f"{source}:{line}: {path}: {msg}" if line else f"{source}: {path}: {msg}")
    return "\n".join(lines)


def parse_config(data: Mapping[str, Any], *, source: str = "<config>") -> GenfanConfig:
    """Validate an already-parsed mapping (for example from ``tomllib``)."""
    return _parse(data, source, "")


def _parse(data: Mapping[str, Any], source: str, text: str) -> GenfanConfig:
    try:
        return GenfanConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc, source, text)) from None


def load_config(path: str | Path) -> GenfanConfig:
    """Read and validate a TOML configuration file (UTF-8).

    Raises:
        ConfigurationError: the file is missing or unreadable, is not UTF-8 or not valid TOML,
            or has invalid keys; one line per problem names the file, the line, the key and
            the fix.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigurationError(
            f"config file {p} not found; create it or pass --config PATH"
        ) from None
    except IsADirectoryError:
        raise ConfigurationError(f"{p} is a folder; pass --config FILE (a .toml file)") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigurationError(
            f"{p}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{p}: not valid TOML: {exc}") from None
    cfg = _parse(data, str(p), text)
    return cfg.model_copy(update={"source": p})
