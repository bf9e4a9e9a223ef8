"""The response cache: the same request to the same backend answered once, then from the cache.

The key is a hash of the canonical request (messages, tools, response format, sampling
settings, ``max_tokens``, stop sequences, seed, logprobs, model: everything but ``timeout`` and
``metadata``) and the backend's name. Only answers are cached, never errors. A sampled request
(``temperature > 0``) asks for a different answer each time, so it is cached only with
``cache_sampled=True``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import telemetry
from .._backend import Backend
from .._errors import ConfigurationError
from .._types import (
    ChatRequest,
    Completion,
    StreamEnd,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from ._store_budget import CostStoreError
from ._store_cache import CacheStore, SQLiteCacheStore, cache_store_from_url
from ._stores import check_store_fields, store_url
from ._wrapper import WrappedBackend

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter

__all__ = ["Cache", "CacheConfig", "CachedBackend", "ResponseCache", "cached", "request_key"]

#: Bump when the key's recipe or the stored form changes: old entries then simply miss.
_KEY_VERSION = 1
_FREE = Usage(cost=0.0)


@runtime_checkable
class Cache(Protocol):
    """What [`cached`][genfan.cost.cached] needs: [`ResponseCache`][genfan.cost.ResponseCache]
    and [`SemanticCache`][genfan.cost.SemanticCache] are two."""

    async def get(self, request: ChatRequest, backend: str) -> Completion | None:
        """The cached answer of ``backend`` to ``request``, or ``None``."""
        ...

    async def put(self, request: ChatRequest, backend: str, completion: Completion) -> None:
        """Keep ``completion`` as ``backend``'s answer to ``request`` (when cacheable)."""
        ...

    async def aclose(self) -> None: ...


