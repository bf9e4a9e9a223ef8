"""Typed results: ``output_type=`` on fan-outs, agents and LLM steps, across providers."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field

from genfan import (
    AllBackendsFailedError,
    CandidateFinished,
    ChatRequest,
    ConfigurationError,
    FanOut,
    FanOutFinished,
    NoAnswerError,
    OutputValidationError,
    ResponseFormat,
    Target,
    ToolCall,
)
from genfan.agents import Agent, Chain, LLMCall, tool
from genfan.cli._ask import result_to_json
from genfan.select import MajorityVote
from genfan.testing import FakeBackend, FunctionBackend, Reply
from genfan.testserver import FakeLLMServer, TextReply

pytestmark = pytest.mark.anyio


class Place(BaseModel):
    city: str
    country: str | None = None


class City(BaseModel):
    name: str
    population: int = Field(ge=0)
    place: Place | None = None
    tags: list[str] = []


OSLO = '{"name": "Oslo", "population": 709000, "place": null, "tags": []}'
OSLO_FENCED = f"Here it is:\n```json\n{OSLO}\n```"
BAD_POPULATION = '{"name": "Oslo", "population": "many"}'
PROSE = "Oslo is the capital of Norway."


class Opaque:
    """No schema, no validator: not an output type."""


# -- the response format ---------------------------------------------------------------------------


def test_the_response_format_is_strict_where_the_type_allows_it() -> None:
    fmt = ResponseFormat.from_type(City)
    assert fmt.type == "json_schema" and fmt.name == "City" and fmt.strict
    schema = fmt.json_schema
    assert schema is not None
    # every object closed, every property required, no defaults (OpenAI's strict mode)
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["name", "population", "place", "tags"]
    assert "default" not in json.dumps(schema)
    assert schema["$defs"]["Place"]["additionalProperties"] is False
    assert schema["$defs"]["Place"]["required"] == ["city", "country"]

    # non-object types are wrapped: providers ask for an object at the root
    wrapped = ResponseFormat.from_type(list[City])
    assert wrapped.name == "list_City" and wrapped.strict
    assert wrapped.json_schema is not None
    assert wrapped.json_schema["required"] == ["response"]
    assert wrapped.json_schema["properties"]["response"]["type"] == "array"

    # an open object (a dict field) cannot be strict: sent as it is
    class Scores(BaseModel):
        by_name: dict[str, int]

    loose = ResponseFormat.from_type(Scores)
    assert not loose.strict and loose.json_schema == Scores.model_json_schema()
    assert ResponseFormat.from_type(str).type == "text"
    with pytest.raises(ConfigurationError, match="not a type pydantic can validate"):
        FanOut([FakeBackend()], output_type=Opaque)


def test_output_validation_errors_say_what_failed_and_pickle() -> None:
    fan: FanOut[City] = FanOut([FakeBackend()], output_type=City)
    assert fan.output_spec is not None
    from genfan import Completion

    with pytest.raises(OutputValidationError) as info:
        fan.output_spec.validate(Completion(text=BAD_POPULATION, backend="b"))
    err = info.value
    assert err.backend == "b" and err.output_type == "City" and err.retryable
    assert "population: Input should be a valid integer" in err.message and "'many'" in str(err)
    assert [e["loc"] for e in err.errors] == [("population",)]
    again = pickle.loads(pickle.dumps(err))
    assert again.errors == err.errors and again.text == BAD_POPULATION
    with pytest.raises(OutputValidationError, match="no JSON found"):
        fan.output_spec.validate(Completion(text=PROSE))


# -- fan-outs -------------------------------------------------------------------------------------


async def test_fanout_validates_every_candidate_and_exposes_the_chosen_output() -> None:
    fast_prose = FakeBackend("prose", [PROSE], latency=0.01)
    bad = FakeBackend("bad", [BAD_POPULATION], latency=0.02)
    good = FakeBackend("good", [OSLO_FENCED], latency=0.03)
    async with FanOut([fast_prose, bad, good], output_type=City) as fan:
        result = await fan.run("Describe Oslo.")

    assert isinstance(result.output, City) and result.output.name == "Oslo"
    assert result.chosen is not None and result.chosen.backend == "good"
    assert [c.status for c in result.candidates] == ["failed", "failed", "ok"]
    invalid = result.candidates[1]
    assert isinstance(invalid.error, OutputValidationError)
    assert "population" in invalid.error.message
    assert invalid.completion is not None and invalid.completion.text == BAD_POPULATION
    assert result.usage.output_tokens == sum(
        len(t.split()) for t in (PROSE, BAD_POPULATION, OSLO_FENCED)
    )  # failed answers' tokens still count
    # every backend was asked for the type's JSON schema
    for backend in (fast_prose, bad, good):
        fmt = backend.calls[0].response_format
        assert fmt is not None and fmt.name == "City" and fmt.strict
    assert result.dump_output() == json.loads(OSLO)
    assert result_to_json(result)["output"] == json.loads(OSLO)


async def test_first_mode_waits_for_the_first_valid_answer() -> None:
    fan = FanOut(
        [
            FakeBackend("quick-but-wrong", [PROSE], latency=0.01),
            FakeBackend("right", [OSLO], latency=0.05),
            FakeBackend("slow", [OSLO], latency=5),
        ],
        mode="first",
        output_type=City,
    )
    result = await fan.run("Describe Oslo.")
    assert result.chosen is not None and result.chosen.backend == "right"
    assert [c.status for c in result.candidates] == ["failed", "ok", "cancelled"]
    completion = await fan.complete(ChatRequest.from_prompt("again"))
    assert City.model_validate_json(completion.text).name == "Oslo"


async def test_output_type_per_call_any_type_adapter_type_and_votes() -> None:
    fan = FanOut(
        [
            FakeBackend("a", ['{"response": [3, 1, 2]}']),
            FakeBackend("b", ["[3, 1, 2]"]),
            FakeBackend("c", ['{"response": ["x"]}']),
        ]
    )
    plain = await fan.run("numbers")
    assert plain.output == plain.text  # no output type: the chosen text
    typed = await fan.run("numbers", output_type=list[int])
    assert typed.output == [3, 1, 2]
    assert dict(typed.outputs) == {0: [3, 1, 2], 1: [3, 1, 2]}
    assert typed.candidates[2].status == "failed"
    assert typed.request.response_format is not None
    assert typed.request.response_format.name == "list_int"

    verdict = await FanOut(
        [FakeBackend(n, [json.dumps({"response": v})]) for n, v in [("a", "no"), ("b", "yes")]]
    ).run("ok?", output_type=Literal["yes", "no"])
    assert verdict.output in ("yes", "no")

    # output_type and a vote's early exit work together: the invalid answer never counts
    votes = FanOut(
        [
            FakeBackend("x", ['{"response": 7}'], latency=0.01),
            FakeBackend("y", ["seven"], latency=0.02),
            FakeBackend("z", ['{"response": 7}'], latency=0.03),
            FakeBackend("w", ['{"response": 7}'], latency=5),
        ],
        mode="quorum",
        quorum=2,
        agree=lambda c: c.text.replace(" ", ""),
        select=MajorityVote().selector(),
        output_type=int,
    )
    voted = await votes.run("7?")
    assert voted.output == 7 and voted.quorum_met
    assert [c.status for c in voted.candidates] == ["ok", "failed", "ok", "cancelled"]


async def test_every_answer_invalid_fails_typed() -> None:
    fan = FanOut([FakeBackend("a", [PROSE]), FakeBackend("b", [BAD_POPULATION])], output_type=City)
    with pytest.raises(AllBackendsFailedError) as info:
        await fan.run("Describe Oslo.")
    assert all(isinstance(e, OutputValidationError) for e in info.value.exceptions)
    with pytest.raises(NoAnswerError):
        await fan.complete(ChatRequest.from_prompt("Describe Oslo."))


async def test_streaming_with_an_output_type_validates_each_stream_at_its_end() -> None:
    fan = FanOut(
        [
            FakeBackend("prose", [Reply(text=PROSE, ttft=0.01, latency=0.05)]),
            FakeBackend("json", [Reply(text=OSLO, ttft=0.02, latency=0.08)]),
        ],
        output_type=City,
    )
    async with fan.run_stream("Describe Oslo.") as events:
        seen = [e async for e in events]
    ends = {e.backend: e.candidate for e in seen if isinstance(e, CandidateFinished)}
    assert isinstance(ends["prose"].error, OutputValidationError)
    assert ends["json"].ok
    final = seen[-1]
    assert isinstance(final, FanOutFinished) and final.result.output == City.model_validate_json(
        OSLO
    )
    assert events.result is not None and events.result.output.name == "Oslo"


def test_typed_run_from_sync_code() -> None:
    fan = FanOut([FakeBackend("a", [OSLO])], output_type=City)
    assert fan.run_sync("Describe Oslo.").output.population == 709000
    assert fan.run_sync("n", output_type=dict[str, Any]).output["name"] == "Oslo"


# -- agents and chains ------------------------------------------------------------------------------


async def test_agent_output_type_retries_an_invalid_answer_with_what_was_wrong() -> None:
    backend = FakeBackend("m", [BAD_POPULATION, OSLO])
    agent = Agent(backend, output_type=City)
    result = await agent.run("Describe Oslo.")
    assert isinstance(result.output, City) and result.output.population == 709000
    assert len(result.steps) == 2
    retry = backend.calls[1].messages[-1]
    assert retry.role == "user" and "population: Input should be a valid integer" in (
        retry.content or ""
    )
    assert backend.calls[0].response_format == ResponseFormat.from_type(City)

    stubborn = Agent(FakeBackend("m", [PROSE]), output_type=City, output_retries=1)
    with pytest.raises(OutputValidationError, match="no JSON found"):
        await stubborn.run("Describe Oslo.")
    no_retry = Agent(FakeBackend("m", [PROSE, OSLO]), output_type=City, output_retries=0)
    with pytest.raises(OutputValidationError):
        await no_retry.run("Describe Oslo.")
    with pytest.raises(ConfigurationError, match="output_retries"):
        Agent(FakeBackend(), output_retries=-1)

    # run(output_type=) overrides per run; without a type the output is the text
    plain = await Agent(FakeBackend("m", ["hello"])).run("hi")
    assert plain.output == "hello"
    per_run = await Agent(FakeBackend("m", ["[1, 2]"])).run("hi", output_type=list[int])
    assert per_run.output == [1, 2]


async def test_agent_with_tools_and_output_type_over_a_fanout() -> None:
    @tool
    async def population(city: str) -> int:
        """Look a population up."""
        return 709000

    call = ToolCall(id="c1", name="population", arguments='{"city": "Oslo"}')
    models = [
        FakeBackend("careless", [Reply(tool_calls=(call,)), PROSE], latency=0.01),
        FakeBackend("careful", [Reply(tool_calls=(call,)), OSLO], latency=0.02),
    ]
    fan = FanOut(models, mode="all")  # the agent's type reaches the fan-out's candidates
    agent = Agent(fan, tools=[population], output_type=City)
    async with agent.run_stream("Describe Oslo.") as events:
        async for _ in events:
            pass
    assert events.result is not None
    assert events.result.output == City.model_validate_json(OSLO)
    # not streamed: the fan-out validated every candidate and chose the valid one
    result = await Agent(
        FanOut(
            [
                FakeBackend("a", [Reply(tool_calls=(call,)), PROSE], latency=0.01),
                FakeBackend("b", [Reply(tool_calls=(call,)), OSLO], latency=0.02),
            ]
        ),
        tools=[population],
        output_type=City,
        output_retries=0,
    ).run("Describe Oslo.")
    assert result.output.name == "Oslo" and [c.name for c in result.tool_calls] == ["population"]
    assert result.steps[-1].completion.backend == "b"


async def test_chain_llm_steps_take_any_output_type() -> None:
    class Facts(BaseModel):
        people: list[str]

    def answer(request: ChatRequest) -> str:
        fmt = request.response_format
        assert fmt is not None and fmt.type == "json_schema"
        if fmt.name == "Facts":
            return '```json\n{"people": ["Kim"]}\n```'
        return '{"response": ["LLMCompiler", "ReAct"]}'

    llm = FunctionBackend(answer, name="llm")
    chain = Chain("typed")
    doc = chain.input("doc", str)
    facts = chain.llm("facts", llm, "Facts in {doc}", doc=doc, response_model=Facts)
    names = chain.step("names", LLMCall(llm, "Names in {doc}", output_type=list[str]), doc=doc)
    result = await chain.run(doc="the paper")
    assert result[facts] == Facts(people=["Kim"])
    assert result["names"] == ["LLMCompiler", "ReAct"] and names.name == "names"
    with pytest.raises(ConfigurationError, match="not both"):
        LLMCall(llm, "x", response_model=Facts, output_type=Facts)

    # an invalid answer fails the step with the typed error
    broken = Chain("broken")
    broken.step("n", LLMCall(FunctionBackend(lambda r: "nope", name="m"), "x", output_type=int))
    with pytest.raises(Exception) as info:
        await broken.run()
    assert info.group_contains(OutputValidationError)  # type: ignore[attr-defined]


# -- across providers, over real HTTP -------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


async def test_typed_fanout_across_openai_and_anthropic(server: FakeLLMServer) -> None:
    from genfan_providers.anthropic import AnthropicBackend
    from genfan_providers.openai import OpenAIBackend

    server.reset()
    server.set_handler(
        lambda path, body: TextReply(OSLO if body.get("model") != "gpt-bad" else PROSE)
    )
    try:
        async with (
            OpenAIBackend("gpt-x", base_url=server.url, api_key="sk-local") as gpt,
            OpenAIBackend("gpt-bad", base_url=server.url, api_key="sk-local") as bad,
            AnthropicBackend("claude-x", base_url=server.url, api_key="sk-ant-local") as claude,
        ):
            fan = FanOut([Target(backend=gpt), bad, claude], output_type=City)
            result = await fan.run("Describe Oslo.")
            assert [c.status for c in result.candidates] == ["ok", "failed", "ok"]
            assert result.outputs[0] == result.outputs[2] == City.model_validate_json(OSLO)
            assert result.output.name == "Oslo"

            bodies = server.bodies()
            oai = next(b for b in bodies if b.get("model") == "gpt-x")
            assert oai["response_format"]["type"] == "json_schema"
            assert oai["response_format"]["json_schema"]["name"] == "City"
            assert oai["response_format"]["json_schema"]["strict"] is True
            assert oai["response_format"]["json_schema"]["schema"]["additionalProperties"] is False
            ant = next(b for b in bodies if b.get("model") == "claude-x")
            assert ant["tool_choice"] == {"type": "tool", "name": "json_response"}
            assert ant["tools"][0]["input_schema"]["required"] == [
                "name",
                "population",
                "place",
                "tags",
            ]

            # streamed over HTTP too
            async with fan.run_stream("Describe Oslo.") as events:
                async for _ in events:
                    pass
            assert events.result is not None and events.result.output.population == 709000
    finally:
        server.reset()
