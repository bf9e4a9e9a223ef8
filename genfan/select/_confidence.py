"""Model confidence and calibration: how sure the model was of an answer, and how often a
selection with a given confidence is right.

* [`answer_confidence`][genfan.select.answer_confidence] reads the token log-probabilities of exactly the tokens that spell
  the extracted answer (``Paris`` in ``The capital of France is Paris.``): the geometric-mean
  probability of those tokens. [`sequence_confidence`][genfan.select.sequence_confidence] does the same over the whole reply.
* [`Calibration`][genfan.select.Calibration] maps a selection's evidence (the vote share, the margin over the runner-up,
  the model's confidence in the answer) to the probability that the answer is right, with a
  logistic model fitted on labelled selections (`Calibration.fit`).
* [`reliability_table`][genfan.select.reliability_table] and [`expected_calibration_error`][genfan.select.expected_calibration_error] measure how well a
  confidence is calibrated: in each confidence bin, the mean confidence against the share right.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .._errors import ConfigurationError
from .._types import Completion

__all__ = [
    "Calibration",
    "ReliabilityBin",
    "answer_confidence",
    "answer_logprobs",
    "expected_calibration_error",
    "reliability_table",
    "sequence_confidence",
]


def answer_logprobs(completion: Completion, start: int, end: int) -> list[float] | None:
    """The log-probabilities of the tokens that overlap ``completion.text[start:end]``.

    ``None`` when the completion carries no log-probabilities, or its tokens do not spell its
    text (a backend that rewrote the text after generating it).
    """
    tokens = completion.logprobs
    if not tokens:
        return None
    text = completion.text
    joined = "".join(t.token for t in tokens)
    shift = 0
    if joined != text:
        shift = joined.find(text) if text else -1
        if shift < 0:
            return None
    lo, hi = start + shift, max(end, start + 1) + shift
    out: list[float] = []
    pos = 0
    for t in tokens:
        nxt = pos + len(t.token)
        if nxt > lo and pos < hi:
            out.append(t.logprob if math.isfinite(t.logprob) else -100.0)
        pos = nxt
        if pos >= hi:
            break
    return out or None


def answer_confidence(completion: Completion, start: int, end: int) -> float | None:
    """The geometric-mean probability of the tokens spelling ``text[start:end]`` (0..1), or
    ``None`` without log-probabilities."""
    values = answer_logprobs(completion, start, end)
    if not values:
        return None
    return math.exp(math.fsum(values) / len(values))


def sequence_confidence(completion: Completion) -> float | None:
    """The geometric-mean token probability of the whole reply (0..1), or ``None``."""
    stats = completion.logprob_stats
    return None if stats is None else stats.probability


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@dataclass(frozen=True)
class Calibration:
    """A logistic map from a selection's evidence to the probability that it is right.

    ``P(right) = sigmoid(intercept + sum(weights[f] * features[f]))``; a feature missing from
    ``features`` counts as its ``defaults`` value (0 unless given).

    Args:
        weights: a weight per feature name.
        intercept: the bias.
        defaults: the value a feature takes when a selection does not have it (e.g. the model's
            confidence when the backend reports no log-probabilities).
        source: where the numbers come from, for explanations and docs.
    """

    weights: Mapping[str, float]
    intercept: float = 0.0
    defaults: Mapping[str, float] = field(default_factory=dict)
    source: str = ""

    def probability(self, features: Mapping[str, float]) -> float:
        """``P(right)`` for a selection with these ``features``."""
        z = self.intercept
        for name, w in self.weights.items():
            z += w * features.get(name, self.defaults.get(name, 0.0))
        return _sigmoid(z)

    @classmethod
    def fit(
        cls,
        rows: Sequence[tuple[Mapping[str, float], bool]],
        *,
        features: Sequence[str] | None = None,
        l2: float = 1e-2,
        defaults: Mapping[str, float] | None = None,
        source: str = "",
        row_weights: Sequence[float] | None = None,
    ) -> Calibration:
        """Fit the logistic map to labelled selections ``(features, was_right)`` (Newton's
        method, a small L2 penalty on the weights).

        Args:
            rows: ``(features, was_right)`` per labelled selection.
            features: the feature names to fit (default: every name in ``rows``).
            l2: the penalty on the weights (not on the intercept).
            defaults: the value of a feature a row lacks (kept in the fitted map).
            source: where the numbers come from.
            row_weights: how much each row counts (default 1 each): e.g. so that the
                selections over each number of samples weigh the same in total, when the
                fit set holds many more selections over few samples than over many.

        Raises:
            ConfigurationError: no rows, every row has the same label, or ``row_weights``
                does not give one non-negative weight per row.
        """
        if not rows:
            raise ConfigurationError("Calibration.fit needs labelled selections")
        labels = [bool(y) for _, y in rows]
        if row_weights is None:
            rw = [1.0] * len(rows)
        else:
            rw = [float(w) for w in row_weights]
            if len(rw) != len(rows):
                raise ConfigurationError(
                    f"row_weights needs one weight per row: {len(rw)} weights, {len(rows)} rows"
                )
            if not all(math.isfinite(w) and w >= 0.0 for w in rw) or not any(rw):
                raise ConfigurationError("row_weights must be finite and >= 0, and not all 0")
        counted = [y for y, r in zip(labels, rw, strict=True) if r > 0]
        if all(counted) or not any(counted):
            raise ConfigurationError("Calibration.fit needs both right and wrong selections")
        names = list(features) if features is not None else sorted({k for f, _ in rows for k in f})
        fill = dict(defaults or {})
        xs = [[1.0] + [f.get(n, fill.get(n, 0.0)) for n in names] for f, _ in rows]
        ys = [1.0 if y else 0.0 for y in labels]
        d = len(names) + 1
        beta = [0.0] * d
        for _ in range(50):
            grad = [0.0] * d
            hess = [[0.0] * d for _ in range(d)]
            for x, y, r in zip(xs, ys, rw, strict=True):
                p = _sigmoid(sum(b * v for b, v in zip(beta, x, strict=True)))
                w = r * p * (1 - p)
                for i in range(d):
                    grad[i] += r * (p - y) * x[i]
                    for j in range(d):
                        hess[i][j] += w * x[i] * x[j]
            for i in range(1, d):
                grad[i] += l2 * beta[i]
                hess[i][i] += l2
            step = _solve(hess, grad)
            beta = [b - s for b, s in zip(beta, step, strict=True)]
            if max(abs(s) for s in step) < 1e-9:
                break
        return cls(
            weights=dict(zip(names, beta[1:], strict=True)),
            intercept=beta[0],
            defaults=fill,
            source=source,
        )


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve ``a x = b`` (Gaussian elimination with partial pivoting; ``a`` is small)."""
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        if abs(m[col][col]) < 1e-12:
            m[col][col] = 1e-12
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


