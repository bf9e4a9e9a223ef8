"""Tools: schemas from real signatures, argument validation, serialisation, and per-tool guards."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from enum import StrEnum
from typing import Annotated, Literal

import anyio
import pytest
from pydantic import BaseModel, Field
from trio.testing import MockClock

from genfan import BackendTimeoutError, ConfigurationError, HTTPStatusError, ToolCall
from genfan.agents import (
    Tool,
    ToolArgumentsError,
    ToolError,
    ToolRegistry,
    ToolTimeoutError,
    UnknownToolError,
    tool,
)
from genfan.resilience import RetryPolicy
from genfan.testing import capture_events


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


class Unit(StrEnum):
    celsius = "celsius"
    fahrenheit = "fahrenheit"


class Place(BaseModel):
    city: str
    country: str | None = None


class Window(BaseModel):
    place: Place
    days: Annotated[int, Field(ge=1, le=14)] = 3


@tool
async def forecast(
    window: Window,
    unit: Unit = Unit.celsius,
    detail: Literal["short", "long"] = "short",
    tags: list[str] | None = None,
    start: dt.date | None = None,
) -> dict[str, object]:
    """Forecast the weather for a place.

    Uses the national weather service.

    Args:
        window: where, and for how many days.
        unit: temperature unit
            (celsius or fahrenheit).
        detail: how much to say.
        tags (list[str]): labels to attach.

    Returns:
        The forecast.

    Raises:
        ValueError: never.
    """
    return {"city": window.place.city, "days": window.days, "unit": unit.value, "start": start}


def test_schema_from_signature_and_docstring() -> None:
    assert forecast.name == "forecast"
    assert forecast.description == (
        "Forecast the weather for a place.\n\nUses the national weather service."
    )
    schema = forecast.parameters
    assert schema["type"] == "object"
    assert schema["required"] == ["window"]
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert list(props) == ["window", "unit", "detail", "tags", "start"]
    # descriptions from the Args section, continuation lines joined, types in parens dropped
    assert props["window"]["description"] == "where, and for how many days."
    assert props["unit"]["description"] == "temperature unit (celsius or fahrenheit)."
    assert props["tags"]["description"] == "labels to attach."
    assert "description" not in props["start"]
    # defaults, enums, Literal, Optional, list, date
    assert props["unit"]["default"] == "celsius"
    assert schema["$defs"]["Unit"]["enum"] == ["celsius", "fahrenheit"]
    assert props["detail"] == {
        "default": "short",
        "description": "how much to say.",
        "enum": ["short", "long"],
        "type": "string",
    }
    assert {"type": "array", "items": {"type": "string"}} in props["tags"]["anyOf"]
    assert {"type": "string", "format": "date"} in props["start"]["anyOf"]
    # nested models with their constraints
    window = schema["$defs"]["Window"]
    assert window["properties"]["days"] == {
        "default": 3,
        "maximum": 14,
        "minimum": 1,
        "type": "integer",
    }
    assert schema["$defs"]["Place"]["required"] == ["city"]
    # no auto-generated titles anywhere
    assert '"title"' not in json.dumps(schema)
    spec = forecast.spec
    assert spec.name == "forecast" and spec.parameters == schema


def test_a_property_called_title_is_kept() -> None:
    def publish(title: str, body: str = "") -> str:
        """Publish a post."""
        return title

    t = Tool.from_function(publish)
    assert set(t.parameters["properties"]) == {"title", "body"}
    assert t.parameters["properties"]["title"] == {"type": "string"}


def test_sync_function_options_and_overrides() -> None:
    def add(a: int, b: int = 2) -> int:
        return a + b

    t = Tool.from_function(add, name="adder", description="Adds.", timeout=2.0, retry=3)
    assert (t.name, t.description, t.timeout) == ("adder", "Adds.", 2.0)
    assert t.retry is not None and t.retry.attempts == 3
    assert t.parameters["required"] == ["a"]
    assert t(1) == 3  # still callable like the function


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1.0}, "timeout"),
        ({"retry": 0}, "retry"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"name": "has space"}, "name"),
        ({"name": "x" * 65}, "name"),
    ],
)
def test_bad_options_raise_configuration_error(kwargs: dict[str, object], field: str) -> None:
    def f(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError, match=field if field != "name" else "tool name"):
        Tool.from_function(f, **kwargs)  # type: ignore[arg-type]


def test_signatures_a_tool_cannot_have() -> None:
    def star(*args: int) -> None: ...

    def kw(**kwargs: int) -> None: ...

    with pytest.raises(ConfigurationError, match=r"\*args/\*\*kwargs"):
        Tool.from_function(star)
    with pytest.raises(ConfigurationError, match=r"\*args/\*\*kwargs"):
        Tool.from_function(kw)
    with pytest.raises(ConfigurationError, match="name="):
        Tool.from_function(lambda x: x)


def test_validation_errors_name_each_bad_field() -> None:
    with pytest.raises(ToolArgumentsError) as info:
        forecast.validate('{"window": {"place": {}, "days": 99}, "unit": "kelvin", "extra": 1}')
    msg = str(info.value)
    assert msg.startswith("invalid arguments for tool 'forecast': ")
    assert "window.place.city: Field required" in msg
    assert "window.days: Input should be less than or equal to 14 (got 99)" in msg
    assert "unit: Input should be 'celsius' or 'fahrenheit' (got 'kelvin')" in msg
    assert "extra: Extra inputs are not permitted" in msg
    assert info.value.tool == "forecast"

    with pytest.raises(ToolArgumentsError, match="Invalid JSON"):
        forecast.validate('{"window": ')
    with pytest.raises(ToolArgumentsError, match="window: Field required"):
        forecast.validate("")


def test_validation_coerces_into_typed_values() -> None:
    kwargs = forecast.validate(
        '{"window": {"place": {"city": "Oslo"}}, "unit": "fahrenheit", "start": "2024-05-01"}'
    )
    assert isinstance(kwargs["window"], Window) and kwargs["window"].days == 3
    assert kwargs["unit"] is Unit.fahrenheit
    assert kwargs["start"] == dt.date(2024, 5, 1)
    assert kwargs["detail"] == "short" and kwargs["tags"] is None


@pytest.mark.anyio
async def test_results_are_serialised_for_the_model() -> None:
    record = await forecast.run(
        ToolCall(id="c1", name="forecast", arguments='{"window": {"place": {"city": "Oslo"}}}')
    )
    assert record.ok and record.attempts == 1
    assert json.loads(record.output) == {
        "city": "Oslo",
        "days": 3,
        "unit": "celsius",
        "start": None,
    }
    assert record.value["city"] == "Oslo"

    def echo(text: str) -> str:
        return text

    def model(city: str) -> Place:
        return Place(city=city)

    text = await Tool.from_function(echo).run(
        ToolCall(id="a", name="echo", arguments='{"text": "hé"}')
    )
    assert text.output == "hé"  # str as is, not JSON-quoted
    obj = await Tool.from_function(model).run(
        ToolCall(id="b", name="model", arguments='{"city": "Rome"}')
    )
    assert json.loads(obj.output) == {"city": "Rome", "country": None}


@pytest.mark.anyio
async def test_invalid_arguments_become_a_readable_result_and_the_tool_is_not_called() -> None:
    calls = 0

    async def lookup(key: int) -> int:
        nonlocal calls
        calls += 1
        return key

    t = Tool.from_function(lookup, retry=3)
    record = await t.run(ToolCall(id="x", name="lookup", arguments='{"key": "abc"}'))
    assert not record.ok and calls == 0 and record.attempts == 0
    assert isinstance(record.error, ToolArgumentsError) and record.error.call_id == "x"
    assert record.output.startswith("Error: invalid arguments for tool 'lookup': key: ")
    assert record.output.endswith("Fix the arguments and call the tool again.")


@pytest.mark.anyio
async def test_a_raising_tool_becomes_a_typed_error() -> None:
    def divide(a: float, b: float) -> float:
        return a / b

    t = Tool.from_function(divide, thread=False)
    record = await t.run(ToolCall(id="d", name="divide", arguments='{"a": 1, "b": 0}'))
    assert record.status == "failed"
    assert record.output == "Error: tool 'divide' raised ZeroDivisionError: float division by zero"
    assert isinstance(record.error, ToolError)
    assert isinstance(record.error.__cause__, ZeroDivisionError)
    with pytest.raises(ToolError) as info:
        await t.invoke({"a": 1, "b": 0})
    assert isinstance(info.value.__cause__, ZeroDivisionError)


@pytest.mark.anyio
async def test_timeout_per_attempt_on_the_mock_clock() -> None:
    @tool(timeout=5.0)
    async def slow(seconds: float) -> str:
        await anyio.sleep(seconds)
        return "done"

    start = anyio.current_time()
    assert await slow.invoke({"seconds": 4.9}) == "done"
    record = await slow.run(ToolCall(id="t", name="slow", arguments='{"seconds": 3600}'))
    assert anyio.current_time() - start == pytest.approx(4.9 + 5.0)
    assert isinstance(record.error, ToolTimeoutError) and isinstance(record.error, TimeoutError)
    assert record.output == "Error: tool 'slow' did not finish within 5s"


@pytest.mark.anyio
async def test_retries_wait_through_anyio_and_stop_at_attempts() -> None:
    attempts: list[float] = []

    async def flaky(x: int) -> int:
        attempts.append(anyio.current_time())
        if len(attempts) < 3:
            raise ConnectionError("reset")
        return x * 10

    policy = RetryPolicy(attempts=4, initial=1.0, multiplier=2.0, jitter="none", budget=None)
    t = Tool.from_function(flaky, retry=policy)
    with capture_events() as events:
        record = await t.run(ToolCall(id="r", name="flaky", arguments='{"x": 4}'))
    assert record.ok and record.value == 40 and record.attempts == 3
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps == pytest.approx([1.0, 2.0])  # exponential backoff, slept on the mock clock
    retries = [e for e in events if e["event"] == "tool_call_retry"]
    assert [e["attempt"] for e in retries] == [2, 3]

    async def always(x: int) -> int:
        raise ConnectionError("down")

    t2 = Tool.from_function(
        always, name="always", retry=RetryPolicy(attempts=3, jitter="none", budget=None)
    )
    record = await t2.run(ToolCall(id="r2", name="always", arguments='{"x": 1}'))
    assert record.attempts == 3 and not record.ok
    assert "ConnectionError: down" in record.output


@pytest.mark.anyio
async def test_timeouts_are_retried_but_non_retryable_backend_errors_are_not() -> None:
    n = 0

    @tool(timeout=1.0, retry=RetryPolicy(attempts=3, initial=0.5, jitter="none", budget=None))
    async def sometimes_hangs() -> str:
        nonlocal n
        n += 1
        if n == 1:
            await anyio.sleep(100)
        return "ok"

    assert await sometimes_hangs.invoke() == "ok" and n == 2

    m = 0

    @tool(retry=5)
    async def forbidden() -> str:
        nonlocal m
        m += 1
        raise HTTPStatusError("forbidden", backend="api", status_code=403)

    record = await forbidden.run(ToolCall(id="f", name="forbidden"))
    assert m == 1 and record.attempts == 1

    k = 0

    @tool(retry=RetryPolicy(attempts=2, initial=0, budget=None, retry_on=(KeyError,)))
    async def picky() -> str:
        nonlocal k
        k += 1
        raise (BackendTimeoutError("slow", backend="x") if k == 1 else KeyError("k"))

    record = await picky.run(ToolCall(id="p", name="picky"))
    assert k == 1  # retry_on=(KeyError,) does not cover the timeout


@pytest.mark.anyio
async def test_bulkhead_limits_concurrent_calls_of_one_tool() -> None:
    running = 0
    peak = 0

    @tool(max_concurrency=2)
    async def limited(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(1.0)
        running -= 1
        return i

    start = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(limited.invoke, {"i": i})
    assert peak == 2
    assert anyio.current_time() - start == pytest.approx(3.0)  # 5 calls, 2 at a time


@pytest.mark.anyio
async def test_registry_runs_only_registered_tools() -> None:
    def ping() -> str:
        """Ping."""
        return "pong"

    registry = ToolRegistry([ping, forecast])
    assert registry.names == ["ping", "forecast"] and len(registry) == 2
    assert [s.name for s in registry.specs()] == ["ping", "forecast"]
    assert "ping" in registry and "rm_rf" not in registry
    record = await registry.run(ToolCall(id="u", name="rm_rf", arguments="{}"))
    assert not record.ok and isinstance(record.error, UnknownToolError)
    assert record.output == "Error: there is no tool named 'rm_rf'; available tools: forecast, ping"
    assert (await registry.run(ToolCall(id="p", name="ping"))).output == "pong"
    with pytest.raises(ConfigurationError, match="two tools are named 'ping'"):
        registry.add(ping)
    with pytest.raises(UnknownToolError):
        registry.get("nope")


@pytest.mark.anyio
async def test_sync_tools_run_in_a_worker_thread() -> None:
    import threading

    main = threading.get_ident()

    def where() -> bool:
        return threading.get_ident() != main

    assert await Tool.from_function(where).invoke() is True
    assert await Tool.from_function(where, thread=False).invoke() is False
