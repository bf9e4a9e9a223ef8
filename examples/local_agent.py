"""An agent on the local model: it calls a tool, reads the result, then answers.

Runs offline on the embedded SmolLM2-135M-Instruct through the in-process vLLM engine (the
model ``make demo`` uses; ``genfan local prepare`` converts it once). A 135M model rarely asks
for a tool on its own, so the first turn is forced with ``tool_choice="required"``: the engine
then constrains its output to a valid call of one of the tools (structured output). The next
turns are asked with ``"auto"``, so the model answers once it has the tool's result.

Run: ``.venv/bin/python examples/local_agent.py``.
"""

from __future__ import annotations

import anyio

from genfan.agents import Agent, tool


@tool(timeout=2.0)
async def get_weather(city: str) -> dict[str, object]:
    """Current weather in a city.

    Args:
        city: the city's name.
    """
    return {"city": city, "temp": 21, "sky": "sunny"}


async def main() -> None:
    # The local engine (genfan-providers); vLLM itself loads when the engine starts.
    from genfan_providers.vllm import VLLMBackend, prepare_default_model

    prepare_default_model(progress=False)  # instant once the model is prepared
    async with VLLMBackend(temperature=0.0, max_tokens=120, name="local") as model:
        agent = Agent(model, tools=[get_weather], tool_choice="required", max_steps=3)
        result = await agent.run("What is the weather in Paris? Use the get_weather tool.")
    for step in result.steps:
        for call in step.tool_calls:
            print(f"step {step.index}: {call.name}({call.call.arguments}) -> {call.output}")
    print(f"answer ({len(result.steps)} model calls): {result.text.strip()}")


if __name__ == "__main__":
    anyio.run(main)
