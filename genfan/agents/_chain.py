"""The `Chain` builder: declare inputs and steps, wire them by their inputs, check the graph.

This is the LLMCompiler idea (Kim et al. 2023) without the planner: the dependency graph comes
from the inputs you wire, and independent steps (LLM calls, fan-outs, tools, plain functions)
run at once. Map steps run one task per item of a list (bounded), and any step with several
inputs is a join.

A failing step fails only what depends on it (``on_error="continue"``), or stops the whole chain
and cancels its running steps (``on_error="fail"``, the default).

Where the rest lives: the graph's parts and the declaration checks in ``_chain_graph.py``, the
LLM step in ``_llm_call.py``, the scheduler in ``_chain_run.py``, the records it returns (and
``ChainFailedError``) in ``_chain_result.py``.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, overload

from pydantic import BaseModel

from .._backend import Backend
from .._errors import ConfigurationError
from .._sync import not_awaited, run_sync
from .._types import ChatRequest
from ..resilience import RetryPolicy
from ._chain_graph import (
    MISSING,
    Input,
    OnError,
    StepRef,
    StepSpec,
    check_on_error,
    check_signature,
    check_timeout,
    fn_name,
    parameters,
    step_kind,
)
from ._chain_result import ChainResult
from ._chain_run import ChainRun
from ._llm_call import LLMCall
from ._retry import as_retry
from ._tools import Tool

__all__ = ["Chain"]

T = TypeVar("T")
R = TypeVar("R")
M = TypeVar("M", bound=BaseModel)


class _StepDecorator(Protocol):
    @overload
    def __call__(self, fn: Tool[R], /) -> StepRef[R]: ...
    @overload
    def __call__(self, fn: Callable[..., Awaitable[R]], /) -> StepRef[R]: ...
    @overload
    def __call__(self, fn: Callable[..., R], /) -> StepRef[R]: ...


class Chain:
    """A graph of steps, built by naming each step's inputs.

    Args:
        name: the chain's name in spans, logs and errors.
        on_error: ``fail`` (default): the first failing step cancels the running ones and
            `run` raises `ChainFailedError`; ``continue``: steps that depend on a
            failed step are skipped, the rest finish, and `run` returns partial results.

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
        # from sync code: result = chain.run_sync(question="What is LLMCompiler?")
        ```
    """

    def __init__(self, name: str = "chain", *, on_error: OnError = "fail") -> None:
        check_on_error(on_error)
        self.name = name
        self.on_error: OnError = on_error
        self._steps: dict[str, StepSpec] = {}
        self._inputs: dict[str, Input[Any]] = {}
        self._order: tuple[str, ...] | None = None

    def __repr__(self) -> str:
        return f"Chain(name={self.name!r}, steps={list(self._steps)!r})"

    @property
    def step_names(self) -> list[str]:
        return list(self._steps)

    def input(self, name: str, type: type[T] | None = None, *, default: Any = MISSING) -> Input[T]:
        """Declare a value the caller passes to `run`."""
        inp: Input[T] = Input(name, type, default=default)
        self._inputs[name] = inp
        return inp

    def ref(self, name: str) -> StepRef[Any]:
        """A reference to a step by name, possibly declared later (checked by `compile`)."""
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
        """Add a step that calls ``fn`` (async or sync function, `Tool`, agent method).

        Each keyword names one of ``fn``'s parameters and gives its value: a `StepRef`
        (the output of that step: a dependency), an `Input`, or a constant.

        Args:
            name: unique step name.
            fn: what to call. A `Tool` runs under its own validation, timeout, retries
                and bulkhead.
            inputs: the same as keywords, for parameters named like this method's options.
            after: steps that must finish successfully first, without passing their output.
            timeout: seconds the step may take (each attempt); then `StepTimeoutError`.
            retry: retry policy for the step (an attempt count or a `RetryPolicy`).
            thread: run a sync ``fn`` in a worker thread (default: inline, for cheap functions).

        Returns:
            A reference to the step's output.

        Raises:
            ConfigurationError: duplicate name, a missing or unknown parameter, a reference from
                another chain.
        """
        values = self._merge_inputs(name, inputs, kw_inputs)
        return self._add(
            StepSpec(
                name=name,
                kind=step_kind(fn),
                fn=fn,
                inputs=values,
                after=self._after(name, after),
                timeout=check_timeout(timeout, name),
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
        """Decorator style of `step`: the decorated function becomes a step (named after
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

        ``model`` may be a backend or a [`FanOut`][genfan.FanOut] (then the fan-out's chosen
        answer is the output). The output is the answer's text, or a ``response_model``
        instance. See `LLMCall` and `step` for the other arguments.
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
            items: a step's output (a list), an `Input`, or a constant list.
            item_param: the parameter that receives each item.
            max_concurrency: at most this many items run at once (default: all).

        See `step` for the other arguments.
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
        params = parameters(fn, name)
        if item_param is None:
            free = [p for p in params if p not in values]
            if not free:
                raise ConfigurationError(
                    f"map step {name!r}: {fn_name(fn)} has no parameter left to receive each item"
                )
            item_param = free[0]
        elif item_param in values:
            raise ConfigurationError(
                f"map step {name!r}: item_param {item_param!r} is also given as an input"
            )
        return self._add(
            StepSpec(
                name=name,
                kind=step_kind(fn),
                fn=fn,
                inputs=values,
                after=self._after(name, after),
                item_param=item_param,
                items=items,
                max_concurrency=max_concurrency,
                timeout=check_timeout(timeout, name),
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
        return self._add(StepSpec(name=name, kind="join", fn=fn, inputs=values))

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

    def _add(self, step: StepSpec) -> StepRef[Any]:
        name = step.name
        if not name or not isinstance(name, str):
            raise ConfigurationError(f"a step needs a non-empty name, got {name!r}")
        if name in self._steps:
            raise ConfigurationError(f"chain {self.name!r} already has a step named {name!r}")
        if not callable(step.fn):
            raise ConfigurationError(f"step {name!r}: {step.fn!r} is not callable")
        if step.kind != "join":
            check_signature(step)
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

        Called by `run`; call it yourself to fail fast at start-up.

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
        """Run the chain: every step starts as soon as the steps it depends on have finished:
        ``result = await chain.run(question="...")`` (from sync code: `run_sync`).

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
        check_on_error(policy)
        order = self.compile()
        not_awaited(inputs, "Chain.run()")
        given = self._check_inputs({**(inputs or {}), **kw_inputs})
        for name, value in given.items():
            not_awaited(value, f"Chain.run() input {name!r}")
        return await ChainRun(self.name, self._steps, order, given, policy).run()

    def run_sync(
        self,
        inputs: Mapping[str, Any] | None = None,
        /,
        *,
        on_error: OnError | None = None,
        **kw_inputs: Any,
    ) -> ChainResult:
        """`run` for sync code: ``result = chain.run_sync(question="...")``.

        It blocks until the chain has finished. It works in a plain script and inside a running
        event loop (a notebook), whose loop it blocks meanwhile, as a sync HTTP client would: in
        async code, ``await chain.run(...)`` instead. Every sync call runs on one event loop
        genfan keeps for the process, so backends made once serve them all.

        Raises:
            ChainFailedError: with ``on_error="fail"``, a step failed.
            ConfigurationError: an invalid graph, or a missing or unknown input.
        """
        return run_sync(self.run, inputs, on_error=on_error, **kw_inputs)

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
