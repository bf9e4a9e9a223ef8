"""Candidates, selections and the selector protocol: what the fan-out hands to selection.

Selection sees candidates (answers or typed failures), never vendors or guards.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeAlias, runtime_checkable

from .._errors import BackendError, ConfigurationError
from .._sync import clip
from .._types import ChatRequest, Completion

__all__ = [
    "Candidate",
    "CandidateStatus",
    "FirstSuccess",
    "Selection",
    "Selector",
    "SelectorLike",
    "as_selector",
]

CandidateStatus = Literal["ok", "failed", "cancelled"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One backend's part in a fan-out: its answer, or the typed error it ended with.

    Attributes:
        index: position of the target in the fan-out.
        backend: the target's name.
        status: ``ok`` (answered), ``failed`` (raised) or ``cancelled`` (stopped unfinished
            because the fan-out was decided or its deadline passed).
        started: seconds from the start of the fan-out to the call's start.
        latency: seconds the call took (until it answered, failed or was cancelled).
        finished_order: 0 for the first call to finish, 1 for the next... (cancelled: ``None``).
    """

    index: int
    backend: str
    status: CandidateStatus
    completion: Completion | None = None
    error: BackendError | None = None
    started: float = 0.0
    latency: float = 0.0
    finished_order: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def text(self) -> str:
        """The answer's text ('' for a failed or cancelled candidate)."""
        return self.completion.text if self.completion is not None else ""

    def __repr__(self) -> str:
        if self.completion is not None:
            detail = f"text={clip(self.completion.text)!r}"
        elif self.error is not None:
            detail = f"error={clip(f'{type(self.error).__name__}: {self.error.message}')!r}"
        else:
            detail = "text=''"
        return (
            f"Candidate(index={self.index}, backend={self.backend!r}, status={self.status!r}, "
            f"{detail}, latency={self.latency:.3f}s)"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    """What the selector decided, and why.

    Attributes:
        chosen: index of the chosen candidate (``None`` when none could be chosen).
        scores: a score per candidate index (higher is better).
        reasons: a short reason per candidate index.
        confidence: how sure the selector is, 0..1, when it can tell (used by cascades).
        explanation: one line for humans.
        method: which selector decided (``first``, ``vote``, ``vote+schema``...).
        by_scorer: each scorer's own score per candidate index, by scorer name.
        rejected: why each candidate that failed a hard filter was left out, by index.
    """

    chosen: int | None
    scores: Mapping[int, float] = field(default_factory=dict)
    reasons: Mapping[int, str] = field(default_factory=dict)
    confidence: float | None = None
    explanation: str = ""
    method: str = ""
    by_scorer: Mapping[str, Mapping[int, float]] = field(default_factory=dict)
    rejected: Mapping[int, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        confidence = "None" if self.confidence is None else f"{self.confidence:.2f}"
        return (
            f"Selection(chosen={self.chosen!r}, method={self.method!r}, "
            f"confidence={confidence}, explanation={clip(self.explanation)!r})"
        )


@runtime_checkable
class Selector(Protocol):
    """Picks one of the candidates of a fan-out."""

    async def select(self, request: ChatRequest, candidates: Sequence[Candidate]) -> Selection: ...


#: A selector, a selector's name (``"auto"``, ``"vote"``... see
#: [`selector_from_name`][genfan.select.selector_from_name]), or a plain function
#: ``(request, candidates) -> Candidate | int | None`` (sync or async).
SelectorLike: TypeAlias = (
    Selector
    | str
    | Callable[[ChatRequest, Sequence[Candidate]], "Candidate | int | None"]
    | Callable[[ChatRequest, Sequence[Candidate]], Awaitable["Candidate | int | None"]]
)


class FirstSuccess:
    """The simplest selector: the successful candidate that finished first."""

    async def select(self, request: ChatRequest, candidates: Sequence[Candidate]) -> Selection:
        ok = [c for c in candidates if c.ok]
        if not ok:
            return Selection(chosen=None, explanation="no candidate succeeded", method="first")
        best = min(ok, key=lambda c: c.finished_order if c.finished_order is not None else 1 << 30)
        return Selection(
            chosen=best.index,
            scores={c.index: 1.0 if c is best else 0.0 for c in ok},
            explanation=f"{best.backend} answered first",
            method="first",
        )


class _FunctionSelector:
    def __init__(self, fn: Callable[..., object]) -> None:
        self._fn = fn
        self._name = getattr(fn, "__name__", "custom")

    async def select(self, request: ChatRequest, candidates: Sequence[Candidate]) -> Selection:
        picked = self._fn(request, candidates)
        if inspect.isawaitable(picked):
            picked = await picked
        if picked is None:
            return Selection(chosen=None, explanation=f"{self._name} chose none", method=self._name)
        if isinstance(picked, Selection):
            return picked
        if isinstance(picked, Candidate):
            index = picked.index
        elif isinstance(picked, int):
            index = picked
        else:
            raise ConfigurationError(
                f"selector function {self._name} must return a Candidate, an index or None, "
                f"not {type(picked).__name__}"
            )
        if not 0 <= index < len(candidates):
            raise ConfigurationError(
                f"selector function {self._name} returned index {index} "
                f"but there are {len(candidates)} candidates"
            )
        return Selection(chosen=index, explanation=f"chosen by {self._name}", method=self._name)


def as_selector(select: SelectorLike | None) -> Selector:
    """Turn ``None`` (first success), a selector, a selector's name (``"auto"``...), or a
    function into a [`Selector`][genfan.select.Selector]."""
    if select is None:
        return FirstSuccess()
    if isinstance(select, Selector):
        return select
    if isinstance(select, str):
        from ._factory import selector_from_name

        return selector_from_name(select)
    if callable(select):
        return _FunctionSelector(select)
    raise ConfigurationError(
        f"select must be a Selector or a function, not {type(select).__name__}"
    )
