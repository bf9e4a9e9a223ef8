"""Tool calls on the in-process vLLM backend, without starting the engine.

The schema that forces tool calls is compared with vLLM's own; vLLM's tool parsers run
in-process on text; complete() and stream() are driven by scripted engine outputs. The runs on
the real engine are in test_local_engine.py (marked ``engine``).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
from genfan_providers.vllm import EngineRequestError
from genfan_providers.vllm._tools import (
    _extract_tool_calls,
    _parse_forced_tool_calls,
    _template_messages,
    _tool_call_schema,
)

from genfan import (
    ChatRequest,
    Completion,
    ConfigurationError,
    MalformedResponseError,
    Message,
    ResponseFormat,
    StreamEnd,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    merge_tool_call_deltas,
)

CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")

WEATHER = ToolSpec(
    name="get_weather",
    description="Current weather in a city.",
    parameters={
        "$defs": {"Unit": {"enum": ["celsius", "fahrenheit"], "type": "string"}},
        "additionalProperties": False,
        "properties": {
            "city": {"type": "string"},
            "unit": {"$ref": "#/$defs/Unit", "default": "celsius"},
        },
        "required": ["city"],
        "type": "object",
    },
)
TIME = ToolSpec(
    name="get_time",
    parameters={"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
)
PING = ToolSpec(name="ping", parameters={})  # no parameters at all
TOOLS = (WEATHER, TIME, PING)


def _weather_request(**fields: Any) -> ChatRequest:
    return ChatRequest.from_prompt("What is the weather in Paris?", tools=TOOLS, **fields)


# -- the schema that forces tool calls ------------------------------------------------------


def test_required_schema_is_vllms_own() -> None:
    """The same schema vLLM's server builds for tool_choice="required" and for a named tool."""
    pytest.importorskip("vllm.tool_parsers")
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionNamedToolChoiceParam,
        ChatCompletionToolsParam,
    )
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    def theirs() -> list[Any]:  # fresh each time: vLLM pops "$defs" out of the tools it reads
        return [
            ChatCompletionToolsParam(
                type="function",
                function={"name": t.name, "description": t.description, "parameters": t.parameters},
            )
            for t in TOOLS
        ]

    assert _tool_call_schema(TOOLS, "required") == get_json_schema_from_tools("required", theirs())
    named = ChatCompletionNamedToolChoiceParam(type="function", function={"name": "get_weather"})
    assert _tool_call_schema(TOOLS, "get_weather") == get_json_schema_from_tools(named, theirs())
    ping = ChatCompletionNamedToolChoiceParam(type="function", function={"name": "ping"})
    assert _tool_call_schema(TOOLS, "ping") == get_json_schema_from_tools(ping, theirs())


def test_required_schema_accepts_tool_calls_and_nothing_else() -> None:
    schema = _tool_call_schema(TOOLS, "required")
    ok = [
        {"name": "get_weather", "parameters": {"city": "Paris", "unit": "fahrenheit"}},
        {"name": "get_time", "parameters": {"zone": "UTC"}},
        {"name": "ping", "parameters": {}},
    ]
    jsonschema.validate(ok, schema)
    refused = [
        [],  # at least one call
        {"name": "ping", "parameters": {}},  # an array, not one object
        [{"name": "send_email", "parameters": {}}],  # not a tool
        [{"name": "get_weather", "parameters": {}}],  # city is required
        [{"name": "get_weather", "parameters": {"city": "Paris", "unit": "kelvin"}}],  # $defs enum
        [{"name": "get_time", "parameters": {"zone": 3}}],
        [{"name": "get_time"}],  # parameters are required
    ]
    for value in refused:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(value, schema)
    # The $defs moved to the top for the schema only; the tool keeps its own.
    assert "$defs" in WEATHER.parameters
    assert schema["$defs"] == WEATHER.parameters["$defs"]


def test_named_tool_schema_is_that_tools_parameters() -> None:
    assert _tool_call_schema(TOOLS, "get_time") == TIME.parameters
    assert _tool_call_schema(TOOLS, "ping") == {"type": "object", "properties": {}}
    with pytest.raises(ValueError, match=r"'send_email'.*get_weather, get_time, ping"):
        _tool_call_schema(TOOLS, "send_email")


