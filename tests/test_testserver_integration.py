"""The providers against the real fake server on 127.0.0.1: real sockets, real faults."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import aclosing
from typing import Any

import anyio
import httpx
import pytest
from genfan_providers.anthropic import AnthropicBackend
from genfan_providers.openai import OpenAIBackend

from genfan import (
    AllBackendsFailedError,
    BackendConnectionError,
    BackendTimeoutError,
    ChatRequest,
    FanOut,
    HTTPStatusError,
    MalformedResponseError,
    RateLimitError,
    ResponseFormat,
    StreamEnd,
    StreamInterruptedError,
    TextDelta,
    ToolCall,
    ToolSpec,
    collect_stream,
)
from genfan.resilience import HedgePolicy, guard
from genfan.testserver import (
    FakeLLMServer,
    Fault,
    RawReply,
    ServerProcess,
    TextReply,
    ToolCallsReply,
)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture
def srv(server: FakeLLMServer) -> FakeLLMServer:
    server.reset()
    server.set_latency(0.0)
    return server


def oai(srv: FakeLLMServer, model: str = "model-x", **kw: Any) -> OpenAIBackend:
    return OpenAIBackend(model, base_url=srv.url, api_key="sk-local", **kw)


def claude(srv: FakeLLMServer, model: str = "claude-x", **kw: Any) -> AnthropicBackend:
    return AnthropicBackend(model, base_url=srv.url, api_key="sk-ant-local", **kw)


async def eventually(predicate: Any, seconds: float = 5.0) -> bool:
    """Poll what the server thread reports until it holds (or ``seconds`` pass)."""
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return True
        await anyio.sleep(0.01)
    return bool(predicate())


# -- the happy paths ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_openai_complete_stream_and_records(srv: FakeLLMServer) -> None:
    async with oai(srv) as b:
        c = await b.complete(ChatRequest.from_prompt("hello there"))
        events = [e async for e in b.stream(ChatRequest.from_prompt("stream me please"))]
    assert c.text == "echo: hello there"
    assert (c.usage.input_tokens, c.usage.output_tokens) == (2, 3)
    assert c.model == "model-x"
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "echo: stream me please"
    end = events[-1]
    assert isinstance(end, StreamEnd)
    assert end.completion.usage.output_tokens == 4  # usage from the last chunk
    assert srv.count("/v1/chat/completions") == 2
    assert srv.last_body()["stream_options"] == {"include_usage": True}
    assert srv.requests[0].headers["authorization"] == "Bearer sk-local"


@pytest.mark.anyio
async def test_anthropic_complete_and_stream(srv: FakeLLMServer) -> None:
    async with claude(srv) as b:
        c = await b.complete(ChatRequest.from_prompt("hi claude", system="be kind"))
        s = await collect_stream(b.stream(ChatRequest.from_prompt("stream it")))
    assert c.text == "echo: hi claude"
    assert c.finish_reason == "stop"
    assert s.text == "echo: stream it"
    assert s.usage.output_tokens == 3
    first = srv.requests[0]
    assert first.path == "/v1/messages"
    assert first.headers["x-api-key"] == "sk-ant-local"
    assert first.body["system"] == "be kind"


@pytest.mark.anyio
@pytest.mark.parametrize("make", [oai, claude])
@pytest.mark.parametrize("streamed", [False, True])
async def test_scripted_parallel_tool_calls_then_text(
    srv: FakeLLMServer, make: Any, streamed: bool
) -> None:
    b = make(srv, "agent-model")
    srv.script(
        "agent-model",
        [
            ToolCallsReply([("search", {"q": "cats"}), ("lookup", {"id": 7})], text=""),
            TextReply("done"),
        ],
    )
    req = ChatRequest.from_prompt("go", tools=(ToolSpec(name="search"), ToolSpec(name="lookup")))
    async with b:
        first = await (collect_stream(b.stream(req)) if streamed else b.complete(req))
        second = await (collect_stream(b.stream(req)) if streamed else b.complete(req))
        third = await b.complete(req)
    assert first.finish_reason == "tool_calls"
    assert [(c.name, c.parsed_arguments()) for c in first.tool_calls] == [
        ("search", {"q": "cats"}),
        ("lookup", {"id": 7}),
    ]
    assert all(c.id for c in first.tool_calls)
    assert second.text == "done"
    assert third.text == "echo: go"  # the script is used up: back to the echo


@pytest.mark.anyio
async def test_tool_results_round_trip_to_anthropic(srv: FakeLLMServer) -> None:
    from genfan import Message

    req = ChatRequest(
        messages=(
            Message.user("q"),
            Message.assistant(None, [ToolCall(id="t1", name="f", arguments="{}")]),
            Message.tool("result text", tool_call_id="t1"),
        )
    )
    async with claude(srv) as b:
        c = await b.complete(req)
    assert c.text == "echo: result text"


@pytest.mark.anyio
async def test_json_formats_on_both_providers(srv: FakeLLMServer) -> None:
    fmt = ResponseFormat(type="json_schema", json_schema={"type": "object"})
    async with oai(srv) as a, claude(srv) as c:
        for b in (a, c):
            out = await b.complete(ChatRequest.from_prompt("json please", response_format=fmt))
            assert out.parse_json() == {"echo": "json please"}


@pytest.mark.anyio
async def test_handler_function_and_raw_replies(srv: FakeLLMServer) -> None:
    def handler(path: str, body: dict[str, Any]) -> Any:
        if "secret" in json.dumps(body):
            return RawReply(status=403, body={"error": {"message": "forbidden topic"}})
        return None

    srv.set_handler(handler)
    async with oai(srv) as b:
        assert (await b.complete(ChatRequest.from_prompt("fine"))).text == "echo: fine"
        with pytest.raises(HTTPStatusError) as info:
            await b.complete(ChatRequest.from_prompt("tell me the secret"))
    assert info.value.status_code == 403
    assert "forbidden topic" in str(info.value)


@pytest.mark.anyio
async def test_embeddings(srv: FakeLLMServer) -> None:
    async with oai(srv, "embed-model") as b:
        v1 = await b.embed(["a", "b", "a"])
    assert len(v1) == 3 and all(len(v) == 8 for v in v1)
    assert v1[0] == v1[2] != v1[1]
    assert srv.count("/v1/embeddings") == 1


# -- faults over real sockets ------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("make", [oai, claude])
@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("503", HTTPStatusError),
        ("529", HTTPStatusError),
        ("429;retry-after=2", RateLimitError),
        ("drop", BackendConnectionError),
        ("malformed", MalformedResponseError),
        ("truncate", MalformedResponseError),
    ],
)
async def test_injected_faults_are_typed(
    srv: FakeLLMServer, make: Any, streamed: bool, fault: str, expected: type[Exception]
) -> None:
    if streamed and fault in ("drop", "truncate"):
        expected = StreamInterruptedError  # cut after text was passed on
    async with make(srv, headers={"x-fake-fault": fault}) as b:
        req = ChatRequest.from_prompt("x")
        with pytest.raises(expected) as info:
            if streamed:
                await collect_stream(b.stream(req))
            else:
                await b.complete(req)
    if isinstance(info.value, RateLimitError):
        assert info.value.retry_after == 2.0
    if isinstance(info.value, HTTPStatusError):
        assert info.value.status_code == int(fault.split(";")[0])


@pytest.mark.anyio
@pytest.mark.parametrize("streamed", [False, True])
async def test_hang_with_request_timeout(srv: FakeLLMServer, streamed: bool) -> None:
    before = srv.abandoned
    async with oai(srv, headers={"x-fake-fault": "hang"}) as b:
        req = ChatRequest.from_prompt("x", timeout=0.2)
        with pytest.raises(BackendTimeoutError):
            if streamed:
                await collect_stream(b.stream(req))
            else:
                await b.complete(req)
    assert await eventually(lambda: srv.abandoned == before + 1)


@pytest.mark.anyio
async def test_server_wide_faults_rate_and_outage(srv: FakeLLMServer) -> None:
    async with oai(srv) as b:
        srv.set_faults(Fault("status", status=500))
        with pytest.raises(HTTPStatusError):
            await b.complete(ChatRequest.from_prompt("x"))
        srv.set_faults("503", rate=0.5)
        outcomes = []
        for _ in range(40):
            try:
                await b.complete(ChatRequest.from_prompt("x"))
                outcomes.append(True)
            except HTTPStatusError:
                outcomes.append(False)
        assert 5 < outcomes.count(False) < 35
        srv.clear_faults()
        srv.set_outage(0.0, 60.0, fault="502")
        with pytest.raises(HTTPStatusError) as info:
            await b.complete(ChatRequest.from_prompt("x"))
        assert info.value.status_code == 502
        srv.clear_faults()
        srv.set_outage(60.0, 120.0)  # not yet
        assert (await b.complete(ChatRequest.from_prompt("y"))).text == "echo: y"


@pytest.mark.anyio
async def test_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with OpenAIBackend("m", base_url=f"http://127.0.0.1:{port}/v1", api_key_env=None) as b:
        with pytest.raises(BackendConnectionError) as info:
            await b.complete(ChatRequest.from_prompt("x"))
    assert isinstance(info.value.__cause__, httpx.ConnectError)


# -- concurrency and cancellation --------------------------------------------------------------


@pytest.mark.anyio
async def test_max_concurrency_bounds_requests_and_connections(srv: FakeLLMServer) -> None:
    srv.set_latency(0.05)
    opened = srv.connections_opened
    srv.max_in_flight = 0
    async with oai(srv, max_concurrency=3) as b:
        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(b.complete, ChatRequest.from_prompt(f"p{i}"))
    assert srv.count() == 12
    assert srv.max_in_flight <= 3
    assert srv.connections_opened - opened <= 3


@pytest.mark.anyio
async def test_fanout_over_several_providers(srv: FakeLLMServer) -> None:
    srv.script("model-b", [TextReply("from b")])
    async with FanOut([oai(srv, "model-a"), oai(srv, "model-b"), claude(srv)], mode="all") as fan:
        result = await fan.run("compare")
    assert [c.backend for c in result.candidates] == [
        "openai:model-a",
        "openai:model-b",
        "anthropic:claude-x",
    ]
    assert [c.text for c in result.candidates] == ["echo: compare", "from b", "echo: compare"]
    assert result.usage.output_tokens == 2 + 2 + 2


@pytest.mark.anyio
async def test_cancelled_fanout_closes_the_losers_connections(srv: FakeLLMServer) -> None:
    before_abandoned = srv.abandoned
    slow = oai(srv, "slow", headers={"x-fake-fault": "hang"})
    slow_stream = claude(srv, "slow-claude", headers={"x-fake-fault": "hang"})
    fast = oai(srv, "fast")
    async with FanOut([slow, slow_stream, fast], mode="first") as fan:
        result = await fan.run("race")
        assert result.text == "echo: race"
        assert [c.status for c in result.candidates] == ["cancelled", "cancelled", "ok"]
        # the server sees both hanging requests' connections closed by the client
        assert await eventually(lambda: srv.abandoned == before_abandoned + 2)
        # and the losers' pools hold no connection
        for b in (slow, slow_stream):
            for client in b.clients:
                assert client._transport._pool.connections == []  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_fanout_deadline_and_all_failed(srv: FakeLLMServer) -> None:
    before = srv.abandoned
    hang = oai(srv, "h", headers={"x-fake-fault": "hang"})
    broken = oai(srv, "b", headers={"x-fake-fault": "500"})
    async with FanOut([hang, broken], deadline=0.3) as fan:
        with pytest.raises(AllBackendsFailedError) as info:
            await fan.run("x")
    kinds = sorted(type(e).__name__ for e in info.value.exceptions)
    assert kinds == ["BackendTimeoutError", "HTTPStatusError"]
    assert await eventually(lambda: srv.abandoned == before + 1)


@pytest.mark.anyio
async def test_abandoned_stream_releases_its_connection(srv: FakeLLMServer) -> None:
    srv.chunk_delay = 0.02
    try:
        before = srv.abandoned
        async with oai(srv, max_concurrency=1) as b:
            long = ChatRequest.from_prompt(" ".join(["word"] * 50))
            async with aclosing(b.stream(long)) as events:
                async for ev in events:
                    if isinstance(ev, TextDelta):
                        break
            # the semaphore slot came back: another call gets through
            assert (await b.complete(ChatRequest.from_prompt("next"))).text == "echo: next"
        assert await eventually(lambda: srv.abandoned == before + 1)
    finally:
        srv.chunk_delay = 0.0


@pytest.mark.anyio
@pytest.mark.parametrize("streamed", [True, False])
async def test_hedge_on_first_token_over_http(srv: FakeLLMServer, streamed: bool) -> None:
    """A model server stalled before its first token is hedged to a replica; the stalled
    stream's connection is closed (handed between tasks on asyncio and trio alike)."""
    srv.set_latency(30.0, model="stalled")
    before = srv.abandoned
    policy = HedgePolicy(delay=0.2, max_extra_ratio=1.0, trigger="first_token")
    async with oai(srv, "stalled") as primary, oai(srv, "replica") as replica:
        hedged = guard(primary, hedge=policy, hedge_alternates=[guard(replica)])
        assert hedged.hedge is not None
        hedged.hedge.budget.deposit()
        request = ChatRequest.from_prompt("who answers")
        with anyio.fail_after(10):
            if streamed:
                c = await collect_stream(hedged.stream(request))
            else:
                c = await hedged.complete(request)
        assert c.text == "echo: who answers" and c.model == "replica"
        assert c.ttft is not None and c.ttft < 5.0
        assert hedged.hedge.statistics().hedge_wins == 1
        assert await eventually(lambda: srv.abandoned == before + 1)
        for client in primary.clients:
            assert client._transport._pool.connections == []  # type: ignore[attr-defined]


