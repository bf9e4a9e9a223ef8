"""Prompt caching: Anthropic ``cache_control`` passed through, cache reads and writes parsed and
priced, the fake server billing them, and the cache-aware fan-out (``prompt_cache="warm-first"``)
that lets one call write a shared prefix before the others read it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from genfan_providers.anthropic import AnthropicBackend
from pydantic import ValidationError

from genfan import (
    BackendConnectionError,
    ChatRequest,
    Completion,
    ConfigurationError,
    FanOut,
    Message,
    StreamEvent,
    Target,
)
from genfan.cost import lookup_price
from genfan.testserver import FakeLLMServer

pytestmark = pytest.mark.anyio

MODEL = "claude-3-5-haiku-latest"
PREFIX = " ".join(f"w{i}" for i in range(2000))  # 2,000 tokens (the fake server counts words)


def cached_request(question: str = "Summarize.", ttl: str = "5m") -> ChatRequest:
    return ChatRequest(
        messages=(
            Message.system(PREFIX, cache_control=ttl),  # type: ignore[arg-type]
            Message.user(question),
        ),
        max_tokens=50,
    )


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture
def srv(server: FakeLLMServer) -> FakeLLMServer:
    server.reset()
    server.cache_ttl = 300.0
    # Calls started together all reach the server within this (they all write the cache).
    server.latency = 0.1
    return server


@pytest.fixture
async def claude(srv: FakeLLMServer) -> AsyncIterator[AnthropicBackend]:
    async with AnthropicBackend(MODEL, base_url=srv.url, api_key="k") as b:
        await b.warm()  # its HTTP client is ready before the first fan-out
        yield b


# -- the request shape -------------------------------------------------------------------------


def test_cache_control_marks_system_and_message_blocks() -> None:
    b = AnthropicBackend(MODEL, base_url="http://127.0.0.1:9/v1", api_key="k")
    request = ChatRequest(
        messages=(
            Message.system("You are terse."),
            Message.system("A long document.", cache_control="1h"),
            Message.user("Earlier question", cache_control="5m"),
            Message.assistant("Earlier answer"),
            Message.user("Now this?"),
        )
    )
    body = b.build_body(request)
    assert body["system"] == [
        {"type": "text", "text": "You are terse."},
        {
            "type": "text",
            "text": "A long document.",
            "cache_control": {"type": "ephemeral", "ttl": "1h"},
        },
    ]
    assert body["messages"][0] == {
        "role": "user",
        "content": [
            {"type": "text", "text": "Earlier question", "cache_control": {"type": "ephemeral"}}
        ],
    }
    assert body["messages"][2] == {"role": "user", "content": "Now this?"}
    # without a mark, the body is as before: one system string
    plain = b.build_body(ChatRequest.from_prompt("q", system="s"))
    assert plain["system"] == "s"


def test_cache_control_takes_only_the_providers_ttls() -> None:
    with pytest.raises(ValidationError, match="cache_control"):
        Message(role="user", content="x", cache_control="forever")  # type: ignore[arg-type]


# -- the fake server bills the cache -----------------------------------------------------------


async def test_a_marked_prefix_is_written_once_then_read(
    srv: FakeLLMServer, claude: AnthropicBackend
) -> None:
    first = await claude.complete(cached_request())
    second = await claude.complete(cached_request("Another question."))
    assert (first.usage.cache_write_tokens, first.usage.cache_read_tokens) == (2000, 0)
    assert (second.usage.cache_write_tokens, second.usage.cache_read_tokens) == (0, 2000)
    # input_tokens counts every prompt token, the cached ones included
    assert first.usage.input_tokens == 2001 and second.usage.input_tokens == 2002
    price = lookup_price(MODEL, provider="anthropic")
    assert price is not None and price.cache_read is not None and price.cache_write is not None
    assert first.usage.cost == pytest.approx(price.cost(first.usage))
    assert second.usage.cost is not None and first.usage.cost is not None
    assert second.usage.cost < first.usage.cost / 5  # a read is a tenth of a write's price
    assert (srv.cache_write_tokens, srv.cache_read_tokens) == (2000, 2000)


async def test_streams_report_the_cache_too(srv: FakeLLMServer, claude: AnthropicBackend) -> None:
    await claude.complete(cached_request())
    events = [e async for e in claude.stream(cached_request())]
    end = events[-1]
    assert end.type == "end"
    assert end.completion.usage.cache_read_tokens == 2000  # type: ignore[union-attr]


async def test_no_mark_no_cache_and_another_prefix_is_written_again(
    srv: FakeLLMServer, claude: AnthropicBackend
) -> None:
    plain = await claude.complete(ChatRequest.from_prompt("q", system=PREFIX, max_tokens=5))
    assert (plain.usage.cache_write_tokens, plain.usage.cache_read_tokens) == (0, 0)
    assert "cache_creation_input_tokens" not in str(srv.last_body())
    await claude.complete(cached_request())
    other = ChatRequest(
        messages=(Message.system(PREFIX + " more", cache_control="5m"), Message.user("q"))
    )
    c = await claude.complete(other)
    assert c.usage.cache_write_tokens == 2001 and c.usage.cache_read_tokens == 0


async def test_the_cache_expires_after_its_ttl(
    srv: FakeLLMServer, claude: AnthropicBackend
) -> None:
    import anyio

    srv.cache_ttl = 0.05
    await claude.complete(cached_request())
    await anyio.sleep(0.2)  # past the TTL (a wait, not a timing assertion)
    again = await claude.complete(cached_request())
    assert again.usage.cache_write_tokens == 2000
    # the 1h TTL of cache_control outlives the server's default
    await claude.complete(cached_request(ttl="1h"))
    await anyio.sleep(0.2)
    kept = await claude.complete(cached_request(ttl="1h"))
    assert kept.usage.cache_read_tokens == 2000


# -- the cache-aware fan-out -------------------------------------------------------------------


def five(claude: AnthropicBackend) -> list[Target]:
    return [Target(backend=claude, name=f"t{i}", temperature=i / 10) for i in range(5)]


async def test_a_plain_fanout_pays_the_cache_write_five_times(
    srv: FakeLLMServer, claude: AnthropicBackend
) -> None:
    result = await FanOut(five(claude)).run(cached_request())
    assert [c.completion.usage.cache_write_tokens for c in result.candidates if c.completion] == [
        2000
    ] * 5
    assert result.usage.cache_read_tokens == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_warm_first_writes_once_and_the_others_read(
    srv: FakeLLMServer, claude: AnthropicBackend, stream: bool
) -> None:
    fan = FanOut(five(claude), prompt_cache="warm-first")
    if stream:
        async with fan.run_stream(cached_request()) as events:
            async for _ in events:
                pass
        result = events.result
        assert result is not None
    else:
        result = await fan.run(cached_request())
    usages = [c.completion.usage for c in result.candidates if c.completion]
    assert [u.cache_write_tokens for u in usages] == [2000, 0, 0, 0, 0]
    assert [u.cache_read_tokens for u in usages] == [0, 2000, 2000, 2000, 2000]
    # the others started once the first had its answer (its first token, when streaming)
    first = result.candidates[0]
    assert all(c.started >= first.started for c in result.candidates[1:])
    # and it is cheaper than every call writing the cache
    srv.reset()
    plain = await FanOut(five(claude)).run(cached_request())
    assert result.cost is not None and plain.cost is not None
    assert result.cost < plain.cost / 2


class Broken:
    """A wrapper around a backend (like a guard) whose calls fail: the cache is never written."""

    def __init__(self, inner: AnthropicBackend) -> None:
        self.inner = inner
        self.name = "broken"

    async def complete(self, request: ChatRequest) -> Completion:
        raise BackendConnectionError("down", backend=self.name)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        raise BackendConnectionError("down", backend=self.name)
        yield  # pragma: no cover

    async def aclose(self) -> None:
        pass


async def test_when_the_first_call_fails_the_others_still_run(
    srv: FakeLLMServer, claude: AnthropicBackend
) -> None:
    targets = [Target(backend=Broken(claude), name="first"), *five(claude)[:3]]  # type: ignore[arg-type]
    result = await FanOut(targets, prompt_cache="warm-first").run(cached_request())
    assert [c.status for c in result.candidates] == ["failed", "ok", "ok", "ok"]


def test_prompt_cache_takes_one_value() -> None:
    claude = AnthropicBackend(MODEL, base_url="http://127.0.0.1:9/v1", api_key="k")
    with pytest.raises(ConfigurationError, match="prompt_cache must be None or 'warm-first'"):
        FanOut([claude], prompt_cache="always")  # type: ignore[arg-type]
