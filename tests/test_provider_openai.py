"""The OpenAI-compatible provider: exact request shapes and every error path (respx)."""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any

import anyio
import httpx
import pytest
import respx
from genfan_providers._http import SSEParser, parse_duration, parse_retry_after
from genfan_providers.openai import OpenAIBackend
from pydantic import BaseModel, SecretStr
from trio.testing import MockClock

from genfan import (
    BackendConnectionError,
    BackendTimeoutError,
    ChatRequest,
    ConfigurationError,
    HTTPStatusError,
    MalformedResponseError,
    Message,
    RateLimitError,
    ResponseFormat,
    StreamEnd,
    StreamInterruptedError,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    collect_stream,
    create_backend,
)

BASE = "https://llm.test/v1"
URL = BASE + "/chat/completions"
KEY = "sk-test-SECRET-0123456789"


def completion_body(
    text: str | None = "Hello!",
    *,
    tool_calls: list[dict[str, Any]] | None = None,
    finish: str = "stop",
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-test-2024",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage or {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
    }


def sse(*chunks: dict[str, Any] | str) -> bytes:
    out = []
    for c in chunks:
        out.append(f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n")
    return "".join(out).encode()


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "gpt-test-2024",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


USAGE_CHUNK = {"id": "c1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}


def backend(**kw: Any) -> OpenAIBackend:
    kw.setdefault("api_key", KEY)
    return OpenAIBackend(kw.pop("model", "gpt-test"), base_url=BASE, **kw)


def request(**kw: Any) -> ChatRequest:
    return ChatRequest.from_prompt("Hi there", **kw)


# -- request shape -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_request_shape_headers_and_every_field() -> None:
    class Answer(BaseModel):
        city: str

    req = ChatRequest(
        messages=(
            Message.system("Be brief."),
            Message.user("Weather?"),
            Message.assistant(None, [ToolCall(id="call_1", name="weather", arguments='{"c":"x"}')]),
            Message.tool("sunny", tool_call_id="call_1"),
        ),
        model="gpt-override",
        temperature=0.3,
        top_p=0.9,
        max_tokens=50,
        stop=("END",),
        seed=7,
        tools=(ToolSpec(name="weather", description="get weather"),),
        tool_choice="weather",
        response_format=ResponseFormat.from_model(Answer),
    )
    with respx.mock:
        route = respx.post(URL).respond(json=completion_body())
        async with backend(headers={"HTTP-Referer": "https://app.test"}) as b:
            await b.complete(req)
    sent = route.calls.last.request
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["http-referer"] == "https://app.test"
    assert sent.headers["content-type"] == "application/json"
    body = json.loads(sent.content)
    assert body == {
        "model": "gpt-override",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"c":"x"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        "temperature": 0.3,
        "top_p": 0.9,
        "max_tokens": 50,
        "stop": ["END"],
        "seed": 7,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "weather",
                    "description": "get weather",
                    "parameters": {"type": "object", "properties": {}},
                },
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "Answer",
                "schema": Answer.model_json_schema(),
                "strict": True,
            },
        },
    }


@pytest.mark.anyio
async def test_minimal_body_and_json_object_format() -> None:
    with respx.mock:
        route = respx.post(URL).respond(json=completion_body('{"a": 1}'))
        async with backend() as b:
            c = await b.complete(
                request(response_format=ResponseFormat(type="json_object"), tool_choice="auto")
            )
    body = json.loads(route.calls.last.request.content)
    assert body == {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "Hi there"}],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
    }
    assert c.parse_json() == {"a": 1}


@pytest.mark.anyio
async def test_no_key_no_model_for_local_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with respx.mock:
        route = respx.post("http://localhost:8080/v1/chat/completions").respond(
            json=completion_body()
        )
        async with OpenAIBackend(base_url="http://localhost:8080/v1") as b:
            assert not b.has_api_key
            await b.complete(request())
    sent = route.calls.last.request
    assert "authorization" not in sent.headers
    assert "model" not in json.loads(sent.content)


