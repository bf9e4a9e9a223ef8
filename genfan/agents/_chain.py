"""Chains: declare steps and what they take; genfan runs each one as soon as its inputs are ready.

This is the LLMCompiler idea (Kim et al. 2023) without the planner: the dependency graph comes
from the inputs you wire, and independent steps (LLM calls, fan-outs, tools, plain functions)
run at once. Map steps run one task per item of a list (bounded), and any step with several
inputs is a join.

A failing step fails only what depends on it (``on_error="continue"``), or stops the whole chain
and cancels its running steps (``on_error="fail"``, the default).
"""

from __future__ import annotations

import functools
import inspect
import string
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar, overload

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup
from pydantic import BaseModel

from .. import telemetry
from .._backend import Backend
from .._errors import ConfigurationError
from .._types import ChatRequest, ResponseFormat
from ..resilience import RetryPolicy
from ._errors import ChainFailedError, StepTimeoutError
from ._model import check_model, complete
from ._tools import Tool, as_retry, is_async, retrying_for

__all__ = [
    "Chain",
    "ChainResult",
    "Input",
    "LLMCall",
    "OnError",
    "StepKind",
    "StepRecord",
    "StepRef",
    "StepStatus",
]

T = TypeVar("T")
R = TypeVar("R")
M = TypeVar("M", bound=BaseModel)

OnError = Literal["fail", "continue"]
StepStatus = Literal["ok", "failed", "skipped", "cancelled"]
StepKind = Literal["function", "tool", "llm", "join"]

_MISSING: Any = object()


class Input(Generic[T]):
    """A value given to :meth:`Chain.run` by name (``chain.run(query="...")``).

    Args:
        name: the keyword the caller passes.
        type: the expected type (documents it, and types ``result`` look-ups).
        default: used when the caller does not pass it.
    """

    __slots__ = ("default", "name", "type")

    def __init__(self, name: str, type: type[T] | None = None, *, default: Any = _MISSING) -> None:
        if not name.isidentifier():
            raise ConfigurationError(f"Input name must be an identifier, got {name!r}")
        self.name = name
        self.type = type
        self.default = default

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def __repr__(self) -> str:
        return f"Input({self.name!r})"


class StepRef(Generic[T]):
    """A step's future output: pass it as another step's input to make that step depend on it.

    ``T`` is what the step returns, so ``result[ref]`` is typed.
    """

    __slots__ = ("_chain", "name")

    def __init__(self, chain: Chain, name: str) -> None:
        self._chain = chain
        self.name = name

    def __repr__(self) -> str:
        return f"StepRef({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, StepRef) and other._chain is self._chain and other.name == self.name
        )

    def __hash__(self) -> int:
        return hash((id(self._chain), self.name))


@dataclass(frozen=True, kw_only=True, slots=True)
class StepRecord:
    """How one step went.

    Attributes:
        status: ``ok``; ``failed`` (raised: see ``error``); ``skipped`` (never started: a step it
            depends on did not succeed, or the chain stopped first); ``cancelled`` (was running
            when the chain stopped or was cancelled).
        output: what it returned (``None`` unless ok).
        started: seconds from the chain's start to the step's start (``None``: never started).
        finished: seconds from the chain's start to the step's end.
        reason: for a skipped step, why.
    """

    name: str
    kind: StepKind
    status: StepStatus
    output: Any = None
    error: BaseException | None = None
    started: float | None = None
    finished: float | None = None
    reason: str | None = None

    @property
    def elapsed(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True, kw_only=True, slots=True)
class ChainResult:
    """Every step's output, status and timing.

    Look outputs up by reference or name: ``result[summary]``, ``result["summarise"]``.

    Attributes:
        steps: a record per step, in declaration order.
        elapsed: seconds for the whole chain (``anyio.current_time()``, so virtual under a mock
            clock).
    """

    chain: str
    steps: Mapping[str, StepRecord]
    elapsed: float = 0.0

    @overload
    def __getitem__(self, key: StepRef[T]) -> T: ...
    @overload
    def __getitem__(self, key: str) -> Any: ...
    def __getitem__(self, key: StepRef[Any] | str) -> Any:
        name = key.name if isinstance(key, StepRef) else key
        record = self.steps[name]
        if record.status != "ok":
            why = f": {type(record.error).__name__}: {record.error}" if record.error else ""
            raise KeyError(f"step {name!r} has no output (it {record.status}{why})")
        return record.output

    @overload
    def get(self, key: StepRef[T], default: R) -> T | R: ...
    @overload
    def get(self, key: str, default: Any = None) -> Any: ...
    def get(self, key: StepRef[Any] | str, default: Any = None) -> Any:
        """The step's output, or ``default`` when it did not succeed."""
        name = key.name if isinstance(key, StepRef) else key
        record = self.steps.get(name)
        return record.output if record is not None and record.ok else default

    @property
    def ok(self) -> bool:
        """Whether every step succeeded."""
        return all(r.ok for r in self.steps.values())

    @property
    def outputs(self) -> dict[str, Any]:
        """Outputs of the steps that succeeded, by name."""
        return {n: r.output for n, r in self.steps.items() if r.ok}

    @property
    def status(self) -> dict[str, StepStatus]:
        return {n: r.status for n, r in self.steps.items()}

    @property
    def errors(self) -> dict[str, BaseException]:
        """The exception of each failed step, by name."""
        return {n: r.error for n, r in self.steps.items() if r.error is not None}


