"""A tool loop: the model asks for several tools in one turn, genfan runs them at once.

Each tool keeps its own guards (timeout, retries, bulkhead); a failing or badly-called tool
does not crash the run, the model reads the error and carries on. Events stream as they happen.

Runs offline: the "model" is a scripted function backend. Swap in a real one with tool support,
e.g. ``create_backend("openai:gpt-4o-mini")``.
"""

from __future__ import annotations

import json
from enum import StrEnum

import anyio

from genfan import ChatRequest, Completion, ToolCall
from genfan.agents import Agent, tool
from genfan.testing import FunctionBackend


class Unit(StrEnum):
    celsius = "celsius"
    fahrenheit = "fahrenheit"


@tool(timeout=2.0, retry=3, max_concurrency=8)
async def get_weather(city: str, unit: Unit = Unit.celsius) -> dict[str, object]:
    """Current weather in a city.

    Args:
        city: the city's name.
        unit: the temperature unit.
    """
    await anyio.sleep(0.2)  # a slow API
    temps = {"Oslo": 4, "Lima": 19, "Cairo": 31}
    if city not in temps:
        raise LookupError(f"unknown city {city!r}")
    return {"city": city, "temp": temps[city], "unit": unit.value}


def model(request: ChatRequest) -> Completion:
    """A scripted model: first asks for four tool calls at once, then answers from the results."""
    results = [m for m in request.messages if m.role == "tool"]
    if not results:
        cities = ["Oslo", "Lima", "Cairo", "Atlantis"]
        calls = tuple(
            ToolCall(id=f"call_{c}", name="get_weather", arguments=json.dumps({"city": c}))
            for c in cities
        )
        return Completion(tool_calls=calls, finish_reason="tool_calls")
    lines = []
    for m in results:
        content = m.content or ""
        if content.startswith("Error:"):
            lines.append(f"(one lookup failed: {content[len('Error: ') :]})")
        else:
            data = json.loads(content)
            lines.append(f"{data['city']} {data['temp']}°")
    return Completion(text="; ".join(lines))


async def main() -> None:
    agent = Agent(FunctionBackend(model, name="scripted"), tools=[get_weather], max_steps=4)
    async with agent.run_stream("What's the weather in Oslo, Lima, Cairo and Atlantis?") as events:
        async for event in events:
            if event.type == "tool_started":
                print(f"started  {event.call.name}({event.call.arguments})")
            elif event.type in ("tool_finished", "tool_failed"):
                r = event.record
                print(f"{event.type[5:]:8} {r.call.arguments} -> {r.output}")
            elif event.type == "final":
                result = event.result
                turn = result.steps[0]
                total = sum(r.elapsed for r in turn.tool_calls)
                print(
                    f"turn 1: {len(turn.tool_calls)} tool calls in {turn.elapsed:.2f}s "
                    f"(their own times add up to {total:.2f}s)"
                )
                print(f"answer: {result.text}")


if __name__ == "__main__":
    anyio.run(main)
