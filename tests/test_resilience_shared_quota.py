"""Rate limits shared by processes through Redis: the RESP2 client, the quota script on a real
Redis (explicit clock: exact), limiters sharing one quota, three OS processes hammering one
limit, and a Redis that is down, silent or goes away (fallback or raise, never a hang, never
the password). A quota is shared one way: a store, ``guard(..., rate_limit_store=store)``
(in TOML: a ``[rate_limit_stores.NAME]`` table the guards name).

Needs Redis on 127.0.0.1:6379 (skipped without it, failed when GENFAN_REQUIRE_SERVICES=1).
Every test uses its own key prefix and deletes its keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from genfan import (
    Backend,
    BackendConnectionError,
    BulkheadFullError,
    ChatRequest,
    Completion,
    ConfigurationError,
    RateLimitError,
    RateLimitExceededError,
    RateLimitInfo,
    Usage,
    parse_config,
)
from genfan._redis import RespError, RespParser, RespProtocolError, encode_command
from genfan.resilience import (
    GuardsConfig,
    RateLimiter,
    RateLimitPolicy,
    RateLimitStoreConfig,
    RedisQuota,
    SharedQuotaError,
    guard,
)
from genfan.resilience._shared import BucketSpec, parse_redis_url, redact_redis_url
from genfan.testing import Fail, FakeBackend, FunctionBackend, capture_events
from tests._services import port_open, require_service

ROOT = Path(__file__).resolve().parents[1]
HOST, PORT = "127.0.0.1", 6379
URL = f"redis://{HOST}:{PORT}/0"
SECRET = "pw-S3CRET-4242"
REQ = ChatRequest.from_prompt("hi")


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", port_open(HOST, PORT), f"nothing listens on {HOST}:{PORT}")
    return URL


@pytest.fixture
def prefix() -> str:
    return f"genfan-test:{uuid.uuid4().hex}:"


async def delete_keys(prefix: str) -> None:
    async with RedisQuota(URL) as q:
        cursor: Any = b"0"
        while True:
            reply = await q._execute("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
            assert isinstance(reply, list) and isinstance(reply[1], list)
            cursor, keys = reply
            if keys:
                await q._execute("DEL", *keys)  # type: ignore[misc]
            if cursor == b"0":
                return


@pytest.fixture
async def quota(redis_url: str, prefix: str) -> AsyncIterator[RedisQuota]:
    async with RedisQuota(redis_url, key_prefix=prefix) as q:
        try:
            yield q
        finally:
            await delete_keys(prefix)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def shared_limiter(backend: Backend, policy: RateLimitPolicy, store: RedisQuota) -> RateLimiter:
    """The rate limiter of a stack whose only guard is the rate limit, sharing ``store``."""
    g = guard(
        backend,
        rate_limit=policy,
        rate_limit_store=store,
        bulkhead=None,
        breaker=None,
        retry=None,
        timeout=None,
    )
    assert g.rate_limiter is not None and g.rate_limiter.store is store
    return g.rate_limiter


def spec(capacity: float, per_second: float, amount: float, remaining: float | None = None) -> Any:
    return BucketSpec(capacity, per_second, amount, remaining)


def no_secret(*things: object) -> None:
    for thing in things:
        assert SECRET not in str(thing), thing
        assert SECRET not in repr(thing), thing


def exc_chain(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


@asynccontextmanager
async def tcp_server(
    handler: Callable[[anyio.abc.SocketStream], Awaitable[None]],
) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1; yields its port."""
    listener = await anyio.create_tcp_listener(local_host=HOST)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


