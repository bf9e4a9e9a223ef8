"""Request/completion types and the error tree."""

from __future__ import annotations

import pickle

import pytest
from pydantic import BaseModel, ValidationError

from genfan import (
    AllBackendsFailedError,
    BackendError,
    BulkheadFullError,
    ChatRequest,
    CircuitOpenError,
    Completion,
    ConfigurationError,
    GenfanError,
    HTTPStatusError,
    MalformedResponseError,
    Message,
    MissingExtraError,
    RateLimitError,
    ResponseFormat,
    ToolCall,
    ToolCallDelta,
    Usage,
    merge_tool_call_deltas,
)


def test_from_prompt_builds_system_and_user_messages() -> None:
    req = ChatRequest.from_prompt("hi", system="be brief", temperature=0.2, max_tokens=10)
    assert [m.role for m in req.messages] == ["system", "user"]
    assert req.prompt == "hi" and req.temperature == 0.2


@pytest.mark.parametrize(
    "fields",
    [{"temperature": 3.0}, {"top_p": 0.0}, {"max_tokens": 0}, {"timeout": -1}, {"unknown": 1}],
)
def test_invalid_request_fields_are_rejected(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ChatRequest.from_prompt("x", **fields)


def test_empty_messages_rejected() -> None:
    with pytest.raises(ValidationError, match="at least one message"):
        ChatRequest(messages=())


def test_requests_are_frozen_and_overrides_copy() -> None:
    req = ChatRequest.from_prompt("x", temperature=0.1)
    with pytest.raises(ValidationError):
        req.temperature = 0.5  # type: ignore[misc]
    other = req.with_overrides(temperature=0.9, model=None)
    assert other.temperature == 0.9 and req.temperature == 0.1
    assert req.with_overrides() is req
    with pytest.raises(ValidationError):
        req.with_overrides(temperature=9)


def test_with_system_replaces_the_system_prompt() -> None:
    req = ChatRequest.from_prompt("x", system="old").with_system("new")
    assert [m.content for m in req.messages] == ["new", "x"]


def test_usage_adds_tokens_and_cost() -> None:
    total = Usage(input_tokens=1, output_tokens=2) + Usage(
        input_tokens=3, output_tokens=4, cost=0.5
    )
    assert (total.input_tokens, total.output_tokens, total.total_tokens, total.cost) == (
        4,
        6,
        10,
        0.5,
    )
    assert (Usage() + Usage()).cost is None


def test_tool_call_arguments_parse() -> None:
    assert ToolCall(id="1", name="f", arguments='{"a": 1}').parsed_arguments() == {"a": 1}
    with pytest.raises(ValueError):
        ToolCall(id="1", name="f", arguments="[1]").parsed_arguments()


def test_streamed_tool_call_pieces_merge_by_index() -> None:
    calls = merge_tool_call_deltas(
        [
            ToolCallDelta(index=0, id="a", name="search", arguments='{"q":'),
            ToolCallDelta(index=1, id="b", name="fetch", arguments='{"url": "x"}'),
            ToolCallDelta(index=0, arguments=' "cats"}'),
        ]
    )
    assert [(c.id, c.name, c.parsed_arguments()) for c in calls] == [
        ("a", "search", {"q": "cats"}),
        ("b", "fetch", {"url": "x"}),
    ]


def test_response_format_from_model() -> None:
    class City(BaseModel):
        name: str

    fmt = ResponseFormat.from_model(City)
    assert fmt.type == "json_schema" and fmt.name == "City"
    assert fmt.json_schema is not None and "name" in fmt.json_schema["properties"]


def test_completion_parse_json() -> None:
    assert Completion(text='{"a": 2}').parse_json() == {"a": 2}
    with pytest.raises(ValueError):
        Completion(text="nope").parse_json()


def test_message_constructors() -> None:
    call = ToolCall(id="c1", name="f")
    assert Message.assistant(tool_calls=[call]).tool_calls == (call,)
    assert Message.tool("result", tool_call_id="c1").role == "tool"


def test_error_tree() -> None:
    assert issubclass(ConfigurationError, GenfanError) and issubclass(
        ConfigurationError, ValueError
    )
    assert issubclass(RateLimitError, HTTPStatusError) and issubclass(HTTPStatusError, BackendError)
    assert not issubclass(ConfigurationError, BackendError)
    err = RateLimitError("slow down", backend="openai", retry_after=2.5)
    assert err.retryable and err.counts_as_failure and err.retry_after == 2.5
    assert str(err) == "[openai] slow down"


@pytest.mark.parametrize(
    ("status", "retryable", "counts"),
    [
        (400, False, False),
        (401, False, False),
        (404, False, False),
        (408, True, True),
        (429, True, True),
        (500, True, True),
        (503, True, True),
    ],
)
def test_http_status_classification(status: int, retryable: bool, counts: bool) -> None:
    err = HTTPStatusError("x", backend="b", status_code=status)
    assert (err.retryable, err.counts_as_failure) == (retryable, counts)


def test_guard_rejections_do_not_count_as_backend_failures() -> None:
    assert not CircuitOpenError("open", retry_at=1.0, retry_after=1.0).counts_as_failure
    assert not BulkheadFullError("full").counts_as_failure
    assert MalformedResponseError("bad json").retryable


def test_errors_survive_pickling() -> None:
    err = RateLimitError("slow", backend="b", retry_after=1.5)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is RateLimitError and copy.retry_after == 1.5 and copy.backend == "b"


def test_missing_extra_says_what_to_install() -> None:
    err = MissingExtraError("vllm", "local")
    assert "pip install 'genfan[local]'" in str(err)
    assert isinstance(err, ImportError) and isinstance(err, ConfigurationError)


def test_all_failed_group_splits_keep_type() -> None:
    group = AllBackendsFailedError("all failed", [RateLimitError("a"), BackendError("b")])
    match, rest = group.split(RateLimitError)
    assert isinstance(match, AllBackendsFailedError) and isinstance(rest, AllBackendsFailedError)
