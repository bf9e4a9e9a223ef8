"""The HTTP path against hostile servers (issue 14): compressed streams, one huge event, odd field
types, credentials in URLs and headers, structlog left as found, unbounded waits and bodies.

Each defect is tested against a real server on 127.0.0.1 (genfan's FakeLLMServer, in a thread or
a child process), not a mocked transport.
"""

from __future__ import annotations

import gzip
import json
import tracemalloc
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
import structlog
from genfan_providers._http import EventTooLarge, SSEParser
from genfan_providers.anthropic import AnthropicBackend
from genfan_providers.openai import OpenAIBackend

from genfan import (
    AllBackendsFailedError,
    ChatRequest,
    ConfigurationError,
    FanOut,
    HTTPStatusError,
    MalformedResponseError,
    RateLimitError,
    ResponseTooLargeError,
    collect_stream,
    telemetry,
)
from genfan.resilience import RateLimitPolicy, RetryPolicy, guard
from genfan.testing import Fail, FakeBackend, capture_events
from genfan.testserver import FakeLLMServer, RawReply, ServerProcess

MiB = 1024 * 1024


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
    kw.setdefault("api_key", "sk-local")
    return OpenAIBackend(model, base_url=srv.url, **kw)


def claude(srv: FakeLLMServer, model: str = "claude-x", **kw: Any) -> AnthropicBackend:
    kw.setdefault("api_key", "sk-ant-local")
    return AnthropicBackend(model, base_url=srv.url, **kw)


MAKERS = [pytest.param(oai, id="openai"), pytest.param(claude, id="anthropic")]


def no_retry_guard(backend: Any) -> Any:
    return guard(backend, retry=RetryPolicy(attempts=2, initial=0.0, max_delay=0.0), timeout=10)


# -- 1. compressed streams -------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("make", MAKERS)
@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "complete"])
async def test_gzip_answers_decode(srv: FakeLLMServer, make: Any, streamed: bool) -> None:
    path = "/v1/chat/completions" if make is oai else "/v1/messages"
    async with httpx.AsyncClient() as raw:  # the server really compresses
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": streamed}
        r = await raw.post(srv.root_url + path, json=body, headers={"x-fake-fault": "gzip"})
        assert r.headers["content-encoding"] == "gzip"
    srv.set_faults("gzip")
    srv.chunk_delay = 0.001  # each event compressed and flushed on its own
    try:
        async with make(srv) as b:
            req = ChatRequest.from_prompt("squeeze this answer please")
            c = await (collect_stream(b.stream(req)) if streamed else b.complete(req))
    finally:
        srv.chunk_delay = 0.0
    assert c.text == "echo: squeeze this answer please"
    assert c.finish_reason == "stop"


# -- 2. one long event costs linear work -----------------------------------------------------