class Proxy:
    """A TCP proxy to the real Redis that can go down (closing every connection) and up."""

    def __init__(self) -> None:
        self.up = True
        self.connections = 0
        self._scopes: set[anyio.CancelScope] = set()

    def go_down(self) -> None:
        self.up = False
        for scope in self._scopes:
            scope.cancel()

    def drop_connections(self) -> None:
        for scope in self._scopes:
            scope.cancel()

    async def handle(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            if not self.up:
                return
            self.connections += 1
            async with await anyio.connect_tcp(HOST, PORT) as server:
                with anyio.CancelScope() as scope:
                    self._scopes.add(scope)
                    try:
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(self._pipe, client, server, scope)
                            tg.start_soon(self._pipe, server, client, scope)
                    finally:
                        self._scopes.discard(scope)

    @staticmethod
    async def _pipe(
        src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, scope: anyio.CancelScope
    ) -> None:
        try:
            async for data in src:
                await dst.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            scope.cancel()


# -- RESP2 -------------------------------------------------------------------------------------


def test_commands_are_encoded_as_arrays_of_bulk_strings() -> None:
    assert encode_command("SET", b"k\r\n", 12, 0.5, "é") == (
        b"*5\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n$3\r\n0.5\r\n$2\r\n\xc3\xa9\r\n"
    )
    assert encode_command() == b"*0\r\n"
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite"):
            encode_command("X", bad)
    with pytest.raises(TypeError):
        encode_command("X", True)
    with pytest.raises(TypeError):
        encode_command("X", None)  # type: ignore[arg-type]


def test_replies_are_decoded_however_the_bytes_are_split() -> None:
    stream = (
        b"+OK\r\n-ERR wrong number\r\n:-42\r\n$5\r\nhe\r\nl\r\n$-1\r\n$0\r\n\r\n*-1\r\n"
        b"*3\r\n:1\r\n*2\r\n$1\r\na\r\n$-1\r\n-NOSCRIPT no\r\n*0\r\n"
    )
    expected: list[Any] = [
        "OK",
        RespError("ERR wrong number"),
        -42,
        b"he\r\nl",
        None,
        b"",
        None,
        [1, [b"a", None], RespError("NOSCRIPT no")],
        [],
    ]
    for chunk in (1, 2, 3, 7, len(stream)):
        parser = RespParser()
        got = []
        for i in range(0, len(stream), chunk):
            parser.feed(stream[i : i + chunk])
            while (reply := parser.next()) is not None:
                got.append(reply[0])
        assert got == expected, chunk
        assert isinstance(got[1], RespError) and isinstance(got[7][2], RespError)  # type: ignore[index]
    parser = RespParser()
    parser.feed(b"$5\r\nhel")
    assert parser.next() is None  # incomplete: more bytes needed


@pytest.mark.parametrize(
    "garbage",
    [b"?what\r\n", b":12x\r\n", b"$abc\r\n", b"$3\r\nabcd\r\n", b"$999999999\r\n", b"*-5\r\n"],
)
def test_what_is_not_resp_is_a_typed_error(garbage: bytes) -> None:
    parser = RespParser()
    parser.feed(garbage)
    with pytest.raises(RespProtocolError, match="is it Redis"):
        parser.next()


@pytest.mark.anyio
async def test_a_peer_that_is_not_redis_is_a_shared_quota_error() -> None:
    async def not_redis(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            await anyio.sleep_forever()

    async with tcp_server(not_redis) as port:
        async with RedisQuota(f"redis://:{SECRET}@{HOST}:{port}/0", timeout=2) as store:
            with pytest.raises(SharedQuotaError, match="is it Redis") as info:
                await store.ping()
            with pytest.raises(SharedQuotaError, match="unavailable"):  # fails fast meanwhile
                await store.ping()
            no_secret(*exc_chain(info.value), store)


def test_redis_urls_are_parsed_and_their_password_never_shown() -> None:
    a = parse_redis_url(f"redis://alice:{SECRET}%21@cache.internal:6380/3")
    assert (a.host, a.port, a.db, a.username, a.password) == (
        "cache.internal",
        6380,
        3,
        "alice",
        SECRET + "!",
    )
    assert a.redacted == "redis://alice:***@cache.internal:6380/3"
    b = parse_redis_url(f"redis://:{SECRET}@10.0.0.1")
    assert (b.port, b.db, b.username, b.password) == (6379, 0, None, SECRET)
    assert redact_redis_url(f"redis://:{SECRET}@10.0.0.1") == "redis://:***@10.0.0.1:6379/0"
    assert redact_redis_url("redis://[::1]:7000") == "redis://[::1]:7000/0"
    no_secret(a, b)
    for bad, match in [
        (f"rediss://:{SECRET}@h", "TLS"),
        (f"unix://:{SECRET}@/tmp/redis.sock", "must look like"),
        (f"redis://:{SECRET}@h:port/0", "port"),
        (f"redis://:{SECRET}@h/zero", "database"),
        (f"redis://:{SECRET}@h/0?timeout=1", "query"),
        (f"redis://:{SECRET}@/0", "no host"),
        (f"http://:{SECRET}@h", "must look like"),
    ]:
        with pytest.raises(ConfigurationError, match=match) as info:
            parse_redis_url(bad)
        no_secret(info.value)
        with pytest.raises(ConfigurationError, match=match) as info:
            RedisQuota(bad)
        no_secret(info.value)


def test_store_and_policy_validate_and_redact() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"timeout": 0}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"reconnect_interval": -1}, "reconnect_interval"),
        ({"max_connections": 0}, "max_connections"),
        ({"key_prefix": 3}, "key_prefix"),
    ]
    for kw, match in cases:
        with pytest.raises(ConfigurationError, match=match):
            RedisQuota(URL, **kw)
    q = RedisQuota(f"redis://:{SECRET}@{HOST}:{PORT}/0", key_prefix="app:")
    assert repr(q) == "RedisQuota('redis://:***@127.0.0.1:6379/0', key_prefix='app:')"
    assert q.keys("openai:gpt") == (
        "app:{openai:gpt}:requests",
        "app:{openai:gpt}:tokens",
        "app:{openai:gpt}:block",
    )
    stack = guard(
        FakeBackend("b"), rate_limit=RateLimitPolicy(requests_per_minute=5), rate_limit_store=q
    )
    assert stack.rate_limiter is not None and stack.rate_limiter.store is q
    no_secret(q, stack, stack.rate_limiter, stack.rate_limiter.policy)
    with pytest.raises(ConfigurationError, match="on_store_error must be one of"):
        RateLimitPolicy(on_store_error="ignore")  # type: ignore[arg-type]