@pytest.mark.anyio
async def test_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "sk-from-env")
    with respx.mock:
        route = respx.post(URL).respond(json=completion_body())
        async with OpenAIBackend("m", base_url=BASE, api_key_env="MY_KEY") as b:
            await b.complete(request())
    assert route.calls.last.request.headers["authorization"] == "Bearer sk-from-env"


@pytest.mark.anyio
async def test_caller_client_gets_headers_and_is_left_open() -> None:
    client = httpx.AsyncClient()
    with respx.mock:
        route = respx.post(URL).respond(json=completion_body())
        async with backend(client=client, headers={"x-extra": "1"}) as b:
            await b.complete(request())
    sent = route.calls.last.request
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["x-extra"] == "1"
    assert not client.is_closed
    await client.aclose()


# -- answers -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_completion_fields_usage_cost_and_rate_limit_headers() -> None:
    headers = {
        "x-ratelimit-limit-requests": "500",
        "x-ratelimit-limit-tokens": "30000",
        "x-ratelimit-remaining-requests": "499",
        "x-ratelimit-remaining-tokens": "29000",
        "x-ratelimit-reset-requests": "120ms",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    with respx.mock:
        respx.post(URL).respond(json=completion_body(), headers=headers)
        async with backend(price=(2.0, 8.0)) as b:
            c = await b.complete(request())
    assert c.text == "Hello!"
    assert c.finish_reason == "stop"
    assert c.model == "gpt-test-2024"
    assert c.backend == "openai:gpt-test"
    assert (c.usage.input_tokens, c.usage.output_tokens) == (11, 3)
    assert c.usage.cost == pytest.approx((11 * 2.0 + 3 * 8.0) / 1e6)
    assert c.latency >= 0
    rl = c.rate_limit
    assert rl is not None
    assert (rl.limit_requests, rl.limit_tokens) == (500, 30000)
    assert (rl.remaining_requests, rl.remaining_tokens) == (499, 29000)
    assert rl.reset_requests == pytest.approx(0.12)
    assert rl.reset_tokens == pytest.approx(360.0)


@pytest.mark.anyio
async def test_tool_calls_in_a_completion() -> None:
    calls = [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        # some servers (Ollama) send arguments as an object
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": {"y": 2}}},
    ]
    with respx.mock:
        respx.post(URL).respond(json=completion_body(None, tool_calls=calls, finish="tool_calls"))
        async with backend() as b:
            c = await b.complete(request())
    assert c.text == ""
    assert c.finish_reason == "tool_calls"
    assert [(t.id, t.name, t.parsed_arguments()) for t in c.tool_calls] == [
        ("a", "f", {"x": 1}),
        ("b", "g", {"y": 2}),
    ]


@pytest.mark.anyio
async def test_unknown_finish_reason_and_missing_usage() -> None:
    body = completion_body()
    body["choices"][0]["finish_reason"] = "something_new"
    del body["usage"]
    with respx.mock:
        respx.post(URL).respond(json=body)
        async with backend() as b:
            c = await b.complete(request())
    assert c.finish_reason == "unknown"
    assert c.usage.total_tokens == 0


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 401, 403, 404, 408, 409, 422, 500, 502, 503, 504])
async def test_every_error_status_is_typed(status: int) -> None:
    with respx.mock:
        respx.post(URL).respond(status, json={"error": {"message": f"nope {status}"}})
        async with backend() as b:
            with pytest.raises(HTTPStatusError) as info:
                await b.complete(request())
    err = info.value
    assert type(err) is HTTPStatusError
    assert err.status_code == status
    assert err.backend == "openai:gpt-test"
    assert f"nope {status}" in str(err)
    assert err.retryable == (status >= 500 or status in (408, 409))


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({}, None),
        ({"retry-after": "soon"}, None),
    ],
)
async def test_rate_limit_retry_after_forms(
    headers: dict[str, str], expected: float | None
) -> None:
    with respx.mock:
        respx.post(URL).respond(429, json={"error": {"message": "slow down"}}, headers=headers)
        async with backend() as b:
            with pytest.raises(RateLimitError) as info:
                await b.complete(request())
    assert info.value.status_code == 429
    assert info.value.retry_after == expected
    assert info.value.retryable


