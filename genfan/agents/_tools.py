"""Tools: typed Python functions a model may call, with their own timeout, retries and bulkhead.

A `Tool` is built from a function's signature and Google-style docstring: its name, its
description, and a JSON schema of its arguments (through a pydantic model, so defaults, enums,
``Literal``, ``Optional``, lists and nested models all work). The model's arguments are
validated before the function runs; what goes wrong comes back as a `ToolError` whose
message the model can read and act on.

Here: `Tool` and the `tool` decorator, and `ToolCallRecord` (what one call
did). The registry an agent runs tools from is in ``_registry.py``; the retry plumbing shared
with chain steps in ``_retry.py``; the signature → schema work in ``_schema.py``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar, overload

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar
from pydantic import BaseModel, ValidationError
from pydantic_core import to_json

from .. import telemetry
from .._errors import ConfigurationError
from .._types import ToolCall, ToolSpec
from ..resilience import RetryPolicy
from ._errors import ToolArgumentsError, ToolError, ToolTimeoutError
from ._retry import as_retry, retrying_for
from ._schema import arguments_model, clean_schema, parse_docstring

__all__ = [
    "Tool",
    "ToolCallRecord",
    "default_serializer",
    "failed_record",
    "is_async",
    "tool",
]

R = TypeVar("R")

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass(frozen=True, kw_only=True, slots=True)
class ToolCallRecord:
    """What one tool call did.

    Attributes:
        call: the model's call (id, tool name, raw JSON arguments).
        status: ``ok`` or ``failed``.
        output: the text the model is sent back: the serialised result, or ``"Error: ..."``.
        value: the tool's Python return value (``None`` when it failed).
        error: the typed error, when it failed.
        attempts: how many times the function was called (0: rejected before running).
        started: ``anyio.current_time()`` when the call started.
        elapsed: seconds it took, retries and waits included.
    """

    call: ToolCall
    status: Literal["ok", "failed"]
    output: str
    value: Any = None
    error: ToolError | None = None
    attempts: int = 0
    started: float = 0.0
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def name(self) -> str:
        return self.call.name

    @property
    def id(self) -> str:
        return self.call.id


def is_async(fn: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004
    return call is not None and inspect.iscoroutinefunction(call)


def default_serializer(value: Any) -> str:
    """Text for the model: strings as they are, anything JSON-able (models too) as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    try:
        return to_json(value).decode()
    except Exception:  # not JSON-able: its str() is the best we can do
        return str(value)


def _describe_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(arguments)"
        msg = err.get("msg", "invalid")
        if err.get("type") not in ("missing", "json_invalid", "extra_forbidden") and "input" in err:
            shown = repr(err["input"])
            if len(shown) > 60:
                shown = shown[:57] + "..."
            msg = f"{msg} (got {shown})"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


