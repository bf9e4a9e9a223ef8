"""The tool loop: ask the model, run the tools it asks for (all at once), feed back, repeat.

When the model asks for several tools in one turn, they run concurrently in one task group,
each under its own timeout, retries and bulkhead. Every call ends as a result or as a typed,
readable error that goes back to the model; nothing a tool does can crash the loop. Only the
model call itself can fail the run (with the backend's typed error), or the step limit
(`AgentStepLimitError`, defined here next to the `AgentResult` it carries).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Literal, TypeAlias, overload

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from typing_extensions import TypeVar

from .. import telemetry
from .._backend import Backend
from .._errors import ConfigurationError, GenfanError
from .._output import OutputSpec, OutputValidationError, output_spec
from .._sync import clip, not_awaited, run_sync
from .._types import ChatRequest, Completion, Message, ToolCall, Usage
from ._llm_call import ask
from ._model import check_model
from ._registry import ToolLike, ToolRegistry
from ._tools import ToolCallRecord

__all__ = [
    "Agent",
    "AgentEvent",
    "AgentFinished",
    "AgentResult",
    "AgentStep",
    "AgentStepLimitError",
    "AgentStream",
    "ModelResponse",
    "ModelTextDelta",
    "ToolFailed",
    "ToolFinished",
    "ToolStarted",
]

#: The type of an agent's output (``str``, the final text, when none is asked for).
OutputT = TypeVar("OutputT", default=str)
#: An output type given for one run.
T = TypeVar("T")
#: The output of a run that has none (stopped at the step limit).
_NO_OUTPUT: Any = object()


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentStep:
    """One turn: a model call, and the tool calls it asked for (empty on the final turn).

    Attributes:
        index: 0 for the first turn.
        completion: the model's answer in this turn.
        tool_calls: a record per tool call, in the order the model listed them.
        started: ``anyio.current_time()`` when the turn started.
        elapsed: seconds for the model call plus the (concurrent) tool calls.
    """

    index: int
    completion: Completion
    tool_calls: tuple[ToolCallRecord, ...] = ()
    started: float = 0.0
    elapsed: float = 0.0


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentResult(Generic[OutputT]):
    """What an agent run produced.

    Attributes:
        text: the final answer (on a step limit: the last text the model wrote, often empty).
        messages: the whole conversation, tool calls and tool results included; pass it to the
            next `Agent.run` to continue.
        steps: every turn.
        stopped: ``final`` (the model answered) or ``step_limit`` (see ``on_step_limit``).
        elapsed: seconds for the whole run.
    """

    text: str
    messages: tuple[Message, ...]
    steps: tuple[AgentStep, ...]
    stopped: Literal["final", "step_limit"] = "final"
    elapsed: float = 0.0
    _output: Any = field(default=_NO_OUTPUT, repr=False)

    @property
    def output(self) -> OutputT:
        """The final answer as the agent's ``output_type``: a validated instance (a pydantic
        model, a ``list[City]``...); without an output type, the final text.

        Raises:
            ValueError: the run stopped at the step limit, with no final answer.
        """
        if self._output is _NO_OUTPUT:
            raise ValueError("the agent stopped at its step limit, with no final output")
        output: OutputT = self._output
        return output

    @property
    def tool_calls(self) -> tuple[ToolCallRecord, ...]:
        """Every tool call of every turn, in order."""
        return tuple(r for s in self.steps for r in s.tool_calls)

    @property
    def usage(self) -> Usage:
        """Tokens (and cost) over every model call."""
        total = Usage()
        for s in self.steps:
            total = total + s.completion.usage
        return total

    @property
    def completion(self) -> Completion | None:
        """The last model answer."""
        return self.steps[-1].completion if self.steps else None

    def __repr__(self) -> str:
        return (
            f"AgentResult(text={clip(self.text)!r}, steps={len(self.steps)}, "
            f"tool_calls={len(self.tool_calls)}, stopped={self.stopped!r}, "
            f"elapsed={self.elapsed:.3f}s)"
        )


class AgentStepLimitError(GenfanError):
    """The agent reached ``max_steps`` while the model was still asking for tools.

    Attributes:
        result: everything the run produced so far (``result.stopped == "step_limit"``).
    """

    def __init__(self, message: str, *, result: AgentResult[Any]) -> None:
        self.result = result
        super().__init__(message)


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelTextDelta:
    """A piece of the model's text, as it streams."""

    step: int
    text: str
    type: Literal["text_delta"] = "text_delta"


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelResponse:
    """The model finished a turn (``completion.tool_calls`` says what it asked for)."""

    step: int
    completion: Completion
    type: Literal["model_response"] = "model_response"


