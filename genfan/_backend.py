"""The one seam between genfan and an LLM: the [`Backend`][genfan.Backend] protocol, and the registry.

A backend has a ``name``, answers `Backend.complete`, streams with `Backend.stream`,
and releases its resources in `Backend.aclose`. Guards (``genfan.resilience``) are backends
that wrap a backend; providers (``genfan_providers``, the genfan-providers distribution, or any
third-party package) implement it for a vendor. genfan never imports them: the registry loads
them by name.

The registry turns ``"openai:gpt-4o-mini"``-style strings into backends. It looks prefixes up in
the ``genfan.backends`` entry-point group, so installing a package is enough to add a provider;
[`register_backend`][genfan.register_backend] adds one at run time. Constructing a backend class directly always works.
`build_backend` returns the provider's backend as it is (unguarded); the public
``genfan.create_backend`` (``genfan._create``, a floor above ``genfan.resilience``) wraps it in
its guard stack.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing, nullcontext
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

from ._errors import ConfigurationError, MalformedResponseError
from ._sync import run_sync, sync_with_error
from ._types import (
    ChatRequest,
    Completion,
    StreamEnd,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolCallDelta,
)

__all__ = [
    "AsyncCloseable",
    "Backend",
    "BackendFactory",
    "BaseBackend",
    "aclose_all",
    "build_backend",
    "collect_stream",
    "register_backend",
    "registered_prefixes",
]


@runtime_checkable
class Backend(Protocol):
    """What genfan needs from an LLM backend."""

    @property
    def name(self) -> str:
        """A short unique name, used in results, errors, logs and metrics."""
        ...

    async def complete(self, request: ChatRequest) -> Completion:
        """Answer ``request``; raise a [`BackendError`][genfan.BackendError] on failure."""
        ...

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """Stream the answer: text and tool-call deltas, then one [`StreamEnd`][genfan.StreamEnd]."""
        ...

    async def aclose(self) -> None:
        """Release connections, engines and other resources."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class AsyncCloseable:
    """What every genfan backend class shares (providers, composites, guards, pools): an async
    context manager whose exit calls `aclose` (subclasses override it), and
    `complete_sync` for sync code.

    ``with`` (instead of ``async with``) raises a ``TypeError`` that says so.
    """

    async def complete(self, request: ChatRequest) -> Completion:
        """Answer ``request``: ``completion = await backend.complete(request)``."""
        raise NotImplementedError

    def complete_sync(self, request: ChatRequest) -> Completion:
        """`complete` for sync code: ``completion = backend.complete_sync(request)``.

        It blocks until the answer is there. It works in a plain script and inside a running
        event loop (a notebook), whose loop it blocks meanwhile, as a sync HTTP client would:
        in async code, ``await backend.complete(request)`` instead. Every sync call runs on one
        event loop genfan keeps for the process, so a backend made once serves them all.
        """
        return run_sync(self.complete, request)

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    if not TYPE_CHECKING:  # at run time only: type checkers still flag `with` as an error

        def __enter__(self):
            sync_with_error(self)

        def __exit__(self, *exc_info):
            return None


async def aclose_all(backends: Iterable[Backend]) -> None:
    """Close each distinct backend once, in order (for composites closing what they own).

    Every backend is closed even when one fails; the first failure is then raised.
    """
    seen: set[int] = set()
    failure: BaseException | None = None
    for backend in backends:
        if id(backend) in seen:
            continue
        seen.add(id(backend))
        try:
            await backend.aclose()
        except Exception as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


class BaseBackend(AsyncCloseable):
    """A convenient base class: context manager, ``stream`` built on ``complete``, and
    `complete_sync` for sync code.

    Subclasses implement `complete` (and `stream` when they can really stream).

    Whoever creates a backend owns it and closes it (``async with backend:`` or
    ``await backend.aclose()``); composites that are handed a backend never close it, so one
    backend serves any number of fan-outs.
    """

    def __init__(self, name: str) -> None:
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    async def complete(self, request: ChatRequest) -> Completion:
        """Answer ``request``: ``completion = await backend.complete(request)``."""
        raise NotImplementedError

    async def warm(self) -> None:
        """Get ready now rather than on the first call: build HTTP clients, start an engine.

        A no-op by default. The command line awaits it before a fan-out's clock starts, so a
        one-off start-up cost is counted neither against the deadline nor in the latency.
        Calling it again, or calling `complete` without it, must work.
        """
        return None

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """Default streaming: the whole completion as one text delta, then the end event."""
        completion = await self.complete(request)
        if completion.text:
            yield TextDelta(text=completion.text)
        for i, call in enumerate(completion.tool_calls):
            yield ToolCallDelta(index=i, id=call.id, name=call.name, arguments=call.arguments)
        yield StreamEnd(completion=completion)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


async def collect_stream(events: AsyncIterator[StreamEvent], *, backend: str = "?") -> Completion:
    """Drain a stream and return its completion, with ``ttft`` measured on the way.

    Raises:
        MalformedResponseError: the stream ended without a [`StreamEnd`][genfan.StreamEnd] event.
    """
    start = time.perf_counter()
    ttft: float | None = None
    # Closed on return, so the stream (and the connection or slot it holds) is let go now,
    # not whenever the garbage collector finalises it.
    async with aclosing(events) if hasattr(events, "aclose") else nullcontext():  # type: ignore[type-var]
        async for ev in events:
            if ttft is None and not isinstance(ev, StreamEnd):
                ttft = time.perf_counter() - start
            if isinstance(ev, StreamEnd):
                c = ev.completion
                if c.ttft is None and ttft is not None:
                    c = c.model_copy(update={"ttft": ttft})
                return c
    raise MalformedResponseError("stream ended without a final event (truncated)", backend=backend)


