"""A real tool loop over HTTP: the OpenAI-compatible provider against the local fake server,
which answers with parallel tool calls."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

from genfan.agents import Agent, tool
from genfan.testserver import FakeLLMServer, TextReply, ToolCallsReply
from providers.openai import OpenAIBackend


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


@pytest.mark.anyio
async def test_parallel_tool_calls_over_http(server: FakeLLMServer) -> None:
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
    async with OpenAIBackend("gpt-test", base_url=server.url, api_key="sk-test") as backend:
        agent = Agent(backend, tools=[weather], system="Use tools.")
        result = await agent.run("Weather in Oslo and Lima?")

    assert result.text == "Oslo 4, Lima 4." and result.stopped == "final"
    ok1, ok2, bad = result.tool_calls
    assert ok1.value == {"city": "Oslo", "temp": 4} and ok2.ok and not bad.ok
    assert server.count("/v1/chat/completions") == 2

    first, second = server.bodies("/v1/chat/completions")[-2:]
    (spec,) = first["tools"]
    assert spec["type"] == "function" and spec["function"]["name"] == "weather"
    assert spec["function"]["parameters"]["required"] == ["city"]
    assert spec["function"]["parameters"]["properties"]["city"]["description"] == "the city."
    tool_msgs = [m for m in second["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_msgs] == [c.id for c in result.tool_calls]
    assert tool_msgs[0]["content"] == '{"city":"Oslo","temp":4}'
    assert tool_msgs[2]["content"].startswith("Error: invalid arguments for tool 'weather'")
    assistant = next(m for m in second["messages"] if m["role"] == "assistant")
    assert len(assistant["tool_calls"]) == 3


@pytest.mark.anyio
async def test_streamed_tool_loop_over_http(server: FakeLLMServer) -> None:
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
    async with OpenAIBackend("gpt-stream", base_url=server.url, api_key="sk-test") as backend:
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