@dataclass(frozen=True, kw_only=True, slots=True)
class ToolStarted:
    """A tool call started."""

    step: int
    call: ToolCall
    type: Literal["tool_started"] = "tool_started"


@dataclass(frozen=True, kw_only=True, slots=True)
class ToolFinished:
    """A tool call succeeded."""

    step: int
    record: ToolCallRecord
    type: Literal["tool_finished"] = "tool_finished"


@dataclass(frozen=True, kw_only=True, slots=True)
class ToolFailed:
    """A tool call failed; ``record.output`` is the error text the model will read."""

    step: int
    record: ToolCallRecord
    type: Literal["tool_failed"] = "tool_failed"


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentFinished:
    """The run ended with ``result`` (the last event)."""

    result: AgentResult[Any]
    type: Literal["final"] = "final"


AgentEvent: TypeAlias = (
    ModelTextDelta | ModelResponse | ToolStarted | ToolFinished | ToolFailed | AgentFinished
)
EventHandler: TypeAlias = Callable[[AgentEvent], Awaitable[None] | None]
Prompt: TypeAlias = str | ChatRequest | Sequence[Message]


class Agent(Generic[OutputT]):
    """A model with tools, run in a loop until it answers.

    Args:
        backend: the model: a [`Backend`][genfan.Backend] (any provider returning
            ``Completion.tool_calls``), or a [`FanOut`][genfan.FanOut] whose chosen answer is used.
        tools: the tools it may call (`Tool` s or plain functions), or a
            `ToolRegistry`. Only these ever run.
        system: the system prompt.
        max_steps: the most model calls in one run (>= 1).
        on_step_limit: at ``max_steps`` with tools still requested, ``raise``
            `AgentStepLimitError` (it carries the partial result) or ``return`` the
            result with ``stopped="step_limit"``.
        max_parallel_tools: at most this many tool calls of one turn run at once (default: all).
        model: the model name to request (default: the backend's).
        temperature: sampling temperature for every model call.
        max_tokens: output limit for every model call.
        tool_choice: ``"auto"``, ``"required"``, ``"none"`` or a tool's name, for the model's
            first call (default: the backend's default, usually ``"auto"``).
        reset_tool_choice: after a turn that called tools, ask the next turns with
            ``tool_choice="auto"`` (as the OpenAI Agents SDK does), so a forced tool call does
            not force one on every turn until ``max_steps``.
        output_type: the final answer's type (a pydantic model class, or any type pydantic's
            ``TypeAdapter`` takes): every model call asks for its JSON schema, the final answer
            is validated into it, and ``result.output`` is the instance. A
            [`FanOut`][genfan.FanOut] backend validates every candidate and chooses among the
            valid ones. ``run(..., output_type=)`` overrides it per run.
        output_retries: how many times an invalid final answer goes back to the model, with
            what was wrong, for another try (each a step); then
            [`OutputValidationError`][genfan.OutputValidationError] is raised.
        name: the agent's name in spans and logs.

    Example:
        ```python
        agent = Agent(backend, tools=[search, fetch_page], system="Answer with sources.")
        result = await agent.run("Who won the 1998 World Cup?")
        print(result.text, [c.name for c in result.tool_calls])
        # from sync code: result = agent.run_sync("Who won the 1998 World Cup?")
        ```
    """

    def __init__(
        self,
        backend: Backend,
        *,
        tools: Iterable[ToolLike] | ToolRegistry = (),
        system: str | None = None,
        max_steps: int = 10,
        on_step_limit: Literal["raise", "return"] = "raise",
        max_parallel_tools: int | None = None,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        tool_choice: str | None = None,
        reset_tool_choice: bool = True,
        output_type: type[OutputT] | None = None,
        output_retries: int = 1,
        name: str = "agent",
    ) -> None:
        self.backend = check_model(backend, what="Agent")
        self.tools = tools if isinstance(tools, ToolRegistry) else ToolRegistry(tools)
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ConfigurationError(f"Agent.max_steps must be an int >= 1, got {max_steps!r}")
        if on_step_limit not in ("raise", "return"):
            raise ConfigurationError(
                f"Agent.on_step_limit must be 'raise' or 'return', got {on_step_limit!r}"
            )
        if max_parallel_tools is not None and (
            not isinstance(max_parallel_tools, int) or max_parallel_tools < 1
        ):
            raise ConfigurationError(
                f"Agent.max_parallel_tools must be an int >= 1, got {max_parallel_tools!r}"
            )
        self.system = system
        self.max_steps = max_steps
        self.on_step_limit = on_step_limit
        self.max_parallel_tools = max_parallel_tools
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        if tool_choice is not None and not isinstance(tool_choice, str):
            raise ConfigurationError(
                "Agent.tool_choice must be 'auto', 'required', 'none' or a tool's name, "
                f"got {tool_choice!r}"
            )
        if tool_choice not in (None, "auto", "required", "none") and tool_choice not in (
            self.tools.names
        ):
            raise ConfigurationError(
                f"Agent.tool_choice {tool_choice!r} is not one of the agent's tools "
                f"({', '.join(self.tools.names) or 'none'}), nor 'auto', 'required' or 'none'"
            )
        self.tool_choice = tool_choice
        self.reset_tool_choice = reset_tool_choice
        if (
            isinstance(output_retries, bool)
            or not isinstance(output_retries, int)
            or (output_retries < 0)
        ):
            raise ConfigurationError(
                f"Agent.output_retries must be an int >= 0, got {output_retries!r}"
            )
        self.output_type = output_type
        self.output_spec: OutputSpec[Any] | None = output_spec(output_type)
        self.output_retries = output_retries
        self.name = name

    def __repr__(self) -> str:
        return (
            f"Agent(name={self.name!r}, backend={self.backend.name!r}, tools={self.tools.names!r})"
        )

    @overload
    async def run(
        self, prompt: Prompt, *, on_event: EventHandler | None = None, output_type: None = None
    ) -> AgentResult[OutputT]: ...
    @overload
    async def run(
        self, prompt: Prompt, *, on_event: EventHandler | None = None, output_type: type[T]
    ) -> AgentResult[T]: ...
    @overload
    async def run(
        self, prompt: Prompt, *, on_event: EventHandler | None = None, output_type: Any
    ) -> AgentResult[Any]: ...
    async def run(
        self, prompt: Prompt, *, on_event: EventHandler | None = None, output_type: Any = None
    ) -> AgentResult[Any]:
        """Run the loop until the model answers without asking for tools:
        ``result = await agent.run("...")`` (from sync code: `run_sync`).

        Args:
            prompt: a user prompt, a list of messages (e.g. a previous result's ``messages``
                plus a new user message), or a whole [`ChatRequest`][genfan.ChatRequest].
            on_event: called with every `AgentEvent` (sync or async); model text is
                streamed when it is set.
            output_type: overrides the agent's ``output_type`` for this run.

        Raises:
            AgentStepLimitError: ``max_steps`` reached with ``on_step_limit="raise"``.
            OutputValidationError: the final answer is not a valid ``output_type``, after
                ``output_retries`` tries.
            BackendError: the model call failed (tools' failures never raise; the model reads
                them).
        """
        not_awaited(prompt, "Agent.run()")
        emit = _as_async(on_event) if on_event is not None else None
        return await self._run(prompt, emit, self._spec(output_type))

    def _spec(self, output_type: Any) -> OutputSpec[Any] | None:
        return self.output_spec if output_type is None else output_spec(output_type)

    @overload
    def run_sync(
        self, prompt: Prompt, *, on_event: EventHandler | None = None, output_type: None = None
    ) -> AgentResult[OutputT]: ...
    @overload
    def run_sync(
        self, prompt: Prompt, *, on_event: EventHandler | None = None, output_type: type[T]
    ) -> AgentResult[T]: ...
    @overload
    def run_sync(
        self, prompt: Prompt, *, on_event: EventHandler | None = None, output_type: Any
    ) -> AgentResult[Any]: ...
    def run_sync(
        self, prompt: Prompt, *, on_event: EventHandler | None = None, output_type: Any = None
    ) -> AgentResult[Any]:
        """`run` for sync code: ``result = agent.run_sync("...")``.

        It blocks until the agent answers. It works in a plain script and inside a running
        event loop (a notebook), whose loop it blocks meanwhile, as a sync HTTP client would: in
        async code, ``await agent.run(...)`` instead. Every sync call runs on one event loop
        genfan keeps for the process (``on_event`` is called there, in genfan's thread), so a
        backend made once serves them all.

        Raises:
            AgentStepLimitError: ``max_steps`` reached with ``on_step_limit="raise"``.
            BackendError: the model call failed.
        """
        return run_sync(self.run, prompt, on_event=on_event, output_type=output_type)

    def run_stream(self, prompt: Prompt, *, output_type: Any = None) -> AgentStream:
        """Run the loop and stream its events.

        Use it as ``async with agent.run_stream(prompt) as events: async for ev in events:``.
        The last event is `AgentFinished`; a failure is raised from the iteration.
        Leaving the block early cancels the run (and its running tools). ``output_type``
        overrides the agent's for this run.
        """
        return AgentStream(self, prompt, self._spec(output_type))

    # -- the loop ---------------------------------------------------------------------------

    def _first_request(self, prompt: Prompt, spec: OutputSpec[Any] | None) -> ChatRequest:
        specs = self.tools.specs()
        if isinstance(prompt, ChatRequest):
            request = prompt
        elif isinstance(prompt, str):
            request = ChatRequest.from_prompt(prompt)
        else:
            request = ChatRequest(messages=tuple(prompt))
        if self.system is not None and not any(m.role == "system" for m in request.messages):
            request = request.with_system(self.system)
        request = request.with_overrides(
            tools=specs or None,
            tool_choice=self.tool_choice,
            model=self.model,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
        )
        return request if spec is None else spec.prepare(request)

    async def _run(
        self,
        prompt: Prompt,
        emit: Callable[[AgentEvent], Awaitable[None]] | None,
        spec: OutputSpec[Any] | None = None,
    ) -> AgentResult[Any]:
        request = self._first_request(prompt, spec)
        messages = list(request.messages)
        steps: list[AgentStep] = []
        retries_left = self.output_retries
        start = anyio.current_time()
        with telemetry.span(
            f"invoke_agent {self.name}",
            **{
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": self.name,
                "genfan.agent.tools": len(self.tools),
                "genfan.agent.max_steps": self.max_steps,
            },
        ) as span:
            for index in range(self.max_steps):
                step_start = anyio.current_time()
                on_text = None
                if emit is not None:
                    on_text = _text_emitter(emit, index)
                invalid: OutputValidationError | None = None
                try:
                    completion, output = await ask(
                        self.backend,
                        request.model_copy(update={"messages": tuple(messages)}),
                        spec,
                        on_text=on_text,
                    )
                except OutputValidationError as exc:
                    if exc.completion is None or not (retries_left and index + 1 < self.max_steps):
                        raise
                    completion, output, invalid = exc.completion, _NO_OUTPUT, exc
                if emit is not None:
                    await emit(ModelResponse(step=index, completion=completion))
                messages.append(Message.assistant(completion.text or None, completion.tool_calls))
                records: tuple[ToolCallRecord, ...] = ()
                if invalid is not None:
                    # The answer goes back to the model with what was wrong, for another try.
                    retries_left -= 1
                    messages.append(Message.user(_retry_prompt(invalid)))
                    telemetry.event(
                        "agent_output_retry",
                        level="info",
                        agent=self.name,
                        step=index,
                        detail=invalid.message,
                    )
                elif completion.tool_calls:
                    records = await self._run_tools(completion.tool_calls, index, emit)
                    messages.extend(
                        Message.tool(r.output, tool_call_id=r.id, name=r.name) for r in records
                    )
                    if self.reset_tool_choice and request.tool_choice not in (None, "auto"):
                        request = request.model_copy(update={"tool_choice": "auto"})
                steps.append(
                    AgentStep(
                        index=index,
                        completion=completion,
                        tool_calls=records,
                        started=step_start,
                        elapsed=anyio.current_time() - step_start,
                    )
                )
                telemetry.event(
                    "agent_step_finished",
                    agent=self.name,
                    step=index,
                    tool_calls=len(records),
                    tool_failures=sum(not r.ok for r in records),
                )
                if not completion.tool_calls and invalid is None:
                    result: AgentResult[Any] = AgentResult(
                        text=completion.text,
                        messages=tuple(messages),
                        steps=tuple(steps),
                        stopped="final",
                        elapsed=anyio.current_time() - start,
                        _output=output,
                    )
                    span.set_attribute("genfan.agent.steps", len(steps))
                    telemetry.event("agent_finished", agent=self.name, steps=len(steps))
                    if emit is not None:
                        await emit(AgentFinished(result=result))
                    return result

            last = steps[-1].completion
            result = AgentResult(
                text=last.text,
                messages=tuple(messages),
                steps=tuple(steps),
                stopped="step_limit",
                elapsed=anyio.current_time() - start,
            )
            span.set_attribute("genfan.agent.steps", len(steps))
            span.set_attribute("genfan.agent.stopped", "step_limit")
            telemetry.event(
                "agent_step_limit", level="warning", agent=self.name, max_steps=self.max_steps
            )
            if self.on_step_limit == "raise":
                raise AgentStepLimitError(
                    f"agent {self.name!r} reached max_steps={self.max_steps} while the model was "
                    f"still calling tools ({', '.join(c.name for c in last.tool_calls)})",
                    result=result,
                )
            if emit is not None:
                await emit(AgentFinished(result=result))
            return result

    async def _run_tools(
        self,
        calls: Sequence[ToolCall],
        step: int,
        emit: Callable[[AgentEvent], Awaitable[None]] | None,
    ) -> tuple[ToolCallRecord, ...]:
        records: list[ToolCallRecord | None] = [None] * len(calls)
        limiter = (
            anyio.CapacityLimiter(self.max_parallel_tools)
            if self.max_parallel_tools is not None
            else None
        )

        async def one(i: int, call: ToolCall) -> None:
            if limiter is not None:
                async with limiter:
                    await run_one(i, call)
            else:
                await run_one(i, call)

        async def run_one(i: int, call: ToolCall) -> None:
            if emit is not None:
                await emit(ToolStarted(step=step, call=call))
            record = await self.tools.run(call)
            records[i] = record
            if emit is not None:
                event = ToolFinished if record.ok else ToolFailed
                await emit(event(step=step, record=record))

        async with anyio.create_task_group() as tg:
            for i, call in enumerate(calls):
                tg.start_soon(one, i, call, name=f"tool {call.name}")
        return tuple(r for r in records if r is not None)


