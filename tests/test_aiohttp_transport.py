"""``transport="aiohttp"``: the HTTP providers over aiohttp on asyncio (issue 14, speed at the
floor), against genfan's fake server on 127.0.0.1: the same answers and the same typed errors
as httpx's transport, connections let go on cancellation, and what trio does with it."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import aclosing
from typing import Any

import anyio
import pytest
from genfan_providers.anthropic import AnthropicBackend
from genfan_providers.openai import OpenAIBackend

from genfan import (
    BackendConnectionError,
    BackendError,
    BackendTimeoutError,
    ChatRequest,
    ConfigurationError,
    FanOut,
    StreamInterruptedError,
    TextDelta,
    collect_stream,
    create_backend,
    parse_config,
)
from genfan.resilience import GuardedBackend
from genfan.testserver import FakeLLMServer

from .test_testserver_integration import eventually

pytest.importorskip("httpx_aiohttp")

#: Most tests are about aiohttp, which runs on asyncio only; trio's own tests name it.
asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture
def srv(server: FakeLLMServer) -> FakeLLMServer:
    server.reset()
    server.set_latency(0.0)
    server.chunk_delay = 0.0
    return server


def oai(srv: FakeLLMServer, model: str = "model-x", **kw: Any) -> OpenAIBackend:
    kw.setdefault("transport", "aiohttp")
    return OpenAIBackend(model, base_url=srv.url, api_key="sk-local-aiohttp", **kw)


def claude(srv: FakeLLMServer, model: str = "claude-x", **kw: Any) -> AnthropicBackend:
    kw.setdefault("transport", "aiohttp")
    return AnthropicBackend(model, base_url=srv.url, api_key="sk-ant-local-aiohttp", **kw)


def user_agent(srv: FakeLLMServer) -> str:
    return srv.requests[-1].headers.get("user-agent", "")


# -- answers -----------------------------------------------------------------------------------


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("make", [oai, claude])
async def test_json_and_streams_over_aiohttp(srv: FakeLLMServer, make: Any) -> None:
    async with make(srv) as b:
        c = await b.complete(ChatRequest.from_prompt("hello there"))
        assert "aiohttp" in user_agent(srv)  # aiohttp carried it, not httpx
        events = [e async for e in b.stream(ChatRequest.from_prompt("stream me please"))]
        assert "aiohttp" in user_agent(srv)
    assert c.text == "echo: hello there"
    assert c.usage.input_tokens == 2
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == "echo: stream me please"
    key = "sk-local-aiohttp" if make is oai else "sk-ant-local-aiohttp"
    header = "authorization" if make is oai else "x-api-key"
    assert key in srv.requests[-1].headers[header]
    assert srv.requests[-1].headers["content-type"] == "application/json"


@pytest.mark.anyio
@asyncio_only
async def test_embeddings_and_the_httpx_client_share_aiohttp(srv: FakeLLMServer) -> None:
    async with oai(srv, "embed-model") as b:
        vectors = await b.embed(["a", "b"])
        assert len(vectors) == 2
        # .client is httpx over aiohttp (httpx-aiohttp), with the backend's headers
        r = await b.client.get(srv.root_url + "/health")
        assert r.json() == {"status": "ok"}
        assert b.clients == [b.client]


async def outcome(b: Any, streamed: bool) -> tuple[Any, ...]:
    """What a call ended with, in a form both transports can be compared by."""
    request = ChatRequest.from_prompt("say something long enough to cut")
    try:
        if streamed:
            c = await collect_stream(b.stream(request))
        else:
            c = await b.complete(request)
    except BackendError as exc:
        return (
            type(exc).__name__,
            getattr(exc, "status_code", None),
            getattr(exc, "retry_after", None),
            getattr(exc, "partial_text", None),
            "sk-" in str(exc),
        )
    return ("ok", c.text, c.finish_reason)


FAULTS = [
    "503",
    "529",
    "429;retry-after=2",
    "drop",
    "malformed",
    "truncate",
    "cut;at=60",
    "gzip",
    "echo;status=401",
    "huge;size=300000",
]


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("make", [oai, claude])
@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("fault", FAULTS)
async def test_every_fault_ends_as_over_httpx(
    srv: FakeLLMServer, make: Any, streamed: bool, fault: str
) -> None:
    """Each fault ends in the same typed error (status, retry-after, partial text, nothing
    secret shown) or the same answer over aiohttp as over httpx."""
    results = {}
    for transport in ("httpx", "aiohttp"):
        async with make(
            srv,
            transport=transport,
            headers={"x-fake-fault": fault},
            max_response_bytes=100_000,
        ) as b:
            results[transport] = await outcome(b, streamed)
    assert results["aiohttp"] == results["httpx"]
    assert results["aiohttp"][-1] is False or results["aiohttp"][0] == "ok"  # no key shown


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("streamed", [False, True])
async def test_a_hung_server_times_out_and_its_connection_is_closed(
    srv: FakeLLMServer, streamed: bool
) -> None:
    before = srv.abandoned
    async with oai(srv, headers={"x-fake-fault": "hang"}) as b:
        # the request's own limit (a cancel scope) ...
        with pytest.raises(BackendTimeoutError):
            request = ChatRequest.from_prompt("x", timeout=0.2)
            if streamed:
                await collect_stream(b.stream(request))
            else:
                await b.complete(request)
    assert await eventually(lambda: srv.abandoned == before + 1)
    # ... and the backend's read timeout (aiohttp's own timer)
    async with oai(srv, headers={"x-fake-fault": "hang"}, timeout=0.2) as b:
        with pytest.raises(BackendTimeoutError) as info:
            await b.complete(ChatRequest.from_prompt("x"))
    assert "timed out after 0.2s" in str(info.value)
    # The server sees that connection dropped too. (Not waiting for it here let the server
    # count it after the next test had read its baseline: that test then saw two.)
    assert await eventually(lambda: srv.abandoned == before + 2)


@pytest.mark.anyio
@asyncio_only
async def test_connection_refused_is_a_connection_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with OpenAIBackend(
        "m", base_url=f"http://127.0.0.1:{port}/v1", api_key_env=None, transport="aiohttp"
    ) as b:
        with pytest.raises(BackendConnectionError) as info:
            await b.complete(ChatRequest.from_prompt("x"))
    assert "\n" not in str(info.value)


@pytest.mark.anyio
@asyncio_only
async def test_a_stream_cut_after_text_keeps_the_partial_text(srv: FakeLLMServer) -> None:
    async with oai(srv, headers={"x-fake-fault": "drop"}) as b:
        with pytest.raises(StreamInterruptedError) as info:
            await collect_stream(b.stream(ChatRequest.from_prompt("one two three four")))
    assert info.value.partial_text


# -- connections -------------------------------------------------------------------------------


@pytest.mark.anyio
@asyncio_only
async def test_connections_are_reused_and_bounded(srv: FakeLLMServer) -> None:
    opened = srv.connections_opened
    async with oai(srv) as b:
        for i in range(20):
            await b.complete(ChatRequest.from_prompt(f"p{i}"))
    assert srv.connections_opened - opened == 1  # one kept-alive connection
    srv.set_latency(0.05)
    opened = srv.connections_opened
    srv.max_in_flight = 0
    async with oai(srv, max_concurrency=3) as b:
        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(b.complete, ChatRequest.from_prompt(f"p{i}"))
    assert srv.max_in_flight <= 3
    assert srv.connections_opened - opened <= 3


@pytest.mark.anyio
@asyncio_only
async def test_a_cancelled_loser_closes_its_connection(srv: FakeLLMServer) -> None:
    before = srv.abandoned
    slow = oai(srv, "slow", headers={"x-fake-fault": "hang"})
    slow_stream = claude(srv, "slow-claude", headers={"x-fake-fault": "hang"})
    async with FanOut([slow, slow_stream, oai(srv, "fast")], mode="first") as fan:
        result = await fan.run("race")
        assert result.text == "echo: race"
        assert [c.status for c in result.candidates] == ["cancelled", "cancelled", "ok"]
        assert await eventually(lambda: srv.abandoned == before + 2)


@pytest.mark.anyio
@asyncio_only
async def test_an_abandoned_stream_lets_its_connection_go(srv: FakeLLMServer) -> None:
    srv.chunk_delay = 0.02
    before = srv.abandoned
    async with oai(srv, max_concurrency=1) as b:
        async with aclosing(b.stream(ChatRequest.from_prompt(" ".join(["w"] * 50)))) as events:
            async for ev in events:
                if isinstance(ev, TextDelta):
                    break
        assert (await b.complete(ChatRequest.from_prompt("next"))).text == "echo: next"
    assert await eventually(lambda: srv.abandoned == before + 1)


# -- choosing it -------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_aiohttp_on_trio_is_a_one_line_configuration_error(srv: FakeLLMServer) -> None:
    async with oai(srv) as b:
        with pytest.raises(ConfigurationError) as info:
            await b.complete(ChatRequest.from_prompt("x"))
    message = str(info.value)
    assert "\n" not in message
    assert "transport='aiohttp' runs on asyncio only" in message and "'auto'" in message
    assert srv.count() == 0


@pytest.mark.anyio
async def test_auto_is_aiohttp_on_asyncio_and_httpx_on_trio(
    srv: FakeLLMServer, anyio_backend: str
) -> None:
    async with oai(srv, transport="auto") as b:
        c = await b.complete(ChatRequest.from_prompt("auto"))
        s = await collect_stream(b.stream(ChatRequest.from_prompt("auto stream")))
    assert (c.text, s.text) == ("echo: auto", "echo: auto stream")
    carried_by_aiohttp = "aiohttp" in user_agent(srv)
    assert carried_by_aiohttp == (anyio_backend == "asyncio")


def test_bad_combinations_are_configuration_errors(srv: FakeLLMServer) -> None:
    import httpx

    with pytest.raises(ConfigurationError, match="transport must be one of"):
        oai(srv, transport="urllib3")
    with pytest.raises(ConfigurationError, match=r"HTTP/1\.1 only"):
        oai(srv, http2=True)
    with pytest.raises(ConfigurationError, match="with client="):
        oai(srv, client=httpx.AsyncClient())


@pytest.mark.anyio
@asyncio_only
async def test_create_backend_and_toml_pass_the_transport_through(srv: FakeLLMServer) -> None:
    made = create_backend("openai:m", base_url=srv.url, api_key_env=None, transport="aiohttp")
    assert isinstance(made, GuardedBackend)
    config = parse_config(
        {
            "backends": {
                "a": {
                    "type": "openai",
                    "model": "m",
                    "base_url": srv.url,
                    "options": {"transport": "aiohttp", "api_key_env": ""},
                }
            }
        }
    )
    from_toml = config.build_backend("a")
    async with made, from_toml:
        assert (await made.complete(ChatRequest.from_prompt("in code"))).text == "echo: in code"
        assert "aiohttp" in user_agent(srv)
        assert (await from_toml.complete(ChatRequest.from_prompt("toml"))).text == "echo: toml"
        assert "aiohttp" in user_agent(srv)
    with pytest.raises(ConfigurationError, match="transport"):
        parse_config(
            {
                "backends": {
                    "b": {
                        "type": "openai",
                        "model": "m",
                        "base_url": srv.url,
                        "options": {"transport": "curl"},
                    }
                }
            }
        ).build_backend("b")