def test_a_policy_holds_no_redis_url() -> None:
    # One way to share a quota: a store given to guard(); a policy has values only.
    for field in ("shared", "shared_env", "on_unavailable"):
        with pytest.raises(TypeError):
            RateLimitPolicy(requests_per_minute=5, **{field: URL})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        RateLimiter(FakeBackend("b"), RateLimitPolicy(), shared=RedisQuota(URL))  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError, match=r"takes a store.*not a str") as info:
        guard(
            FakeBackend("b"),
            rate_limit=RateLimitPolicy(requests_per_minute=5),
            rate_limit_store=f"redis://:{SECRET}@h/0",  # type: ignore[arg-type]
        )
    no_secret(info.value)


def test_the_url_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GENFAN_TEST_REDIS_URL", raising=False)
    with pytest.raises(ConfigurationError, match="GENFAN_TEST_REDIS_URL is not set"):
        RedisQuota.from_env("GENFAN_TEST_REDIS_URL")
    monkeypatch.setenv("GENFAN_TEST_REDIS_URL", f"redis://:{SECRET}@h:bad/0")
    with pytest.raises(ConfigurationError, match=r"\$GENFAN_TEST_REDIS_URL.*port") as info:
        RedisQuota.from_env("GENFAN_TEST_REDIS_URL")
    no_secret(info.value)
    monkeypatch.setenv("GENFAN_TEST_REDIS_URL", f"redis://:{SECRET}@h:7000/2")
    store = RedisQuota.from_env("GENFAN_TEST_REDIS_URL", key_prefix="app:", timeout=0.5)
    assert store.url == "redis://:***@h:7000/2"
    assert (store.key_prefix, store.timeout) == ("app:", 0.5)
    limiter = shared_limiter(FakeBackend("b"), RateLimitPolicy(requests_per_minute=5), store)
    no_secret(store, limiter)
    with pytest.raises(ConfigurationError, match="environment variable"):
        RedisQuota.from_env("")