def _retry_prompt(error: OutputValidationError) -> str:
    """What the model reads after an answer that is not a valid output."""
    return (
        f"Your answer is not a valid {error.output_type}: {error.reason}. Answer again with "
        "only the JSON the response format asks for."
    )


def _as_async(handler: EventHandler) -> Callable[[AgentEvent], Awaitable[None]]:
    async def emit(event: AgentEvent) -> None:
        out = handler(event)
        if inspect.isawaitable(out):
            await out

    return emit


def _text_emitter(
    emit: Callable[[AgentEvent], Awaitable[None]], step: int
) -> Callable[[str], Awaitable[None]]:
    async def on_text(text: str) -> None:
        await emit(ModelTextDelta(step=step, text=text))

    return on_text


class AgentStream:
    """The events of one agent run (see `Agent.run_stream`).

    Attributes:
        result: the run's result, once `AgentFinished` has been received.
    """

    def __init__(
        self, agent: Agent[Any], prompt: Prompt, spec: OutputSpec[Any] | None = None
    ) -> None:
        self.agent = agent
        self.prompt = prompt
        self.result: AgentResult[Any] | None = None
        self._spec = spec
        self._error: BaseException | None = None
        self._tg: TaskGroup | None = None
        self._send: MemoryObjectSendStream[AgentEvent] | None = None
        self._receive: MemoryObjectReceiveStream[AgentEvent] | None = None
        self._done = False

    async def __aenter__(self) -> AgentStream:
        # Unbounded: tools never wait for a slow reader; events are small.
        self._send, self._receive = anyio.create_memory_object_stream[AgentEvent](math.inf)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._produce, name=f"agent {self.agent.name}")
        return self

    async def _produce(self) -> None:
        assert self._send is not None
        send = self._send
        try:
            self.result = await self.agent._run(self.prompt, send.send, self._spec)
        except Exception as exc:
            self._error = exc
        finally:
            self._done = True
            send.close()

    def __aiter__(self) -> AsyncIterator[AgentEvent]:
        return self

    async def __anext__(self) -> AgentEvent:
        if self._receive is None:
            raise RuntimeError("use `async with agent.run_stream(...) as events:` first")
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            pass
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        raise StopAsyncIteration

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        if not self._done or exc is not None:
            self._tg.cancel_scope.cancel()
        try:
            if exc is not None and not isinstance(exc, anyio.get_cancelled_exc_class()):
                # The reader's own error (or the run's, re-raised by the iteration) goes out
                # as it is, not wrapped in the task group's ExceptionGroup.
                await self._tg.__aexit__(None, None, None)
                return None
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            if self._receive is not None:
                self._receive.close()