def request_key(request: ChatRequest, backend: str) -> str:
    """The cache key of ``request`` sent to ``backend``: a SHA-256 of both, canonical JSON."""
    body = request.model_dump(mode="json", exclude={"timeout", "metadata"}, exclude_defaults=True)
    text = json.dumps(
        {"v": _KEY_VERSION, "backend": backend, "request": body},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def sampled(request: ChatRequest) -> bool:
    """Whether ``request`` asks for a sample (``temperature > 0``)."""
    return request.temperature is not None and request.temperature > 0


def cacheable(completion: Completion) -> bool:
    """Whether an answer may be kept: not an error, and not an empty answer."""
    if completion.finish_reason == "error":
        return False
    return bool(completion.text or completion.tool_calls)


class _Metrics:
    def __init__(self) -> None:
        self.lookups: Counter = telemetry.get_meter().create_counter(
            "genfan.cache.lookups", description="response cache lookups, by outcome"
        )


@functools.cache
def _metrics() -> _Metrics:
    return _Metrics()


def record(outcome: str, backend: str, kind: str, **fields: Any) -> None:
    """Telemetry of one lookup: a ``cache_hit``/``cache_miss``/``cache_skip`` event and the
    ``genfan.cache.lookups`` counter."""
    telemetry.event(f"cache_{outcome}", backend=backend, cache=kind, **fields)
    _metrics().lookups.add(1, {"outcome": outcome, "backend": backend, "cache": kind})


def served(completion: Completion, latency: float) -> Completion:
    """A cached completion as a hit returns it: nothing spent, the lookup's latency."""
    return completion.model_copy(update={"usage": _FREE, "latency": latency, "ttft": None})


class ResponseCache:
    """Exact caching of answers: the same request to the same backend is answered once.

    ```python
    cache = ResponseCache("sqlite:///cache.db", ttl=3600)
    backend = cached(backend, cache)
    ```

    A hit returns the stored completion with ``usage`` ``Usage(cost=0.0)`` (nothing was spent)
    and ``latency`` the lookup's. Errors are never cached, nor empty answers; sampled requests
    (``temperature > 0``) only with ``cache_sampled=True``. A store that fails (Redis down, a
    locked file) never fails a call: the lookup is a miss, and a ``cache_unavailable`` event is
    logged.

    Args:
        store: a [`CacheStore`][genfan.cost.CacheStore], or a URL (``sqlite:///path.db`` or a
            path, ``redis://...``, ``memory://``). Default: ``SQLiteCacheStore("genfan-cache.db")``.
        ttl: seconds an entry lives (``None``: until the store drops it).
        cache_sampled: cache requests with ``temperature > 0`` too (the first sample is then
            every later answer).
        namespace: mixed into every key: a new namespace starts an empty cache (after a prompt
            or model change that the request does not show, say).
        clock: the Unix time, for expiry (``time.time``).

    Raises:
        ConfigurationError: a bad value.
    """

    kind = "exact"

    def __init__(
        self,
        store: CacheStore | str | Path | None = None,
        *,
        ttl: float | None = None,
        cache_sampled: bool = False,
        namespace: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0
        ):
            raise ConfigurationError(f"ResponseCache.ttl must be seconds > 0 or None, got {ttl!r}")
        if not isinstance(namespace, str):
            raise ConfigurationError(f"ResponseCache.namespace must be a string, got {namespace!r}")
        self._owns_store = not isinstance(store, CacheStore)
        if store is None:
            self.store: CacheStore = SQLiteCacheStore()
        elif isinstance(store, str | Path):
            self.store = cache_store_from_url(store)
        elif isinstance(store, CacheStore):
            self.store = store
        else:
            raise ConfigurationError(
                "ResponseCache.store must be a CacheStore or a URL (sqlite:///path.db,"
                f" redis://..., memory://), got {type(store).__name__}"
            )
        self.ttl = None if ttl is None else float(ttl)
        self.cache_sampled = bool(cache_sampled)
        self.namespace = namespace
        self.clock = clock
        self._down_warned = False
        self._holders = 0  # backends built from the TOML config that share it
        self._memo: tuple[ChatRequest, str, str] | None = None

    def __repr__(self) -> str:
        return f"ResponseCache({self.store!r}, ttl={self.ttl!r})"

    def key(self, request: ChatRequest, backend: str) -> str | None:
        """The key ``request`` to ``backend`` is cached under; ``None``: not cacheable."""
        if sampled(request) and not self.cache_sampled:
            return None
        memo = self._memo
        if memo is not None and memo[0] is request and memo[1] == backend:
            return memo[2]  # the lookup's key, again for keeping the answer
        key = request_key(request, f"{self.namespace}\x00{backend}" if self.namespace else backend)
        self._memo = (request, backend, key)
        return key

    async def get(self, request: ChatRequest, backend: str) -> Completion | None:
        """The cached answer of ``backend`` to ``request`` (a hit costs nothing), or ``None``."""
        start = time.perf_counter()
        key = self.key(request, backend)
        if key is None:
            record("skip", backend, self.kind, reason="sampled")
            return None
        try:
            raw = await self.store.get(key, now=self.clock())
        except CostStoreError as exc:
            self._unavailable(exc, backend)
            return None
        if raw is not None:
            try:
                completion = Completion.model_validate_json(raw)
            except ValueError:
                raw = None  # written by another version: a miss, overwritten after the call
        if raw is None:
            record("miss", backend, self.kind, key=key[:16])
            return None
        self._down_warned = False
        record("hit", backend, self.kind, key=key[:16])
        return served(completion, time.perf_counter() - start)

    async def put(self, request: ChatRequest, backend: str, completion: Completion) -> None:
        """Keep ``completion`` as the answer (unless an error, empty, or not cacheable)."""
        key = self.key(request, backend)
        if key is None or not cacheable(completion):
            return
        now = self.clock()
        data = completion.model_dump_json(exclude={"rate_limit"}).encode()
        try:
            await self.store.set(
                key, data, expires=None if self.ttl is None else now + self.ttl, now=now
            )
        except CostStoreError as exc:
            self._unavailable(exc, backend)

    async def clear(self) -> None:
        """Drop every entry of the store."""
        await self.store.clear()

    def _unavailable(self, exc: CostStoreError, backend: str) -> None:
        # Once per outage, not per call.
        if not self._down_warned:
            telemetry.event("cache_unavailable", level="warning", backend=backend, error=str(exc))
            self._down_warned = True

    async def aclose(self) -> None:
        """Close the store when this cache built it (from a URL or the default)."""
        if self._owns_store:
            await self.store.aclose()

    async def __aenter__(self) -> ResponseCache:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def replay(completion: Completion, piece: int = 64) -> list[StreamEvent]:
    """A completion as the stream events that would have carried it."""
    events: list[StreamEvent] = []
    text = completion.text
    for i in range(0, len(text), piece):
        events.append(TextDelta(text=text[i : i + piece]))
    for i, call in enumerate(completion.tool_calls):
        events.append(ToolCallDelta(index=i, id=call.id, name=call.name, arguments=call.arguments))
    events.append(StreamEnd(completion=completion))
    return events


class CachedBackend(WrappedBackend):
    """A backend whose answers are cached; built by `cached`.

    `complete` answers a hit from the cache and keeps a miss's answer; `stream` replays a hit
    as text deltas (then the end event) and keeps a miss's assembled answer once its stream
    ended normally.

    Attributes:
        inner: the wrapped backend.
        cache: the cache.
    """

    def __init__(self, inner: Backend, cache: Cache) -> None:
        if not isinstance(cache, Cache):
            raise ConfigurationError(
                "cached() takes a ResponseCache(...) or SemanticCache(...), not"
                f" {type(cache).__name__}"
            )
        self.inner = inner
        self.cache = cache

    async def complete(self, request: ChatRequest) -> Completion:
        hit = await self.cache.get(request, self.name)
        if hit is not None:
            return hit
        completion = await self.inner.complete(request)
        await self.cache.put(request, self.name, completion)
        return completion

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        hit = await self.cache.get(request, self.name)
        if hit is not None:
            for event in replay(hit):
                yield event
            return
        end: Completion | None = None
        events = self.inner.stream(request)
        try:
            async for event in events:
                if isinstance(event, StreamEnd):
                    end = event.completion
                yield event
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
        if end is not None:
            await self.cache.put(request, self.name, end)

    async def aclose(self) -> None:
        """Closes nothing: whoever made the backend and the cache closes them."""
        return None

    def __repr__(self) -> str:
        return f"CachedBackend({self.inner!r}, {self.cache!r})"


def cached(backend: Backend, cache: Cache) -> CachedBackend:
    """Answer ``backend``'s repeated requests from ``cache``.

    ``backend`` may be any [`Backend`][genfan.Backend]: a provider, a guarded one (put the
    cache outside the guards and any budget, so a hit spends nothing and waits for nothing),
    or a [`FanOut`][genfan.FanOut], whose chosen answer is then cached as a whole.

    Raises:
        ConfigurationError: ``cache`` is not a cache.
    """
    return CachedBackend(backend, cache)


class CacheConfig(BaseModel):
    """One ``[caches.NAME]`` table: an exact response cache, built once per configuration build
    and named by every backend it serves (``cache = "NAME"``).

    Example:
        ```toml
        [caches.answers]
        store = "sqlite:///genfan-cache.db"   # or store_env = "GENFAN_CACHE_URL" (redis://...)
        ttl = 86400

        [backends.gpt]
        type = "openai"
        cache = "answers"
        ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    store: str | None = None
    store_env: Annotated[str, Field(min_length=1)] | None = None
    ttl: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    cache_sampled: bool = False
    namespace: str = ""

    @model_validator(mode="after")
    def _one_store(self) -> CacheConfig:
        check_store_fields(self.store, self.store_env, cache_store_from_url)
        return self

    def build(self) -> ResponseCache:
        """The cache (no connection is opened until it is used).

        Raises:
            ConfigurationError: ``store_env`` is not set, or holds a bad URL.
        """
        url = store_url(
            self.store, self.store_env, what="the cache store's URL (sqlite:///..., redis://...)"
        )
        return ResponseCache(
            url, ttl=self.ttl, cache_sampled=self.cache_sampled, namespace=self.namespace
        )
