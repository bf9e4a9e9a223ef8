"""Stream integrity (issue 14): a stream cut anywhere never passes as a whole answer.

A real server on 127.0.0.1 (FakeLLMServer's ``cut`` and ``truncate`` faults) sends the recorded
stream of an answer, up to a byte offset that hypothesis picks, then closes the socket in the
middle of the body (``cut``) or ends the body cleanly there (``truncate``). Whatever the offset:

* either the whole answer comes back (the cut fell after the end marker), or
* before any piece was passed on, a retryable error that retries and fallbacks handle like any
  other (``BackendConnectionError``, ``MalformedResponseError``), never ``StreamInterruptedError``;
* after, :class:`~genfan.StreamInterruptedError`, whose ``partial_text`` is exactly the text
  passed on, a prefix of the whole answer.

The local engine cannot be cut from outside, so its check is a unit test on the backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import pytest
from genfan_providers.anthropic import AnthropicBackend
from genfan_providers.openai import OpenAIBackend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genfan import (
    BackendConnectionError,
    BackendError,
    ChatRequest,
    Completion,
    MalformedResponseError,
    StreamEnd,
    StreamEvent,
    StreamInterruptedError,
    TextDelta,
    ToolCallDelta,
)
from genfan.resilience import RetryPolicy, guard
from genfan.testserver import FakeLLMServer, Fault, ToolCallsReply

PROMPT = "tell me a story in several words"
WHOLE = f"echo: {PROMPT}"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


def _backend(kind: str, srv: FakeLLMServer, fault: str | None) -> Any:
    headers = {"x-fake-fault": fault} if fault else None
    if kind == "openai":
        return OpenAIBackend("m", base_url=srv.url, api_key="k", headers=headers)
    return AnthropicBackend("m", base_url=srv.url, api_key="k", headers=headers)


def _recorded_length(kind: str, srv: FakeLLMServer) -> int:
    """The size of the answer's whole ``text/event-stream`` body, as the server sends it."""
    path = "/v1/chat/completions" if kind == "openai" else "/v1/messages"
    body: dict[str, Any] = {"model": "m", "stream": True, "max_tokens": 100}
    body["messages"] = [{"role": "user", "content": PROMPT}]
    if kind == "openai":
        body["stream_options"] = {"include_usage": True}
    with httpx.Client() as client:
        return len(client.post(srv.root_url + path, json=body).content)


async def _run(backend: Any) -> tuple[list[StreamEvent], BaseException | None]:
    events: list[StreamEvent] = []
    try:
        async with backend:
            async for event in backend.stream(ChatRequest.from_prompt(PROMPT)):
                events.append(event)
    except BackendError as exc:
        return events, exc
    return events, None


def _check(events: list[StreamEvent], error: BaseException | None) -> None:
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    if error is None:
        end = events[-1]
        assert isinstance(end, StreamEnd)
        assert end.completion.text == text == WHOLE
        return
    assert WHOLE.startswith(text)
    if not events:
        assert not isinstance(error, StreamInterruptedError)
        assert isinstance(error, BackendConnectionError | MalformedResponseError)
        assert error.retryable
    else:
        assert isinstance(error, StreamInterruptedError), repr(error)
        assert error.partial_text == text
        assert not any(isinstance(e, StreamEnd) for e in events)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("how", ["cut", "truncate"])
