"""Adaptive sampling's stopping rules: is the leading answer settled, or is another wave needed?

Self-consistency draws a fixed number of samples; most questions are settled long before the
last one (all agree after three). Adaptive-Consistency (Aggarwal et al. 2023) draws samples in
waves and stops as soon as a stopping criterion on the vote counts says more samples would not
change the winner: with the Beta criterion, when the posterior probability that the leading
answer is the most likely one exceeds a threshold (0.95). It cut the samples up to 7.9x for
under 0.1 points of accuracy.

A [`StoppingRule`][genfan.select.StoppingRule] reads the vote counts (largest first) and how many samples are still in
the budget; [`AdaptiveConsistency`][genfan.select.AdaptiveConsistency] is the Beta criterion, plus the certainty that the
leader cannot be caught any more; [`Majority`][genfan.select.Majority] is a laxer rule (the leader
holds half the votes). [`Waves`][genfan.select.Waves] is the schedule a fan-out follows (wave sizes
and the rule) and counts the votes with a vote counter (by default the ``auto`` selector's
answer extraction, weighted by model confidence where the answers carry it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .._errors import ConfigurationError
from .._types import ChatRequest
from ._base import Candidate

__all__ = [
    "AdaptiveConsistency",
    "CannotLose",
    "ConfidenceEstimator",
    "Majority",
    "StoppingRule",
    "VoteCounter",
    "Waves",
    "beta_leader_probability",
    "regularized_beta",
]


@runtime_checkable
class StoppingRule(Protocol):
    """Decides from the vote counts whether the leading answer is settled."""

    def settled(self, counts: Sequence[float], remaining: int) -> bool:
        """``counts``: the (possibly weighted) votes per distinct answer, largest first;
        ``remaining``: samples still in the budget. True: stop sampling."""
        ...


@runtime_checkable
class VoteCounter(Protocol):
    """Counts the votes of a fan-out's candidates (what a stopping rule reads)."""

    def vote_counts(self, request: ChatRequest, candidates: Sequence[Candidate]) -> list[float]:
        """The votes per distinct answer, largest first (answers with no vote left out)."""
        ...


@runtime_checkable
class ConfidenceEstimator(Protocol):
    """Says how likely the answer it would pick among the candidates is right (0..1)."""

    def confidence(self, request: ChatRequest, candidates: Sequence[Candidate]) -> float: ...


def _beta_cf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-12:
            break
    return h


