"""The scorer protocol: a score in 0..1 and a short reason for each answered candidate.

A scorer sees the request and every candidate of a fan-out (failed and cancelled ones too, so
it can tell how many answered) and returns a [`Score`][genfan.select.Score] per successful candidate, keyed by
`Candidate.index`. ``score`` may be a plain or an ``async`` method. The selector
([`Select`][genfan.select.Select]) combines scorers with weights.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias, runtime_checkable

from .._errors import ConfigurationError
from .._types import ChatRequest
from ._base import Candidate

__all__ = [
    "CandidateFn",
    "CandidateScorer",
    "FunctionScorer",
    "Score",
    "ScoreLike",
    "ScoreMap",
    "Scorer",
    "ScorerLike",
    "as_scorer",
    "run_scorer",
    "scorer",
]


@dataclass(frozen=True, slots=True)
class Score:
    """One scorer's verdict on one candidate.

    Attributes:
        value: 0 (worst) to 1 (best).
        reason: a few words saying why, shown in the selection's explanation.
    """

    value: float
    reason: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.value, int | float) and 0.0 <= self.value <= 1.0):
            raise ValueError(f"a score must be a number in [0, 1], got {self.value!r}")


#: A score per candidate index.
ScoreMap: TypeAlias = Mapping[int, Score]


@runtime_checkable
class Scorer(Protocol):
    """Scores the candidates of a fan-out.

    ``score`` returns a [`Score`][genfan.select.Score] per successful candidate, keyed by ``Candidate.index``;
    a successful candidate it leaves out counts as 0. It may be ``async``.
    """

    @property
    def name(self) -> str:
        """A short name used in reasons, explanations and telemetry."""
        ...

    def score(
        self, request: ChatRequest, candidates: Sequence[Candidate]
    ) -> ScoreMap | Awaitable[ScoreMap]: ...


#: What a per-candidate function may return.
ScoreLike: TypeAlias = Score | float | bool | tuple[float, str]

#: A function scoring one candidate: ``(request, candidate) -> ScoreLike``, plain or ``async``.
CandidateFn: TypeAlias = Callable[[ChatRequest, Candidate], ScoreLike | Awaitable[ScoreLike]]

#: A scorer, or a per-candidate function (see [`scorer`][genfan.select.scorer]).
ScorerLike: TypeAlias = Scorer | CandidateFn


def _to_score(value: object, who: str) -> Score:
    if isinstance(value, Score):
        return value
    if isinstance(value, bool):
        return Score(1.0 if value else 0.0, "passes" if value else "fails")
    if isinstance(value, tuple) and len(value) == 2:
        number, reason = value
        return Score(_to_score(number, who).value, str(reason))
    if isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 1.0:
        return Score(float(value))
    raise ConfigurationError(
        f"scorer {who} must return a Score, a bool, a number in [0, 1] or (number, reason); "
        f"got {value!r}"
    )


class CandidateScorer:
    """Base class for scorers that judge each successful candidate on its own.

    Subclasses implement `score_one`.
    """

    name: str = "scorer"

    def score_one(self, request: ChatRequest, candidate: Candidate) -> Score:
        raise NotImplementedError

    def score(self, request: ChatRequest, candidates: Sequence[Candidate]) -> dict[int, Score]:
        return {c.index: self.score_one(request, c) for c in candidates if c.ok}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class FunctionScorer:
    """A scorer from a per-candidate function (plain or ``async``).

    The function gets ``(request, candidate)`` and returns a [`Score`][genfan.select.Score], a bool (pass 1 /
    fail 0), a number in [0, 1], or ``(number, reason)``.
    """

    def __init__(self, fn: CandidateFn, *, name: str | None = None) -> None:
        if not callable(fn):
            raise ConfigurationError(f"a scorer function must be callable, got {fn!r}")
        self._fn = fn
        self.name: str = name or str(getattr(fn, "__name__", "custom"))

    async def score(
        self, request: ChatRequest, candidates: Sequence[Candidate]
    ) -> dict[int, Score]:
        out: dict[int, Score] = {}
        for c in candidates:
            if not c.ok:
                continue
            value: object = self._fn(request, c)
            if inspect.isawaitable(value):
                value = await value
            out[c.index] = _to_score(value, self.name)
        return out

    def __repr__(self) -> str:
        return f"FunctionScorer(name={self.name!r})"


def scorer(
    fn: CandidateFn | None = None, *, name: str | None = None
) -> FunctionScorer | Callable[[CandidateFn], FunctionScorer]:
    """Turn a per-candidate function into a scorer; usable as ``@scorer`` or ``@scorer(name=...)``.

    Example:
        ```python
        @scorer
        def short(request, candidate):
            return len(candidate.text) < 200
        ```
    """
    if fn is None:
        return lambda f: FunctionScorer(f, name=name)
    return FunctionScorer(fn, name=name)


def as_scorer(obj: ScorerLike) -> Scorer:
    """A [`Scorer`][genfan.select.Scorer] as is; a function wrapped in `FunctionScorer`."""
    if isinstance(obj, Scorer):
        return obj
    if callable(obj):
        return FunctionScorer(obj)
    raise ConfigurationError(f"expected a Scorer or a function, got {type(obj).__name__}")


async def run_scorer(
    s: Scorer, request: ChatRequest, candidates: Sequence[Candidate]
) -> dict[int, Score]:
    """Run a (sync or async) scorer; check what it returned."""
    result = s.score(request, candidates)
    if inspect.isawaitable(result):
        result = await result
    if not isinstance(result, Mapping):
        raise ConfigurationError(
            f"scorer {s.name} must return a mapping of candidate index to Score, "
            f"got {type(result).__name__}"
        )
    valid = {c.index for c in candidates}
    out: dict[int, Score] = {}
    for index, value in result.items():
        if index not in valid:
            raise ConfigurationError(f"scorer {s.name} scored unknown candidate index {index!r}")
        out[index] = _to_score(value, s.name)
    return out
