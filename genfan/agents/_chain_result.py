"""What a chain run gives back: a `StepRecord` per step, gathered in a `ChainResult`.

Each record says how its step went (``ok``, ``failed``, ``skipped`` or ``cancelled``), with its
output or error and its timing; the result looks outputs up by step reference or name. A run
that stops on a failure (``on_error="fail"``) raises `ChainFailedError`, which carries
the partial result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, overload

from .._errors import GenfanError
from .._sync import clip
from ._chain_graph import StepKind, StepRef

__all__ = ["ChainFailedError", "ChainResult", "StepRecord", "StepStatus"]

T = TypeVar("T")
R = TypeVar("R")

StepStatus = Literal["ok", "failed", "skipped", "cancelled"]


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

    def __repr__(self) -> str:
        elapsed = "" if self.elapsed is None else f", elapsed={self.elapsed:.3f}s"
        if self.status == "ok":
            detail = f", output={clip(repr(self.output))}"
        elif self.error is not None:
            detail = f", error={clip(f'{type(self.error).__name__}: {self.error}')!r}"
        else:
            detail = f", reason={self.reason!r}" if self.reason else ""
        return f"StepRecord(name={self.name!r}, status={self.status!r}{detail}{elapsed})"


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

    def __repr__(self) -> str:
        bad = [n for n, r in self.steps.items() if not r.ok]
        not_ok = f", not_ok={clip(repr(bad))}" if bad else ""
        ok = len(self.steps) - len(bad)
        return (
            f"ChainResult(chain={self.chain!r}, ok={ok}/{len(self.steps)}{not_ok}, "
            f"elapsed={self.elapsed:.3f}s)"
        )


class ChainFailedError(GenfanError, ExceptionGroup):
    """A chain run with ``on_error="fail"`` stopped because a step failed.

    An ``ExceptionGroup`` of the failing steps' own exceptions (each with a note naming its
    step). Running steps were cancelled.

    Attributes:
        result: the partial result: outputs of the steps that finished, and every step's status.
    """

    result: ChainResult

    def __new__(
        cls, message: str, exceptions: Sequence[Exception], *, result: ChainResult
    ) -> ChainFailedError:
        self = super().__new__(cls, message, exceptions)
        self.result = result
        return self

    def __init__(
        self, message: str, exceptions: Sequence[Exception], *, result: ChainResult
    ) -> None:
        super().__init__(message, exceptions)
        self.result = result

    def derive(self, excs: Sequence[Exception]) -> ChainFailedError:  # type: ignore[override]
        return ChainFailedError(self.message, excs, result=self.result)
