"""The Anthropic Messages provider: exact request shapes and every error path (respx)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import respx
from genfan_providers.anthropic import ANTHROPIC_VERSION, AnthropicBackend
from pydantic import BaseModel

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

BASE = "https://claude.test/v1"
URL = BASE + "/messages"
KEY = "sk-ant-SECRET-0123456789"


def message_body(
    content: list[dict[str, Any]] | None = None, stop: str = "end_turn", **usage: int
) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test-2025",
        "content": content if content is not None else [{"type": "text", "text": "Hello!"}],
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 4, **usage},
    }


def sse(*events: dict[str, Any]) -> bytes:
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()


START = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test-2025",
        "content": [],
        "usage": {"input_tokens": 20, "output_tokens": 1},
    },
}
STOP = {"type": "message_stop"}


def delta(stop: str, output_tokens: int) -> dict[str, Any]:
    return {
        "type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": None},
        "usage": {"output_tokens": output_tokens},
    }


def text_block(index: int, *pieces: str) -> list[dict[str, Any]]:
    return [
        {
            "type": "content_block_start",
            "index": index,
            "content_block": {"type": "text", "text": ""},
        },
        *(
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "text_delta", "text": p},
            }
            for p in pieces
        ),
        {"type": "content_block_stop", "index": index},
    ]


def tool_block(index: int, id: str, name: str, *pieces: str) -> list[dict[str, Any]]:
    return [
        {
            "type": "content_block_start",
            "index": index,
            "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}},
        },
        *(
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "input_json_delta", "partial_json": p},
            }
            for p in pieces
        ),
        {"type": "content_block_stop", "index": index},
    ]


def backend(**kw: Any) -> AnthropicBackend:
    kw.setdefault("api_key", KEY)
    return AnthropicBackend(kw.pop("model", "claude-test"), base_url=BASE, **kw)


def request(**kw: Any) -> ChatRequest:
    return ChatRequest.from_prompt("Hi there", **kw)


# -- request shape -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_request_shape_headers_system_and_tool_turns() -> None:
    req = ChatRequest(
        messages=(
            Message.system("Be brief."),
            Message.user("Weather in Oslo and Rome?"),
            Message.assistant(
                "Checking.",
                [
                    ToolCall(id="t1", name="weather", arguments='{"city": "Oslo"}'),
                    ToolCall(id="t2", name="weather", arguments='{"city": "Rome"}'),
                ],
            ),
            Message.tool("rain", tool_call_id="t1"),
            Message.tool("sun", tool_call_id="t2"),
            Message.system("Answer in English."),
        ),
        temperature=1.5,
        top_p=0.8,
        max_tokens=300,
        stop=("END",),
        tools=(ToolSpec(name="weather", description="get weather"),),
        tool_choice="required",
    )
    with respx.mock:
        route = respx.post(URL).respond(json=message_body())
        async with backend(headers={"anthropic-beta": "x"}) as b:
            await b.complete(req)
    sent = route.calls.last.request
    assert sent.headers["x-api-key"] == KEY
    assert sent.headers["anthropic-version"] == ANTHROPIC_VERSION
    assert sent.headers["anthropic-beta"] == "x"
    assert "authorization" not in sent.headers
    assert json.loads(sent.content) == {
        "model": "claude-test",
        "max_tokens": 300,
        "system": "Be brief.\n\nAnswer in English.",
        "messages": [
            {"role": "user", "content": "Weather in Oslo and Rome?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Oslo"}},
                    {"type": "tool_use", "id": "t2", "name": "weather", "input": {"city": "Rome"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "rain"},
                    {"type": "tool_result", "tool_use_id": "t2", "content": "sun"},
                ],
            },
        ],
        "tools": [
            {
                "name": "weather",
                "description": "get weather",
                "input_schema": {"type": "object", "properties": {}},
            }
        ],
        "tool_choice": {"type": "any"},
        "temperature": 1.0,  # clamped to Anthropic's 0..1
        "top_p": 0.8,
        "stop_sequences": ["END"],
    }


@pytest.mark.anyio
async def test_default_max_tokens_and_named_tool_choice() -> None:
    with respx.mock:
        route = respx.post(URL).respond(json=message_body())
        async with backend(max_tokens=77) as b:
            await b.complete(
                request(tools=(ToolSpec(name="f"),), tool_choice="f", model="claude-other")
            )
    body = json.loads(route.calls.last.request.content)
    assert body["max_tokens"] == 77
    assert body["model"] == "claude-other"
    assert body["tool_choice"] == {"type": "tool", "name": "f"}
    assert "system" not in body


@pytest.mark.anyio
async def test_json_schema_via_forced_tool() -> None:
    class Answer(BaseModel):
        city: str

    content = [{"type": "tool_use", "id": "t", "name": "json_response", "input": {"city": "Oslo"}}]
    with respx.mock:
        route = respx.post(URL).respond(json=message_body(content, stop="tool_use"))
        async with backend() as b:
            c = await b.complete(request(response_format=ResponseFormat.from_model(Answer)))
    body = json.loads(route.calls.last.request.content)
    assert body["tool_choice"] == {"type": "tool", "name": "json_response"}
    assert body["tools"][0]["input_schema"] == Answer.model_json_schema()
    assert c.parse_json() == {"city": "Oslo"}
    assert c.finish_reason == "stop"
    assert c.tool_calls == ()


@pytest.mark.anyio
async def test_json_object_and_schema_with_tools_via_system_prompt() -> None:
    with respx.mock:
        route = respx.post(URL).respond(json=message_body([{"type": "text", "text": "{}"}]))
        async with backend() as b:
            await b.complete(request(response_format=ResponseFormat(type="json_object")))
            assert "JSON object" in json.loads(route.calls.last.request.content)["system"]
            await b.complete(
                request(
                    tools=(ToolSpec(name="f"),),
                    response_format=ResponseFormat(
                        type="json_schema", json_schema={"type": "object", "title": "Z"}
                    ),
                )
            )
    body = json.loads(route.calls.last.request.content)
    assert '"title": "Z"' in body["system"]
    assert [t["name"] for t in body["tools"]] == ["f"]


# -- answers -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_completion_text_tools_usage_and_rate_limits() -> None:
    reset = (datetime.now(UTC) + timedelta(seconds=60)).isoformat().replace("+00:00", "Z")
    content = [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_1", "name": "search", "input": {"q": "x"}},
    ]
    headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "49",
        "anthropic-ratelimit-requests-reset": reset,
        "anthropic-ratelimit-tokens-limit": "8000",
        "anthropic-ratelimit-tokens-remaining": "7000",
        "anthropic-ratelimit-tokens-reset": "not a date",
    }
    with respx.mock:
        respx.post(URL).respond(
            json=message_body(content, stop="tool_use", cache_read_input_tokens=3), headers=headers
        )
        async with backend(price=(3.0, 15.0)) as b:
            c = await b.complete(request())
    assert c.text == "Let me look."
    assert c.finish_reason == "tool_calls"
    assert [(t.id, t.name, t.parsed_arguments()) for t in c.tool_calls] == [
        ("toolu_1", "search", {"q": "x"})
    ]
    assert (c.usage.input_tokens, c.usage.output_tokens) == (15, 4)
    assert c.usage.cost == pytest.approx((15 * 3.0 + 4 * 15.0) / 1e6)
    assert c.model == "claude-test-2025"
    rl = c.rate_limit
    assert rl is not None
    assert (rl.limit_requests, rl.remaining_requests) == (50, 49)
    assert (rl.limit_tokens, rl.remaining_tokens) == (8000, 7000)
    assert rl.reset_requests is not None and 50 < rl.reset_requests <= 60
    assert rl.reset_tokens is None


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("refusal", "content_filter"),
        ("new", "unknown"),
    ],
)
async def test_stop_reasons(stop: str, finish: str) -> None:
    with respx.mock:
        respx.post(URL).respond(json=message_body(stop=stop))
        async with backend() as b:
            assert (await b.complete(request())).finish_reason == finish


# -- errors ------------------------------------------------------------------------------------


def error_body(etype: str, message: str = "nope") -> dict[str, Any]:
    return {"type": "error", "error": {"type": etype, "message": message}}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "etype"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (500, "api_error"),
        (529, "overloaded_error"),
    ],
)
async def test_error_statuses(status: int, etype: str) -> None:
    with respx.mock:
        respx.post(URL).respond(status, json=error_body(etype, f"{etype} happened"))
        async with backend() as b:
            with pytest.raises(HTTPStatusError) as info:
                await b.complete(request())
    assert type(info.value) is HTTPStatusError
    assert info.value.status_code == status
    assert f"{etype} happened" in str(info.value)
    assert info.value.retryable == (status >= 500)
    if status == 529:
        assert "overloaded" in str(info.value)
        assert info.value.counts_as_failure


@pytest.mark.anyio
async def test_rate_limit_with_retry_after() -> None:
    with respx.mock:
        respx.post(URL).respond(
            429, json=error_body("rate_limit_error"), headers={"retry-after": "12"}
        )
        async with backend() as b:
            with pytest.raises(RateLimitError) as info:
                await b.complete(request())
    assert info.value.retry_after == 12.0


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (httpx.ReadTimeout("slow"), BackendTimeoutError),
        (httpx.ConnectError("refused"), BackendConnectionError),
        (httpx.RemoteProtocolError("closed"), BackendConnectionError),
    ],
)
async def test_transport_failures(exc: Exception, expected: type[Exception]) -> None:
    with respx.mock:
        respx.post(URL).mock(side_effect=exc)
        async with backend() as b:
            with pytest.raises(expected) as info:
                await b.complete(request())
    assert info.value.__cause__ is exc


@pytest.mark.anyio
@pytest.mark.parametrize(
    "content",
    [b"not json", b'{"content": "x"}', b'{"content": [{"text": "no type"}]}', b"[]"],
)
async def test_malformed_bodies(content: bytes) -> None:
    with respx.mock:
        respx.post(URL).respond(200, content=content)
        async with backend() as b:
            with pytest.raises(MalformedResponseError):
                await b.complete(request())


@pytest.mark.anyio
async def test_key_redacted_everywhere() -> None:
    b = backend()
    assert KEY not in repr(b)
    with respx.mock:
        respx.post(URL).respond(401, json=error_body("authentication_error", f"bad key {KEY}"))
        with pytest.raises(HTTPStatusError) as info:
            await b.complete(request())
    await b.aclose()
    assert KEY not in str(info.value) and KEY not in repr(info.value)
    # says where the key came from
    assert "the api_key passed to AnthropicBackend was refused" in str(info.value)


# -- streaming ---------------------------------------------------------------------------------


def stream_response(*events: dict[str, Any]) -> httpx.Response:
    return httpx.Response(200, content=sse(*events), headers={"content-type": "text/event-stream"})


@pytest.mark.anyio
async def test_stream_text_tools_and_usage() -> None:
    events = [
        START,
        {"type": "ping"},
        *text_block(0, "Let ", "me look."),
        *tool_block(1, "toolu_a", "search", '{"q": ', '"cats"}'),
        *tool_block(2, "toolu_b", "lookup", "", '{"k": "v"}'),
        delta("tool_use", 42),
        STOP,
    ]
    with respx.mock:
        route = respx.post(URL).mock(return_value=stream_response(*events))
        async with backend() as b:
            got = [e async for e in b.stream(request())]
    assert json.loads(route.calls.last.request.content)["stream"] is True
    assert [e.text for e in got if isinstance(e, TextDelta)] == ["Let ", "me look."]
    pieces = [e for e in got if isinstance(e, ToolCallDelta)]
    assert [p.index for p in pieces] == [0, 0, 0, 1, 1]
    end = got[-1]
    assert isinstance(end, StreamEnd)
    c = end.completion
    assert c.text == "Let me look."
    assert c.finish_reason == "tool_calls"
    assert [(t.id, t.name, t.parsed_arguments()) for t in c.tool_calls] == [
        ("toolu_a", "search", {"q": "cats"}),
        ("toolu_b", "lookup", {"k": "v"}),
    ]
    assert (c.usage.input_tokens, c.usage.output_tokens) == (20, 42)
    assert c.ttft is not None


@pytest.mark.anyio
async def test_stream_json_schema_tool_becomes_text() -> None:
    events = [
        START,
        *tool_block(0, "t", "json_response", '{"city"', ': "Oslo"}'),
        delta("tool_use", 5),
        STOP,
    ]
    with respx.mock:
        respx.post(URL).mock(return_value=stream_response(*events))
        async with backend() as b:
            c = await collect_stream(
                b.stream(
                    request(
                        response_format=ResponseFormat(
                            type="json_schema", json_schema={"type": "object"}
                        )
                    )
                )
            )
    assert c.parse_json() == {"city": "Oslo"}
    assert c.finish_reason == "stop"
    assert c.tool_calls == ()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("events", "expected", "status"),
    [
        (
            [
                START,
                *text_block(0, "Hi"),
                {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
            ],
            HTTPStatusError,
            529,
        ),
        (
            [START, {"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}],
            RateLimitError,
            429,
        ),
        (
            [START, {"type": "error", "error": {"type": "api_error", "message": "boom"}}],
            HTTPStatusError,
            500,
        ),
    ],
)
async def test_stream_error_events(
    events: list[dict[str, Any]], expected: type[HTTPStatusError], status: int
) -> None:
    with respx.mock:
        respx.post(URL).mock(return_value=stream_response(*events))
        async with backend() as b:
            with pytest.raises(expected) as info:
                await collect_stream(b.stream(request()))
    assert info.value.status_code == status


@pytest.mark.anyio
async def test_stream_status_529() -> None:
    with respx.mock:
        respx.post(URL).respond(529, json=error_body("overloaded_error", "Overloaded"))
        async with backend() as b:
            with pytest.raises(HTTPStatusError) as info:
                await collect_stream(b.stream(request()))
    assert info.value.status_code == 529


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [
        sse(START) + b"event: content_block_delta\ndata: {broken\n\n",
        sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}}),
        sse(START, delta("end_turn", 2)),  # no message_stop, and no text passed on
        b"",
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
        sse(START, *text_block(0, "Hi"), delta("end_turn", 2)),  # no message_stop
        sse(START, *text_block(0, "Hi")),
    ],
)
async def test_streams_cut_after_text_keep_the_partial_text(body: bytes) -> None:
    with respx.mock:
        respx.post(URL).respond(200, content=body, headers={"content-type": "text/event-stream"})
        async with backend() as b:
            with pytest.raises(StreamInterruptedError) as info:
                await collect_stream(b.stream(request()))
    assert info.value.partial_text == "Hi" and info.value.retryable


# -- construction ------------------------------------------------------------------------------


def test_bad_max_tokens() -> None:
    with pytest.raises(ConfigurationError, match="max_tokens"):
        AnthropicBackend("c", max_tokens=0)


def test_registry_builds_an_anthropic_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    # The environment's key goes to api.anthropic.com only: another base_url names its key.
    monkeypatch.setenv("MY_ANTHROPIC_KEY", "sk-ant-env")
    b = create_backend(
        "anthropic:claude-x",
        base_url="http://127.0.0.1:9/v1",
        api_key_env="MY_ANTHROPIC_KEY",
        guards=False,
    )
    assert isinstance(b, AnthropicBackend)
    assert b.name == "anthropic:claude-x"
    assert b.has_api_key
    assert "sk-ant-env" not in repr(b)