def test_tools_that_define_the_same_def_differently_are_refused() -> None:
    other = ToolSpec(
        name="convert",
        parameters={
            "$defs": {"Unit": {"enum": ["kelvin"], "type": "string"}},
            "type": "object",
            "properties": {"unit": {"$ref": "#/$defs/Unit"}},
        },
    )
    with pytest.raises(ValueError, match=r"\$defs/Unit"):
        _tool_call_schema((WEATHER, other), "required")
    same = other.model_copy(update={"parameters": WEATHER.parameters, "name": "again"})
    assert _tool_call_schema((WEATHER, same), "required")["$defs"] == WEATHER.parameters["$defs"]


# -- reading forced tool calls --------------------------------------------------------------


def test_a_required_answer_becomes_tool_calls() -> None:
    text = (
        '[{"name": "get_weather", "parameters": {"city": "Paris"}},\n'
        ' {"name": "ping", "parameters": {}}]'
    )
    calls = _parse_forced_tool_calls(text, "required", {"get_weather", "ping"})
    assert [c.name for c in calls] == ["get_weather", "ping"]
    assert calls[0].parsed_arguments() == {"city": "Paris"}
    assert calls[1].parsed_arguments() == {}
    assert all(CALL_ID.match(c.id) for c in calls)
    assert calls[0].id != calls[1].id


def test_a_named_tool_answer_is_the_arguments() -> None:
    (call,) = _parse_forced_tool_calls(' {"zone": "UTC"}\n', "get_time", {"get_time"})
    assert call.name == "get_time"
    assert call.arguments == '{"zone": "UTC"}'
    assert CALL_ID.match(call.id)


@pytest.mark.parametrize(
    ("text", "choice"),
    [
        ('[{"name": "get_weather", "parameters": {"ci', "required"),  # cut short
        ("[]", "required"),
        ('{"name": "get_weather", "parameters": {}}', "required"),  # not an array
        ('[{"name": "send_email", "parameters": {}}]', "required"),  # not a tool
        ('[{"name": "get_weather", "parameters": [1]}]', "required"),
        ('["get_weather"]', "required"),
        ('["UTC"]', "get_time"),
        ("", "get_time"),
    ],
)
def test_a_forced_answer_that_is_not_a_tool_call_is_refused(text: str, choice: str) -> None:
    with pytest.raises(ValueError):
        _parse_forced_tool_calls(text, choice, {"get_weather", "get_time"})


# -- what the chat template sees ------------------------------------------------------------


def test_the_template_sees_tool_calls_with_dict_arguments_and_tool_results() -> None:
    request = ChatRequest(
        messages=(
            Message.user("Weather in Paris?"),
            Message.assistant(
                None,
                (
                    ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}'),
                    ToolCall(id="call_2", name="ping", arguments="not json"),
                ),
            ),
            Message.tool('{"temp": 21}', tool_call_id="call_1", name="get_weather"),
        )
    )
    user, assistant, tool = _template_messages(request)
    assert user == {"role": "user", "content": "Weather in Paris?"}
    assert assistant["content"] == ""  # templates concatenate content: never None
    assert assistant["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
        },
        # vLLM coerces unreadable arguments in the history to {} rather than failing the turn
        {"id": "call_2", "type": "function", "function": {"name": "ping", "arguments": {}}},
    ]
    assert tool == {
        "role": "tool",
        "content": '{"temp": 21}',
        "tool_call_id": "call_1",
        "name": "get_weather",
    }


# -- vLLM's tool parsers, in-process ----------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_parsers() -> None:
    """vLLM imported up front (so the backend does not set the engine's environment here)."""
    pytest.importorskip("vllm.tool_parsers")