# -- the server as a subprocess ----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # one loop is enough: the server is a process
async def test_server_subprocess(anyio_backend: str) -> None:
    with ServerProcess(latency=0.0) as proc:
        assert proc.url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient() as client:
            health = await client.get(proc.url.removesuffix("/v1") + "/health")
        assert health.json() == {"status": "ok"}
        async with OpenAIBackend("m", base_url=proc.url, api_key_env=None) as b:
            assert (await b.complete(ChatRequest.from_prompt("sub"))).text == "echo: sub"
    assert proc.proc is None


@pytest.mark.anyio
async def test_a_failing_handler_answers_500(srv: FakeLLMServer) -> None:
    def handler(path: str, body: dict[str, Any]) -> Any:
        raise RuntimeError("bug in the test's handler")

    srv.set_handler(handler)
    async with oai(srv) as b:
        with pytest.raises(HTTPStatusError) as info:
            await b.complete(ChatRequest.from_prompt("x"))
    assert info.value.status_code == 500
    assert "bug in the test's handler" in str(info.value)


def test_fault_header_syntax() -> None:
    assert Fault.parse("503") == Fault("status", status=503)
    assert Fault.parse("429; retry-after=2.5") == Fault("status", status=429, retry_after=2.5)
    assert Fault.parse("hang") == Fault("hang")
    with pytest.raises(ValueError):
        Fault.parse("explode")
