"""``http2=True`` against a local HTTP/2 server (hypercorn over TLS, a ``trustme`` CA): a
fan-out's cancelled loser resets its stream and keeps the connection (issue 14, connections
kept), counted by the server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import aclosing
from typing import Any

import anyio
import httpx
import pytest
from genfan_providers._http import _reset_cancelled_streams
from genfan_providers.openai import OpenAIBackend

from genfan import (
    ChatRequest,
    ConfigurationError,
    FanOut,
    TextDelta,
    collect_stream,
    create_backend,
    parse_config,
)
from genfan.testserver import FakeLLMServer

from .test_testserver_integration import eventually

pytest.importorskip("h2")
pytest.importorskip("hypercorn")
pytest.importorskip("trustme")

from benchmarks.http2_connections import H2Server

SLOW = 30.0  # the loser's latency: it can only end by being cancelled


@pytest.fixture(scope="module")
def h2_server() -> Iterator[H2Server]:
    with H2Server(latencies={"fast": 0.0, "steady": 0.02, "slow": SLOW}) as srv:
        yield srv


@pytest.fixture
def server(h2_server: H2Server) -> Iterator[H2Server]:
    yield from _quiet(h2_server)


def _quiet(h2_server: H2Server) -> Iterator[H2Server]:
    """The server with its counts reset, once the last test's requests are over (a loser's
    reset can reach it after that test ended)."""
    deadline = time.monotonic() + 10
    while h2_server.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    h2_server.reset()
    h2_server.latencies.pop("stream-delay", None)
    yield h2_server


def backend(server: H2Server, model: str, **kw: Any) -> OpenAIBackend:
    kw.setdefault("http2", True)
    kw.setdefault("verify", server.ca_path)
    return OpenAIBackend(model, base_url=server.url, api_key_env=None, **kw)


@pytest.mark.anyio
async def test_http2_carries_answers_and_streams_on_one_connection(server: H2Server) -> None:
    async with backend(server, "fast") as b:
        c = await b.complete(ChatRequest.from_prompt("over h2"))
        s = await collect_stream(b.stream(ChatRequest.from_prompt("streamed over h2")))
        assert server.accepted == 1
        # 8 at once: one connection per 4 calls in flight (the backend's pools of 4, which
        # stay small should a server answer HTTP/1.1 instead)
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(b.complete, ChatRequest.from_prompt(f"many {i}"))
    assert c.text == "echo: over h2"
    assert s.text == "echo: streamed over h2"
    assert server.versions == {"2": 10}
    assert server.accepted == 2


@pytest.mark.anyio
async def test_a_cancelled_loser_resets_its_stream_and_keeps_the_connection(
    server: H2Server,
) -> None:
    """120 first-mode fan-outs: 2 connections in all; the server sees each loser's stream
    reset (an ``http.disconnect``, not a connection closed). More than the server's 100
    concurrent streams: streams that were only forgotten (httpcore's own behaviour) would
    stay open in h2's count until the connection refused new ones."""
    fanouts = 120
    async with FanOut([backend(server, "fast"), backend(server, "slow")], mode="first") as fan:
        for i in range(fanouts):
            result = await fan.run(f"race {i}")
            assert result.text == f"echo: race {i}"
            statuses = [c.status for c in result.candidates]
            assert statuses == ["ok", "cancelled"], [repr(c.error) for c in result.candidates]
        assert await eventually(lambda: server.cancelled == fanouts)
        assert server.accepted == 2
        assert server.versions == {"2": 2 * fanouts}
        # the connections are still there and still work
        assert (await fan.run("after")).text == "echo: after"
    assert server.accepted == 2


@pytest.mark.anyio
async def test_a_call_cancelled_while_its_connection_opens_leaves_it_working(
    server: H2Server,
) -> None:
    """httpcore takes its stream permits in a loop of awaits as a connection opens; a request
    cancelled inside it used to leave too many, and the server's settings then broke the
    connection ("semaphore released too many times") for the calls after it."""
    for i in range(30):
        async with backend(server, "slow") as b:
            with anyio.move_on_after(0.0005 * (i % 10)):
                await b.complete(ChatRequest.from_prompt("cancelled"))
            b.model = "fast"
            for _ in range(3):
                assert (await b.complete(ChatRequest.from_prompt("then"))).text == "echo: then"


@pytest.mark.anyio
async def test_over_http1_every_cancelled_loser_costs_a_connection(server: H2Server) -> None:
    """The same race without HTTP/2 (the default): each loser's connection is closed."""
    fanouts = 8
    # the winner takes 20 ms: time enough for the loser to open its connection
    fast, slow = backend(server, "steady", http2=False), backend(server, "slow", http2=False)
    async with FanOut([fast, slow], mode="first") as fan:
        for i in range(fanouts):
            assert (await fan.run(f"race {i}")).text == f"echo: race {i}"
    assert await eventually(lambda: server.accepted == fanouts + 1), server.accepted
    assert set(server.versions) == {"1.1"}


@pytest.mark.anyio
async def test_an_abandoned_stream_is_reset_and_its_connection_kept(server: H2Server) -> None:
    server.latencies["stream-delay"] = 0.05
    async with backend(server, "fast") as b:
        long = ChatRequest.from_prompt(" ".join(["word"] * 40))
        async with aclosing(b.stream(long)) as events:
            async for ev in events:
                if isinstance(ev, TextDelta):
                    break
        assert await eventually(lambda: server.cancelled == 1)
        server.latencies.pop("stream-delay")
        assert (await b.complete(ChatRequest.from_prompt("next"))).text == "echo: next"
    assert server.accepted == 1


@pytest.mark.anyio
async def test_a_request_timeout_resets_the_stream(server: H2Server) -> None:
    from genfan import BackendTimeoutError

    async with backend(server, "slow") as b:
        with pytest.raises(BackendTimeoutError):
            await b.complete(ChatRequest.from_prompt("x", timeout=0.2))
        assert await eventually(lambda: server.cancelled == 1)
        b.model = "fast"
        assert (await b.complete(ChatRequest.from_prompt("y"))).text == "echo: y"
    assert server.accepted == 1


@pytest.mark.anyio
async def test_http2_against_a_server_without_it_speaks_http1() -> None:
    with FakeLLMServer() as srv:  # plain http:// and HTTP/1.1 only
        async with OpenAIBackend("m", base_url=srv.url, api_key_env=None, http2=True) as b:
            assert (await b.complete(ChatRequest.from_prompt("h1"))).text == "echo: h1"
            s = await collect_stream(b.stream(ChatRequest.from_prompt("h1 stream")))
    assert s.text == "echo: h1 stream"


def test_httpx_transport_takes_the_reset_fix() -> None:
    """If a new httpx or httpcore changed the pool, this says so (and the fix is skipped)."""
    assert _reset_cancelled_streams(httpx.AsyncHTTPTransport(http2=True))


def test_options_are_checked(server: H2Server) -> None:
    with pytest.raises(ConfigurationError, match="no such CA bundle"):
        backend(server, "m", verify="/nonexistent/ca.pem")
    with pytest.raises(ConfigurationError, match="http2 must be true or false"):
        backend(server, "m", http2="yes")
    with pytest.raises(ConfigurationError, match="with client="):
        backend(server, "m", client=httpx.AsyncClient())


@pytest.mark.anyio
async def test_create_backend_and_toml_pass_http2_and_verify_through(server: H2Server) -> None:
    made = create_backend(
        "openai:fast", base_url=server.url, api_key_env=None, http2=True, verify=server.ca_path
    )
    config = parse_config(
        {
            "backends": {
                "h2": {
                    "type": "openai",
                    "model": "fast",
                    "base_url": server.url,
                    "options": {"http2": True, "verify": server.ca_path, "api_key_env": ""},
                },
                "insecure": {
                    "type": "openai",
                    "model": "fast",
                    "base_url": server.url,
                    "options": {"verify": False, "api_key_env": ""},
                },
            }
        }
    )
    async with made, config.build_backend("h2") as h2, config.build_backend("insecure") as h1:
        assert (await made.complete(ChatRequest.from_prompt("code"))).text == "echo: code"
        assert (await h2.complete(ChatRequest.from_prompt("toml"))).text == "echo: toml"
        assert (await h1.complete(ChatRequest.from_prompt("h1"))).text == "echo: h1"
    assert server.versions == {"2": 2, "1.1": 1}


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("transport", ["httpx", "aiohttp"])
async def test_verify_decides_which_certificates_pass(server: H2Server, transport: str) -> None:
    """A private CA's server passes with ``verify=<its CA>``, fails (typed, one line) with the
    default bundle; over both transports."""
    pytest.importorskip("httpx_aiohttp")
    from genfan import BackendConnectionError

    async with backend(server, "fast", http2=False, transport=transport) as b:
        assert (await b.complete(ChatRequest.from_prompt("tls"))).text == "echo: tls"
    async with backend(server, "fast", http2=False, transport=transport, verify=True) as b:
        with pytest.raises(BackendConnectionError) as info:
            await b.complete(ChatRequest.from_prompt("untrusted"))
    assert "certificate" in str(info.value).lower() and "\n" not in str(info.value)
    assert server.versions == {"1.1": 1}
