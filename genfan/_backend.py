"""The one seam between genfan and an LLM: the :class:`Backend` protocol, and the registry.

A backend has a ``name``, answers :meth:`Backend.complete`, streams with :meth:`Backend.stream`,
and releases its resources in :meth:`Backend.aclose`. Guards (``genfan.resilience``) are backends
that wrap a backend; providers (``genfan_providers``, the genfan-providers distribution, or any
third-party package) implement it for a vendor. genfan never imports them: the registry loads
them by name.

The registry turns ``"openai:gpt-4o-mini"``-style strings into backends. It looks prefixes up in
the ``genfan.backends`` entry-point group, so installing a package is enough to add a provider;
:func:`register_backend` adds one at run time. Constructing a backend class directly always works.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, nullcontext
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from ._errors import ConfigurationError, MalformedResponseError
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
    "Backend",
    "BackendFactory",
    "BaseBackend",
    "collect_stream",
    "create_backend",
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
        """Answer ``request``; raise a :class:`~genfan.BackendError` on failure."""
        ...

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """Stream the answer: text and tool-call deltas, then one :class:`StreamEnd`."""
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
    """An async context manager whose exit calls :meth:`aclose` (backends and the wrappers
    around them all share this lifetime; subclasses override :meth:`aclose`)."""

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


class BaseBackend(AsyncCloseable):
    """A convenient base class: context manager, and ``stream`` built on ``complete``.

    Subclasses implement :meth:`complete` (and :meth:`stream` when they can really stream).
    """

    def __init__(self, name: str) -> None:
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    async def complete(self, request: ChatRequest) -> Completion:
        raise NotImplementedError

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
        MalformedResponseError: the stream ended without a :class:`StreamEnd` event.
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


def create_backend(spec: str, /, **options: Any) -> Backend:
    """Create a backend from ``"prefix:model"``, e.g. ``create_backend("openai:gpt-4o-mini")``.

    Options are passed to the backend's constructor (``name=``, ``base_url=``, ...).

    Raises:
        ConfigurationError: the spec is malformed or names an unknown prefix.
    """
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
    return factory(model=model or None, **options)