@pytest.mark.anyio
async def test_rate_limit_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    with respx.mock:
        respx.post(URL).respond(429, headers={"retry-after": when})
        async with backend() as b:
            with pytest.raises(RateLimitError) as info:
                await b.complete(request())
    assert info.value.retry_after is not None
    assert 20 < info.value.retry_after <= 31


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (httpx.ConnectTimeout("connect timed out"), BackendTimeoutError),
        (httpx.ReadTimeout("read timed out"), BackendTimeoutError),
        (httpx.PoolTimeout("pool"), BackendTimeoutError),
        (httpx.ConnectError("refused"), BackendConnectionError),
        (httpx.ReadError("reset"), BackendConnectionError),
        (httpx.RemoteProtocolError("peer closed"), BackendConnectionError),
        (httpx.DecodingError("bad gzip"), MalformedResponseError),
    ],
)
async def test_transport_failures_are_typed(exc: Exception, expected: type[Exception]) -> None:
    with respx.mock:
        respx.post(URL).mock(side_effect=exc)
        async with backend() as b:
            with pytest.raises(expected) as info:
                await b.complete(request())
    assert info.value.__cause__ is exc
    assert "openai:gpt-test" in str(info.value)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "content",
    [
        b"<html>bad gateway</html>",
        b'{"choices": []}',
        b'{"no": "choices"}',
        b'{"choices": [{"message": "text"}]}',
        b"[1, 2]",
        b'{"choices": [{"message": {"content": 5}}]}',
    ],
)
async def test_malformed_bodies(content: bytes) -> None:
    with respx.mock:
        respx.post(URL).respond(200, content=content)
        async with backend() as b:
            with pytest.raises(MalformedResponseError) as info:
                await b.complete(request())
    assert info.value.backend == "openai:gpt-test"
    assert info.value.__cause__ is not None


@pytest.mark.anyio
async def test_error_status_with_non_json_body() -> None:
    with respx.mock:
        respx.post(URL).respond(502, content=b"<html>upstream broke</html>")
        async with backend() as b:
            with pytest.raises(HTTPStatusError) as info:
                await b.complete(request())
    assert info.value.status_code == 502
    assert "upstream broke" in str(info.value)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", [("trio", {"clock": MockClock(autojump_threshold=0)})])
async def test_request_timeout_limits_the_whole_call(anyio_backend: Any) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(3600)
        return httpx.Response(200, json=completion_body())

    client = httpx.AsyncClient(transport=httpx.MockTransport(slow))
    async with backend(client=client) as b:
        start = anyio.current_time()
        with pytest.raises(BackendTimeoutError) as info:
            await b.complete(request(timeout=5.0))
        assert anyio.current_time() - start == pytest.approx(5.0)
    assert "5s" in str(info.value)
    await client.aclose()


# -- secrets -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_key_never_in_repr_str_or_errors() -> None:
    b = backend(api_key=SecretStr(KEY))
    assert KEY not in repr(b)
    assert KEY not in str(b)
    assert repr(b) == f"OpenAIBackend(base_url='{BASE}', model='gpt-test')"
    with respx.mock:
        # a server that echoes the key back in its error message
        respx.post(URL).respond(401, json={"error": {"message": f"Incorrect API key {KEY}"}})
        with pytest.raises(HTTPStatusError) as info:
            await b.complete(request())
        respx.post(URL).respond(200, content=f"garbage {KEY}".encode())
        with pytest.raises(MalformedResponseError) as info2:
            await b.complete(request())
    await b.aclose()
    for err in (info.value, info2.value):
        assert KEY not in str(err)
        assert KEY not in repr(err)
        assert "***" in str(err)
    # says where the key came from
    assert "the api_key passed to OpenAIBackend was refused" in str(info.value)


