"""The exact response cache: a real HTTP backend (FakeLLMServer) answered once per request,
the key's parts, sampled requests, errors never cached, TTL on an injected clock, streams
replayed and recorded, a fan-out's chosen answer cached whole, every store (memory, a real
SQLite file, a real Redis), a store that is down, telemetry, and misuse.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from genfan_providers.openai import OpenAIBackend

from genfan import (
    BackendConnectionError,
    ChatRequest,
    ConfigurationError,
    FanOut,
    StreamEnd,
    TextDelta,
    ToolSpec,
)
from genfan.cost import (
    CacheStore,
    MemoryCacheStore,
    RedisCacheStore,
    ResponseCache,
    SQLiteCacheStore,
    cache_store_from_url,
    cached,
    request_key,
)
from genfan.testing import Fail, FakeBackend, Reply, capture_events
from genfan.testserver import FakeLLMServer
from tests._services import port_open, require_service

REQ = ChatRequest.from_prompt("what is the capital of France?")
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture
def srv(server: FakeLLMServer) -> FakeLLMServer:
    server.reset()
    return server


def oai(srv: FakeLLMServer, name: str = "gpt") -> OpenAIBackend:
    return OpenAIBackend("model-x", base_url=srv.url, api_key="sk-local", name=name, price=(1, 2))


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.anyio
async def test_a_repeated_request_is_answered_from_the_cache(srv: FakeLLMServer) -> None:
    async with oai(srv) as provider:
        backend = cached(provider, ResponseCache(MemoryCacheStore()))
        first = await backend.complete(REQ)
        with capture_events() as events:
            again = await backend.complete(REQ)
        assert srv.count(CHAT) == 1
        assert again.text == first.text == "echo: what is the capital of France?"
        assert first.usage.cost is not None and first.usage.cost > 0
        assert again.usage.cost == 0.0 and again.usage.total_tokens == 0  # nothing spent
        assert again.latency < first.latency
        assert [e["event"] for e in events] == ["cache_hit"]
        assert events[0]["backend"] == "gpt" and events[0]["cache"] == "exact"
        # timeout and metadata are not part of the question
        same = REQ.model_copy(update={"timeout": 5.0, "metadata": {"user": "u1"}})
        await backend.complete(same)
        assert srv.count(CHAT) == 1


@pytest.mark.anyio
async def test_the_key_holds_the_request_settings_and_the_backend(srv: FakeLLMServer) -> None:
    cache = ResponseCache(MemoryCacheStore())
    async with oai(srv) as provider:
        backend = cached(provider, cache)
        tool = ToolSpec(name="lookup")
        variants = [
            REQ,
            REQ.with_overrides(max_tokens=50),
            REQ.with_overrides(temperature=0.0),
            REQ.with_overrides(seed=7),
            REQ.with_system("Be brief."),
            REQ.model_copy(update={"tools": (tool,)}),
            ChatRequest.from_prompt("what is the capital of Spain?"),
        ]
        for request in variants:
            await backend.complete(request)
        assert srv.count(CHAT) == len(variants)  # each a miss
        for request in variants:
            await backend.complete(request)
        assert srv.count(CHAT) == len(variants)  # each now a hit
        await cached(oai(srv, name="other"), cache).complete(REQ)  # another backend: a miss
        assert srv.count(CHAT) == len(variants) + 1
    assert request_key(REQ, "a") != request_key(REQ, "b")
    assert len(request_key(REQ, "a")) == 64


@pytest.mark.anyio
async def test_sampled_requests_are_cached_only_when_asked() -> None:
    inner = FakeBackend("b", ["one", "two", "three"])
    hot = REQ.with_overrides(temperature=0.8)
    backend = cached(inner, ResponseCache(MemoryCacheStore()))
    with capture_events() as events:
        assert [(await backend.complete(hot)).text for _ in range(2)] == ["one", "two"]
    assert [e["event"] for e in events] == ["cache_skip", "cache_skip"]
    sampling = cached(inner, ResponseCache(MemoryCacheStore(), cache_sampled=True))
    assert [(await sampling.complete(hot)).text for _ in range(2)] == ["three", "three"]


@pytest.mark.anyio
async def test_errors_and_empty_answers_are_never_cached() -> None:
    inner = FakeBackend(
        "b", [Fail(error=BackendConnectionError), Reply(text=""), Reply(text="fine")]
    )
    backend = cached(inner, ResponseCache(MemoryCacheStore()))
    with pytest.raises(BackendConnectionError):
        await backend.complete(REQ)
    assert (await backend.complete(REQ)).text == ""
    assert (await backend.complete(REQ)).text == "fine"
    assert (await backend.complete(REQ)).text == "fine"
    assert len(inner.calls) == 3


@pytest.mark.anyio
async def test_entries_expire_after_their_ttl() -> None:
    clock = Clock()
    inner = FakeBackend("b", ["first", "second"])
    backend = cached(inner, ResponseCache(MemoryCacheStore(), ttl=60, clock=clock))
    assert (await backend.complete(REQ)).text == "first"
    clock.t += 59
    assert (await backend.complete(REQ)).text == "first"
    clock.t += 2
    assert (await backend.complete(REQ)).text == "second"


@pytest.mark.anyio
async def test_a_stream_miss_is_recorded_and_a_hit_replayed(srv: FakeLLMServer) -> None:
    async with oai(srv) as provider:
        backend = cached(provider, ResponseCache(MemoryCacheStore()))
        request = ChatRequest.from_prompt("tell me a long story " + "again " * 40)
        live = [e async for e in backend.stream(request)]
        replayed = [e async for e in backend.stream(request)]
        assert srv.count(CHAT) == 1
        text = "".join(e.text for e in live if isinstance(e, TextDelta))
        deltas = [e for e in replayed if isinstance(e, TextDelta)]
        assert len(deltas) > 1 and "".join(d.text for d in deltas) == text
        assert isinstance(replayed[-1], StreamEnd) and replayed[-1].completion.text == text
        assert (await backend.complete(request)).text == text  # streamed once, hit either way


@pytest.mark.anyio
async def test_a_failed_stream_is_not_recorded() -> None:
    inner = FakeBackend("b", [Fail(error=BackendConnectionError), "ok"])
    backend = cached(inner, ResponseCache(MemoryCacheStore()))
    with pytest.raises(BackendConnectionError):
        async for _ in backend.stream(REQ):
            pass
    assert (await backend.complete(REQ)).text == "ok"
    assert len(inner.calls) == 2


@pytest.mark.anyio
async def test_a_fanouts_chosen_answer_is_cached_whole() -> None:
    a = FakeBackend("a", ["Paris", "Lyon"])
    b = FakeBackend("b", ["Paris", "Nice"])
    c = FakeBackend("c", ["Paris is the capital", "Rome"])
    fan = FanOut([a, b, c], select="vote")
    backend = cached(fan, ResponseCache(MemoryCacheStore()))
    first = await backend.complete(REQ)
    again = await backend.complete(REQ)
    assert first.text == again.text == "Paris"
    assert [len(x.calls) for x in (a, b, c)] == [1, 1, 1]  # the fan-out ran once


# -- stores ------------------------------------------------------------------------------------


def make_store(kind: str, tmp_path: Path) -> CacheStore:
    if kind == "memory":
        return MemoryCacheStore()
    if kind == "sqlite":
        return SQLiteCacheStore(tmp_path / "cache.db")
    require_service("Redis", port_open("127.0.0.1", 6379), "nothing on 6379")
    return RedisCacheStore(key_prefix=f"genfan-test:{uuid.uuid4().hex}:")


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
@pytest.mark.anyio
async def test_every_store_keeps_and_expires_entries(kind: str, tmp_path: Path) -> None:
    store = make_store(kind, tmp_path)
    try:
        now = 1_000.0
        await store.set("k", b"v1", expires=None, now=now)
        assert await store.get("k", now=now) == b"v1"
        await store.set("k", b"v2", expires=now + 0.3, now=now)
        assert await store.get("k", now=now) == b"v2"
        assert await store.get("missing", now=now) is None
        if kind == "redis":
            await anyio.sleep(0.4)  # Redis's own clock expires it
        assert await store.get("k", now=now + 1) is None
        await store.set("a", b"x", expires=None, now=now)
        await store.clear()
        assert await store.get("a", now=now) is None
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_a_sqlite_cache_is_shared_by_cache_objects(tmp_path: Path) -> None:
    inner = FakeBackend("b", ["first", "second"])
    async with ResponseCache(f"sqlite:///{tmp_path}/cache.db") as one:
        assert (await cached(inner, one).complete(REQ)).text == "first"
    async with ResponseCache(tmp_path / "cache.db") as two:
        assert (await cached(inner, two).complete(REQ)).text == "first"
    assert len(inner.calls) == 1


@pytest.mark.anyio
async def test_a_store_that_is_down_never_fails_a_call() -> None:
    cache = ResponseCache(RedisCacheStore("redis://:hunter2@127.0.0.1:1/0"))
    inner = FakeBackend("b", ["ok"])
    backend = cached(inner, cache)
    with capture_events() as events:
        assert (await backend.complete(REQ)).text == "ok"
        assert (await backend.complete(REQ)).text == "ok"
    assert len(inner.calls) == 2
    down = [e for e in events if e["event"] == "cache_unavailable"]
    assert len(down) == 1 and down[0]["log_level"] == "warning"  # once per outage
    assert "hunter2" not in repr(events) and "hunter2" not in repr(cache)
    await cache.aclose()


def test_misuse_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="ResponseCache"):
        cached(FakeBackend(), "sqlite:///x.db")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="ttl must be seconds > 0"):
        ResponseCache(MemoryCacheStore(), ttl=0)
    with pytest.raises(ConfigurationError, match="unknown cache store URL scheme 'mysql'"):
        cache_store_from_url("mysql://u:hunter2@h/db")
    with pytest.raises(ConfigurationError, match="MemoryCacheStore"):
        SQLiteCacheStore(":memory:")
    with pytest.raises(ConfigurationError, match="store must be a CacheStore"):
        ResponseCache(42)  # type: ignore[arg-type]
