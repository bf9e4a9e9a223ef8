"""Fallback chains: an ordered list of backends tried as one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing

from .._backend import AsyncCloseable, Backend, aclose_all
from .._errors import AnswerRejectedError, BackendError, ConfigurationError, MalformedResponseError
from .._output import AnswerValidator, ValidateLike, answer_validator
from .._types import ChatRequest, Completion, StreamEnd, StreamEvent
from ._base import decision, time_left

__all__ = ["Fallback"]


def _default_fallback_on(exc: BaseException) -> bool:
    return isinstance(exc, BackendError)


class Fallback(AsyncCloseable):
    """Try backends in order until one answers well; one backend to the caller.

    The next backend is tried when the previous one failed with an error ``fallback_on``
    accepts (any [`BackendError`][genfan.BackendError] by default: another model may well
    accept what this one refused), or answered an answer ``validate`` rejects, and some of the
    deadline is left; it inherits what is left of it. When every backend fails, the last error
    is raised with the earlier ones (and every rejection's reason) in its ``__notes__`` (and
    chained as ``__context__``).

    Args:
        backends: the chain, best first.
        name: the name of the chain (default ``"fallback(a,b,...)"``).
        fallback_on: which errors move on to the next backend.
        owns_backends: closing the chain also closes its backends (for backends made for this
            chain alone, as a config's ``type = "fallback"`` does). By default it closes none:
            whoever creates a backend owns it.
        validate: what a good answer is (see `ValidateLike`: a function
            ``(completion) -> None | reason``, an object with a ``check`` method, a per-answer
            scorer such as ``SchemaValid()`` or ``RefusalDetector()``, a type as for
            ``output_type``, or a list of these). An answer it rejects raises
            [`AnswerRejectedError`][genfan.AnswerRejectedError] inside the chain, which always moves on to the
            next backend (whatever ``fallback_on`` says). Answers that ask for tools are not
            checked.
        validate_streams: buffer each stream to its end, check its answer, and only then pass
            it on; a rejected stream (or one that fails midway) moves on to the next backend.
            By default streams are passed on live, as they arrive, and are not checked (the
            pieces passed on cannot be taken back), and fall back only before their first event.
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        name: str | None = None,
        fallback_on: Callable[[BaseException], bool] = _default_fallback_on,
        owns_backends: bool = False,
        validate: ValidateLike | None = None,
        validate_streams: bool = False,
    ) -> None:
        if not backends:
            raise ConfigurationError("Fallback needs at least one backend")
        self.backends = tuple(backends)
        self._name = name or "fallback(" + ",".join(b.name for b in self.backends) + ")"
        self._fallback_on = fallback_on
        self.owns_backends = owns_backends
        self.validator: AnswerValidator | None = answer_validator(validate)
        self.validate_streams = validate_streams

    @property
    def name(self) -> str:
        return self._name

    def _next_or_raise(self, i: int, exc: Exception, errors: list[Exception]) -> None:
        errors.append(exc)
        last = i == len(self.backends) - 1
        rejected = isinstance(exc, AnswerRejectedError)
        if last or not (rejected or self._fallback_on(exc)) or time_left() <= 0:
            if len(errors) > 1:
                for earlier in errors[:-1]:
                    exc.add_note(f"fallback: {type(earlier).__name__}: {earlier}")
            raise exc
        fields = {"reason": exc.reason} if isinstance(exc, AnswerRejectedError) else {}
        decision(
            "fallback_next",
            backend=self.backends[i].name,
            level="info",
            to=self.backends[i + 1].name,
            error=type(exc).__name__,
            **fields,
        )

    async def _check(self, completion: Completion, request: ChatRequest, backend: str) -> None:
        if self.validator is not None:
            await self.validator(completion, request=request, backend=backend)

    async def complete(self, request: ChatRequest) -> Completion:
        errors: list[Exception] = []
        for i, backend in enumerate(self.backends):
            try:
                completion = await backend.complete(request)
                await self._check(completion, request, backend.name)
                return completion
            except Exception as exc:
                self._next_or_raise(i, exc, errors)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _buffered(self, backend: Backend, request: ChatRequest) -> list[StreamEvent]:
        """``backend``'s whole stream, its answer checked."""
        events: list[StreamEvent] = []
        async with aclosing(backend.stream(request)) as stream:  # type: ignore[type-var]
            async for event in stream:
                events.append(event)
        end = events[-1] if events else None
        if not isinstance(end, StreamEnd):
            raise MalformedResponseError(
                "stream ended without a final event (truncated)", backend=backend.name
            )
        await self._check(end.completion, request, backend.name)
        return events

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """Falls back only before the first event, and passes the stream on live (a stream cut
        midway raises); with ``validate_streams=True``, each stream is buffered to its end and
        checked first, so a rejected or broken one falls back too."""
        errors: list[Exception] = []
        if self.validate_streams:
            for i, backend in enumerate(self.backends):
                try:
                    buffered = await self._buffered(backend, request)
                except Exception as exc:
                    self._next_or_raise(i, exc, errors)
                    continue
                for event in buffered:
                    yield event
                return
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
