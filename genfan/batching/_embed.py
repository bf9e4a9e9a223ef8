"""Batching where it pays: embeddings, and any backend that can answer a batch of requests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from .._backend import Backend
from .._errors import BackendError, ConfigurationError, MalformedResponseError
from .._types import ChatRequest, Completion, StreamEvent
from ._micro import BatcherStatistics, MicroBatcher, OnFull

__all__ = [
    "BatchCompleter",
    "BatchingBackend",
    "BatchingEmbedder",
    "Embedder",
    "split_unless_outage",
]


def split_unless_outage(exc: BaseException) -> bool:
    """The default split policy of the wrappers: retry items alone unless the backend is down.

    A batch refused for its content (a 400, a bad item) is split so that good items succeed; a
    timeout, connection error, 429 or 5xx is not, so an outage is not multiplied by per-item
    retries (the guards around the backend handle those).
    """
    return not (isinstance(exc, BackendError) and exc.retryable)


@runtime_checkable
class Embedder(Protocol):
    """Anything that embeds many texts in one call (``OpenAIBackend.embed`` is one)."""

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in the texts' order."""
        ...


@runtime_checkable
class BatchCompleter(Protocol):
    """A backend that can answer several requests in one call (a local engine, a batch API)."""

    @property
    def name(self) -> str: ...

    async def complete_batch(
        self, requests: Sequence[ChatRequest]
    ) -> Sequence[Completion | BackendError]:
        """One completion (or typed error) per request, in the requests' order."""
        ...


class BatchingEmbedder:
    """Turns many single ``embed_one(text)`` calls into few batched ``embed(texts)`` requests.

    Concurrent callers' texts are grouped by a [`MicroBatcher`][genfan.batching.MicroBatcher]: one HTTP request carries
    up to ``max_size`` texts, sent when full, when the queue holds one of ``preferred_sizes``,
    or after ``max_wait`` seconds. Texts with a higher ``priority`` go first. Use it as an async
    context manager.

    Args:
        embedder: the object that really embeds (``async embed(texts) -> vectors``).
        max_size: the most texts per request.
        max_wait: seconds the first text of a batch may wait for company.
        preferred_sizes: request sizes sent at once, without waiting for ``max_wait`` (the
            largest that the queue holds); as for [`MicroBatcher`][genfan.batching.MicroBatcher].
        max_queue: texts waiting at most; then ``on_full`` applies.
        on_full: ``"wait"`` (backpressure) or ``"reject"``.
        max_queue_wait: seconds a text may stay queued while every request slot is busy;
            then it fails with [`BulkheadFullError`][genfan.BulkheadFullError] unsent (``None``: no
            limit; must be ``>= max_wait``).
        max_concurrent_batches: requests in flight at once.
        split_on_batch_error: when a whole request fails, retry its texts alone? Default:
            [`split_unless_outage`][genfan.batching.split_unless_outage].
        name: for errors, events and statistics.

    Example:
        ```python
        async with BatchingEmbedder(openai_backend, max_size=64) as embedder:
            vector = await embedder.embed_one("hello")
        ```
    """

    def __init__(
        self,
        embedder: Embedder,
        *,
        max_size: int = 64,
        max_wait: float = 0.005,
        preferred_sizes: Sequence[int] = (),
        max_queue: int = 10_000,
        on_full: OnFull = "wait",
        max_queue_wait: float | None = None,
        max_concurrent_batches: int = 4,
        split_on_batch_error: bool | Callable[[BaseException], bool] = split_unless_outage,
        name: str | None = None,
    ) -> None:
        self.embedder = embedder
        self.name = name or str(getattr(embedder, "name", "embedder"))
        self._batcher: MicroBatcher[str, list[float]] = MicroBatcher(
            self._handle,
            max_size=max_size,
            max_wait=max_wait,
            preferred_sizes=preferred_sizes,
            max_queue=max_queue,
            on_full=on_full,
            max_queue_wait=max_queue_wait,
            max_concurrent_batches=max_concurrent_batches,
            split_on_batch_error=split_on_batch_error,
            name=self.name,
        )

    async def _handle(self, texts: list[str]) -> list[list[float]]:
        vectors = await self.embedder.embed(texts)
        if len(vectors) != len(texts):
            raise MalformedResponseError(
                f"asked for {len(texts)} embeddings, got {len(vectors)}", backend=self.name
            )
        return vectors

    async def __aenter__(self) -> Self:
        await self._batcher.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._batcher.__aexit__(exc_type, exc, tb)

    async def embed_one(self, text: str, *, priority: int = 0) -> list[float]:
        """The vector of ``text``, computed in a batch with other callers' texts.

        Args:
            text: the text to embed.
            priority: higher is sent first (see [`MicroBatcher`][genfan.batching.MicroBatcher]).
        """
        return await self._batcher.submit(text, priority=priority)

    async def embed(self, texts: Sequence[str], *, priority: int = 0) -> list[list[float]]:
        """Vectors for ``texts`` (batched together with any concurrent callers' texts).

        Args:
            texts: the texts to embed.
            priority: of every text; higher is sent first (see [`MicroBatcher`][genfan.batching.MicroBatcher]).

        Raises:
            Exception: the first text's error, when any text failed.
        """
        results = await self._batcher.submit_many(list(texts), priority=priority)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    def statistics(self) -> BatcherStatistics:
        """The batcher's statistics (fill rate, waits, batch latency)."""
        return self._batcher.statistics()