# -- streaming ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_stream_text_and_usage_in_last_chunk() -> None:
    body = sse(
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo"}),
        chunk({}, "stop"),
        USAGE_CHUNK,
        "[DONE]",
    )
    with respx.mock:
        route = respx.post(URL).respond(
            200,
            content=body,
            headers={"content-type": "text/event-stream", "x-ratelimit-remaining-requests": "9"},
        )
        async with backend() as b:
            events = [e async for e in b.stream(request())]
    sent = json.loads(route.calls.last.request.content)
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hel", "lo"]
    end = events[-1]
    assert isinstance(end, StreamEnd)
    c = end.completion
    assert c.text == "Hello"
    assert (c.usage.input_tokens, c.usage.output_tokens) == (5, 2)
    assert c.ttft is not None and c.ttft <= c.latency
    assert c.model == "gpt-test-2024"
    assert c.rate_limit is not None and c.rate_limit.remaining_requests == 9


@pytest.mark.anyio
async def test_stream_parallel_tool_calls_in_pieces() -> None:
    def tc(index: int, **kw: Any) -> dict[str, Any]:
        return chunk({"tool_calls": [{"index": index, **kw}]})

    body = sse(
        tc(0, id="call_a", type="function", function={"name": "search", "arguments": ""}),
        tc(1, id="call_b", type="function", function={"name": "lookup", "arguments": '{"k"'}),
        tc(0, function={"arguments": '{"q": '}),
        tc(1, function={"arguments": ': "v"}'}),
        tc(0, function={"arguments": '"cats"}'}),
        chunk({}, "tool_calls"),
        USAGE_CHUNK,
        "[DONE]",
    )
    with respx.mock:
        respx.post(URL).respond(200, content=body, headers={"content-type": "text/event-stream"})
        async with backend() as b:
            events = [e async for e in b.stream(request())]
    pieces = [e for e in events if isinstance(e, ToolCallDelta)]
    assert len(pieces) == 5
    c = events[-1].completion  # type: ignore[union-attr]
    assert c.finish_reason == "tool_calls"
    assert [(t.id, t.name, t.parsed_arguments()) for t in c.tool_calls] == [
        ("call_a", "search", {"q": "cats"}),
        ("call_b", "lookup", {"k": "v"}),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [
        # a chunk that is not JSON
        sse(chunk({"content": "Hel"})) + b"data: {oops\n\n",
        # a chunk of the wrong shape
        sse({"choices": [{"index": 0, "delta": "text"}]}),
        # nothing at all, or no text before the end: truncated, retryable
        b"",
        sse(chunk({"role": "assistant"})),
        sse(chunk({"role": "assistant"}), "[DONE]"),
    ],
)
async def test_truncated_or_malformed_streams(body: bytes) -> None:
    with respx.mock:
        respx.post(URL).respond(200, content=body, headers={"content-type": "text/event-stream"})
        async with backend() as b:
            with pytest.raises(MalformedResponseError) as info:
                await collect_stream(b.stream(request()))
    assert info.value.retryable


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [
        # cut before [DONE] and before the finish reason
        sse(chunk({"content": "Hel"})),
        # finish reason but no [DONE]: the usage chunk may be lost
        sse(chunk({"content": "Hel"}), chunk({}, "stop")),
        # [DONE] without a finish reason
        sse(chunk({"content": "Hel"}), "[DONE]"),
    ],
)
async def test_streams_cut_after_text_keep_the_partial_text(body: bytes) -> None:
    with respx.mock:
        respx.post(URL).respond(200, content=body, headers={"content-type": "text/event-stream"})
        async with backend() as b:
            with pytest.raises(StreamInterruptedError) as info:
                await collect_stream(b.stream(request()))
    assert info.value.partial_text == "Hel"
    assert info.value.retryable and info.value.backend == "openai:gpt-test"


