"""The semantic cache: a paraphrase hits above the threshold, a near miss does not; only the
last user message is compared (everything else must match exactly); TTL, sampled requests,
errors, an embedder that fails, persistence in a real SQLite file, eviction, and a real
genfan embedder (``OpenAIBackend.embed`` against FakeLLMServer's embeddings endpoint).

A small bag-of-words embedder stands in for a sentence model, so similarities are exact and
known; benchmarks/semantic_cache.py measures a real model (all-MiniLM-L6-v2).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from genfan_providers.openai import OpenAIBackend

from genfan import BackendConnectionError, ChatRequest, ConfigurationError, Message
from genfan.cost import Embedder, SemanticCache, cached
from genfan.testing import Fail, FakeBackend, capture_events
from genfan.testserver import FakeLLMServer

DIM = 64


class Words:
    """Bag of words, each word one dimension (hash mod DIM): cosine = shared words."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls += 1
        if self.fail:
            raise BackendConnectionError("embedder down", backend="words")
        return [bag(text) for text in texts]


def bag(text: str) -> list[float]:
    v = [0.0] * DIM
    for word in re.findall(r"\w+", text.lower()):
        v[sum(map(ord, word)) % DIM] += 1.0
    return v


def cosine(a: str, b: str) -> float:
    va, vb = bag(a), bag(b)
    dot = sum(x * y for x, y in zip(va, vb, strict=True))
    return dot / math.sqrt(sum(x * x for x in va) * sum(y * y for y in vb))


Q = "what is the capital of france"
PARAPHRASE = "what is the capital of france please"  # 6 of 7 words shared
NEAR_MISS = "what is the capital of spain"  # 5 of 6 words shared


def req(text: str, **kw: object) -> ChatRequest:
    return ChatRequest.from_prompt(text, **kw)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_paraphrase_hits_and_a_near_miss_does_not() -> None:
    threshold = 0.9
    assert cosine(Q, PARAPHRASE) >= threshold > cosine(Q, NEAR_MISS)
    inner = FakeBackend("b", ["Paris", "Madrid"])
    backend = cached(inner, SemanticCache(Words(), threshold=threshold))
    assert (await backend.complete(req(Q))).text == "Paris"
    with capture_events() as events:
        hit = await backend.complete(req(PARAPHRASE))
    assert hit.text == "Paris" and hit.usage.cost == 0.0
    assert events[0]["event"] == "cache_hit" and events[0]["similarity"] >= threshold
    assert (await backend.complete(req(NEAR_MISS))).text == "Madrid"
    assert len(inner.calls) == 2


@pytest.mark.anyio
async def test_only_the_last_user_message_is_compared() -> None:
    inner = FakeBackend("b", ["one", "two", "three", "four"])
    cache = SemanticCache(Words(), threshold=0.9)
    backend = cached(inner, cache)
    await backend.complete(req(Q))
    await backend.complete(req(Q, system="Answer in French."))  # another system prompt
    await backend.complete(req(Q, max_tokens=5))  # other settings
    await cached(FakeBackend("other", ["x"]), cache).complete(req(Q))  # another backend
    turns = (Message.user("hello"), Message.assistant("hi"), Message.user(Q))
    await backend.complete(ChatRequest(messages=turns))  # other earlier turns
    assert len(inner.calls) == 4
    assert (await backend.complete(req(PARAPHRASE, system="Answer in French."))).text == "two"


@pytest.mark.anyio
async def test_nearest_reports_the_similarity_for_tuning() -> None:
    cache = SemanticCache(Words(), threshold=0.99)
    assert await cache.nearest(req(Q), "b") is None
    backend = cached(FakeBackend("b", ["Paris", "again"]), cache)
    await backend.complete(req(Q))
    near = await cache.nearest(req(PARAPHRASE), "b")
    assert near is not None and near.question == Q and near.completion.text == "Paris"
    assert near.similarity == pytest.approx(cosine(Q, PARAPHRASE))
    assert (await backend.complete(req(PARAPHRASE))).text == "again"  # below 0.99: a miss


@pytest.mark.anyio
async def test_without_numpy_the_same_neighbour_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    import genfan.cost._semantic as semantic

    cache = SemanticCache(Words(), threshold=0.5)
    backend = cached(FakeBackend("b", ["france", "spain"]), cache)
    await backend.complete(req(Q))
    await backend.complete(req("how many people live in spain today"))
    with_numpy = await cache.nearest(req(NEAR_MISS), "b")
    monkeypatch.setattr(semantic, "_numpy", lambda: None)
    pure = await cache.nearest(req(NEAR_MISS), "b")
    assert with_numpy is not None and pure is not None
    assert pure.question == with_numpy.question == Q
    assert pure.similarity == pytest.approx(with_numpy.similarity, abs=1e-6)


@pytest.mark.anyio
async def test_ttl_sampled_and_errors() -> None:
    now = [1000.0]
    inner = FakeBackend("b", [Fail(error=BackendConnectionError), "a", "b", "c", "d"])
    backend = cached(inner, SemanticCache(Words(), ttl=10, clock=lambda: now[0]))
    with pytest.raises(BackendConnectionError):
        await backend.complete(req(Q))  # an error: nothing kept
    assert (await backend.complete(req(Q))).text == "a"
    assert (await backend.complete(req(Q))).text == "a"
    now[0] += 11
    assert (await backend.complete(req(Q))).text == "b"  # expired
    hot = req(Q, temperature=0.7)
    assert (await backend.complete(hot)).text == "c"  # sampled: not cached...
    assert (await backend.complete(hot)).text == "d"


@pytest.mark.anyio
async def test_an_embedder_that_fails_is_a_miss_not_a_failed_call() -> None:
    words = Words()
    inner = FakeBackend("b", ["a", "b"])
    backend = cached(inner, SemanticCache(words))
    await backend.complete(req(Q))
    words.fail = True
    with capture_events() as events:
        assert (await backend.complete(req(PARAPHRASE))).text == "b"
    assert [e["event"] for e in events].count("cache_unavailable") == 1


@pytest.mark.anyio
async def test_entries_persist_in_sqlite_and_the_oldest_are_evicted(tmp_path: Path) -> None:
    path = tmp_path / "semantic.db"
    async with SemanticCache(Words(), path=path, max_entries=2) as cache:
        backend = cached(FakeBackend("b", ["1", "2", "3"]), cache)
        for q in ("alpha beta gamma", "delta epsilon zeta", "eta theta iota"):
            await backend.complete(req(q))
    async with SemanticCache(Words(), path=path) as again:
        assert await again.get(req("alpha beta gamma"), "b") is None  # evicted
        hit = await again.get(req("eta theta iota"), "b")
        assert hit is not None and hit.text == "3"


@pytest.mark.anyio
async def test_a_genfan_embedder_over_http() -> None:
    with FakeLLMServer() as srv:
        async with OpenAIBackend("emb", base_url=srv.url, api_key="sk-local") as embedder:
            assert isinstance(embedder, Embedder)
            inner = FakeBackend("b", ["first", "second"])
            backend = cached(inner, SemanticCache(embedder, threshold=0.99))
            assert (await backend.complete(req(Q))).text == "first"
            assert (await backend.complete(req(Q))).text == "first"  # same text, same vector
            assert srv.count("/v1/embeddings") == 1  # the question's vector is reused for put


def test_misuse_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="needs an embedder"):
        SemanticCache(object())  # type: ignore[arg-type]
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigurationError, match="threshold"):
            SemanticCache(Words(), threshold=bad)
    with pytest.raises(ConfigurationError, match="max_entries"):
        SemanticCache(Words(), max_entries=0)
