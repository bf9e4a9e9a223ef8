"""The semantic cache (opt-in): a question asked in other words gets the cached answer.

The last user message is embedded by any genfan embedder (an ``async embed(texts)``, such as
``OpenAIBackend.embed`` or a local model), and the nearest stored question by cosine similarity
answers if it is at least ``threshold`` similar. Everything else about the request (the system
prompt, the earlier turns, tools, response format, sampling settings, the backend) must match
exactly: it is hashed into a partition, and only entries of the same partition are compared.
"""

from __future__ import annotations

import math
import sqlite3
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import anyio

from .. import telemetry
from .._errors import ConfigurationError
from .._types import ChatRequest, Completion, Message
from ._cache import cacheable, record, request_key, sampled, served

__all__ = ["Embedder", "SemanticCache", "SemanticHit"]


@runtime_checkable
class Embedder(Protocol):
    """Anything that embeds many texts in one call (``OpenAIBackend.embed`` is one; so is
    ``genfan.batching``'s embedder protocol, the same shape)."""

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in the texts' order."""
        ...


@dataclass(frozen=True, slots=True)
class SemanticHit:
    """The nearest stored question to a lookup.

    Attributes:
        similarity: cosine similarity in [-1, 1].
        question: the stored question's text.
        completion: its answer (as stored: with its original usage and latency).
    """

    similarity: float
    question: str
    completion: Completion