@pytest.mark.anyio
async def test_toml_names_one_store_that_backends_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENFAN_TEST_REDIS_URL", f"redis://:{SECRET}@h:1/0")
    data = {
        "rate_limit_stores": {"main": {"url_env": "GENFAN_TEST_REDIS_URL", "key_prefix": "app:"}},
        "defaults": {"guards": {"rate_limit_store": "main"}},
        "backends": {
            "gpt": {"type": "fake", "guards": {"rate_limit": {"requests_per_minute": 500}}},
            "gpt-2": {
                "type": "fake",
                "guards": {"rate_limit": {"requests_per_minute": 60, "on_store_error": "raise"}},
            },
            "local": {"type": "fake", "guards": {"rate_limit": False}},
        },
    }
    cfg = parse_config(data)
    no_secret(cfg)
    fan = cfg.build_fanout()
    gpt, gpt2, local = (t.backend for t in fan.targets)
    for stack in (gpt, gpt2):
        assert stack.rate_limiter is not None  # type: ignore[attr-defined]
    a, b = gpt.rate_limiter, gpt2.rate_limiter  # type: ignore[attr-defined]
    assert a.policy.requests_per_minute == 500 and b.policy.on_store_error == "raise"
    assert isinstance(a.store, RedisQuota) and a.store is b.store  # built once, shared
    assert a.store.url == "redis://:***@h:1/0" and a.store.key_prefix == "app:"
    assert local.rate_limiter is None  # type: ignore[attr-defined]
    no_secret(fan, a, a.store)
    store = a.store
    await gpt.aclose()
    assert not store._closed  # gpt-2 still holds it
    await fan.aclose()
    assert store._closed  # the last stack closed it

    # a policy table that carries a URL is refused, without echoing it
    bad_tables: list[dict[str, Any]] = [
        {"rate_limit": {"requests_per_minute": 5, "shared": f"redis://:{SECRET}@h/0"}},
        {"rate_limit": {"requests_per_minute": 5, "shared_env": "GENFAN_TEST_REDIS_URL"}},
    ]
    for table in bad_tables:
        with pytest.raises(ValueError, match="rate_limit_stores") as info:
            GuardsConfig.model_validate(table)
        no_secret(info.value)
    merged = GuardsConfig.model_validate({"rate_limit": {"on_store_error": "raise"}}).merged_over(
        GuardsConfig.model_validate({"rate_limit": True, "rate_limit_store": "main"})
    )
    assert merged.rate_limit_store == "main"
    assert merged.policies()["rate_limit"].on_store_error == "raise"
    bad = {"timeout": "soon", "rate_limit": {"requests_per_minute": 0, "shared": bad_tables}}
    with pytest.raises(ValueError) as info:  # pydantic's ValidationError
        GuardsConfig.model_validate(bad)
    no_secret(info.value)

    # the store table: one URL, validated at load, never shown
    table = RateLimitStoreConfig(url=f"redis://:{SECRET}@h/0")
    assert "redis://:***@h:6379/0" in repr(table)
    no_secret(table, table.build())
    for bad_store, match in [
        ({"url": f"redis://:{SECRET}@h:x/0"}, "port"),
        ({}, "url_env"),
        ({"url": URL, "url_env": "X"}, "one of them"),
        ({"url": URL, "timeout": 0}, "timeout"),
    ]:
        with pytest.raises(ConfigurationError, match=match) as caught:
            parse_config({"rate_limit_stores": {"main": bad_store}})
        assert "rate_limit_stores.main" in str(caught.value)
        no_secret(caught.value)
    with pytest.raises(ConfigurationError, match=r"names 'nope'.*rate_limit_stores"):
        parse_config({"backends": {"b": {"type": "fake", "guards": {"rate_limit_store": "nope"}}}})
    monkeypatch.delenv("GENFAN_TEST_REDIS_URL")
    with pytest.raises(ConfigurationError, match=r"rate_limit_stores.main:.*is not set"):
        cfg.build_backend("gpt")
    with pytest.raises(ConfigurationError, match=r"backends.b.guards.rate_limit_store.*needs a"):
        parse_config(
            {
                "rate_limit_stores": {"main": {"url": URL}},
                "backends": {"b": {"type": "fake", "guards": {"rate_limit_store": "main"}}},
            }
        )
    # a backend whose rate limit is off does not use the store [defaults.guards] names
    unused = GuardsConfig.model_validate({"rate_limit_store": "main"}).build(FakeBackend("b"))
    assert unused.rate_limiter is None


# -- the quota script on a real Redis (explicit clock: exact) ----------------------------------


@pytest.mark.anyio
async def test_burst_refill_and_fifo_reservations(quota: RedisQuota) -> None:
    r = spec(10, 1, 1)  # burst 10, one a second
    for _ in range(10):
        g = await quota._acquire("b", requests=r, tokens=None, limit=None, now=100.0)
        assert g.admitted and g.wait == 0
    assert g.requests == 0
    # Further calls reserve in order: each waits one second longer (the bucket goes into debt).
    waits = [
        (await quota._acquire("b", requests=r, tokens=None, limit=None, now=100.0)).wait
        for _ in range(3)
    ]
    assert waits == [1.0, 2.0, 3.0]
    # 5.5 s later: 5.5 refilled over a debt of 3, never past the burst.
    g = await quota._acquire("b", requests=r, tokens=None, limit=None, now=105.5)
    assert g.wait == 0.0 and g.requests == pytest.approx(1.5)
    g = await quota._acquire("b", requests=spec(10, 1, 0), tokens=None, limit=None, now=1000.0)
    assert g.requests == 10.0  # full again, not more


@pytest.mark.anyio
async def test_a_wait_past_the_limit_takes_nothing(quota: RedisQuota) -> None:
    r = spec(2, 0.5, 1)
    for _ in range(2):
        await quota._acquire("b", requests=r, tokens=None, limit=0.0, now=0.0)
    g = await quota._acquire("b", requests=r, tokens=None, limit=0.0, now=0.0)  # reject mode
    assert not g.admitted and g.wait == 2.0 and g.requests == 0
    g = await quota._acquire("b", requests=r, tokens=None, limit=1.9, now=0.0)
    assert not g.admitted and g.wait == 2.0
    g = await quota._acquire("b", requests=r, tokens=None, limit=2.0, now=0.0)
    assert g.admitted and g.wait == 2.0 and g.requests == -1  # the refusals took nothing