def merge_tool_call_deltas(deltas: list[ToolCallDelta]) -> tuple[ToolCall, ...]:
    """Join streamed tool-call pieces (grouped by ``index``) into whole tool calls."""
    parts: dict[int, dict[str, str]] = {}
    for d in deltas:
        p = parts.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
        if d.id:
            p["id"] = d.id
        if d.name and not p["name"]:
            p["name"] = d.name
        p["arguments"] += d.arguments
    return tuple(
        ToolCall(id=p["id"] or f"call_{i}", name=p["name"], arguments=p["arguments"] or "{}")
        for i, p in sorted(parts.items())
    )


#: Builds a backend from the model part of a spec string and keyword options.
BackendFactory = Callable[..., Backend]

_registry: dict[str, BackendFactory] = {}


def register_backend(prefix: str, factory: BackendFactory) -> None:
    """Make ``"prefix:model"`` strings resolve through ``factory(model=..., **options)``."""
    if not prefix or ":" in prefix:
        raise ConfigurationError(
            f"backend prefix must be non-empty and contain no ':', got {prefix!r}"
        )
    _registry[prefix] = factory


def _entry_point_factories() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="genfan.backends")}


def registered_prefixes() -> list[str]:
    """Every prefix the registry knows (run-time registrations and entry points)."""
    return sorted(set(_registry) | set(_entry_point_factories()))


def build_backend(spec: str, /, **options: Any) -> Backend:
    """The provider's backend for ``"prefix:model"``, as it is: **no guards** (the registry;
    ``genfan.create_backend`` and the TOML config wrap it in its guard stack).

    Options are passed to the backend's constructor (``name=``, ``base_url=``, ...).

    Raises:
        ConfigurationError: the spec is malformed or names an unknown prefix, or an option is
            not one the backend takes (the message names it and the valid ones).
    """
    factory, model = _factory(spec)
    valid = _option_names(factory)
    unknown = [k for k in options if k == "model" or (valid is not None and k not in valid)]
    if unknown:
        raise ConfigurationError(unknown_option_message(spec, unknown[0], valid))
    try:
        return factory(model=model or None, **options)
    except TypeError as exc:  # a factory taking **options passed on a key it does not know
        if "unexpected keyword argument" not in str(exc):
            raise
        raise ConfigurationError(f"backend {spec!r}: {exc}") from None


def _factory(spec: str) -> tuple[BackendFactory, str]:
    """The registry's factory for ``spec``, and the spec's model part."""
    prefix, sep, model = spec.partition(":")
    if not sep or not prefix:
        raise ConfigurationError(
            f"backend spec {spec!r} must look like 'provider:model', e.g. 'openai:gpt-4o-mini'"
        )
    factory = _registry.get(prefix)
    if factory is None:
        ep = _entry_point_factories().get(prefix)
        if ep is None:
            known = ", ".join(registered_prefixes()) or "none"
            raise ConfigurationError(
                f"unknown backend provider {prefix!r} in {spec!r}; known providers: {known}. "
                "Install the package that provides it, or call genfan.register_backend()."
            )
        factory = ep.load()
        _registry[prefix] = factory
    return factory, model


def _option_names(factory: Callable[..., Any]) -> list[str] | None:
    """The keyword options ``factory`` takes besides ``model`` (``None``: any, through
    ``**options`` it says nothing more about). A factory that passes ``**options`` on to the
    class its return annotation names takes that class's options too."""
    import inspect
    import typing

    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return None
    names = [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "model"
    ]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        try:
            target = typing.get_type_hints(factory).get("return")
        except Exception:  # unresolvable annotations: nothing more to learn
            return None
        if not isinstance(target, type) or target is factory:
            return None
        inner = _option_names(target)
        return None if inner is None else sorted({*names, *inner})
    return names


def backend_options(spec: str) -> list[str] | None:
    """The keyword options the backend behind ``spec`` takes (``None``: it accepts any).

    Raises:
        ConfigurationError: the spec is malformed or names an unknown prefix.
    """
    return _option_names(_factory(spec)[0])


#: Keys that belong to a request (or a fan-out target), not to a backend's constructor.
_REQUEST_KEYS = ("temperature", "top_p", "max_tokens", "system", "seed", "stop")


def unknown_option_message(spec: str, key: str, valid: list[str] | None) -> str:
    """Why ``key`` is not an option of the backend behind ``spec``, and what to write instead."""
    import difflib

    if key == "model":
        return f"model goes in the spec ({spec.partition(':')[0]}:MODEL), not in the options"
    text = f"backend {spec.removesuffix(':')!r} takes no option {key!r}"
    if valid is not None:
        close = difflib.get_close_matches(key, valid, n=1)
        text += f"; valid options: {', '.join(valid)}"
        if close:
            text += f" (did you mean {close[0]!r}?)"
    if key in _REQUEST_KEYS:
        text += (
            f"; {key} is a request setting: ChatRequest({key}=...) or Target({key}=...) in "
            "code, a key of [backends.NAME] (not of its options) in a config file"
        )
    return text
