"""The tool loop: parallel tool calls, results and readable errors fed back, limits, streaming."""

from __future__ import annotations

import json

import anyio
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from trio.testing import MockClock

from genfan import (
    BackendConnectionError,
    ChatRequest,
    ConfigurationError,
    FanOut,
    Message,
    ToolCall,
    Usage,
)
from genfan.agents import (
    Agent,
    AgentFinished,
    AgentStepLimitError,
    ModelResponse,
    ModelTextDelta,
    Tool,
    ToolFailed,
    ToolFinished,
    ToolRegistry,
    ToolStarted,
    ToolTimeoutError,
    UnknownToolError,
    tool,
)
from genfan.testing import Fail, FakeBackend, Reply


def calls(*specs: tuple[str, dict[str, object]]) -> tuple[ToolCall, ...]:
    return tuple(
        ToolCall(id=f"call_{i}", name=name, arguments=json.dumps(args))
        for i, (name, args) in enumerate(specs)
    )


class Barrier:
    """Every party waits until ``n`` are inside at once: deadlocks unless they run concurrently."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.inside = 0
        self.peak = 0
        self.all_in = anyio.Event()

    async def wait(self) -> None:
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        if self.inside == self.n:
            self.all_in.set()
        with anyio.fail_after(5):  # a guard against a deadlock, not a timing assertion
            await self.all_in.wait()
        self.inside -= 1


@pytest.mark.anyio
async def test_parallel_tool_calls_run_concurrently_and_results_go_back_in_order() -> None:
    barrier = Barrier(4)

    @tool
    async def lookup(key: str) -> str:
        """Look a key up."""
        await barrier.wait()
        return key.upper()

    backend = FakeBackend(
        replies=[
            Reply(tool_calls=calls(*[("lookup", {"key": k}) for k in "abcd"])),
            Reply(text="ABCD it is", usage=Usage(input_tokens=7, output_tokens=3)),
        ]
    )
    agent = Agent(backend, tools=[lookup], system="Be brief.")
    result = await agent.run("look up a, b, c and d")

    assert barrier.peak == 4  # all four were running at the same time
    assert result.text == "ABCD it is" and result.stopped == "final"
    assert [r.output for r in result.tool_calls] == ["A", "B", "C", "D"]
    assert len(result.steps) == 2 and len(backend.calls) == 2

    first, second = backend.calls
    assert [t.name for t in first.tools] == ["lookup"]
    assert first.messages[0] == Message.system("Be brief.")
    roles = [m.role for m in second.messages]
    assert roles == ["system", "user", "assistant", "tool", "tool", "tool", "tool"]
    assistant = second.messages[2]
    assert [c.id for c in assistant.tool_calls] == ["call_0", "call_1", "call_2", "call_3"]
    tool_messages = second.messages[3:]
    assert [(m.tool_call_id, m.content) for m in tool_messages] == [
        ("call_0", "A"),
        ("call_1", "B"),
        ("call_2", "C"),
        ("call_3", "D"),
    ]
    assert result.messages[-1] == Message.assistant("ABCD it is")
    assert result.usage.output_tokens >= 3


@pytest.mark.parametrize("anyio_backend", [("trio", {"clock": MockClock(autojump_threshold=0)})])
@pytest.mark.anyio
async def test_a_turn_with_five_tool_calls_takes_as_long_as_the_slowest() -> None:
    @tool
    async def work(seconds: float) -> float:
        await anyio.sleep(seconds)
        return seconds

    durations = [1.0, 2.0, 3.0, 2.5, 0.5]
    backend = FakeBackend(
        replies=[Reply(tool_calls=calls(*[("work", {"seconds": s}) for s in durations])), "done"]
    )
    start = anyio.current_time()
    result = await Agent(backend, tools=[work]).run("go")
    assert anyio.current_time() - start == pytest.approx(3.0)  # not 9.0: sequential would sum
    assert result.steps[0].elapsed == pytest.approx(3.0)
    assert [r.value for r in result.tool_calls] == durations


@pytest.mark.anyio
async def test_validation_and_unknown_tool_errors_go_back_to_the_model() -> None:
    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    seen: list[ChatRequest] = []

    def script(request: ChatRequest) -> Reply | str:
        seen.append(request)
        if len(seen) == 1:
            return Reply(tool_calls=calls(("add", {"a": "one", "b": 2}), ("delete_all", {})))
        if len(seen) == 2:
            return Reply(tool_calls=calls(("add", {"a": 1, "b": 2})))
        return "3"

    result = await Agent(FakeBackend(replies=script), tools=[add]).run("1 + 2?")
    assert result.text == "3"
    bad, unknown = result.steps[0].tool_calls
    assert not bad.ok and not unknown.ok
    assert isinstance(unknown.error, UnknownToolError)
    feedback = [m.content for m in seen[1].messages if m.role == "tool"]
    assert feedback[0] is not None and feedback[0].startswith(
        "Error: invalid arguments for tool 'add': a: Input should be a valid integer"
    )
    assert feedback[1] == "Error: there is no tool named 'delete_all'; available tools: add"
    assert [m.content for m in seen[2].messages if m.role == "tool"][-1] == "3"


@pytest.mark.parametrize("anyio_backend", [("trio", {"clock": MockClock(autojump_threshold=0)})])
@pytest.mark.anyio
async def test_a_hanging_tool_times_out_alone_and_the_others_still_answer() -> None:
    @tool(timeout=2.0)
    async def hang() -> str:
        await anyio.sleep(3600)
        return "never"

    @tool
    async def quick() -> str:
        await anyio.sleep(0.5)
        return "quick"

    backend = FakeBackend(replies=[Reply(tool_calls=calls(("hang", {}), ("quick", {}))), "ok"])
    start = anyio.current_time()
    result = await Agent(backend, tools=[hang, quick]).run("go")
    assert anyio.current_time() - start == pytest.approx(2.0)
    slow, fast = result.tool_calls
    assert isinstance(slow.error, ToolTimeoutError) and fast.output == "quick"
    assert "did not finish within 2s" in (backend.calls[1].messages[-2].content or "")


@pytest.mark.anyio
async def test_step_limit_raises_with_the_partial_result_or_returns_flagged() -> None:
    @tool
    def again() -> str:
        return "more"

    forever = Reply(tool_calls=calls(("again", {})))
    agent = Agent(FakeBackend(replies=[forever]), tools=[again], max_steps=3)
    with pytest.raises(AgentStepLimitError, match="max_steps=3") as info:
        await agent.run("loop")
    assert info.value.result.stopped == "step_limit" and len(info.value.result.steps) == 3

    agent = Agent(
        FakeBackend(replies=[forever]), tools=[again], max_steps=2, on_step_limit="return"
    )
    result = await agent.run("loop")
    assert result.stopped == "step_limit" and len(result.tool_calls) == 2


@pytest.mark.anyio
async def test_forced_tool_choice_applies_to_the_first_turn_then_resets_to_auto() -> None:
    @tool
    def weather(city: str) -> str:
        return f"sunny in {city}"

    def model(request: ChatRequest) -> Reply:
        # A model that always calls a tool when forced to, and answers otherwise.
        if request.tool_choice in ("required", "weather"):
            return Reply(tool_calls=calls(("weather", {"city": "Paris"})))
        return Reply(text="It is sunny.")

    fake = FakeBackend(replies=model)
    result = await Agent(fake, tools=[weather], tool_choice="required").run("Weather?")
    assert result.stopped == "final" and result.text == "It is sunny."
    assert [r.tool_choice for r in fake.calls] == ["required", "auto"]

    named = FakeBackend(replies=model)
    await Agent(named, tools=[weather], tool_choice="weather").run("Weather?")
    assert [r.tool_choice for r in named.calls] == ["weather", "auto"]

    # Without the reset the forced choice stays, and the loop runs into its step limit.
    stuck = Agent(
        FakeBackend(replies=model),
        tools=[weather],
        tool_choice="required",
        reset_tool_choice=False,
        max_steps=3,
        on_step_limit="return",
    )
    assert (await stuck.run("Weather?")).stopped == "step_limit"


def test_tool_choice_must_name_a_tool_of_the_agent() -> None:
    @tool
    def weather(city: str) -> str:
        return city

    with pytest.raises(ConfigurationError, match=r"'wether' is not one of the agent's tools"):
        Agent(FakeBackend(), tools=[weather], tool_choice="wether")


@pytest.mark.anyio
async def test_model_failure_is_the_backends_typed_error() -> None:
    agent = Agent(FakeBackend(replies=[Fail(error=BackendConnectionError("refused"))]))
    with pytest.raises(BackendConnectionError):
        await agent.run("hi")


@pytest.mark.anyio
async def test_stream_events_in_order() -> None:
    barrier = Barrier(3)

    @tool
    async def fetch(url: str) -> str:
        await barrier.wait()
        if url == "bad":
            raise ValueError("404")
        return f"page {url}"

    backend = FakeBackend(
        replies=[
            Reply(
                tool_calls=calls(
                    ("fetch", {"url": "a"}), ("fetch", {"url": "bad"}), ("fetch", {"url": "c"})
                )
            ),
            "two pages were fetched",
        ]
    )
    agent = Agent(backend, tools=[fetch])
    events = []
    async with agent.run_stream("fetch a, bad, c") as stream:
        async for event in stream:
            events.append(event)
    kinds = [e.type for e in events]
    assert kinds[0] == "model_response"
    assert kinds[1:4] == ["tool_started"] * 3  # all started before any finished
    assert sorted(kinds[4:7]) == ["tool_failed", "tool_finished", "tool_finished"]
    assert kinds[-2:] == ["model_response", "final"]
    text = "".join(e.text for e in events if isinstance(e, ModelTextDelta))
    assert text == "two pages were fetched"
    assert {e.step for e in events if isinstance(e, ModelTextDelta)} == {1}
    failed = [e for e in events if isinstance(e, ToolFailed)]
    assert failed[0].record.output == "Error: tool 'fetch' raised ValueError: 404"
    assert isinstance(events[-1], AgentFinished) and stream.result is events[-1].result
    assert {e.call.id for e in events if isinstance(e, ToolStarted)} == {
        "call_0",
        "call_1",
        "call_2",
    }
    assert sum(isinstance(e, ToolFinished) for e in events) == 2
    assert sum(isinstance(e, ModelResponse) for e in events) == 2


@pytest.mark.anyio
async def test_stream_raises_the_runs_error() -> None:
    agent = Agent(FakeBackend(replies=[Fail(error=BackendConnectionError("refused"))]))
    with pytest.raises(BackendConnectionError):
        async with agent.run_stream("hi") as stream:
            async for _ in stream:
                pass


@pytest.mark.anyio
async def test_on_event_callback_sees_the_same_events() -> None:
    @tool
    def one() -> int:
        return 1

    seen: list[str] = []
    agent = Agent(FakeBackend(replies=[Reply(tool_calls=calls(("one", {}))), "done"]), tools=[one])
    result = await agent.run("go", on_event=lambda e: seen.append(e.type))
    assert result.text == "done"
    assert seen[:3] == ["model_response", "tool_started", "tool_finished"]
    assert seen[-1] == "final"


@pytest.mark.anyio
async def test_cancelling_a_run_cancels_every_running_tool() -> None:
    started = Barrier(3)
    cancelled = 0

    @tool
    async def block(i: int) -> int:
        nonlocal cancelled
        try:
            await started.wait()
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled += 1
            raise
        return i

    backend = FakeBackend(
        replies=[Reply(tool_calls=calls(*[("block", {"i": i}) for i in range(3)]))]
    )
    agent = Agent(backend, tools=[block])
    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.run, "go")
        await started.all_in.wait()
        tg.cancel_scope.cancel()
    assert cancelled == 3


@pytest.mark.anyio
async def test_leaving_a_stream_early_cancels_its_tools() -> None:
    cancelled = anyio.Event()

    @tool
    async def slow() -> str:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()
        return "never"

    agent = Agent(FakeBackend(replies=[Reply(tool_calls=calls(("slow", {})))]), tools=[slow])
    async with agent.run_stream("go") as stream:
        async for event in stream:
            if event.type == "tool_started":
                break
    assert cancelled.is_set()


@pytest.mark.anyio
async def test_max_parallel_tools_bounds_one_turn() -> None:
    running = 0
    peak = 0

    @tool
    async def step(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.001)
        running -= 1
        return i

    backend = FakeBackend(
        replies=[Reply(tool_calls=calls(*[("step", {"i": i}) for i in range(6)])), "ok"]
    )
    result = await Agent(backend, tools=[step], max_parallel_tools=2).run("go")
    assert peak == 2 and [r.value for r in result.tool_calls] == list(range(6))


@pytest.mark.anyio
async def test_continue_a_conversation_and_use_a_registry() -> None:
    registry = ToolRegistry([Tool.from_function(lambda: "x", name="x")])
    backend = FakeBackend(replies=["first", "second"])
    agent = Agent(backend, tools=registry, model="m1", temperature=0.2)
    first = await agent.run("hello")
    second = await agent.run([*first.messages, Message.user("and again")])
    assert second.text == "second"
    request = backend.calls[1]
    assert [m.role for m in request.messages] == ["user", "assistant", "user"]
    assert request.model == "m1" and request.temperature == 0.2


@pytest.mark.anyio
async def test_a_fan_out_can_be_the_model() -> None:
    @tool
    def pick(n: int) -> int:
        return n * 2

    a = FakeBackend("a", replies=[Reply(tool_calls=calls(("pick", {"n": 21}))), "42"])
    b = FakeBackend("b", replies=[Fail(error=BackendConnectionError("down"))])
    result = await Agent(FanOut([a, b], mode="first"), tools=[pick]).run("?")
    assert result.text == "42" and result.tool_calls[0].value == 42


def test_agent_configuration_errors() -> None:
    backend = FakeBackend()
    with pytest.raises(ConfigurationError, match="max_steps"):
        Agent(backend, max_steps=0)
    with pytest.raises(ConfigurationError, match="on_step_limit"):
        Agent(backend, on_step_limit="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_parallel_tools"):
        Agent(backend, max_parallel_tools=0)
    with pytest.raises(ConfigurationError, match="Backend or a FanOut"):
        Agent("openai:gpt-4o")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_spans_agent_parent_of_model_and_tool_calls(spans: InMemorySpanExporter) -> None:
    @tool
    async def t1() -> str:
        return "1"

    @tool
    async def t2() -> str:
        raise RuntimeError("no")

    backend = FakeBackend("fake", replies=[Reply(tool_calls=calls(("t1", {}), ("t2", {}))), "done"])
    await Agent(backend, tools=[t1, t2], name="helper").run("go")
    finished = {s.name: s for s in spans.get_finished_spans()}
    root = finished["invoke_agent helper"]
    chats = [s for s in spans.get_finished_spans() if s.name.startswith("chat ")]
    tools = [finished["execute_tool t1"], finished["execute_tool t2"]]
    assert len(chats) == 2
    for child in [*chats, *tools]:
        assert child.parent is not None and child.parent.span_id == root.context.span_id
        assert child.context.trace_id == root.context.trace_id
    assert tools[0].attributes["gen_ai.tool.call.id"] == "call_0"
    assert tools[1].attributes["error.type"] == "ToolError"
    assert root.attributes["genfan.agent.steps"] == 2