class LLMCall:
    """An LLM call as a function of named inputs: the prompt is a ``str.format`` template.

    ``LLMCall(model, "Summarise:\\n{text}")`` takes the keyword ``text``. Used by
    :meth:`Chain.llm`, and usable on its own (for instance with :meth:`Chain.map`).

    Args:
        model: a :class:`~genfan.Backend` (a :class:`~genfan.FanOut` is one).
        prompt: the template; its ``{fields}`` are the call's inputs. Or a function of the
            inputs returning the prompt or a whole :class:`~genfan.ChatRequest`.
        system: a system prompt.
        response_model: parse the answer as JSON into this pydantic model (and ask the backend
            for JSON of its schema).
        temperature: sampling temperature.
        max_tokens: output limit.
    """

    def __init__(
        self,
        model: Backend,
        prompt: str | Callable[..., str | ChatRequest],
        *,
        system: str | None = None,
        response_model: type[BaseModel] | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self.model = check_model(model, what="an LLM step")
        self.prompt = prompt
        self.system = system
        self.response_model = response_model
        self.temperature = temperature
        self.max_tokens = max_tokens
        if isinstance(prompt, str):
            try:
                fields = [f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None]
            except ValueError as exc:
                raise ConfigurationError(f"bad prompt template {prompt!r}: {exc}") from exc
            names: list[str] = []
            for f in fields:
                base = f.split(".", 1)[0].split("[", 1)[0]
                if not base.isidentifier():
                    raise ConfigurationError(
                        f"prompt template fields must be named, like {{text}}; got {{{f}}} in "
                        f"{prompt!r}"
                    )
                if base not in names:
                    names.append(base)
            self.__signature__ = inspect.Signature(
                [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names]
            )
        else:
            self.__signature__ = inspect.signature(prompt)
        self.__name__ = f"llm[{self.model.name}]"

    def __repr__(self) -> str:
        return f"LLMCall({self.model.name!r})"

    def request(self, **values: Any) -> ChatRequest:
        """The request for these input values."""
        if isinstance(self.prompt, str):
            request: ChatRequest | str = self.prompt.format(**values)
        else:
            request = self.prompt(**values)
        req = ChatRequest.from_prompt(request) if isinstance(request, str) else request
        if self.system is not None:
            req = req.with_system(self.system)
        fmt = ResponseFormat.from_model(self.response_model) if self.response_model else None
        return req.with_overrides(
            temperature=self.temperature, max_tokens=self.max_tokens, response_format=fmt
        )

    async def __call__(self, **values: Any) -> Any:
        completion = await complete(self.model, self.request(**values))
        if self.response_model is not None:
            return self.response_model.model_validate_json(completion.text)
        return completion.text


class _StepDecorator(Protocol):
    @overload
    def __call__(self, fn: Tool[R], /) -> StepRef[R]: ...
    @overload
    def __call__(self, fn: Callable[..., Awaitable[R]], /) -> StepRef[R]: ...
    @overload
    def __call__(self, fn: Callable[..., R], /) -> StepRef[R]: ...


@dataclass(kw_only=True)
class _Step:
    name: str
    kind: StepKind
    fn: Callable[..., Any]
    inputs: dict[str, Any]  # param -> StepRef | Input | constant
    after: tuple[str, ...] = ()
    item_param: str | None = None  # map steps: the parameter each item goes to
    items: Any = None  # map steps: the source of the list
    max_concurrency: int | None = None
    timeout: float | None = None
    retry: RetryPolicy | None = None
    thread: bool = False
    deps: tuple[str, ...] = field(default=())


class Chain:
    """A graph of steps, built by naming each step's inputs.

    Args:
        name: the chain's name in spans, logs and errors.
        on_error: ``fail`` (default): the first failing step cancels the running ones and
            :meth:`run` raises :class:`ChainFailedError`; ``continue``: steps that depend on a
            failed step are skipped, the rest finish, and :meth:`run` returns partial results.

    Example:
        ```python
        chain = Chain("research")
        question = chain.input("question", str)
        hits = chain.step("search", search, query=question)
        summary = chain.llm("summarise", backend, "Summarise:\\n{text}", text=hits)
        facts = chain.llm("extract", backend, "List the facts in:\\n{text}", text=hits)
        answer = chain.step("merge", merge, summary=summary, facts=facts)
        result = await chain.run(question="What is LLMCompiler?")
        print(result[answer])
        ```
    """

    def __init__(self, name: str = "chain", *, on_error: OnError = "fail") -> None:
        _check_on_error(on_error)
        self.name = name
        self.on_error: OnError = on_error
        self._steps: dict[str, _Step] = {}
        self._inputs: dict[str, Input[Any]] = {}
        self._order: tuple[str, ...] | None = None

    def __repr__(self) -> str:
        return f"Chain(name={self.name!r}, steps={list(self._steps)!r})"

    @property
    def step_names(self) -> list[str]:
        return list(self._steps)

    def input(self, name: str, type: type[T] | None = None, *, default: Any = _MISSING) -> Input[T]:
        """Declare a value the caller passes to :meth:`run`."""
        inp: Input[T] = Input(name, type, default=default)
        self._inputs[name] = inp
        return inp

    def ref(self, name: str) -> StepRef[Any]:
        """A reference to a step by name, possibly declared later (checked by :meth:`compile`)."""
        return StepRef(self, name)

    # -- declaring steps ---------------------------------------------------------------------

    @overload
    def step(
        self,
        name: str,
        fn: Tool[R],
        /,
        *,
        inputs: Mapping[str, Any] | None = ...,
        after: Iterable[StepRef[Any] | str] = ...,
        timeout: float | None = ...,
        retry: RetryPolicy | int | None = ...,
        thread: bool = ...,
        **kw_inputs: Any,
    ) -> StepRef[R]: ...
    @overload
    def step(
        self,
        name: str,
        fn: Callable[..., Awaitable[R]],
        /,
        *,
        inputs: Mapping[str, Any] | None = ...,
        after: Iterable[StepRef[Any] | str] = ...,
        timeout: float | None = ...,
        retry: RetryPolicy | int | None = ...,
        thread: bool = ...,
        **kw_inputs: Any,
    ) -> StepRef[R]: ...
    @overload
    def step(
        self,
        name: str,
        fn: Callable[..., R],
        /,
        *,
        inputs: Mapping[str, Any] | None = ...,
        after: Iterable[StepRef[Any] | str] = ...,
        timeout: float | None = ...,
        retry: RetryPolicy | int | None = ...,
        thread: bool = ...,
        **kw_inputs: Any,
    ) -> StepRef[R]: ...
    def step(
        self,
        name: str,
        fn: Callable[..., Any],
        /,
        *,
        inputs: Mapping[str, Any] | None = None,
        after: Iterable[StepRef[Any] | str] = (),
        timeout: float | None = None,
        retry: RetryPolicy | int | None = None,
        thread: bool = False,
        **kw_inputs: Any,
    ) -> StepRef[Any]:
        """Add a step that calls ``fn`` (async or sync function, :class:`Tool`, agent method).

        Each keyword names one of ``fn``'s parameters and gives its value: a :class:`StepRef`
        (the output of that step: a dependency), an :class:`Input`, or a constant.

        Args:
            name: unique step name.
            fn: what to call. A :class:`Tool` runs under its own validation, timeout, retries
                and bulkhead.
            inputs: the same as keywords, for parameters named like this method's options.
            after: steps that must finish successfully first, without passing their output.
            timeout: seconds the step may take (each attempt); then :class:`StepTimeoutError`.
            retry: retry policy for the step (an attempt count or a :class:`~genfan.resilience.RetryPolicy`).
            thread: run a sync ``fn`` in a worker thread (default: inline, for cheap functions).

        Returns:
            A reference to the step's output.

        Raises:
            ConfigurationError: duplicate name, a missing or unknown parameter, a reference from
                another chain.
        """
        values = self._merge_inputs(name, inputs, kw_inputs)
        kind: StepKind = "tool" if isinstance(fn, Tool) else "function"
        if isinstance(fn, LLMCall):
            kind = "llm"
        return self._add(
            _Step(
                name=name,
                kind=kind,
                fn=fn,
                inputs=values,
                after=self._after(name, after),
                timeout=_check_timeout(timeout, name),
                retry=as_retry(retry, what=f"step {name!r}"),
                thread=thread,
            )
        )

    def task(
        self,
        name: str | None = None,
        /,
        *,
        inputs: Mapping[str, Any] | None = None,
        after: Iterable[StepRef[Any] | str] = (),
        timeout: float | None = None,
        retry: RetryPolicy | int | None = None,
        thread: bool = False,
        **kw_inputs: Any,
    ) -> _StepDecorator:
        """Decorator style of :meth:`step`: the decorated function becomes a step (named after
        it unless ``name`` is given), and its name now refers to the step's output.

        Example:
            ```python
            chain = Chain("research")
            question = chain.input("question", str)

            @chain.task(query=question)
            async def search(query: str) -> list[str]: ...

            @chain.task(hits=search)
            def count(hits: list[str]) -> int:
                return len(hits)
            ```
        """

        def decorate(fn: Callable[..., Any]) -> StepRef[Any]:
            step_name = name or getattr(fn, "__name__", None)
            if not step_name:
                raise ConfigurationError(f"give the step a name: chain.task('name', ...) ({fn!r})")
            return self.step(
                step_name,
                fn,
                inputs=inputs,
                after=after,
                timeout=timeout,
                retry=retry,
                thread=thread,
                **kw_inputs,
            )

        return decorate

    @overload
    def llm(
        self,
        name: str,
        model: Backend,
        prompt: str | Callable[..., str | ChatRequest],
        /,
        *,
        response_model: type[M],
        system: str | None = ...,
        temperature: float | None = ...,
        max_tokens: int | None = ...,
        inputs: Mapping[str, Any] | None = ...,
        after: Iterable[StepRef[Any] | str] = ...,
        timeout: float | None = ...,
        retry: RetryPolicy | int | None = ...,
        **kw_inputs: Any,
    ) -> StepRef[M]: ...
    @overload
    def llm(
        self,
        name: str,
        model: Backend,
        prompt: str | Callable[..., str | ChatRequest],
        /,
        *,
        response_model: None = ...,
        system: str | None = ...,
        temperature: float | None = ...,
        max_tokens: int | None = ...,
        inputs: Mapping[str, Any] | None = ...,
        after: Iterable[StepRef[Any] | str] = ...,
        timeout: float | None = ...,
        retry: RetryPolicy | int | None = ...,
        **kw_inputs: Any,
    ) -> StepRef[str]: ...
    def llm(
        self,
        name: str,
        model: Backend,
        prompt: str | Callable[..., str | ChatRequest],
        /,
        *,
        response_model: type[BaseModel] | None = None,
        system: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        inputs: Mapping[str, Any] | None = None,
        after: Iterable[StepRef[Any] | str] = (),
        timeout: float | None = None,
        retry: RetryPolicy | int | None = None,
        **kw_inputs: Any,
    ) -> StepRef[Any]:
        """Add an LLM step: fill the ``prompt`` template with the inputs and ask ``model``.

        ``model`` may be a backend or a :class:`~genfan.FanOut` (then the fan-out's chosen
        answer is the output). The output is the answer's text, or a ``response_model``
        instance. See :class:`LLMCall` and :meth:`step` for the other arguments.
        """
        call = LLMCall(
            model,
            prompt,
            system=system,
            response_model=response_model,
            temperature=temperature,
            max_tokens=max_tokens,
        )
        return self.step(
            name, call, inputs=inputs, after=after, timeout=timeout, retry=retry, **kw_inputs
        )

    @overload
    def map(
        self,
        name: str,
        fn: Tool[R],
        items: StepRef[Any] | Input[Any] | Sequence[Any],
        /,
        *,
        item_param: str | None = ...,
        max_concurrency: int | None = ...,
        inputs: Mapping[str, Any] | None = ...,
        after: Iterable[StepRef[Any] | str] = ...,
        timeout: float | None = ...,
        retry: RetryPolicy | int | None = ...,
        thread: bool = ...,
        **kw_inputs: Any,
    ) -> StepRef[list[R]]: ...
    @overload
    def map(
        self,
        name: str,
        fn: Callable[..., Awaitable[R]],
        items: StepRef[Any] | Input[Any] | Sequence[Any],
        /,
        *,
        item_param: str | None = ...,
        max_concurrency: int | None = ...,
        inputs: Mapping[str, Any] | None = ...,
        after: Iterable[StepRef[Any] | str] = ...,
        timeout: float | None = ...,
        retry: RetryPolicy | int | None = ...,
        thread: bool = ...,
        **kw_inputs: Any,
    ) -> StepRef[list[R]]: ...
    @overload
    def map(
        self,
        name: str,
        fn: Callable[..., R],
        items: StepRef[Any] | Input[Any] | Sequence[Any],
        /,
        *,
        item_param: str | None = ...,
        max_concurrency: int | None = ...,
        inputs: Mapping[str, Any] | None = ...,
        after: Iterable[StepRef[Any] | str] = ...,
        timeout: float | None = ...,
        retry: RetryPolicy | int | None = ...,
        thread: bool = ...,
        **kw_inputs: Any,
    ) -> StepRef[list[R]]: ...
    def map(
        self,
        name: str,
        fn: Callable[..., Any],
        items: StepRef[Any] | Input[Any] | Sequence[Any],
        /,
        *,
        item_param: str | None = None,
        max_concurrency: int | None = None,
        inputs: Mapping[str, Any] | None = None,
        after: Iterable[StepRef[Any] | str] = (),
        timeout: float | None = None,
        retry: RetryPolicy | int | None = None,
        thread: bool = False,
        **kw_inputs: Any,
    ) -> StepRef[list[Any]]:
        """Add a map step: call ``fn`` once per item of ``items``, concurrently; output a list.

        Each item goes to ``item_param`` (default: ``fn``'s first parameter not given in the
        inputs); the other inputs are the same for every item. The outputs keep the items'
        order. If one item fails, the step fails (and its other items are cancelled).

        Args:
            items: a step's output (a list), an :class:`Input`, or a constant list.
            item_param: the parameter that receives each item.
            max_concurrency: at most this many items run at once (default: all).

        See :meth:`step` for the other arguments.
        """
        values = self._merge_inputs(name, inputs, kw_inputs)
        if max_concurrency is not None and (
            isinstance(max_concurrency, bool)
            or not isinstance(max_concurrency, int)
            or max_concurrency < 1
        ):
            raise ConfigurationError(
                f"step {name!r}: max_concurrency must be an int >= 1, got {max_concurrency!r}"
            )
        params = _parameters(fn, name)
        if item_param is None:
            free = [p for p in params if p not in values]
            if not free:
                raise ConfigurationError(
                    f"map step {name!r}: {_fn_name(fn)} has no parameter left to receive each item"
                )
            item_param = free[0]
        elif item_param in values:
            raise ConfigurationError(
                f"map step {name!r}: item_param {item_param!r} is also given as an input"
            )
        kind: StepKind = "tool" if isinstance(fn, Tool) else "function"
        if isinstance(fn, LLMCall):
            kind = "llm"
        return self._add(
            _Step(
                name=name,
                kind=kind,
                fn=fn,
                inputs=values,
                after=self._after(name, after),
                item_param=item_param,
                items=items,
                max_concurrency=max_concurrency,
                timeout=_check_timeout(timeout, name),
                retry=as_retry(retry, what=f"step {name!r}"),
                thread=thread,
            )
        )

    @overload
    def join(self, name: str, /, *refs: StepRef[Any]) -> StepRef[tuple[Any, ...]]: ...
    @overload
    def join(self, name: str, /, **named: StepRef[Any]) -> StepRef[dict[str, Any]]: ...
    def join(self, name: str, /, *refs: StepRef[Any], **named: StepRef[Any]) -> StepRef[Any]:
        """A step that waits for several steps and outputs their outputs together.

        ``chain.join("all", a, b)`` outputs a tuple; ``chain.join("all", a=a, b=b)`` a dict.
        """
        if refs and named:
            raise ConfigurationError(f"join {name!r}: give steps either positionally or by name")
        if not refs and not named:
            raise ConfigurationError(f"join {name!r} needs at least one step")
        if refs:
            keys = [f"s{i}" for i in range(len(refs))]
            sig = inspect.Signature(
                [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in keys]
            )

            def join_tuple(**values: Any) -> tuple[Any, ...]:
                return tuple(values[k] for k in keys)

            join_tuple.__signature__ = sig  # type: ignore[attr-defined]
            values = self._merge_inputs(name, None, dict(zip(keys, refs, strict=True)))
            fn: Callable[..., Any] = join_tuple
        else:
            sig = inspect.Signature(
                [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in named]
            )

            def join_dict(**values: Any) -> dict[str, Any]:
                return dict(values)

            join_dict.__signature__ = sig  # type: ignore[attr-defined]
            values = self._merge_inputs(name, None, dict(named))
            fn = join_dict
        return self._add(_Step(name=name, kind="join", fn=fn, inputs=values))

    # -- building ------------------------------------------------------------------------------

    def _merge_inputs(
        self, name: str, inputs: Mapping[str, Any] | None, kw: Mapping[str, Any]
    ) -> dict[str, Any]:
        values = dict(inputs or {})
        for k, v in kw.items():
            if k in values:
                raise ConfigurationError(f"step {name!r}: input {k!r} is given twice")
            values[k] = v
        for k, v in values.items():
            if isinstance(v, StepRef) and v._chain is not self:
                raise ConfigurationError(
                    f"step {name!r}: input {k!r} refers to step {v.name!r} of another chain"
                )
        return values

    def _after(self, name: str, after: Iterable[StepRef[Any] | str]) -> tuple[str, ...]:
        names = []
        for a in after:
            if isinstance(a, StepRef):
                if a._chain is not self:
                    raise ConfigurationError(
                        f"step {name!r}: after= refers to step {a.name!r} of another chain"
                    )
                names.append(a.name)
            elif isinstance(a, str):
                names.append(a)
            else:
                raise ConfigurationError(
                    f"step {name!r}: after= takes step references or names, got {a!r}"
                )
        return tuple(names)

    def _add(self, step: _Step) -> StepRef[Any]:
        name = step.name
        if not name or not isinstance(name, str):
            raise ConfigurationError(f"a step needs a non-empty name, got {name!r}")
        if name in self._steps:
            raise ConfigurationError(f"chain {self.name!r} already has a step named {name!r}")
        if not callable(step.fn):
            raise ConfigurationError(f"step {name!r}: {step.fn!r} is not callable")
        if step.kind != "join":
            _check_signature(step)
        sources = list(step.inputs.values())
        if step.items is not None:
            if isinstance(step.items, StepRef) and step.items._chain is not self:
                raise ConfigurationError(
                    f"map step {name!r}: items refer to step {step.items.name!r} of another chain"
                )
            sources.append(step.items)
        deps: list[str] = []
        for src in sources:
            if isinstance(src, StepRef) and src.name not in deps:
                deps.append(src.name)
            elif isinstance(src, Input):
                known = self._inputs.get(src.name)
                if known is None:
                    self._inputs[src.name] = src
        for a in step.after:
            if a not in deps:
                deps.append(a)
        step.deps = tuple(deps)
        self._steps[name] = step
        self._order = None
        return StepRef(self, name)

    def compile(self) -> tuple[str, ...]:
        """Check the graph and return the steps in a dependency order.

        Called by :meth:`run`; call it yourself to fail fast at start-up.

        Raises:
            ConfigurationError: a step depends on a step that does not exist, or the steps
                form a cycle (the message lists it, e.g. ``a -> b -> a``).
        """
        if self._order is not None:
            return self._order
        if not self._steps:
            raise ConfigurationError(f"chain {self.name!r} has no steps")
        for step in self._steps.values():
            missing = [d for d in step.deps if d not in self._steps]
            if missing:
                known = ", ".join(self._steps)
                raise ConfigurationError(
                    f"chain {self.name!r}: step {step.name!r} depends on "
                    + ", ".join(repr(m) for m in missing)
                    + f", which {'is' if len(missing) == 1 else 'are'} not a step "
                    f"(steps: {known})"
                )
        order: list[str] = []
        state: dict[str, int] = {}  # 1: visiting, 2: done

        def visit(name: str, path: list[str]) -> None:
            mark = state.get(name)
            if mark == 2:
                return
            if mark == 1:
                cycle = [*path[path.index(name) :], name]
                raise ConfigurationError(f"chain {self.name!r} has a cycle: " + " -> ".join(cycle))
            state[name] = 1
            for dep in self._steps[name].deps:
                visit(dep, [*path, name])
            state[name] = 2
            order.append(name)

        for name in self._steps:
            visit(name, [])
        self._order = tuple(order)
        return self._order

    # -- running -------------------------------------------------------------------------------

    async def run(
        self,
        inputs: Mapping[str, Any] | None = None,
        /,
        *,
        on_error: OnError | None = None,
        **kw_inputs: Any,
    ) -> ChainResult:
        """Run the chain: every step starts as soon as the steps it depends on have finished.

        Args:
            inputs: the chain's inputs by name (or pass them as keywords).
            on_error: overrides the chain's policy for this run.

        Returns:
            Every step's output, status and timing. With ``on_error="continue"`` some steps
            may have failed or been skipped (``result.ok`` is false).

        Raises:
            ChainFailedError: with ``on_error="fail"``, a step failed; running steps were
                cancelled. It is an ``ExceptionGroup`` of the steps' errors and carries the
                partial result.
            ConfigurationError: an invalid graph, or a missing or unknown input.
        """
        policy: OnError = on_error if on_error is not None else self.on_error
        _check_on_error(policy)
        order = self.compile()
        given = self._check_inputs({**(inputs or {}), **kw_inputs})
        return await _Run(self, order, given, policy).run()

    def _check_inputs(self, given: dict[str, Any]) -> dict[str, Any]:
        unknown = [k for k in given if k not in self._inputs]
        if unknown:
            declared = ", ".join(self._inputs) or "none"
            raise ConfigurationError(
                f"chain {self.name!r} got unknown input(s) {', '.join(map(repr, unknown))}; "
                f"its inputs: {declared}"
            )
        values = dict(given)
        for name, inp in self._inputs.items():
            if name in values:
                continue
            if inp.required:
                users = [
                    s.name
                    for s in self._steps.values()
                    if any(
                        isinstance(v, Input) and v.name == name
                        for v in (*s.inputs.values(), s.items)
                    )
                ]
                raise ConfigurationError(
                    f"chain {self.name!r} needs input {name!r} (used by step(s) "
                    f"{', '.join(map(repr, users))})"
                )
            values[name] = inp.default
        return values


class _Run:
    """The state of one chain run."""

    def __init__(
        self, chain: Chain, order: tuple[str, ...], inputs: dict[str, Any], policy: OnError
    ) -> None:
        self.chain = chain
        self.steps = chain._steps
        self.order = order
        self.inputs = inputs
        self.policy = policy
        self.records: dict[str, StepRecord] = {}
        self.started: dict[str, float] = {}
        self.waiting: dict[str, int] = {n: len(set(s.deps)) for n, s in self.steps.items()}
        self.dependants: dict[str, list[str]] = {n: [] for n in self.steps}
        for n, s in self.steps.items():
            for d in set(s.deps):
                self.dependants[d].append(n)
        self.span_contexts: dict[str, Any] = {}
        self.failures: list[Exception] = []
        self.t0 = 0.0
        self._tg: TaskGroup | None = None

    @property
    def tg(self) -> TaskGroup:
        assert self._tg is not None
        return self._tg

    def now(self) -> float:
        return anyio.current_time() - self.t0

    async def run(self) -> ChainResult:
        chain = self.chain
        self.t0 = anyio.current_time()
        with telemetry.span(
            f"chain {chain.name}",
            **{
                "genfan.chain.name": chain.name,
                "genfan.chain.steps": len(self.steps),
                "genfan.chain.on_error": self.policy,
            },
        ) as span:
            try:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    for name in self.order:
                        if self.waiting[name] == 0:
                            tg.start_soon(self.run_step, name, name=f"step {name}")
            finally:
                self.close_records()
            result = ChainResult(
                chain=chain.name,
                steps={n: self.records[n] for n in self.steps},
                elapsed=self.now(),
            )
            counts = {
                s: sum(r.status == s for r in result.steps.values())
                for s in ("ok", "failed", "skipped", "cancelled")
            }
            for s, c in counts.items():
                span.set_attribute(f"genfan.chain.{s}", c)
            telemetry.event(
                "chain_finished",
                chain=chain.name,
                elapsed=round(result.elapsed, 6),
                ok=counts["ok"],
                failed=counts["failed"],
                skipped=counts["skipped"],
                cancelled=counts["cancelled"],
            )
            if self.failures and self.policy == "fail":
                names = [r.name for r in result.steps.values() if r.status == "failed"]
                span.set_attribute("error.type", "ChainFailedError")
                raise ChainFailedError(
                    f"chain {chain.name!r} failed at step(s) {', '.join(map(repr, names))}",
                    self.failures,
                    result=result,
                )
            return result

    def close_records(self) -> None:
        """Steps that never started are skipped; steps still marked running were cancelled."""
        now = self.now()
        for name, step in self.steps.items():
            if name in self.records:
                continue
            if name in self.started:
                self.records[name] = StepRecord(
                    name=name,
                    kind=step.kind,
                    status="cancelled",
                    started=self.started[name],
                    finished=now,
                )
            else:
                self.records[name] = StepRecord(
                    name=name,
                    kind=step.kind,
                    status="skipped",
                    reason="the chain stopped before it could start",
                )

    def resolve(self, value: Any) -> Any:
        if isinstance(value, StepRef):
            return self.records[value.name].output
        if isinstance(value, Input):
            return self.inputs[value.name]
        return value

    async def run_step(self, name: str) -> None:
        step = self.steps[name]
        self.started[name] = self.now()
        links = _links(self.span_contexts[d] for d in step.deps if d in self.span_contexts)
        error: Exception | None = None
        output: Any = None
        with telemetry.get_tracer().start_as_current_span(
            f"chain_step {name}",
            attributes={
                "genfan.chain.name": self.chain.name,
                "genfan.chain.step": name,
                "genfan.chain.step.kind": step.kind,
                "genfan.chain.step.map": step.item_param is not None,
            },
            links=links,
        ) as span:
            self.span_contexts[name] = span.get_span_context()
            kwargs = {k: self.resolve(v) for k, v in step.inputs.items()}
            try:
                if step.item_param is not None:
                    output = await self.run_map(step, kwargs, span)
                else:
                    output = await _call_step(step, kwargs)
            except Exception as exc:
                error = exc
                exc.add_note(f"in step {name!r} of chain {self.chain.name!r}")
                span.set_attribute("error.type", type(exc).__name__)
                _set_error_status(span, exc)
            except BaseException:
                span.set_attribute("genfan.chain.step.cancelled", True)
                raise
        finished = self.now()
        if error is None:
            self.records[name] = StepRecord(
                name=name,
                kind=step.kind,
                status="ok",
                output=output,
                started=self.started[name],
                finished=finished,
            )
            telemetry.event(
                "chain_step_finished",
                chain=self.chain.name,
                step=name,
                elapsed=round(finished - self.started[name], 6),
            )
        else:
            self.records[name] = StepRecord(
                name=name,
                kind=step.kind,
                status="failed",
                error=error,
                started=self.started[name],
                finished=finished,
            )
            self.failures.append(error)
            telemetry.event(
                "chain_step_failed",
                level="info",
                chain=self.chain.name,
                step=name,
                error=type(error).__name__,
            )
            if self.policy == "fail":
                self.tg.cancel_scope.cancel()
                return
        self.settle(name)

    def settle(self, name: str) -> None:
        """``name`` is done: start the dependants whose inputs are all ready; skip the doomed."""
        for dep in self.dependants[name]:
            self.waiting[dep] -= 1
            if self.waiting[dep] > 0 or dep in self.records:
                continue
            bad = [d for d in self.steps[dep].deps if self.records[d].status != "ok"]
            if bad:
                self.records[dep] = StepRecord(
                    name=dep,
                    kind=self.steps[dep].kind,
                    status="skipped",
                    reason=f"step(s) {', '.join(map(repr, bad))} did not succeed",
                )
                telemetry.event(
                    "chain_step_skipped", chain=self.chain.name, step=dep, because=",".join(bad)
                )
                self.settle(dep)
            else:
                self.tg.start_soon(self.run_step, dep, name=f"step {dep}")

    async def run_map(self, step: _Step, kwargs: dict[str, Any], span: Any) -> list[Any]:
        items = self.resolve(step.items)
        if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
            raise TypeError(
                f"map step {step.name!r} needs a list of items, got {type(items).__name__}"
            )
        items = list(items)
        span.set_attribute("genfan.chain.step.items", len(items))
        out: list[Any] = [None] * len(items)
        limiter = (
            anyio.CapacityLimiter(step.max_concurrency)
            if step.max_concurrency is not None
            else None
        )
        failure: list[Exception] = []
        assert step.item_param is not None
        param = step.item_param

        async def one(i: int, item: Any, tg_scope: anyio.CancelScope) -> None:
            try:
                if limiter is not None:
                    async with limiter:
                        out[i] = await _call_step(step, {**kwargs, param: item})
                else:
                    out[i] = await _call_step(step, {**kwargs, param: item})
            except Exception as exc:
                exc.add_note(f"item {i} of map step {step.name!r}")
                failure.append(exc)
                tg_scope.cancel()

        async with anyio.create_task_group() as tg:
            for i, item in enumerate(items):
                tg.start_soon(one, i, item, tg.cancel_scope)
        if failure:
            raise failure[0]
        return out


async def _call_step(step: _Step, kwargs: dict[str, Any]) -> Any:
    if step.retry is None or step.retry.attempts <= 1:
        return await _call_once(step, kwargs)
    retrying = retrying_for(step.retry, step.name, event="chain_step_retry", kind="step")
    async for attempt in retrying:
        with attempt:
            return await _call_once(step, kwargs)
    raise AssertionError("unreachable: tenacity stops with reraise=True")  # pragma: no cover


async def _call_once(step: _Step, kwargs: dict[str, Any]) -> Any:
    if step.timeout is None:
        return await _invoke(step, kwargs)
    with anyio.move_on_after(step.timeout):
        return await _invoke(step, kwargs)
    raise StepTimeoutError(
        f"step {step.name!r} did not finish within {step.timeout:g}s", step=step.name
    )


async def _invoke(step: _Step, kwargs: dict[str, Any]) -> Any:
    fn = step.fn
    if isinstance(fn, Tool):
        return await fn.invoke(kwargs)
    if isinstance(fn, LLMCall) or is_async(fn):
        return await fn(**kwargs)
    if step.thread:
        result = await anyio.to_thread.run_sync(
            functools.partial(fn, **kwargs), abandon_on_cancel=True
        )
    else:
        result = fn(**kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


def _parameters(fn: Callable[..., Any], step: str) -> dict[str, inspect.Parameter]:
    target = fn.fn if isinstance(fn, Tool) else fn
    try:
        return dict(inspect.signature(target).parameters)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"step {step!r}: cannot read the signature of {target!r}: {exc}"
        ) from exc


def _fn_name(fn: Callable[..., Any]) -> str:
    if isinstance(fn, Tool):
        return f"tool {fn.name!r}"
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _check_signature(step: _Step) -> None:
    params = _parameters(step.fn, step.name)
    given = set(step.inputs)
    if step.item_param is not None:
        given.add(step.item_param)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    for n in sorted(given):
        p = named.get(n)
        if p is None and not takes_any:
            listing = ", ".join(named) or "none"
            raise ConfigurationError(
                f"step {step.name!r}: {_fn_name(step.fn)} has no parameter {n!r} "
                f"(its parameters: {listing})"
            )
        if p is not None and p.kind is p.POSITIONAL_ONLY:
            raise ConfigurationError(
                f"step {step.name!r}: parameter {n!r} of {_fn_name(step.fn)} is positional-only "
                "and cannot be given by name"
            )
    missing = [
        n for n, p in named.items() if n not in given and p.default is inspect.Parameter.empty
    ]
    if missing:
        raise ConfigurationError(
            f"step {step.name!r} is missing input(s) {', '.join(map(repr, missing))} "
            f"(required by {_fn_name(step.fn)})"
        )


def _check_timeout(timeout: float | None, step: str) -> float | None:
    if timeout is not None and not (timeout > 0 and timeout != float("inf")):
        raise ConfigurationError(f"step {step!r}: timeout must be > 0 seconds, got {timeout!r}")
    return timeout


def _check_on_error(value: object) -> None:
    if value not in ("fail", "continue"):
        raise ConfigurationError(f"on_error must be 'fail' or 'continue', got {value!r}")


def _links(contexts: Iterable[Any]) -> list[Any]:
    from opentelemetry.trace import Link

    return [Link(c) for c in contexts if c is not None and c.is_valid]


def _set_error_status(span: Any, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