@pytest.mark.anyio
async def test_both_buckets_and_oversized_requests(quota: RedisQuota) -> None:
    r, t = spec(5, 1, 1), spec(100, 10, 250)  # 250 tokens: more than the bucket holds
    g = await quota._acquire("b", requests=r, tokens=t, limit=None, now=0.0)
    assert g.admitted and g.wait == 0 and (g.requests, g.tokens) == (4, 0)
    g = await quota._acquire("b", requests=r, tokens=spec(100, 10, 30), limit=None, now=1.0)
    assert g.wait == pytest.approx(2.0)  # tokens: 10 there, 30 needed at 10/s; requests: none
    assert (g.requests, g.tokens) == (4, -20)


@pytest.mark.anyio
async def test_give_back_correct_and_learn(quota: RedisQuota) -> None:
    r, t = spec(10, 1, 1), spec(1000, 100, 300)
    await quota._acquire("b", requests=r, tokens=t, limit=None, now=0.0)
    g = await quota._update("b", requests=spec(10, 1, 1), tokens=spec(1000, 100, 300), now=0.0)
    assert (g.requests, g.tokens) == (10, 1000)  # given back, never past the burst
    g = await quota._update("b", requests=None, tokens=spec(1000, 100, -400), now=0.0)
    assert g.tokens == 600  # used more than estimated: taken
    g = await quota._update("b", requests=spec(10, 1, 0, remaining=3), tokens=None, now=0.0)
    assert g.requests == 3  # the provider says 3 are left
    g = await quota._update("b", requests=spec(10, 1, 0, remaining=8), tokens=None, now=0.0)
    assert g.requests == 3  # a higher report never raises the level


@pytest.mark.anyio
async def test_a_block_stops_everyone_and_the_longer_wins(quota: RedisQuota) -> None:
    r = spec(10, 1, 1)
    await quota._update("b", requests=None, tokens=None, block=5.0, now=0.0)
    g = await quota._update("b", requests=None, tokens=None, block=2.0, now=1.0)
    assert g.blocked == 4.0  # the shorter block does not cut the longer one
    g = await quota._acquire("b", requests=r, tokens=None, limit=None, now=1.0)
    assert g.admitted and g.wait == 4.0 and g.blocked == 4.0
    g = await quota._acquire("b", requests=r, tokens=None, limit=None, min_wait=6.0, now=1.0)
    assert g.wait == 6.0  # the caller's own block counts too
    g = await quota._acquire("b", requests=r, tokens=None, limit=None, now=5.0)
    assert g.wait == 0 and g.blocked == 0
    g = await quota._acquire("other", requests=r, tokens=None, limit=None, now=1.0)
    assert g.wait == 0 and g.requests == 9  # another backend's quota is its own


@pytest.mark.anyio
async def test_keys_expire_once_the_bucket_would_be_full(quota: RedisQuota) -> None:
    req_key, tok_key, block_key = quota.keys("b")
    await quota._acquire("b", requests=spec(10, 2, 4), tokens=None, limit=None)
    ttl = await quota._execute("PTTL", req_key)
    assert isinstance(ttl, int) and 2000 < ttl <= 3000  # refilled in 2 s, plus 1 s margin
    assert await quota._execute("EXISTS", tok_key, block_key) == 0
    await quota._update("b", requests=None, tokens=None, block=30.0)
    ttl = await quota._execute("PTTL", block_key)
    assert isinstance(ttl, int) and 29000 < ttl <= 30000
    await quota._update("b", requests=spec(10, 2, 4), tokens=None)
    assert await quota._execute("EXISTS", req_key) == 0  # full: nothing to keep
    await quota.reset("b")
    assert await quota._execute("EXISTS", block_key) == 0


@pytest.mark.anyio
async def test_redis_time_is_the_clock_and_the_script_reloads(quota: RedisQuota) -> None:
    r = spec(1, 20, 1)  # one at a time, one every 50 ms
    g1 = await quota._acquire("b", requests=r, tokens=None, limit=None)
    g2 = await quota._acquire("b", requests=r, tokens=None, limit=None)
    assert g1.wait == 0 and 0 < g2.wait <= 0.05
    await quota._execute("SCRIPT", "FLUSH")  # as after a Redis restart: EVALSHA says NOSCRIPT
    await anyio.sleep(0.2)
    g3 = await quota._acquire("b", requests=r, tokens=None, limit=None)
    assert g3.admitted and g3.wait == 0


# -- limiters sharing one quota (real time: bounds, not exact timings) -------------------------