class _Tokenizer:
    """Enough of a tokenizer for the hermes parser and for the chat template call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def get_vocab(self) -> dict[str, int]:
        return {}

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        self.calls.append({"messages": messages, **kwargs})
        return [1, 2, 3]


def _shared(tokenizer: _Tokenizer | None = None) -> Any:
    return SimpleNamespace(tokenizer=tokenizer or _Tokenizer(), max_model_len=2048, is_cpu=True)


def _backend(**options: Any) -> Any:
    from genfan_providers.vllm import VLLMBackend

    return VLLMBackend("scripted-model", name="scripted", **options)


@pytest.mark.usefixtures("vllm_parsers")
def test_hermes_reads_tool_calls_out_of_the_text() -> None:
    backend = _backend(tool_parser="hermes")
    plan = backend._tool_plan(_shared(), _weather_request())
    text = (
        "Let me check.\n"
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'
    )
    content, calls = _extract_tool_calls(plan.new_parser(), text, plan.parser_request)
    assert content == "Let me check.\n"
    assert [(c.name, c.parsed_arguments()) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "CET"}),
    ]
    assert all(CALL_ID.match(c.id) for c in calls)
    assert plan.skip_special_tokens is False  # <tool_call> is a special token in some models
    content, calls = _extract_tool_calls(plan.new_parser(), "Paris is sunny.", plan.parser_request)
    assert (content, calls) == ("Paris is sunny.", ())


@pytest.mark.usefixtures("vllm_parsers")
def test_an_unknown_tool_parser_is_a_configuration_error_listing_them() -> None:
    with pytest.raises(ConfigurationError, match=r"tool_parser.*hermes.*'hermez'"):
        _backend(tool_parser="hermez")
    assert _backend().tool_parser is None


@pytest.mark.usefixtures("vllm_parsers")
def test_tool_choice_decides_what_the_template_sees_and_what_is_forced() -> None:
    backend = _backend(tool_parser="hermes")
    tokenizer = _Tokenizer()
    shared = _shared(tokenizer)
    for choice, shown, forced, parsed in [
        (None, True, None, True),
        ("auto", True, None, True),
        ("none", False, None, False),
        ("required", True, "required", False),
        ("get_time", True, "get_time", False),
    ]:
        plan = backend._tool_plan(shared, _weather_request(tool_choice=choice))
        backend._prompt_ids(shared, _weather_request(tool_choice=choice), plan)
        sent = tokenizer.calls[-1]
        assert ("tools" in sent) is shown, choice
        if shown:
            assert [t["function"]["name"] for t in sent["tools"]] == [t.name for t in TOOLS]
        assert plan.forced == forced, choice
        assert (plan.new_parser is not None) is parsed, choice
    # Without a tool_parser, "auto" returns the text as it is.
    assert _backend()._tool_plan(shared, _weather_request()).new_parser is None


@pytest.mark.usefixtures("vllm_parsers")
def test_a_forced_tool_choice_that_cannot_be_met_is_refused() -> None:
    backend = _backend()
    with pytest.raises(EngineRequestError, match="send_email") as info:
        backend._tool_plan(_shared(), _weather_request(tool_choice="send_email"))
    assert not info.value.retryable
    with pytest.raises(EngineRequestError, match="needs tools"):
        backend._tool_plan(_shared(), ChatRequest.from_prompt("hi", tool_choice="required"))


@pytest.mark.usefixtures("vllm_parsers")
def test_forced_tool_calls_are_constrained_over_response_format() -> None:
    backend = _backend(tool_parser="hermes")
    shared = _shared()
    request = _weather_request(
        tool_choice="required", response_format=ResponseFormat(type="json_object")
    )
    plan = backend._tool_plan(shared, request)
    params = backend._sampling_params(shared, request, 10, plan, stream=False)
    assert params.structured_outputs.json == _tool_call_schema(TOOLS, "required")
    assert params.skip_special_tokens is True
    auto = backend._tool_plan(shared, _weather_request())
    params = backend._sampling_params(shared, _weather_request(), 10, auto, stream=True)
    assert params.structured_outputs is None
    assert params.skip_special_tokens is False


# -- complete() and stream() over scripted engine outputs ------------------------------------


def _script(
    backend: Any, monkeypatch: pytest.MonkeyPatch, pieces: Sequence[str], finish: str = "stop"
) -> None:
    """Make the backend's engine produce ``pieces`` (one token each), then ``finish``."""
    shared = _shared()

    async def generate(request: ChatRequest, *, stream: bool) -> AsyncIterator[Any]:
        plan = backend._tool_plan(shared, request)
        ids = backend._prompt_ids(shared, request, plan)
        steps = (
            [(p, [i]) for i, p in enumerate(pieces)]
            if stream
            else [("".join(pieces), list(range(len(pieces))))]
        )
        for n, (text, token_ids) in enumerate(steps):
            last = n == len(steps) - 1
            choice = SimpleNamespace(
                text=text, token_ids=token_ids, finish_reason=finish if last else None
            )
            yield plan, len(ids), SimpleNamespace(outputs=[choice], finished=last)

    monkeypatch.setattr(backend, "_generate", generate)


async def _events(backend: Any, request: ChatRequest) -> list[Any]:
    return [e async for e in backend.stream(request)]


REQUIRED_ANSWER = ['[{"name": "get_weather", ', '"parameters": {"city": ', '"Paris"}}]']