def test_a_stream_cut_at_any_byte_never_passes_as_whole(
    server: FakeLLMServer, kind: str, how: str
) -> None:
    server.reset()
    length = _recorded_length(kind, server)
    assert length > 300
    outcomes: set[str] = set()

    @settings(
        max_examples=120,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
        database=None,
    )
    @given(at=st.integers(min_value=0, max_value=length))
    def cut_at(at: int) -> None:
        backend = _backend(kind, server, f"{how};at={at}")
        events, error = anyio.run(_run, backend)
        _check(events, error)
        outcomes.add(
            "whole"
            if error is None
            else ("interrupted" if isinstance(error, StreamInterruptedError) else "retryable")
        )

    cut_at()
    # the offsets explored reached every kind of outcome
    assert {"retryable", "interrupted"} <= outcomes


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("how", ["cut", "truncate"])
def test_every_cut_of_the_recorded_stream_on_its_event_boundaries(
    server: FakeLLMServer, kind: str, how: str
) -> None:
    """The same property, deterministically, at each event boundary and one byte on either
    side (where an off-by-one would hide)."""
    server.reset()
    path = "/v1/chat/completions" if kind == "openai" else "/v1/messages"
    body: dict[str, Any] = {"model": "m", "stream": True, "max_tokens": 100}
    body["messages"] = [{"role": "user", "content": PROMPT}]
    if kind == "openai":
        body["stream_options"] = {"include_usage": True}
    with httpx.Client() as client:
        recorded = client.post(server.root_url + path, json=body).content
    boundaries = [i + 2 for i in range(len(recorded)) if recorded[i : i + 2] == b"\n\n"]
    offsets = sorted({0, *(b + d for b in boundaries for d in (-1, 0, 1))})
    whole = 0
    for at in offsets:
        events, error = anyio.run(_run, _backend(kind, server, f"{how};at={at}"))
        _check(events, error)
        whole += error is None
    assert whole >= 1  # a cut at the very end (after the end marker) is a whole answer


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_cut_before_any_text_is_retried_by_the_guard(
    server: FakeLLMServer, kind: str
) -> None:
    server.reset()
    server.script("m", [Fault("cut", at=40), Fault("truncate", at=40)])  # then the echo
    backend = _backend(kind, server, None)
    async with guard(backend, retry=RetryPolicy(attempts=3, initial=0.0, max_delay=0.0)) as g:
        events = [e async for e in g.stream(ChatRequest.from_prompt(PROMPT))]
    end = events[-1]
    assert isinstance(end, StreamEnd) and end.completion.text == WHOLE
    assert server.count() == 3


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_tool_call_pieces_count_as_passed_on(server: FakeLLMServer, kind: str) -> None:
    server.reset()
    reply = ToolCallsReply([("search", {"query": "a long enough query to split"})])
    path = "/v1/chat/completions" if kind == "openai" else "/v1/messages"
    body: dict[str, Any] = {"model": "m", "stream": True, "max_tokens": 100}
    body["messages"] = [{"role": "user", "content": "x"}]
    server.script("m", [reply])
    async with httpx.AsyncClient() as client:
        recorded = (await client.post(server.root_url + path, json=body)).content
    at = recorded.index(b"split")  # inside the tool call's arguments
    server.script("m", [reply])
    backend = _backend(kind, server, None)
    server.set_faults(Fault("cut", at=at))
    try:
        events, error = await _run(backend)
    finally:
        server.clear_faults()
    assert any(isinstance(e, ToolCallDelta) for e in events)
    assert isinstance(error, StreamInterruptedError) and error.partial_text == ""


# -- the local engine ------------------------------------------------------------------------


def _local_backend(outputs: list[Any]) -> Any:
    """A VLLMBackend whose engine is replaced by ``outputs`` (no model, no engine)."""
    vllm = pytest.importorskip("genfan_providers.vllm._backend")
    backend = vllm.VLLMBackend.__new__(vllm.VLLMBackend)
    vllm.BaseBackend.__init__(backend, "vllm:test")
    backend.model_name = "test"
    backend._timeout = None
    backend.price = vllm._FREE

    async def generate(request: ChatRequest, *, stream: bool, n: int = 1) -> Any:
        for out in outputs:
            yield vllm._NO_TOOLS, 3, out

    backend._generate = generate
    return backend


def _output(text: str, *, finished: bool, reason: str | None = None) -> Any:
    choice = SimpleNamespace(text=text, token_ids=[1] * len(text.split()), finish_reason=reason)
    return SimpleNamespace(outputs=[choice], finished=finished)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_local_engine_stream_must_finish(anyio_backend: str) -> None:
    whole = _local_backend(
        [_output("Hello", finished=False), _output(" world", finished=True, reason="stop")]
    )
    events = [e async for e in whole.stream(ChatRequest.from_prompt("x"))]
    end = events[-1]
    assert isinstance(end, StreamEnd) and isinstance(end.completion, Completion)
    assert end.completion.text == "Hello world"

    cut = _local_backend([_output("Hello", finished=False), _output(" wor", finished=False)])
    got: list[StreamEvent] = []
    with pytest.raises(StreamInterruptedError) as info:
        async for event in cut.stream(ChatRequest.from_prompt("x")):
            got.append(event)
    assert info.value.partial_text == "Hello wor" and info.value.retryable
    assert not any(isinstance(e, StreamEnd) for e in got)

    nothing = _local_backend([_output("", finished=False)])
    with pytest.raises(MalformedResponseError) as empty:
        async for _ in nothing.stream(ChatRequest.from_prompt("x")):
            pass
    assert empty.value.retryable and not isinstance(empty.value, StreamInterruptedError)
