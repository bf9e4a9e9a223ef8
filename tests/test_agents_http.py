"""A real tool loop over HTTP: the OpenAI-compatible and Anthropic providers against the local
fake server, which answers with parallel tool calls (OpenAI ``tool_calls``, Anthropic
``tool_use`` blocks)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import anyio
import pytest
from genfan_providers.anthropic import AnthropicBackend
from genfan_providers.openai import OpenAIBackend

from genfan import Backend
from genfan.agents import Agent, tool
from genfan.testserver import FakeLLMServer, TextReply, ToolCallsReply

Factory = Callable[[str, str], Backend]
PROVIDERS = pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda model, url: OpenAIBackend(model, base_url=url, api_key="sk-t"), id="openai"
        ),
        pytest.param(
            lambda model, url: AnthropicBackend(model, base_url=url, api_key="sk-t"), id="anthropic"
        ),
    ],
)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


@PROVIDERS
@pytest.mark.anyio
async def test_parallel_tool_calls_over_http(server: FakeLLMServer, make: Factory) -> None:
    server.reset()
    inside = 0
    all_in = anyio.Event()

    @tool
    async def weather(city: str, unit: str = "celsius") -> dict[str, object]:
        """Current weather.

        Args:
            city: the city.
            unit: celsius or fahrenheit.
        """
        nonlocal inside
        inside += 1
        if inside == 2:
            all_in.set()
        with anyio.fail_after(5):  # both valid calls run at once, or this deadlocks
            await all_in.wait()
        return {"city": city, "temp": len(city)}

    server.script(
        "gpt-test",
        [
            ToolCallsReply(
                [
                    ("weather", {"city": "Oslo"}),
                    ("weather", {"city": "Lima", "unit": "fahrenheit"}),
                    ("weather", {"town": "Nowhere"}),  # bad arguments: the model is told
                ]
            ),
            TextReply("Oslo 4, Lima 4."),
        ],
    )
    async with make("gpt-test", server.url) as backend:
        agent = Agent(backend, tools=[weather], system="Use tools.")
        result = await agent.run("Weather in Oslo and Lima?")

    assert result.text == "Oslo 4, Lima 4." and result.stopped == "final"
    ok1, ok2, bad = result.tool_calls
    assert ok1.value == {"city": "Oslo", "temp": 4} and ok2.ok and not bad.ok
    ids = [c.id for c in result.tool_calls]
    if isinstance(backend, OpenAIBackend):
        assert server.count("/v1/chat/completions") == 2
        first, second = server.bodies("/v1/chat/completions")[-2:]
        (spec,) = first["tools"]
        assert spec["type"] == "function" and spec["function"]["name"] == "weather"
        schema = spec["function"]["parameters"]
        tool_msgs = [m for m in second["messages"] if m["role"] == "tool"]
        assert [m["tool_call_id"] for m in tool_msgs] == ids
        outputs = [m["content"] for m in tool_msgs]
        assistant = next(m for m in second["messages"] if m["role"] == "assistant")
        assert len(assistant["tool_calls"]) == 3
    else:
        assert server.count("/v1/messages") == 2
        first, second = server.bodies("/v1/messages")[-2:]
        (spec,) = first["tools"]
        assert spec["name"] == "weather"
        schema = spec["input_schema"]
        blocks = [
            b for m in second["messages"] if isinstance(m["content"], list) for b in m["content"]
        ]
        uses = [b for b in blocks if b["type"] == "tool_use"]
        results = [b for b in blocks if b["type"] == "tool_result"]
        assert [b["id"] for b in uses] == ids
        assert [b["tool_use_id"] for b in results] == ids
        outputs = [
            b["content"] if isinstance(b["content"], str) else b["content"][0]["text"]
            for b in results
        ]
    assert schema["required"] == ["city"]
    assert schema["properties"]["city"]["description"] == "the city."
    assert outputs[0] == '{"city":"Oslo","temp":4}'
    assert outputs[2].startswith("Error: invalid arguments for tool 'weather'")


@PROVIDERS
@pytest.mark.anyio
async def test_streamed_tool_loop_over_http(server: FakeLLMServer, make: Factory) -> None:
    server.reset()

    @tool
    def add(a: int, b: int) -> int:
        """Add."""
        return a + b

    server.script(
        "gpt-stream",
        [
            ToolCallsReply([("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]),
            TextReply("3 and 7"),
        ],
    )
    async with make("gpt-stream", server.url) as backend:
        agent = Agent(backend, tools=[add])
        kinds: list[str] = []
        text = ""
        async with agent.run_stream("add things") as events:
            async for event in events:
                kinds.append(event.type)
                if event.type == "text_delta":
                    text += event.text
        assert events.result is not None
        assert [r.value for r in events.result.tool_calls] == [3, 7]
    assert text == "3 and 7"
    assert kinds.count("tool_finished") == 2 and kinds[-1] == "final"