@pytest.mark.anyio
async def test_limiters_of_one_backend_share_the_quota(redis_url: str, prefix: str) -> None:
    policy = RateLimitPolicy(requests_per_minute=60, burst_requests=3, mode="reject")
    async with (
        RedisQuota(redis_url, key_prefix=prefix) as qa,
        RedisQuota(redis_url, key_prefix=prefix) as qb,
    ):
        try:
            a = shared_limiter(FakeBackend("gpt"), policy, qa)
            b = shared_limiter(FakeBackend("gpt"), policy, qb)
            other = shared_limiter(FakeBackend("claude"), policy, qb)
            await a.complete(REQ)
            await a.complete(REQ)
            await b.complete(REQ)
            with pytest.raises(RateLimitExceededError, match="shared rate limit") as info:
                await b.complete(REQ)  # the burst is spent, by both
            assert 0.5 < info.value.retry_after <= 1.0
            with pytest.raises(RateLimitExceededError):
                await a.complete(REQ)
            await other.complete(REQ)  # another backend name, another quota
            assert a.statistics().admitted == 2 and b.statistics().rejected == 1
            assert b.requests is not None and b.requests.level < 0.5  # mirrors the shared level
        finally:
            await delete_keys(prefix)


@pytest.mark.anyio
async def test_waiters_of_several_limiters_are_served_in_turn(redis_url: str, prefix: str) -> None:
    policy = RateLimitPolicy(requests_per_minute=1200, burst_requests=1)  # one per 50 ms
    async with (
        RedisQuota(redis_url, key_prefix=prefix) as qa,
        RedisQuota(redis_url, key_prefix=prefix) as qb,
    ):
        try:
            limiters = [shared_limiter(FakeBackend("b"), policy, q) for q in (qa, qb)]
            done: list[float] = []
            start = anyio.current_time()

            async def calls(limiter: RateLimiter) -> None:
                for _ in range(3):
                    await limiter.complete(REQ)
                    done.append(anyio.current_time() - start)

            async with anyio.create_task_group() as tg:
                for limiter in limiters:
                    tg.start_soon(calls, limiter)
            assert len(done) == 6
            assert 0.2 <= max(done) < 2.0  # 5 waits of 50 ms, in whichever order they came
            assert sum(lim.statistics().waited for lim in limiters) >= 4
        finally:
            await delete_keys(prefix)


@pytest.mark.anyio
async def test_what_one_limiter_learns_stops_the_others(redis_url: str, prefix: str) -> None:
    policy = RateLimitPolicy(requests_per_minute=600, mode="reject")
    info = RateLimitInfo(remaining_requests=0, reset_requests=20.0)
    async with (
        RedisQuota(redis_url, key_prefix=prefix) as qa,
        RedisQuota(redis_url, key_prefix=prefix) as qb,
    ):
        try:
            a = shared_limiter(
                FakeBackend("gpt", [Fail(error=RateLimitError("429", retry_after=30.0))]),
                policy,
                qa,
            )
            b = shared_limiter(FakeBackend("gpt"), policy, qb)
            with pytest.raises(RateLimitError):
                await a.complete(REQ)
            with pytest.raises(RateLimitExceededError) as caught:
                await b.complete(REQ)  # a's 429 said 30 s: b waits too
            assert 29.0 < caught.value.retry_after <= 30.0
            assert b.statistics().blocked_until is not None

            # Headers of a completion: no requests left for 20 s.
            c = shared_limiter(
                FunctionBackend(lambda r: Completion(text="x", rate_limit=info), name="gpt-2"),
                policy,
                qa,
            )
            d = shared_limiter(FakeBackend("gpt-2"), policy, qb)
            await c.complete(REQ)
            assert d.requests is not None and d.requests.level > 500  # not heard of it yet
            with pytest.raises(RateLimitExceededError) as caught:
                await d.complete(REQ)
            assert 19.0 < caught.value.retry_after <= 20.0
            assert d.requests.level < 1  # mirrored from the store (and refilled a little)
        finally:
            await delete_keys(prefix)


@pytest.mark.anyio
async def test_tokens_are_corrected_and_unsent_calls_given_back(quota: RedisQuota) -> None:
    policy = RateLimitPolicy(tokens_per_minute=6000, requests_per_minute=60)
    reply = Completion(text="x", usage=Usage(input_tokens=5, output_tokens=5))
    ok = shared_limiter(FunctionBackend(lambda r: reply, name="b"), policy, quota)
    shed = shared_limiter(
        FakeBackend("b", [Fail(error=BulkheadFullError("full", backend="b"))]), policy, quota
    )
    await ok.complete(REQ)  # estimated 258, used 10: 248 refunded
    state = await quota._acquire(
        "b", requests=spec(60, 1, 0), tokens=spec(6000, 100, 0), limit=None
    )
    assert state.tokens == pytest.approx(5990, abs=1) and state.requests == pytest.approx(
        59, abs=0.1
    )
    with pytest.raises(BulkheadFullError):
        await shed.complete(REQ)  # never sent: its quota goes back
    state = await quota._acquire(
        "b", requests=spec(60, 1, 0), tokens=spec(6000, 100, 0), limit=None
    )
    assert state.tokens == pytest.approx(5990, abs=1) and state.requests == pytest.approx(
        59, abs=0.1
    )