def _parse_work(parser: Any, size: int, chunk: int = 64 * 1024) -> int:
    """Bytes the parser allocates for one ``size``-byte event fed in ``chunk``-byte pieces: the
    sum over the feeds of each feed's peak allocation (tracemalloc), a count of copies that does
    not depend on the machine's speed."""
    piece = b"x" * chunk  # one object, fed again and again: only the parser's copies count
    head = b"data: "
    work = 0
    tracemalloc.start()
    try:
        feeds = [head] + [piece] * (size // chunk) + [b"\n\n"]
        events: list[Any] = []
        for data in feeds:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            events = parser.feed(data)
            work += tracemalloc.get_traced_memory()[1] - before
            if events:
                break
    finally:
        tracemalloc.stop()
    assert len(events) == 1 and len(events[0][1]) == size // chunk * chunk
    return work


class _CopyingParser:
    """The old parser's way (the pending buffer copied on every chunk), to show the measure
    tells quadratic work from linear."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, chunk: bytes) -> list[tuple[None, str]]:
        self.buf = self.buf + chunk
        if b"\n\n" not in self.buf:
            return []
        return [(None, self.buf[6:].split(b"\n")[0].decode())]


def test_one_long_event_is_parsed_in_linear_work() -> None:
    small, large = _parse_work(SSEParser(), 8 * MiB), _parse_work(SSEParser(), 16 * MiB)
    # Linear: a few copies of the event in all (joined once, decoded once), and twice the
    # work for twice the bytes. The old parser copied ~64 events' worth for 8 MiB, and 4x for 2x.
    assert large <= 4 * 16 * MiB
    assert large / small < 2.6
    old_small = _parse_work(_CopyingParser(), 2 * MiB)
    old_large = _parse_work(_CopyingParser(), 4 * MiB)
    assert old_large / old_small > 3.2  # the measure does see quadratic work


def test_the_parser_reads_every_line_ending_and_bounds_each_event() -> None:
    p = SSEParser()
    out = p.feed(b"data: a\r")
    out += p.feed(b"\ndata\rdatabase: no\r\r")  # "\r\n" split, bare "\r", "data" alone
    out += p.feed(b'data: b\n\ndata: {"cut')  # an event cut short at the end
    out += p.close()
    assert out == [(None, "a\n"), (None, "b")]
    limited = SSEParser(max_event_bytes=10)
    assert limited.feed(b"data: 0123456789\n\n") == [(None, "0123456789")]
    with pytest.raises(EventTooLarge):  # one line that never ends
        for _ in range(3):
            limited.feed(b"data: 01234")
    many = SSEParser(max_event_bytes=10)
    with pytest.raises(EventTooLarge):  # many short data lines of one event
        many.feed(b"data: 0123\ndata: 4567\ndata: 89ab\n")


@pytest.mark.anyio
async def test_a_16_mb_event_streams_from_a_real_server(srv: FakeLLMServer) -> None:
    size = 16_000_000
    async with oai(srv, headers={"x-fake-fault": f"huge;size={size}"}) as b:
        c = await collect_stream(b.stream(ChatRequest.from_prompt("x")))
    assert len(c.text) == size and c.text.count("x") == size


# -- 3. odd field types in streams -----------------------------------------------------------


def _openai_sse(*chunks: Any) -> bytes:
    lines = [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
    return "".join(lines).encode()


def _oai_chunk(delta: dict[str, Any], finish: Any = None, **extra: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    } | extra


_OAI_ODD = {
    "finish_reason list": [_oai_chunk({"content": "hi"}), _oai_chunk({}, ["stop"])],
    "usage list": [_oai_chunk({"content": "hi"}, "stop"), {"choices": [], "usage": [1, 2]}],
    "prompt_tokens text": [
        _oai_chunk({"content": "hi"}, "stop"),
        {"choices": [], "usage": {"prompt_tokens": "lots", "completion_tokens": 1}},
    ],
    "completion_tokens negative": [
        _oai_chunk({"content": "hi"}, "stop"),
        {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": -3}},
    ],
    "model number": [_oai_chunk({"content": "hi"}, "stop", model=7)],
    "content number": [_oai_chunk({"content": 7}, "stop")],
    "chunk list": [[1, 2]],
}


def _anthropic_sse(*events: dict[str, Any]) -> bytes:
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()


def _start(usage: Any = None) -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {"model": "c", "usage": usage or {"input_tokens": 3, "output_tokens": 1}},
    }


_TEXT = [
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
]
_STOP = {"type": "message_stop"}


def _delta(stop: Any = "end_turn", usage: Any = None) -> dict[str, Any]:
    return {
        "type": "message_delta",
        "delta": {"stop_reason": stop},
        "usage": {"output_tokens": 2} if usage is None else usage,
    }


_ANTHROPIC_ODD = {
    "stop_reason list": [_start(), *_TEXT, _delta(["end_turn"]), _STOP],
    "output_tokens text": [_start(), *_TEXT, _delta(usage={"output_tokens": "lots"}), _STOP],
    "usage list": [_start(), *_TEXT, _delta(usage=[1, 2]), _STOP],
    "input_tokens text": [_start({"input_tokens": "lots"}), *_TEXT, _delta(), _STOP],
    "text number": [
        _start(),
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 5}},
        _delta(),
        _STOP,
    ],
    "model list": [{"type": "message_start", "message": {"model": ["c"]}}, *_TEXT, _delta(), _STOP],
}


def _odd_cases() -> list[Any]:
    cases = [
        pytest.param(oai, _openai_sse(*chunks), id=f"openai-{name}")
        for name, chunks in _OAI_ODD.items()
    ]
    cases += [
        pytest.param(claude, _anthropic_sse(*events), id=f"anthropic-{name}")
        for name, events in _ANTHROPIC_ODD.items()
    ]
    return cases


@pytest.mark.anyio
@pytest.mark.parametrize(("make", "body"), _odd_cases())
async def test_odd_field_types_in_streams_are_malformed(
    srv: FakeLLMServer, make: Any, body: bytes
) -> None:
    reply = RawReply(body=body, headers={"content-type": "text/event-stream"})
    srv.set_handler(lambda path, request: reply)
    async with make(srv) as b:
        with pytest.raises(MalformedResponseError) as plain:
            await collect_stream(b.stream(ChatRequest.from_prompt("x")))
        async with no_retry_guard(b) as guarded:
            with pytest.raises(MalformedResponseError) as guarded_info:
                await collect_stream(guarded.stream(ChatRequest.from_prompt("x")))
    for info in (plain, guarded_info):
        assert "unreadable" in str(info.value) or "not" in str(info.value)


def _odd_bodies() -> list[Any]:
    message = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}
    claude_message = {"content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn"}
    return [
        pytest.param(oai, {**message, "usage": [1, 2]}, id="openai-usage-list"),
        pytest.param(
            oai, {**message, "usage": {"prompt_tokens": "lots"}}, id="openai-prompt-tokens-text"
        ),
        pytest.param(
            oai,
            {"choices": [{"message": {"content": "hi"}, "finish_reason": ["stop"]}]},
            id="openai-finish-list",
        ),
        pytest.param(
            claude, {**claude_message, "stop_reason": ["end_turn"]}, id="anthropic-stop-list"
        ),
        pytest.param(
            claude,
            {**claude_message, "usage": {"output_tokens": "lots"}},
            id="anthropic-output-tokens-text",
        ),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(("make", "body"), _odd_bodies())
async def test_the_same_odd_fields_in_whole_answers_are_malformed(
    srv: FakeLLMServer, make: Any, body: dict[str, Any]
) -> None:
    srv.set_handler(lambda path, request: RawReply(body=body))
    async with make(srv) as b:
        with pytest.raises(MalformedResponseError):
            await b.complete(ChatRequest.from_prompt("x"))


# -- 4. credentials in a base URL ------------------------------------------------------------


@pytest.mark.parametrize("cls", [OpenAIBackend, AnthropicBackend])
@pytest.mark.parametrize(
    "url",
    [
        "http://alice:hunter2-PASSWORD@127.0.0.1:9/v1",
        "https://:hunter2-PASSWORD@proxy.example/v1",
        "https://hunter2-PASSWORD@proxy.example/v1",
        "ftp://alice:hunter2-PASSWORD@proxy.example/v1",
    ],
)
def test_credentials_in_base_url_are_refused_unshown(cls: Any, url: str) -> None:
    with capture_events() as events, pytest.raises(ConfigurationError) as info:
        cls("m", base_url=url, api_key="sk-real-key")
    shown = f"{info.value} {info.value!r} {info.value.args} {events}"
    assert "hunter2" not in shown
    assert "***@" in str(info.value)


@pytest.mark.parametrize(
    ("cls", "var"),
    [(OpenAIBackend, "OPENAI_BASE_URL"), (AnthropicBackend, "ANTHROPIC_BASE_URL")],
)
def test_credentials_in_the_base_url_variable_are_refused_unshown(
    monkeypatch: pytest.MonkeyPatch, cls: Any, var: str
) -> None:
    monkeypatch.setenv(var, "https://alice:hunter2-PASSWORD@proxy.example/v1")
    with pytest.raises(ConfigurationError) as info:
        cls("m")
    assert "hunter2" not in str(info.value) and var in str(info.value)


@pytest.mark.anyio
async def test_no_basic_auth_ever_replaces_the_key(srv: FakeLLMServer) -> None:
    url = srv.url.replace("http://", "http://alice:hunter2@")
    with pytest.raises(ConfigurationError):
        OpenAIBackend("m", base_url=url, api_key="sk-real-key")
    assert srv.count() == 0  # nothing was sent, with or without Basic auth
    async with oai(srv, api_key="sk-real-key") as b:
        await b.complete(ChatRequest.from_prompt("x"))
    assert srv.requests[-1].headers["authorization"] == "Bearer sk-real-key"


# -- 5. keys in headers= echoed by a server --------------------------------------------------

HEADER_SECRETS = {
    "Authorization": "Bearer sk-hdr-SECRET-0123456789",
    "x-api-key": "xk-hdr-SECRET-abcdef",
    "api-key": "azure-SECRET-key-42",
    "Proxy-Authorization": "Basic cHJveHk6U0VDUkVULXByb3h5",
    "Cookie": "session=SECRET-cookie-value-77; theme=dark",
}
SECRET_PARTS = [
    "sk-hdr-SECRET-0123456789",
    "xk-hdr-SECRET-abcdef",
    "azure-SECRET-key-42",
    "cHJveHk6U0VDUkVULXByb3h5",
    "SECRET-cookie-value-77",
]


@pytest.mark.anyio
@pytest.mark.parametrize("make", MAKERS)
@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "complete"])
@pytest.mark.parametrize("status", [401, 500])
async def test_header_credentials_echoed_by_a_server_are_redacted(
    srv: FakeLLMServer, make: Any, streamed: bool, status: int, spans: Any
) -> None:
    headers = {**HEADER_SECRETS, "x-fake-fault": f"echo;status={status}"}
    with capture_events() as events:
        async with make(srv, api_key=None, api_key_env=None, headers=headers) as b:
            req = ChatRequest.from_prompt("x")
            with pytest.raises(HTTPStatusError) as info:
                await (collect_stream(b.stream(req)) if streamed else b.complete(req))
            with pytest.raises(AllBackendsFailedError):  # a fan-out records it on its span
                await FanOut([b]).run(req)
            async with guard(b, retry=None) as guarded:
                with pytest.raises(HTTPStatusError) as guarded_info:
                    await guarded.complete(req)
    assert "refused; you sent" in info.value.message  # the server did echo them
    assert "***" in info.value.message
    recorded = " ".join(
        str(attr)
        for s in spans.get_finished_spans()
        for e in s.events
        for attr in e.attributes.values()
    )
    assert "refused; you sent" in recorded  # the OTel exception event quotes the message
    for where in (
        str(info.value),
        repr(info.value),
        str(guarded_info.value),
        str(events),
        recorded,
    ):
        for secret in SECRET_PARTS:
            assert secret not in where


@pytest.mark.anyio
async def test_the_callers_client_headers_are_redacted_too(srv: FakeLLMServer) -> None:
    secret = "sk-client-SECRET-0123456789"
    client = httpx.AsyncClient(
        headers={"Authorization": f"Bearer {secret}", "x-fake-fault": "echo;status=401"}
    )
    async with client, OpenAIBackend("m", base_url=srv.url, client=client) as b:
        with pytest.raises(HTTPStatusError) as info:
            await b.complete(ChatRequest.from_prompt("x"))
    assert "you sent" in str(info.value) and secret not in str(info.value)


@pytest.mark.anyio
async def test_a_key_cut_at_the_snippet_edge_is_not_half_shown(srv: FakeLLMServer) -> None:
    key = "sk-edge-SECRET-0123456789abcdef"
    body = b"x" * 290 + key.encode() + b" was refused"  # not JSON: shown as a snippet
    srv.set_handler(lambda path, request: RawReply(status=401, body=body))
    async with oai(srv, api_key=key) as b:
        with pytest.raises(HTTPStatusError) as info:
            await b.complete(ChatRequest.from_prompt("x"))
    assert "sk-edge" not in str(info.value) and "***" in str(info.value)


# -- 6. capture_events() leaves structlog as it found it --------------------------------------


def test_capture_events_leaves_an_unconfigured_structlog_unconfigured(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert not structlog.is_configured()
    with capture_events() as events:
        telemetry.event("inside", level="warning")
    assert [e["event"] for e in events] == ["inside"]
    assert not structlog.is_configured()
    telemetry.event("after", level="warning", secret="nothing")
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_capture_events_puts_the_applications_configuration_back() -> None:
    seen: list[str] = []

    def keep(logger: Any, method: str, event: dict[str, Any]) -> str:
        seen.append(event["event"])
        return ""

    structlog.configure(processors=[keep], logger_factory=structlog.ReturnLoggerFactory())
    before = structlog.get_config()
    with capture_events() as events:
        telemetry.event("inside", level="info")
    assert structlog.is_configured() and structlog.get_config() == before
    telemetry.event("after", level="info")
    assert [e["event"] for e in events] == ["inside"] and seen == ["after"]


# -- 7. unbounded waits and bodies -----------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("make", MAKERS)
@pytest.mark.parametrize(
    ("retry_after", "cap", "expected"),
    [
        ("Thu, 01 Jan 2099 00:00:00 GMT", None, 3600.0),
        ("1e308", None, 3600.0),
        ("Thu, 01 Jan 2099 00:00:00 GMT", 5.0, 5.0),
        ("2", None, 2.0),
        ("inf", None, None),
    ],
)
async def test_retry_after_is_cut_to_max_server_wait(
    srv: FakeLLMServer, make: Any, retry_after: str, cap: float | None, expected: float | None
) -> None:
    options = {} if cap is None else {"max_server_wait": cap}
    headers = {"x-fake-fault": f"429;retry-after={retry_after}"}
    async with make(srv, headers=headers, **options) as b:
        with pytest.raises(RateLimitError) as info:
            await b.complete(ChatRequest.from_prompt("x"))
    assert info.value.retry_after == expected


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("make", "headers"),
    [
        pytest.param(
            oai,
            {
                "x-ratelimit-remaining-requests": "inf",
                "x-ratelimit-remaining-tokens": "0",
                "x-ratelimit-reset-tokens": "1e308",
                "x-ratelimit-reset-requests": "nan",
            },
            id="openai",
        ),
        pytest.param(
            claude,
            {
                "anthropic-ratelimit-requests-remaining": "1e999",
                "anthropic-ratelimit-tokens-remaining": "0",
                "anthropic-ratelimit-tokens-reset": "2099-01-01T00:00:00Z",
            },
            id="anthropic",
        ),
    ],
)
async def test_quota_headers_out_of_range_are_read_safely(
    srv: FakeLLMServer, make: Any, headers: dict[str, str]
) -> None:
    srv.rate_limit_headers = headers
    try:
        async with make(srv) as b:
            c = await b.complete(ChatRequest.from_prompt("x"))
            s = await collect_stream(b.stream(ChatRequest.from_prompt("x")))
    finally:
        srv.rate_limit_headers = {}
    for info in (c.rate_limit, s.rate_limit):
        assert info is not None
        assert info.remaining_requests is None and info.remaining_tokens == 0
        assert info.reset_tokens == 3600.0 and info.reset_requests is None


@pytest.mark.anyio
async def test_the_rate_limiter_learns_no_wait_past_its_maximum(srv: FakeLLMServer) -> None:
    date = "Thu, 01 Jan 2099 00:00:00 GMT"
    async with oai(srv, headers={"x-fake-fault": f"429;retry-after={date}"}) as b:
        async with guard(b, retry=None, rate_limit=RateLimitPolicy(mode="reject")) as g:
            with pytest.raises(RateLimitError):
                await g.complete(ChatRequest.from_prompt("x"))
            assert g.rate_limiter is not None
            blocked_until = g.rate_limiter.statistics().blocked_until
            assert blocked_until is not None
            blocked = blocked_until - anyio.current_time()
    assert 3590 < blocked <= 3600
    # the limiter's own cap holds whatever a backend reports
    fake = FakeBackend("f", [Fail(error=RateLimitError("slow", backend="f", retry_after=1e308))])
    async with guard(fake, retry=None, rate_limit=RateLimitPolicy()) as g2:
        with pytest.raises(RateLimitError):
            await g2.complete(ChatRequest.from_prompt("x"))
        assert g2.rate_limiter is not None
        until = g2.rate_limiter.statistics().blocked_until
        assert until is not None and until - anyio.current_time() <= 3600


@pytest.mark.anyio
async def test_a_50_mb_body_is_refused_without_being_read() -> None:
    with ServerProcess(args=["--fault", "huge;size=50000000"]) as proc:
        async with OpenAIBackend("m", base_url=proc.url) as b:
            tracemalloc.start()
            try:
                with pytest.raises(ResponseTooLargeError) as info:
                    await b.complete(ChatRequest.from_prompt("x"))
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
    assert isinstance(info.value, MalformedResponseError) and not info.value.retryable
    assert info.value.limit == 16 * MiB and info.value.size > 50_000_000
    assert peak < 8 * MiB  # the announced length was enough: nothing of the body was kept


@pytest.mark.anyio
async def test_a_compressed_body_is_counted_decoded(srv: FakeLLMServer) -> None:
    text = "y" * (20 * MiB)
    message = {"choices": [{"message": {"content": text}, "finish_reason": "stop"}]}
    packed = gzip.compress(json.dumps(message).encode())
    assert len(packed) < MiB  # a small body on the wire, 20 MiB decoded
    srv.set_handler(
        lambda path, request: RawReply(body=packed, headers={"content-encoding": "gzip"})
    )
    async with oai(srv) as b:
        with pytest.raises(ResponseTooLargeError) as info:
            await b.complete(ChatRequest.from_prompt("x"))
        # stopped at the first decoded piece past the limit (one piece of the wire decodes to
        # at most ~1000x its size: here, the whole small body at once)
        assert info.value.size > 16 * MiB
    async with oai(srv, max_response_bytes=None) as unlimited:
        c = await unlimited.complete(ChatRequest.from_prompt("x"))
    assert len(c.text) == len(text)


@pytest.mark.anyio
async def test_one_stream_event_past_the_limit_is_refused(srv: FakeLLMServer) -> None:
    async with oai(srv, headers={"x-fake-fault": "huge;size=3000000"}, max_response_bytes=MiB) as b:
        with pytest.raises(ResponseTooLargeError) as info:
            await collect_stream(b.stream(ChatRequest.from_prompt("x")))
    assert info.value.limit == MiB and "one event" in str(info.value)
    async with claude(srv, headers={"x-fake-fault": "huge;size=300000"}) as ok:
        c = await collect_stream(ok.stream(ChatRequest.from_prompt("x")))
    assert len(c.text) == 300000


@pytest.mark.anyio
@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "complete"])
async def test_a_huge_error_body_is_cut_and_its_connection_let_go(
    srv: FakeLLMServer, streamed: bool
) -> None:
    srv.set_handler(lambda path, request: RawReply(status=500, body=b"e" * 5_000_000))
    async with oai(srv, max_concurrency=1) as b:  # one connection: a leaked one would block
        for _ in range(3):
            req = ChatRequest.from_prompt("x", timeout=5)
            with pytest.raises(HTTPStatusError) as info:
                await (collect_stream(b.stream(req)) if streamed else b.complete(req))
            assert info.value.status_code == 500 and "eee..." in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_response_bytes": 0},
        {"max_response_bytes": 1.5},
        {"max_response_bytes": True},
        {"max_server_wait": -1},
        {"max_server_wait": float("inf")},
        {"max_server_wait": float("nan")},
    ],
)
def test_limits_are_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match=next(iter(kwargs))):
        OpenAIBackend("m", base_url="http://127.0.0.1:9/v1", **kwargs)