def regularized_beta(x: float, a: float, b: float) -> float:
    """``I_x(a, b)``: the CDF at ``x`` of a Beta(``a``, ``b``) distribution (``a, b > 0``)."""
    if a <= 0 or b <= 0:
        raise ValueError(f"a and b must be > 0, got {a!r}, {b!r}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, 1.0 - x) / b


def beta_leader_probability(first: float, second: float, prior: float = 1.0) -> float:
    """Adaptive-Consistency's Beta criterion: the posterior probability that the leading
    answer is more likely than the runner-up, ``P(p > 0.5)`` for
    ``p ~ Beta(first + prior, second + prior)``."""
    return 1.0 - regularized_beta(0.5, first + prior, second + prior)


@dataclass(frozen=True)
class CannotLose:
    """Stop when the leader's lead is larger than the samples left: no draw can change it."""

    def settled(self, counts: Sequence[float], remaining: int) -> bool:
        if not counts:
            return remaining <= 0
        lead = counts[0] - (counts[1] if len(counts) > 1 else 0.0)
        return lead > remaining

    def __repr__(self) -> str:
        return "CannotLose()"


@dataclass(frozen=True)
class AdaptiveConsistency:
    """Adaptive-Consistency's Beta stopping criterion (Aggarwal et al. 2023).

    Stop when ``P(leader more likely than runner-up) >= threshold`` under a Beta posterior on
    the two largest vote counts, or when the leader can no longer be caught
    ([`CannotLose`][genfan.select.CannotLose]), and at least ``min_votes`` votes were cast.

    Args:
        threshold: the posterior probability needed (the paper's 0.95).
        prior: the Beta prior's pseudo-counts (1: uniform).
        min_votes: never stop on fewer votes (answers with nothing extractable cast none).
    """

    threshold: float = 0.95
    prior: float = 1.0
    min_votes: float = 2.0

    def __post_init__(self) -> None:
        if not 0.5 <= self.threshold < 1.0:
            raise ConfigurationError(f"threshold must be in [0.5, 1), got {self.threshold!r}")
        if not self.prior > 0:
            raise ConfigurationError(f"prior must be > 0, got {self.prior!r}")

    def settled(self, counts: Sequence[float], remaining: int) -> bool:
        if CannotLose().settled(counts, remaining):
            return True
        if not counts or sum(counts) < self.min_votes:
            return False
        second = counts[1] if len(counts) > 1 else 0.0
        return beta_leader_probability(counts[0], second, self.prior) >= self.threshold


@dataclass(frozen=True)
class Majority:
    """Stop once the leading answer holds a majority: at least ``share`` of the votes cast and
    at least ``votes`` votes (or once it cannot be caught, [`CannotLose`][genfan.select.CannotLose]).

    Laxer than the Beta criterion: two agreeing answers out of three settle it. On a small model
    whose first answers rarely all agree, most of what more samples add is on the questions
    where they all differ, and this rule keeps drawing there while it stops where two agree
    (see the selection benchmark in docs/benchmarks.md).

    Args:
        votes: the fewest votes the leader needs (weighted votes where the counter weighs them).
        share: the smallest share of the votes cast it needs (0.5: at least half).
    """

    votes: float = 2.0
    share: float = 0.5

    def __post_init__(self) -> None:
        if not self.votes > 0:
            raise ConfigurationError(f"votes must be > 0, got {self.votes!r}")
        if not 0.0 < self.share <= 1.0:
            raise ConfigurationError(f"share must be in (0, 1], got {self.share!r}")

    def settled(self, counts: Sequence[float], remaining: int) -> bool:
        if CannotLose().settled(counts, remaining):
            return True
        if not counts:
            return False
        return counts[0] >= self.votes and counts[0] >= self.share * math.fsum(counts)


@dataclass(frozen=True)
class Waves:
    """How a fan-out draws its targets: in waves, stopping once the answer is settled.

    Args:
        size: targets per wave after the first.
        first: targets in the first wave (default ``size``).
        stop: the stopping rule (default [`AdaptiveConsistency`][genfan.select.AdaptiveConsistency]).
        counter: counts the votes after each wave (default: the ``auto`` selector's answer
            extraction and confidence weighting, [`AutoSelect`][genfan.select.AutoSelect]).
        confident: also stop once the counter's calibrated probability that its current pick
            is right reaches this (the counter must estimate it, as ``AutoSelect`` does); a
            question the model is sure of need not wait for the Beta criterion.

    Example:
        ```python
        fan = FanOut([Target(backend=local, temperature=0.7)] * 9, waves=Waves(size=3))
        result = await fan.run("What is 17 * 3?")   # 3 samples, then 3 more only if unsettled
        ```
    """

    size: int = 3
    first: int | None = None
    stop: StoppingRule = field(default_factory=AdaptiveConsistency)
    counter: VoteCounter | None = None
    confident: float | None = None

    def __post_init__(self) -> None:
        if self.confident is not None and not 0.0 < self.confident <= 1.0:
            raise ConfigurationError(f"confident must be in (0, 1], got {self.confident!r}")
        if self.size < 1:
            raise ConfigurationError(f"a wave needs at least 1 target, got size={self.size!r}")
        if self.first is not None and self.first < 1:
            raise ConfigurationError(f"first must be >= 1, got {self.first!r}")

    def plan(self, total: int) -> list[int]:
        """The wave sizes for ``total`` targets (they add up to ``total``)."""
        sizes: list[int] = []
        left = total
        step = self.first or self.size
        while left > 0:
            sizes.append(min(step, left))
            left -= sizes[-1]
            step = self.size
        return sizes

    def _counter(self) -> VoteCounter:
        if self.counter is not None:
            return self.counter
        from ._auto import AutoSelect

        return _DEFAULT_COUNTER.setdefault("auto", AutoSelect())

    def counts(self, request: ChatRequest, candidates: Sequence[Candidate]) -> list[float]:
        """The votes of ``candidates`` per distinct answer, largest first."""
        return self._counter().vote_counts(request, candidates)

    def settled(
        self, request: ChatRequest, candidates: Sequence[Candidate], remaining: int
    ) -> bool:
        """Whether the answers so far settle the question (``remaining`` targets not yet run)."""
        if remaining <= 0:
            return True
        if self.stop.settled(self.counts(request, candidates), remaining):
            return True
        counter = self._counter()
        if self.confident is not None and isinstance(counter, ConfidenceEstimator):
            return counter.confidence(request, candidates) >= self.confident
        return False


_DEFAULT_COUNTER: dict[str, VoteCounter] = {}