@pytest.mark.anyio
async def test_a_cancelled_wait_gives_its_reservation_back(quota: RedisQuota) -> None:
    policy = RateLimitPolicy(requests_per_minute=60, burst_requests=1)
    limiter = shared_limiter(FakeBackend("b"), policy, quota)
    await limiter.complete(REQ)
    async with anyio.create_task_group() as tg:
        tg.start_soon(limiter.complete, REQ)  # reserves, waits ~1 s...
        await anyio.sleep(0.1)
        tg.cancel_scope.cancel()  # ...and is cancelled
    assert limiter.statistics().waited == 1 and limiter.statistics().admitted == 1
    state = await quota._acquire("b", requests=spec(1, 1, 0), tokens=None, limit=None)
    assert (
        state.requests is not None and 0 <= state.requests < 0.5
    )  # the debt of the cancelled call is gone
    with anyio.move_on_after(0.5):
        with pytest.raises(RateLimitExceededError):
            await limiter.complete(REQ)  # quota back in ~0.8 s, 0.5 s left: refused at once


# -- several OS processes ----------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, sys, time

    import anyio

    from genfan import ChatRequest
    from genfan import RateLimitExceededError
    from genfan.resilience import RateLimiter, RateLimitPolicy, RedisQuota, guard
    from genfan.testing import FakeBackend

    URL, PREFIX, BACKEND, DURATION = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    POLICY = RateLimitPolicy(requests_per_minute=60, burst_requests=10, max_wait=None)
    REQ = ChatRequest.from_prompt("hi")


    async def hammer(limiter, end, admitted):
        while (left := end - anyio.current_time()) > 0:
            with anyio.move_on_after(left):
                try:
                    await limiter.complete(REQ)
                    admitted.append(time.time())
                except RateLimitExceededError:  # the next quota is past the end
                    await anyio.sleep(0.02)


    async def main():
        async with RedisQuota(URL, key_prefix=PREFIX) as store:
            stack = guard(
                FakeBackend("gpt"), rate_limit=POLICY, rate_limit_store=store,
                bulkhead=None, breaker=None, retry=None, timeout=None,
            )
            shared = stack.rate_limiter
            alone = RateLimiter(FakeBackend("gpt"), POLICY)  # what it would do by itself
            out = {"shared": [], "alone": []}
            end = anyio.current_time() + DURATION
            async with anyio.create_task_group() as tg:
                tg.start_soon(hammer, shared, end, out["shared"])
                tg.start_soon(hammer, alone, end, out["alone"])
            out["fallbacks"] = shared.statistics().shared_fallbacks
        print(json.dumps(out), flush=True)


    print("ready", flush=True)
    sys.stdin.readline()
    anyio.run(main, backend=BACKEND)
    """
)


def test_three_processes_stay_within_one_shared_limit(redis_url: str, prefix: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, redis_url, prefix, backend, "2.0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for backend in ("asyncio", "trio", "asyncio")
    ]
    try:
        for p in procs:  # everyone imported and ready: start together
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=30)
            assert p.returncode == 0, err
            results.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        anyio.run(delete_keys, prefix)
    assert all(r["fallbacks"] == 0 for r in results)
    times = sorted(t for r in results for t in r["shared"])
    elapsed = times[-1] - times[0]
    # A token bucket of 10 refilled at 1/s admits at most 10 + elapsed (one of slack for the
    # time between Redis reserving and the process noting it).
    assert 10 <= len(times) <= 10 + elapsed * 1.0 + 1
    alone = [len(r["alone"]) for r in results]
    assert all(n >= 11 for n in alone), alone  # each alone admits its burst and more...
    assert sum(alone) >= 3 * 11 > len(times)  # ...so together they would have far exceeded it


# -- a Redis that is down, silent or goes away -------------------------------------------------


@pytest.mark.anyio
async def test_a_refused_redis_falls_back_to_local_buckets_once_warned() -> None:
    url = f"redis://:{SECRET}@{HOST}:{free_port()}/0"
    store = RedisQuota(url)
    policy = RateLimitPolicy(requests_per_minute=60, burst_requests=2, mode="reject")
    limiter = shared_limiter(FakeBackend("b"), policy, store)
    with capture_events() as events:
        start = anyio.current_time()
        await limiter.complete(REQ)
        await limiter.complete(REQ)
        with pytest.raises(RateLimitExceededError, match="local rate limit") as info:
            await limiter.complete(REQ)  # the local bucket: burst 2
        assert anyio.current_time() - start < 1.0
    warnings = [e for e in events if e["event"] == "rate_limit_shared_unavailable"]
    assert len(warnings) == 1  # once per outage, not per call
    assert warnings[0]["log_level"] == "warning" and warnings[0]["fallback"] == "local"
    assert "connection refused" in warnings[0]["error"]
    assert limiter.statistics().shared_fallbacks == 3
    no_secret(info.value, events, limiter, limiter.policy, limiter.store, limiter.statistics())
    await limiter.aclose()
    await store.aclose()


@pytest.mark.anyio
async def test_a_refused_redis_raises_when_told_to() -> None:
    url = f"redis://:{SECRET}@{HOST}:{free_port()}/0"
    store = RedisQuota(url, reconnect_interval=0.2)
    policy = RateLimitPolicy(requests_per_minute=60, on_store_error="raise")
    limiter = shared_limiter(FakeBackend("b"), policy, store)
    for _ in range(2):  # the second fails at once: Redis is not tried again for 0.2 s
        with pytest.raises(BackendConnectionError, match="shared rate limit") as info:
            await limiter.complete(REQ)
        assert info.value.backend == "b" and info.value.retryable
        assert isinstance(info.value.__cause__, SharedQuotaError)
        assert "redis://:***@127.0.0.1" in str(info.value)
        no_secret(*exc_chain(info.value))
    assert limiter.statistics().admitted == 0
    await store.aclose()


@pytest.mark.anyio
async def test_a_wrong_password_is_an_error_without_the_password(redis_url: str) -> None:
    async with RedisQuota(f"redis://:{SECRET}@{HOST}:{PORT}/0") as store:
        with pytest.raises(SharedQuotaError, match="AUTH failed") as info:
            await store.ping()
        no_secret(*exc_chain(info.value), store)


@pytest.mark.anyio
async def test_a_silent_redis_times_out_then_fails_fast() -> None:
    connections = 0

    async def black_hole(stream: anyio.abc.SocketStream) -> None:
        nonlocal connections
        connections += 1
        async with stream:
            await anyio.sleep_forever()

    async with tcp_server(black_hole) as port:
        store = RedisQuota(f"redis://:{SECRET}@{HOST}:{port}/0", timeout=0.2)
        limiter = shared_limiter(FakeBackend("b"), RateLimitPolicy(requests_per_minute=60), store)
        start = anyio.current_time()
        with capture_events() as events:
            await limiter.complete(REQ)  # no answer in 0.2 s: decided locally
            first = anyio.current_time() - start
            await limiter.complete(REQ)  # Redis is not asked again for a while
        total = anyio.current_time() - start
        assert 0.15 < first < 1.5 and total - first < 0.2
        assert connections == 1
        assert "no answer within 0.2s" in events[0]["error"]
        with pytest.raises(SharedQuotaError, match="unavailable"):
            await store.ping()
        no_secret(events, store)
        await store.aclose()


@pytest.mark.anyio
async def test_redis_going_away_mid_run_falls_back_and_comes_back(
    redis_url: str, prefix: str
) -> None:
    proxy = Proxy()
    async with tcp_server(proxy.handle) as port:
        store = RedisQuota(
            f"redis://{HOST}:{port}/0", key_prefix=prefix, timeout=0.5, reconnect_interval=0.1
        )
        policy = RateLimitPolicy(requests_per_minute=60, burst_requests=5, mode="reject")
        limiter = shared_limiter(FakeBackend("b"), policy, store)
        try:
            with capture_events() as events:
                await limiter.complete(REQ)
                proxy.drop_connections()  # a dropped connection is replaced transparently
                await anyio.sleep(0.05)
                await limiter.complete(REQ)
                assert proxy.connections == 2 and limiter.statistics().shared_fallbacks == 0
                proxy.go_down()
                await anyio.sleep(0.05)
                start = anyio.current_time()
                await limiter.complete(REQ)  # local buckets, starting from the shared level
                assert anyio.current_time() - start < 0.5
                assert limiter.statistics().shared_fallbacks == 1
                proxy.up = True
                await anyio.sleep(0.15)  # past reconnect_interval
                await limiter.complete(REQ)
            names = [e["event"] for e in events if "shared" in e["event"]]
            assert names == ["rate_limit_shared_unavailable", "rate_limit_shared_restored"]
            state = await store._acquire("b", requests=spec(5, 1, 0), tokens=None, limit=None)
            assert state.requests is not None and 1.5 < state.requests < 3.0  # 3 taken in Redis
        finally:
            await store.aclose()
            await delete_keys(prefix)