@pytest.mark.anyio
@pytest.mark.usefixtures("vllm_parsers")
async def test_required_tool_calls_from_complete_and_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = _backend()
    _script(backend, monkeypatch, REQUIRED_ANSWER)
    request = _weather_request(tool_choice="required")
    c = await backend.complete(request)
    assert c.text == ""
    assert c.finish_reason == "tool_calls"
    (call,) = c.tool_calls
    assert call.name == "get_weather" and call.parsed_arguments() == {"city": "Paris"}
    assert CALL_ID.match(call.id)
    assert c.usage.output_tokens == 3

    events = await _events(backend, request)
    assert not [e for e in events if isinstance(e, TextDelta)]  # the JSON is not text
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    end = events[-1]
    assert isinstance(end, StreamEnd)
    assert end.completion.finish_reason == "tool_calls"
    assert merge_tool_call_deltas(deltas) == end.completion.tool_calls
    assert end.completion.tool_calls[0].parsed_arguments() == {"city": "Paris"}
    assert end.completion.ttft is not None


@pytest.mark.anyio
@pytest.mark.usefixtures("vllm_parsers")
async def test_a_forced_answer_that_does_not_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _backend()
    request = _weather_request(tool_choice="required")
    # Cut short by max_tokens: the text comes back with finish_reason="length" (a larger
    # max_tokens fixes it; a retry would not).
    _script(backend, monkeypatch, REQUIRED_ANSWER[:2], finish="length")
    c = await backend.complete(request)
    assert (c.tool_calls, c.finish_reason) == ((), "length")
    assert c.text == "".join(REQUIRED_ANSWER[:2])
    events = await _events(backend, request)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == c.text
    end = events[-1].completion
    assert (end.text, end.tool_calls, end.finish_reason) == (c.text, (), "length")
    # Stopped by itself yet unreadable (a stop sequence cut it): retryable MalformedResponseError.
    _script(backend, monkeypatch, REQUIRED_ANSWER[:2], finish="stop")
    with pytest.raises(MalformedResponseError, match="tool_choice='required'") as info:
        await backend.complete(request)
    assert info.value.retryable
    with pytest.raises(MalformedResponseError):
        await _events(backend, request)


HERMES_ANSWER = [
    "Let me ",
    "check.",
    " <tool_",
    'call>{"name": "get_weather", ',
    '"arguments": {"city": "Paris"}}',
    "</tool_call>",
]


@pytest.mark.anyio
@pytest.mark.usefixtures("vllm_parsers")
async def test_auto_tool_calls_with_hermes(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _backend(tool_parser="hermes")
    _script(backend, monkeypatch, HERMES_ANSWER)
    c = await backend.complete(_weather_request())
    assert c.text == "Let me check. "
    assert c.finish_reason == "tool_calls"
    assert [(t.name, t.parsed_arguments()) for t in c.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]

    events = await _events(backend, _weather_request(tool_choice="auto"))
    texts = [e.text for e in events if isinstance(e, TextDelta)]
    assert "".join(texts) == "Let me check. "  # the tool call's markup is never sent as text
    end = events[-1].completion
    assert end.text == c.text and end.finish_reason == "tool_calls"
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    assert merge_tool_call_deltas(deltas) == end.tool_calls
    assert [(t.name, t.arguments) for t in end.tool_calls] == [
        (t.name, t.arguments) for t in c.tool_calls
    ]


@pytest.mark.anyio
@pytest.mark.usefixtures("vllm_parsers")
async def test_a_malformed_auto_tool_call_is_text_as_in_vllm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vLLM's server answers an unreadable <tool_call> as plain text; so does the backend."""
    broken = ["Sure. ", '<tool_call>{"name": "get_weather", "arguments": {"city": ', "</tool_call>"]
    backend = _backend(tool_parser="hermes")
    _script(backend, monkeypatch, broken)
    c = await backend.complete(_weather_request())
    assert (c.text, c.tool_calls, c.finish_reason) == ("".join(broken), (), "stop")
    events = await _events(backend, _weather_request())
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == c.text
    assert not [e for e in events if isinstance(e, ToolCallDelta)]


@pytest.mark.anyio
@pytest.mark.usefixtures("vllm_parsers")
async def test_without_a_parser_or_with_tool_choice_none_text_is_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for backend, request in [
        (_backend(), _weather_request()),
        (_backend(tool_parser="hermes"), _weather_request(tool_choice="none")),
    ]:
        _script(backend, monkeypatch, HERMES_ANSWER)
        c = await backend.complete(request)
        assert (c.text, c.tool_calls, c.finish_reason) == ("".join(HERMES_ANSWER), (), "stop")
        events = await _events(backend, request)
        assert [e.text for e in events if isinstance(e, TextDelta)] == HERMES_ANSWER
        assert isinstance(events[-1].completion, Completion)
        assert events[-1].completion.text == c.text