@pytest.mark.anyio
async def test_stream_error_status_and_error_event() -> None:
    with respx.mock:
        respx.post(URL).respond(
            429, json={"error": {"message": "quota"}}, headers={"retry-after": "3"}
        )
        async with backend() as b:
            with pytest.raises(RateLimitError) as info:
                await collect_stream(b.stream(request()))
        assert info.value.retry_after == 3.0
        respx.post(URL).respond(
            200,
            content=sse(
                chunk({"content": "Hi"}),
                {"error": {"message": "model crashed", "type": "server_error", "code": None}},
            ),
            headers={"content-type": "text/event-stream"},
        )
        async with backend() as b:
            with pytest.raises(HTTPStatusError) as info2:
                await collect_stream(b.stream(request()))
    assert info2.value.status_code == 500
    assert "model crashed" in str(info2.value)


@pytest.mark.anyio
async def test_stream_transport_failure_mid_stream() -> None:
    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            yield sse(chunk({"content": "Hel"}))
            raise httpx.RemoteProtocolError("peer closed connection")

    with respx.mock:
        respx.post(URL).respond(200, stream=Broken(), headers={"content-type": "text/event-stream"})
        async with backend() as b:
            got = []
            with pytest.raises(StreamInterruptedError) as info:
                async for ev in b.stream(request()):
                    got.append(ev)
    assert [e.text for e in got if isinstance(e, TextDelta)] == ["Hel"]
    assert info.value.partial_text == "Hel"
    assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)


# -- embeddings --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_embed_request_and_order() -> None:
    data = {
        "data": [
            {"index": 1, "embedding": [0.0, 1.0]},
            {"index": 0, "embedding": [1.0, 0.0]},
        ]
    }
    with respx.mock:
        route = respx.post(BASE + "/embeddings").respond(json=data)
        async with backend() as b:
            vectors = await b.embed(["a", "b"], model="text-embedding-3-small")
            assert await b.embed([]) == []
    assert vectors == [[1.0, 0.0], [0.0, 1.0]]
    assert json.loads(route.calls.last.request.content) == {
        "input": ["a", "b"],
        "model": "text-embedding-3-small",
    }
    assert route.call_count == 1


@pytest.mark.anyio
async def test_embed_count_mismatch_is_malformed() -> None:
    with respx.mock:
        respx.post(BASE + "/embeddings").respond(json={"data": [{"index": 0, "embedding": [1]}]})
        async with backend() as b:
            with pytest.raises(MalformedResponseError):
                await b.embed(["a", "b"])


# -- construction, registry --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"base_url": "llm.test/v1"}, "base_url"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"price": (1.0,)}, "price"),
        ({"price": (-1.0, 1.0)}, "price"),
    ],
)
def test_bad_configuration(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        OpenAIBackend("m", **kwargs)


def test_registry_builds_an_openai_backend() -> None:
    b = create_backend(
        "openai:gpt-4o-mini", base_url="http://127.0.0.1:9/v1", api_key="k", guards=False
    )
    assert isinstance(b, OpenAIBackend)
    assert b.model == "gpt-4o-mini"
    assert b.name == "openai:gpt-4o-mini"
    assert b.base_url == "http://127.0.0.1:9/v1"


@pytest.mark.anyio
async def test_closed_backend_refuses_calls() -> None:
    b = backend()
    await b.aclose()
    with pytest.raises(ConfigurationError, match="closed"):
        await b.complete(request())


# -- helpers -----------------------------------------------------------------------------------


def test_sse_parser_handles_splits_crlf_multiline_and_comments() -> None:
    p = SSEParser()
    out = p.feed(b": comment\r\nevent: a\r\ndata: 1\r")
    out += p.feed(b"\ndata: 2\r\n\r\nda")
    out += p.feed(b'ta: {"x"')
    out += p.feed(b": 1}\n\n")
    out += p.feed(b"data:nospace\n")
    out += p.close()
    assert out == [("a", "1\n2"), (None, '{"x": 1}'), (None, "nospace")]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("2.5", 2.5),
        ("", None),
        ("soon", None),
        ("5x", None),
    ],
)
def test_parse_duration(value: str, seconds: float | None) -> None:
    assert parse_duration(value) == (pytest.approx(seconds) if seconds is not None else None)


def test_parse_retry_after_past_date_is_zero() -> None:
    past = email.utils.formatdate(time.time() - 100, usegmt=True)
    assert parse_retry_after({"retry-after": past}) == 0.0