@dataclass(frozen=True, slots=True)
class ReliabilityBin:
    """One confidence bin of a reliability table.

    Attributes:
        low: the bin's lower edge (inclusive; the last bin includes 1.0).
        high: the bin's upper edge.
        count: selections whose confidence fell in the bin.
        confidence: their mean confidence (``None`` when empty).
        accuracy: the share of them that were right (``None`` when empty).
    """

    low: float
    high: float
    count: int
    confidence: float | None
    accuracy: float | None


def reliability_table(pairs: Iterable[tuple[float, bool]], bins: int = 10) -> list[ReliabilityBin]:
    """Bin ``(confidence, was_right)`` pairs into ``bins`` equal-width confidence bins."""
    if bins < 1:
        raise ConfigurationError(f"bins must be >= 1, got {bins!r}")
    groups: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for confidence, right in pairs:
        c = min(1.0, max(0.0, float(confidence)))
        groups[min(bins - 1, int(c * bins))].append((c, bool(right)))
    out = []
    for i, g in enumerate(groups):
        out.append(
            ReliabilityBin(
                low=i / bins,
                high=(i + 1) / bins,
                count=len(g),
                confidence=math.fsum(c for c, _ in g) / len(g) if g else None,
                accuracy=sum(r for _, r in g) / len(g) if g else None,
            )
        )
    return out


def expected_calibration_error(pairs: Iterable[tuple[float, bool]], bins: int = 10) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over the bins."""
    table = reliability_table(pairs, bins)
    total = sum(b.count for b in table)
    if total == 0:
        return 0.0
    return (
        math.fsum(
            b.count * abs((b.confidence or 0.0) - (b.accuracy or 0.0)) for b in table if b.count
        )
        / total
    )