class Tool(Generic[R]):
    """A function the model may call, with its schema and its guards.

    Build one with `from_function` or the `tool` decorator. The tool stays callable
    like the function it wraps (``search("q")``), so it can be unit-tested and used in chains.

    Args:
        fn: the function (sync or async). Sync functions run in a worker thread unless
            ``thread=False``, so they do not block the event loop (a thread cannot be
            interrupted: on timeout its result is abandoned).
        name: the name the model sees (default: the function's name).
        description: what the model is told the tool does (default: the docstring's text).
        timeout: seconds one attempt may take; then it fails with `ToolTimeoutError`.
        retry: a `RetryPolicy`, or an attempt count. By default
            only transient failures are retried (timeouts, connection errors, retryable
            backend errors); the policy's ``retry_on`` widens that. Invalid arguments never.
        max_concurrency: at most this many calls of this tool run at once (a bulkhead shared by
            every agent and chain in the event loop); more wait for a slot.
        thread: run a sync function in a worker thread (default ``True``).
        serializer: turns the result into the text the model reads (default: str as is,
            anything else as JSON).

    Raises:
        ConfigurationError: a bad option, a name the model APIs refuse, or a signature with
            ``*args``/``**kwargs``.
    """

    fn: Callable[..., Any]

    def __init__(
        self,
        fn: Callable[..., Awaitable[R]] | Callable[..., R],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | int | None = None,
        max_concurrency: int | None = None,
        thread: bool = True,
        serializer: Callable[[Any], str] | None = None,
    ) -> None:
        if isinstance(fn, Tool):
            fn = fn.fn
        if not callable(fn):
            raise ConfigurationError(f"a tool needs a callable, got {fn!r}")
        tool_name = name or getattr(fn, "__name__", None)
        if not tool_name or tool_name == "<lambda>":
            raise ConfigurationError(f"give the tool a name= (cannot derive one from {fn!r})")
        if len(tool_name) > 64 or not set(tool_name) <= _NAME_CHARS:
            raise ConfigurationError(
                f"tool name {tool_name!r} must be 1-64 characters of A-Z, a-z, 0-9, '_', '.', '-'"
            )
        if timeout is not None and not (timeout > 0 and timeout != float("inf")):
            raise ConfigurationError(
                f"tool {tool_name!r}: timeout must be > 0 seconds, got {timeout!r}"
            )
        retry_policy = as_retry(retry, what=f"tool {tool_name!r}")
        if max_concurrency is not None and (
            isinstance(max_concurrency, bool)
            or not isinstance(max_concurrency, int)
            or max_concurrency < 1
        ):
            raise ConfigurationError(
                f"tool {tool_name!r}: max_concurrency must be an int >= 1, got {max_concurrency!r}"
            )
        doc = parse_docstring(inspect.getdoc(fn))
        self.fn = fn
        self.name: str = tool_name
        self.description: str = description if description is not None else doc.description
        self.args_model: type[BaseModel] = arguments_model(fn, name=tool_name, docstring=doc)
        schema = clean_schema(self.args_model.model_json_schema())
        schema.setdefault("properties", {})
        self.parameters: dict[str, Any] = schema
        self.timeout = timeout
        self.retry: RetryPolicy | None = retry_policy
        self.max_concurrency = max_concurrency
        self.thread = thread
        self.serializer = serializer or default_serializer
        self._async = is_async(fn)
        self._limiter: RunVar[anyio.CapacityLimiter] = RunVar(f"genfan.tool.{tool_name}")
        functools.update_wrapper(self, fn)

    @classmethod
    def from_function(
        cls,
        fn: Callable[..., Awaitable[R]] | Callable[..., R],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | int | None = None,
        max_concurrency: int | None = None,
        thread: bool = True,
        serializer: Callable[[Any], str] | None = None,
    ) -> Tool[R]:
        """A tool from ``fn`` (see `Tool` for the options)."""
        return cls(
            fn,
            name=name,
            description=description,
            timeout=timeout,
            retry=retry,
            max_concurrency=max_concurrency,
            thread=thread,
            serializer=serializer,
        )

    @property
    def spec(self) -> ToolSpec:
        """What the model is sent: name, description and the JSON schema of the arguments."""
        return ToolSpec(name=self.name, description=self.description, parameters=self.parameters)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped function directly (no validation, no guards)."""
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Tool(name={self.name!r})"

    def validate(self, arguments: str | Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Validate the model's arguments; return keyword arguments for the function.

        Args:
            arguments: the model's JSON text, or a mapping.

        Raises:
            ToolArgumentsError: not a JSON object, or it does not match the schema; the message
                names each bad field.
        """
        try:
            if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
                model = self.args_model.model_validate({})
            elif isinstance(arguments, str | bytes):
                model = self.args_model.model_validate_json(arguments)
            else:
                model = self.args_model.model_validate(dict(arguments))
        except ValidationError as exc:
            raise ToolArgumentsError(
                f"invalid arguments for tool {self.name!r}: {_describe_validation(exc)}",
                tool=self.name,
            ) from exc
        return {field: getattr(model, field) for field in type(model).model_fields}

    def serialize(self, value: Any) -> str:
        """The text the model reads for ``value``."""
        return self.serializer(value)

    async def invoke(
        self, arguments: str | Mapping[str, Any] | None = None, /, *, call_id: str | None = None
    ) -> R:
        """Validate ``arguments`` and run the tool under its timeout, retries and bulkhead.

        Raises:
            ToolArgumentsError: the arguments did not validate (the function was not called).
            ToolTimeoutError: the last attempt ran past ``timeout``.
            ToolError: the function raised (the original exception is ``__cause__``).
        """
        value, _ = await self._execute(arguments, call_id=call_id, attempts=[0])
        return value

    async def run(self, call: ToolCall) -> ToolCallRecord:
        """Run the model's tool call; never raises except on cancellation.

        Failures become a record whose ``output`` is ``"Error: ..."``, for the model to read.
        """
        start = anyio.current_time()
        attempts = [0]
        try:
            value, _ = await self._execute(call.arguments, call_id=call.id, attempts=attempts)
        except ToolError as exc:
            return failed_record(call, exc, attempts=attempts[0], started=start)
        try:
            output = self.serialize(value)
        except Exception as exc:
            err = ToolError(
                f"tool {self.name!r} returned a value that could not be serialised: "
                f"{type(exc).__name__}: {exc}",
                tool=self.name,
                call_id=call.id,
            )
            err.__cause__ = exc
            return failed_record(call, err, attempts=attempts[0], started=start)
        return ToolCallRecord(
            call=call,
            status="ok",
            output=output,
            value=value,
            attempts=attempts[0],
            started=start,
            elapsed=anyio.current_time() - start,
        )

    # -- internals --------------------------------------------------------------------------

    async def _execute(
        self,
        arguments: str | Mapping[str, Any] | None,
        *,
        call_id: str | None,
        attempts: list[int],
    ) -> tuple[R, int]:
        start = anyio.current_time()
        with telemetry.span(
            f"execute_tool {self.name}",
            **{
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": self.name,
                "gen_ai.tool.call.id": call_id,
            },
        ) as span:
            try:
                try:
                    kwargs = self.validate(arguments)
                except ToolArgumentsError as exc:
                    exc.call_id = call_id
                    raise
                value = await self._with_retries(kwargs, call_id, attempts)
            except ToolError as exc:
                _mark_failed(span, exc)
                span.set_attribute("genfan.tool.attempts", attempts[0])
                telemetry.event(
                    "tool_call_failed",
                    level="info",
                    tool=self.name,
                    call_id=call_id,
                    error=type(exc).__name__,
                    attempts=attempts[0],
                )
                raise
            span.set_attribute("genfan.tool.attempts", attempts[0])
            telemetry.event(
                "tool_call_finished",
                tool=self.name,
                call_id=call_id,
                attempts=attempts[0],
                elapsed=round(anyio.current_time() - start, 6),
            )
            return value, attempts[0]

    async def _with_retries(
        self, kwargs: dict[str, Any], call_id: str | None, attempts: list[int]
    ) -> R:
        policy = self.retry
        try:
            if policy is None or policy.attempts <= 1:
                attempts[0] += 1
                return await self._attempt(kwargs, call_id)
            retrying = retrying_for(policy, self.name)
            async for attempt in retrying:
                with attempt:
                    attempts[0] += 1
                    return await self._attempt(kwargs, call_id)
            raise AssertionError(
                "unreachable: tenacity stops with reraise=True"
            )  # pragma: no cover
        except ToolError:
            raise
        except Exception as exc:
            err = ToolError(
                f"tool {self.name!r} raised {type(exc).__name__}: {exc}",
                tool=self.name,
                call_id=call_id,
            )
            raise err from exc

    async def _attempt(self, kwargs: dict[str, Any], call_id: str | None) -> R:
        limiter = self._bulkhead()
        async with limiter if limiter is not None else nullcontext():
            if self.timeout is None:
                return await self._call(kwargs)
            with anyio.move_on_after(self.timeout):
                return await self._call(kwargs)
            raise ToolTimeoutError(
                f"tool {self.name!r} did not finish within {self.timeout:g}s",
                tool=self.name,
                call_id=call_id,
            )

    async def _call(self, kwargs: dict[str, Any]) -> R:
        if self._async:
            return await self.fn(**kwargs)  # type: ignore[no-any-return]
        if self.thread:
            result = await anyio.to_thread.run_sync(
                functools.partial(self.fn, **kwargs), abandon_on_cancel=True
            )
        else:
            result = self.fn(**kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result  # type: ignore[no-any-return]

    def _bulkhead(self) -> anyio.CapacityLimiter | None:
        # One limiter per event loop: a module-level tool may serve several loops (tests run on
        # asyncio and trio), and a limiter belongs to the loop that created it.
        if self.max_concurrency is None:
            return None
        try:
            return self._limiter.get()
        except LookupError:
            limiter = anyio.CapacityLimiter(self.max_concurrency)
            self._limiter.set(limiter)
            return limiter


def _mark_failed(span: Any, exc: BaseException) -> None:
    span.set_attribute("error.type", type(exc).__name__)
    try:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
    except Exception:  # pragma: no cover - a non-SDK span without status support
        pass


def failed_record(
    call: ToolCall, error: ToolError, *, attempts: int, started: float
) -> ToolCallRecord:
    """A record of a failed call: the model reads ``Error: <message>``."""
    hint = (
        " Fix the arguments and call the tool again."
        if isinstance(error, ToolArgumentsError)
        else ""
    )
    return ToolCallRecord(
        call=call,
        status="failed",
        output=f"Error: {error.message}{hint}",
        error=error,
        attempts=attempts,
        started=started,
        elapsed=anyio.current_time() - started,
    )


class _ToolDecorator(Protocol):
    @overload
    def __call__(self, fn: Callable[..., Awaitable[R]], /) -> Tool[R]: ...
    @overload
    def __call__(self, fn: Callable[..., R], /) -> Tool[R]: ...


@overload
def tool(fn: Callable[..., Awaitable[R]], /) -> Tool[R]: ...
@overload
def tool(fn: Callable[..., R], /) -> Tool[R]: ...
@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
    retry: RetryPolicy | int | None = None,
    max_concurrency: int | None = None,
    thread: bool = True,
    serializer: Callable[[Any], str] | None = None,
) -> _ToolDecorator: ...
def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
    retry: RetryPolicy | int | None = None,
    max_concurrency: int | None = None,
    thread: bool = True,
    serializer: Callable[[Any], str] | None = None,
) -> Tool[Any] | _ToolDecorator:
    """Make a function a `Tool`: ``@tool`` or ``@tool(timeout=5, retry=3)``.

    Example:
        ```python
        @tool(timeout=10, max_concurrency=4)
        async def search(query: str, k: int = 5) -> list[str]:
            \"\"\"Search the web.

            Args:
                query: what to look for.
                k: how many hits to return.
            \"\"\"
        ```
    """

    def wrap(f: Callable[..., Any]) -> Tool[Any]:
        return Tool(
            f,
            name=name,
            description=description,
            timeout=timeout,
            retry=retry,
            max_concurrency=max_concurrency,
            thread=thread,
            serializer=serializer,
        )

    if fn is not None:
        return wrap(fn)
    return wrap
