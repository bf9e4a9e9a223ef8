"""Running a chain: every step starts as soon as the steps it depends on have finished.

`ChainRun` is the state of one run. It starts the steps with no dependencies in one task
group; each finished step starts the dependants whose inputs are now all ready, and skips those
that depend on a failed step. Map steps run one task per item (bounded). The error policy
decides what a failure does: ``fail`` cancels the running steps and raises
`ChainFailedError`; ``continue`` lets the rest finish. Each step (or map item) is called
under its own timeout and retries, through genfan's one retry engine.
Spans: one per chain, one per step, linked to the steps whose outputs it took.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from .. import telemetry
from ._chain_graph import Input, OnError, StepRef, StepSpec
from ._chain_result import ChainFailedError, ChainResult, StepRecord
from ._errors import StepTimeoutError
from ._llm_call import LLMCall
from ._retry import retrying_for
from ._tools import Tool, is_async

__all__ = ["ChainRun"]


class ChainRun:
    """The state of one chain run."""

    def __init__(
        self,
        name: str,
        steps: Mapping[str, StepSpec],
        order: tuple[str, ...],
        inputs: dict[str, Any],
        policy: OnError,
    ) -> None:
        self.name = name
        self.steps = steps
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
        self.t0 = anyio.current_time()
        with telemetry.span(
            f"chain {self.name}",
            **{
                "genfan.chain.name": self.name,
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
                chain=self.name,
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
                chain=self.name,
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
                    f"chain {self.name!r} failed at step(s) {', '.join(map(repr, names))}",
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
                "genfan.chain.name": self.name,
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
                exc.add_note(f"in step {name!r} of chain {self.name!r}")
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
                chain=self.name,
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
                chain=self.name,
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
                    "chain_step_skipped", chain=self.name, step=dep, because=",".join(bad)
                )
                self.settle(dep)
            else:
                self.tg.start_soon(self.run_step, dep, name=f"step {dep}")

    async def run_map(self, step: StepSpec, kwargs: dict[str, Any], span: Any) -> list[Any]:
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


async def _call_step(step: StepSpec, kwargs: dict[str, Any]) -> Any:
    """Call the step once, or under its retry policy; each attempt under its timeout."""
    if step.retry is None or step.retry.attempts <= 1:
        return await _call_once(step, kwargs)
    retrying = retrying_for(step.retry, step.name, event="chain_step_retry", kind="step")
    async for attempt in retrying:
        with attempt:
            return await _call_once(step, kwargs)
    raise AssertionError("unreachable: tenacity stops with reraise=True")  # pragma: no cover


async def _call_once(step: StepSpec, kwargs: dict[str, Any]) -> Any:
    if step.timeout is None:
        return await _invoke(step, kwargs)
    with anyio.move_on_after(step.timeout):
        return await _invoke(step, kwargs)
    raise StepTimeoutError(
        f"step {step.name!r} did not finish within {step.timeout:g}s", step=step.name
    )


async def _invoke(step: StepSpec, kwargs: dict[str, Any]) -> Any:
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


def _links(contexts: Iterable[Any]) -> list[Any]:
    from opentelemetry.trace import Link

    return [Link(c) for c in contexts if c is not None and c.is_valid]


def _set_error_status(span: Any, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