class BatchingBackend:
    """A [`Backend`][genfan.Backend] whose ``complete`` calls are grouped into ``complete_batch``.

    Streaming is not batched: `stream` goes straight to the wrapped backend when it can
    stream. Use it as an async context manager (it runs the batcher).

    A request's priority (higher is sent first, see [`MicroBatcher`][genfan.batching.MicroBatcher]) is the
    ``priority=`` given to `complete`, else ``priority_of(request)``, else ``0``.
    [`ChatRequest`][genfan.ChatRequest] has no priority field, and a fan-out calls
    ``complete(request)``, so ``priority_of`` is the way to set one for a fan-out target, for
    example from the request's ``metadata``.

    Args:
        backend: a backend with ``complete_batch`` (see [`BatchCompleter`][genfan.batching.BatchCompleter]).
        max_size: the most requests in one batch.
        max_wait: seconds the first request of a batch may wait for company.
        preferred_sizes: batch sizes sent at once, without waiting for ``max_wait`` (the
            largest that the queue holds); as for [`MicroBatcher`][genfan.batching.MicroBatcher].
        max_queue: requests waiting at most; then ``on_full`` applies.
        on_full: ``"wait"`` (backpressure) or ``"reject"``.
        max_queue_wait: seconds a request may stay queued while every batch slot is busy;
            then it fails with [`BulkheadFullError`][genfan.BulkheadFullError] unsent (``None``: no
            limit; must be ``>= max_wait``).
        max_concurrent_batches: batches in flight at once.
        split_on_batch_error: as for [`MicroBatcher`][genfan.batching.MicroBatcher]; default [`split_unless_outage`][genfan.batching.split_unless_outage].
        priority_of: ``request -> int``, the priority of a request sent without ``priority=``
            (``None``: ``0``).

    Example:
        ```python
        def urgent_first(request: ChatRequest) -> int:
            return int(request.metadata.get("priority", "0"))

        async with BatchingBackend(engine, preferred_sizes=(8, 16), priority_of=urgent_first):
            ...
        ```
    """

    def __init__(
        self,
        backend: BatchCompleter,
        *,
        max_size: int = 16,
        max_wait: float = 0.01,
        preferred_sizes: Sequence[int] = (),
        max_queue: int = 10_000,
        on_full: OnFull = "wait",
        max_queue_wait: float | None = None,
        max_concurrent_batches: int = 1,
        split_on_batch_error: bool | Callable[[BaseException], bool] = split_unless_outage,
        priority_of: Callable[[ChatRequest], int] | None = None,
    ) -> None:
        if priority_of is not None and not callable(priority_of):
            raise ConfigurationError(
                f"priority_of must be a function of the request or None, got {priority_of!r}"
            )
        self.inner = backend
        self.priority_of = priority_of
        self._batcher: MicroBatcher[ChatRequest, Completion] = MicroBatcher(
            self._handle,
            max_size=max_size,
            max_wait=max_wait,
            preferred_sizes=preferred_sizes,
            max_queue=max_queue,
            on_full=on_full,
            max_queue_wait=max_queue_wait,
            max_concurrent_batches=max_concurrent_batches,
            split_on_batch_error=split_on_batch_error,
            name=backend.name,
        )

    @property
    def name(self) -> str:
        return self.inner.name

    async def _handle(self, requests: list[ChatRequest]) -> Sequence[Completion | BackendError]:
        return await self.inner.complete_batch(requests)

    async def complete(self, request: ChatRequest, *, priority: int | None = None) -> Completion:
        """Answer ``request`` as part of a batch.

        Args:
            request: the request.
            priority: higher is sent first; ``None``: ``priority_of(request)``, or ``0``.
        """
        if priority is None:
            priority = 0 if self.priority_of is None else self.priority_of(request)
        return await self._batcher.submit(request, priority=priority)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """Stream through the wrapped backend (streams are not batched)."""
        if isinstance(self.inner, Backend):
            async with aclosing(self.inner.stream(request)) as events:  # type: ignore[type-var]
                async for event in events:
                    yield event
            return
        from .._types import StreamEnd, TextDelta

        completion = await self.complete(request)
        if completion.text:
            yield TextDelta(text=completion.text)
        yield StreamEnd(completion=completion)

    def statistics(self) -> BatcherStatistics:
        return self._batcher.statistics()

    async def aclose(self) -> None:
        close = getattr(self.inner, "aclose", None)
        if close is not None:
            await close()

    async def __aenter__(self) -> Self:
        await self._batcher.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._batcher.__aexit__(exc_type, exc, tb)
        finally:
            await self.aclose()

    def __repr__(self) -> str:
        return f"BatchingBackend(name={self.name!r}, inner={self.inner!r})"
