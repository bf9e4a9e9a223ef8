"""Fallback chains: an ordered list of backends tried as one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing

from .._backend import AsyncCloseable, Backend, aclose_all
from .._errors import BackendError, ConfigurationError
from .._types import ChatRequest, Completion, StreamEvent
from ._base import decision, time_left

__all__ = ["Fallback"]


def _default_fallback_on(exc: BaseException) -> bool:
    return isinstance(exc, BackendError)


class Fallback(AsyncCloseable):
    """Try backends in order until one answers; one backend to the caller.

    The next backend is tried when the previous one failed with an error ``fallback_on``
    accepts (any :class:`~genfan.BackendError` by default: another model may well
    accept what this one refused) and some of the deadline is left; it inherits what is left
    of it. When every backend fails, the last error is raised with the earlier ones in its
    ``__notes__`` (and chained as ``__context__``).

    Args:
        backends: the chain, best first.
        name: the name of the chain (default ``"fallback(a,b,...)"``).
        fallback_on: which errors move on to the next backend.
        owns_backends: closing the chain also closes its backends (for backends made for this
            chain alone, as a config's ``type = "fallback"`` does). By default it closes none:
            whoever creates a backend owns it.
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        name: str | None = None,
        fallback_on: Callable[[BaseException], bool] = _default_fallback_on,
        owns_backends: bool = False,
    ) -> None:
        if not backends:
            raise ConfigurationError("Fallback needs at least one backend")
        self.backends = tuple(backends)
        self._name = name or "fallback(" + ",".join(b.name for b in self.backends) + ")"
        self._fallback_on = fallback_on
        self.owns_backends = owns_backends

    @property
    def name(self) -> str:
        return self._name

    def _next_or_raise(self, i: int, exc: Exception, errors: list[Exception]) -> None:
        errors.append(exc)
        last = i == len(self.backends) - 1
        if last or not self._fallback_on(exc) or time_left() <= 0:
            if len(errors) > 1:
                for earlier in errors[:-1]:
                    exc.add_note(f"fallback: {type(earlier).__name__}: {earlier}")
            raise exc
        decision(
            "fallback_next",
            backend=self.backends[i].name,
            level="info",
            to=self.backends[i + 1].name,
            error=type(exc).__name__,
        )

    async def complete(self, request: ChatRequest) -> Completion:
        errors: list[Exception] = []
        for i, backend in enumerate(self.backends):
            try:
                return await backend.complete(request)
            except Exception as exc:
                self._next_or_raise(i, exc, errors)
        raise AssertionError("unreachable")  # pragma: no cover

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """Falls back only before the first event; a stream cut midway raises."""
        errors: list[Exception] = []
        for i, backend in enumerate(self.backends):
            async with aclosing(backend.stream(request)) as events:  # type: ignore[type-var]
                iterator = aiter(events)
                try:
                    first = await anext(iterator)
                except StopAsyncIteration:
                    return
                except Exception as exc:
                    self._next_or_raise(i, exc, errors)
                    continue
                yield first
                async for event in iterator:
                    yield event
                return

    async def aclose(self) -> None:
        """Close the backends if the chain owns them (``owns_backends=True``); else nothing."""
        if self.owns_backends:
            await aclose_all(self.backends)

    def __repr__(self) -> str:
        return f"Fallback({list(self.backends)!r})"