@dataclass(slots=True)
class _Partition:
    vectors: list[list[float]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    expires: list[float | None] = field(default_factory=list)
    matrix: Any = None  # numpy's stacked vectors, rebuilt after a change


def _normalized(vector: Sequence[float]) -> list[float]:
    norm = math.sqrt(math.fsum(x * x for x in vector))
    if norm == 0 or not math.isfinite(norm):
        return [0.0] * len(vector)
    return [x / norm for x in vector]


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # numpy is optional: pure Python does the same, slower
        return None
    return numpy


class SemanticCache:
    """A cache that answers a question asked in other words (opt-in; exactness first).

    ```python
    cache = SemanticCache(embedder, threshold=0.9)
    backend = cached(backend, cache)
    ```

    The last user message is embedded; the stored question nearest by cosine similarity
    answers when it is at least ``threshold`` similar, within the same partition: the same
    backend and the same request apart from that message (system prompt, earlier turns, tools,
    response format, sampling settings). A hit costs nothing (``usage.cost`` 0.0). Pick the
    threshold from your own paraphrases: a question that differs only in a number or a name
    ("the population of France" and "...of Spain") can be very similar to a sentence model;
    docs/caching.md has the measured hit and false-hit rates.

    Errors, empty answers and sampled requests (unless ``cache_sampled``) are never cached. An
    embedder that fails makes the lookup a miss (a ``cache_unavailable`` event), never a failed
    call.

    Args:
        embedder: anything with ``async embed(texts) -> list[list[float]]``.
        threshold: the least cosine similarity that hits, in (0, 1].
        path: an SQLite file that keeps the entries across restarts (loaded on first use);
            ``None``: memory only.
        ttl: seconds an entry lives (``None``: for ever).
        cache_sampled: cache requests with ``temperature > 0`` too.
        max_entries: the most entries kept (the oldest go first).
        clock: the Unix time, for expiry.

    Raises:
        ConfigurationError: a bad value.
    """

    kind = "semantic"

    def __init__(
        self,
        embedder: Embedder,
        *,
        threshold: float = 0.9,
        path: str | Path | None = None,
        ttl: float | None = None,
        cache_sampled: bool = False,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(embedder, Embedder):
            raise ConfigurationError(
                "SemanticCache needs an embedder: an object with async embed(texts) ->"
                f" list[list[float]], not {type(embedder).__name__}"
            )
        ok = isinstance(threshold, int | float) and not isinstance(threshold, bool)
        if not ok or not 0 < threshold <= 1:
            raise ConfigurationError(
                f"SemanticCache.threshold must be a cosine similarity in (0, 1], got {threshold!r}"
            )
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0
        ):
            raise ConfigurationError(f"SemanticCache.ttl must be seconds > 0 or None, got {ttl!r}")
        if not (isinstance(max_entries, int) and max_entries >= 1):
            raise ConfigurationError(
                f"SemanticCache.max_entries must be an integer >= 1, got {max_entries!r}"
            )
        self.embedder = embedder
        self.threshold = float(threshold)
        self.path = None if path is None else str(path)
        self.ttl = None if ttl is None else float(ttl)
        self.cache_sampled = bool(cache_sampled)
        self.max_entries = max_entries
        self.clock = clock
        self._partitions: dict[str, _Partition] = {}
        self._order: list[tuple[str, str]] = []  # (partition, text), oldest first
        self._recent: OrderedDict[str, list[float]] = OrderedDict()  # text -> vector
        self._db: sqlite3.Connection | None = None
        self._pending: list[tuple[str, tuple[Any, ...]]] = []  # writes for the file
        self._limiter = anyio.CapacityLimiter(1)
        self._loaded = path is None
        self._down_warned = False

    def __repr__(self) -> str:
        where = f", path={self.path!r}" if self.path else ""
        return f"SemanticCache(threshold={self.threshold}{where})"

    # -- keys ----------------------------------------------------------------------------------

    @staticmethod
    def split(request: ChatRequest, backend: str) -> tuple[str, str] | None:
        """``request`` as (its partition, the text compared); ``None`` without a user message."""
        messages = list(request.messages)
        for i in range(len(messages) - 1, -1, -1):
            if messages[i].role == "user":
                text = messages[i].content or ""
                messages[i] = Message.user("")
                rest = request.model_copy(update={"messages": tuple(messages)})
                return request_key(rest, backend), text
        return None

    async def _vector(self, text: str) -> list[float]:
        vector = self._recent.get(text)
        if vector is None:
            [raw] = await self.embedder.embed([text])
            vector = _normalized(raw)
            self._recent[text] = vector
            while len(self._recent) > 256:
                self._recent.popitem(last=False)
        return vector

    # -- lookups -------------------------------------------------------------------------------

    async def nearest(self, request: ChatRequest, backend: str) -> SemanticHit | None:
        """The stored question nearest to ``request``'s, whatever its similarity (``None``:
        nothing stored in its partition). For tuning the threshold."""
        split = self.split(request, backend)
        if split is None:
            return None
        await self._load()
        partition = self._partitions.get(split[0])
        if partition is None or not partition.vectors:
            return None
        vector = await self._vector(split[1])
        now = self.clock()
        best, best_i = -2.0, -1
        np = _numpy()
        if np is not None:
            if partition.matrix is None:
                partition.matrix = np.asarray(partition.vectors, dtype=np.float32)
            if partition.matrix.shape[1] != len(vector):
                return None  # another embedder's vectors
            scores = partition.matrix @ np.asarray(vector, dtype=np.float32)
            for i in np.argsort(-scores):
                exp = partition.expires[int(i)]
                if exp is None or exp > now:
                    best, best_i = float(scores[int(i)]), int(i)
                    break
        else:
            for i, other in enumerate(partition.vectors):
                exp = partition.expires[i]
                if (exp is not None and exp <= now) or len(other) != len(vector):
                    continue
                score = math.fsum(a * b for a, b in zip(other, vector, strict=True))
                if score > best:
                    best, best_i = score, i
        if best_i < 0:
            return None
        completion = Completion.model_validate_json(partition.values[best_i])
        return SemanticHit(
            similarity=min(1.0, best), question=partition.texts[best_i], completion=completion
        )

    async def get(self, request: ChatRequest, backend: str) -> Completion | None:
        """The answer to the nearest stored question at least ``threshold`` similar, or ``None``."""
        start = time.perf_counter()
        if sampled(request) and not self.cache_sampled:
            record("skip", backend, self.kind, reason="sampled")
            return None
        try:
            hit = await self.nearest(request, backend)
        except Exception as exc:  # an embedder's failure is a miss, never a failed call
            self._unavailable(exc, backend)
            return None
        if hit is None or hit.similarity < self.threshold:
            record("miss", backend, self.kind, similarity=hit.similarity if hit else None)
            return None
        record("hit", backend, self.kind, similarity=round(hit.similarity, 4))
        return served(hit.completion, time.perf_counter() - start)

    async def put(self, request: ChatRequest, backend: str, completion: Completion) -> None:
        """Keep ``completion`` as the answer to ``request``'s question (when cacheable)."""
        if (sampled(request) and not self.cache_sampled) or not cacheable(completion):
            return
        split = self.split(request, backend)
        if split is None:
            return
        try:
            vector = await self._vector(split[1])
        except Exception as exc:
            self._unavailable(exc, backend)
            return
        await self._load()
        expires = None if self.ttl is None else self.clock() + self.ttl
        value = completion.model_dump_json(exclude={"rate_limit"}).encode()
        self._add(split[0], split[1], vector, value, expires)
        if self._db is not None:
            self._pending.append(
                (
                    "INSERT INTO genfan_semantic (part, text, vector, value, expires)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (split[0], split[1], array("f", vector).tobytes(), value, expires),
                )
            )
            await self._flush(backend)

    def _add(
        self, part: str, text: str, vector: list[float], value: bytes, expires: float | None
    ) -> None:
        partition = self._partitions.setdefault(part, _Partition())
        if text in partition.texts:  # the same question again: the newer answer
            i = partition.texts.index(text)
            partition.values[i], partition.expires[i] = value, expires
            return
        partition.vectors.append(vector)
        partition.texts.append(text)
        partition.values.append(value)
        partition.expires.append(expires)
        partition.matrix = None
        self._order.append((part, text))
        while len(self._order) > self.max_entries:
            old_part, old_text = self._order.pop(0)
            self._drop(old_part, old_text)

    def _drop(self, part: str, text: str) -> None:
        partition = self._partitions[part]
        i = partition.texts.index(text)
        for column in (partition.vectors, partition.texts, partition.values, partition.expires):
            del column[i]
        partition.matrix = None
        if self._db is not None:
            self._pending.append(
                ("DELETE FROM genfan_semantic WHERE part = ? AND text = ?", (part, text))
            )

    def _open(self) -> tuple[sqlite3.Connection, list[Any]]:
        assert self.path is not None
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout = 5000")
            db.execute(
                "CREATE TABLE IF NOT EXISTS genfan_semantic (part TEXT NOT NULL,"
                " text TEXT NOT NULL, vector BLOB NOT NULL, value BLOB NOT NULL, expires REAL)"
            )
            rows = db.execute(
                "SELECT part, text, vector, value, expires FROM genfan_semantic ORDER BY rowid"
            ).fetchall()
        except BaseException:
            db.close()
            raise
        return db, rows

    async def _load(self) -> None:
        """Read the SQLite file's entries, once (in a worker thread: it may be large)."""
        if self._loaded:
            return
        self._loaded = True
        try:
            db, rows = await anyio.to_thread.run_sync(self._open)
        except (OSError, sqlite3.Error) as exc:
            self._unavailable(exc, "?")
            return
        now = self.clock()
        for part, text, blob, value, expires in rows:
            if expires is None or expires > now:
                self._add(part, text, list(array("f", blob)), bytes(value), expires)
        self._pending.clear()  # what was dropped while loading is not in the file yet
        self._db = db

    async def _flush(self, backend: str) -> None:
        """Write the pending inserts and deletes, in one transaction, in a worker thread (the
        file may be held by another process for a while)."""
        db, ops = self._db, self._pending
        self._pending = []
        if db is None or not ops:
            return

        def write() -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in ops:
                    db.execute(sql, params)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

        try:
            await anyio.to_thread.run_sync(write, limiter=self._limiter)
        except sqlite3.Error as exc:
            self._unavailable(exc, backend)

    def _unavailable(self, exc: BaseException, backend: str) -> None:
        if not self._down_warned:
            telemetry.event(
                "cache_unavailable", level="warning", backend=backend, cache=self.kind,
                error=f"{type(exc).__name__}: {exc}",
            )  # fmt: skip
            self._down_warned = True

    async def clear(self) -> None:
        """Drop every entry."""
        self._partitions.clear()
        self._order.clear()
        if self._db is not None:
            self._pending = [("DELETE FROM genfan_semantic", ())]
            await self._flush("?")

    async def aclose(self) -> None:
        """Close the SQLite file, when there is one."""
        db, self._db = self._db, None
        if db is not None:
            db.close()

    async def __aenter__(self) -> SemanticCache:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
