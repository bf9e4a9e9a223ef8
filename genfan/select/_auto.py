"""The ``auto`` selector: read the answer the question asks for, vote, weigh by confidence.

No knob needs setting for the task at hand. For each request it infers the form of the answer
([`infer_form`][genfan.select.infer_form]: a number, a choice letter, JSON, a short phrase or name, or
free text), reads that answer out of every reply (echoes of the question cast no vote), and
votes among the answers that are comparable, each vote weighted by the model's confidence in the
tokens of its answer where the replies carry log-probabilities. Free text, or replies with
nothing readable, fall back to consensus (the reply most similar to the others).

``Selection.confidence`` is the calibrated probability that the chosen answer is right, from the
vote share, the margin over the runner-up, the model's confidence in the answer and the answer
form, mapped by a [`Calibration`][genfan.select.Calibration] (by default `DEFAULT_CALIBRATION`,
fitted on the selection benchmark's dev splits; fit your own with `Calibration.fit` on labelled
selections of your model). For free text it is the consensus score: there is no vote to
calibrate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .. import telemetry
from .._errors import ConfigurationError
from .._types import ChatRequest, Completion
from ._base import Candidate, Selection
from ._confidence import Calibration, answer_confidence, sequence_confidence
from ._forms import AnswerForm, Extracted, extract_answer, infer_form
from ._scorer import Score
from ._select import _TIE_BREAKS, TieBreak

__all__ = ["DEFAULT_CALIBRATION", "AutoAgreementKey", "AutoSelect", "Weighting"]

#: How votes are weighted: by the model's confidence in the answer's own tokens (``answer``),
#: in the whole reply (``sequence``), or not at all (``none``).
Weighting = Literal["answer", "sequence", "none"]

#: Fitted on the dev splits of ``benchmarks/data/selection_bench.jsonl`` in the committed draws
#: 1 and 2 of samples (SmolLM2-135M-Instruct in float32, temperature 0.4; 131 questions each),
#: on the selections over 1, 3, 5, 7 and 9 samples by the default ``AutoSelect()``, each number
#: of samples weighing the same; the features, the answer form among them, were chosen on dev by
#: cross-validation (``python -m benchmarks.selection fit``); see docs/benchmarks.md.
DEFAULT_CALIBRATION = Calibration(
    weights={
        "share": 5.559,
        "margin": -2.069,
        "log_n": 0.592,
        "answer_conf": 5.132,
        "choice": 1.89,
        "short": 2.502,
    },
    intercept=-8.005,
    defaults={"answer_conf": 0.531},
    source=(
        "selection benchmark, dev splits of draws 1 and 2, SmolLM2-135M-Instruct at temperature 0.4"
    ),
)


@dataclass(frozen=True, slots=True)
class _Analysis:
    form: AnswerForm
    ok: list[Candidate]
    kept: list[Candidate]
    extracted: dict[int, Extracted]
    weights: dict[int, float]
    confidence: dict[int, float]
    groups: dict[str, list[int]]  # key -> candidate indices, strongest group first
    group_weight: dict[str, float]
    total_weight: float


class AutoSelect:
    """Votes on the answer the question asks for; needs no task-specific settings.

    Args:
        weight: weigh each vote by the model's confidence in its answer's tokens (``answer``,
            default), in its whole reply (``sequence``) or not (``none``); replies without
            log-probabilities weigh 1.
        keep: the share of replies kept for the vote, the most confident first (by mean token
            log-probability), rounded up: filters out low-confidence samples (DeepConf). The
            default 1.0 keeps all (chosen on the selection benchmark's dev split, where every
            reply voting did better at each sampling temperature tried); 0.75 leaves out the
            least confident quarter (none of 3 or fewer replies). Applies only when every reply
            carries log-probabilities.
        calibration: maps the vote's evidence to ``P(right)`` (default
            `DEFAULT_CALIBRATION`).
        tie_break: among equally strong answers: ``first_finished`` (default), ``fastest``,
            ``cheapest``, ``index`` or a key function.
        name: the selector's name in selections and explanations.

    Example:
        ```python
        fan = FanOut([Target(backend=local, temperature=0.7)] * 9, select=AutoSelect())
        result = await fan.run("What is the capital of Peru? Answer briefly.")
        print(result.text, result.selection.confidence, result.selection.explanation)
        ```
    """

    def __init__(
        self,
        *,
        weight: Weighting = "answer",
        keep: float = 1.0,
        calibration: Calibration | None = None,
        tie_break: TieBreak = "first_finished",
        name: str = "auto",
    ) -> None:
        if weight not in ("answer", "sequence", "none"):
            raise ConfigurationError(
                f"weight must be 'answer', 'sequence' or 'none', got {weight!r}"
            )
        if not 0.0 < keep <= 1.0:
            raise ConfigurationError(f"keep must be in (0, 1], got {keep!r}")
        self.weight: Weighting = weight
        self.keep = keep
        self.calibration = calibration if calibration is not None else DEFAULT_CALIBRATION
        if callable(tie_break):
            self._tie_key: Callable[[Candidate], Any] = tie_break
            self.tie_break = getattr(tie_break, "__name__", "custom")
        elif tie_break in _TIE_BREAKS:
            self._tie_key = _TIE_BREAKS[tie_break]
            self.tie_break = tie_break
        else:
            raise ConfigurationError(
                f"tie_break must be one of {sorted(_TIE_BREAKS)} or a key function, got {tie_break!r}"
            )
        self.name = name

    def __repr__(self) -> str:
        return f"AutoSelect(weight={self.weight!r}, keep={self.keep!r}, name={self.name!r})"

    # -- reading answers -----------------------------------------------------------------

    def form(self, request: ChatRequest) -> AnswerForm:
        """The answer form inferred for ``request``."""
        return infer_form(request)

    def key(self, text: str, request: ChatRequest | None = None) -> str | None:
        """The vote ``text`` casts as an answer to ``request`` (``None``: no vote)."""
        if request is None or not text:
            return None
        found = extract_answer(infer_form(request), text, request)
        return None if found is None else found.key

    def _analyse(self, request: ChatRequest, candidates: Sequence[Candidate]) -> _Analysis:
        form = infer_form(request)
        ok = [c for c in candidates if c.ok and c.completion is not None]
        kept = ok
        if self.keep < 1.0 and len(ok) > 1:
            seq = {c.index: sequence_confidence(c.completion) for c in ok if c.completion}
            if all(v is not None for v in seq.values()):
                n_keep = max(1, math.ceil(self.keep * len(ok) - 1e-9))
                ranked = sorted(ok, key=lambda c: -(seq.get(c.index) or 0.0))
                chosen = {c.index for c in ranked[:n_keep]}
                kept = [c for c in ok if c.index in chosen]
        extracted: dict[int, Extracted] = {}
        weights: dict[int, float] = {}
        confidence: dict[int, float] = {}
        for c in kept:
            assert c.completion is not None
            found = extract_answer(form, c.text, request)
            conf: float | None = None
            if found is not None:
                extracted[c.index] = found
                conf = answer_confidence(c.completion, found.start, found.end)
            seq_conf = sequence_confidence(c.completion)
            if conf is None:
                conf = seq_conf
            if conf is not None:
                confidence[c.index] = conf
            if self.weight == "answer":
                w = conf
            elif self.weight == "sequence":
                w = seq_conf
            else:
                w = None
            weights[c.index] = 1.0 if w is None else max(w, 1e-6)
        groups: dict[str, list[int]] = {}
        for index, found in extracted.items():
            groups.setdefault(found.key, []).append(index)
        group_weight = {k: math.fsum(weights[i] for i in v) for k, v in groups.items()}
        order = {c.index: self._tie_key(c) for c in kept}
        ranked_keys = sorted(
            groups,
            key=lambda k: (-group_weight[k], -len(groups[k]), min(order[i] for i in groups[k])),
        )
        return _Analysis(
            form=form,
            ok=ok,
            kept=kept,
            extracted=extracted,
            weights=weights,
            confidence=confidence,
            groups={k: groups[k] for k in ranked_keys},
            group_weight=group_weight,
            total_weight=math.fsum(weights.values()),
        )

    @property
    def agreement_key(self) -> AutoAgreementKey:
        """``agree=`` for ``FanOut(mode="quorum", quorum=k, agree=...)``: this selector's answer
        key, bound to each request by the fan-out (so echoes of the question never agree)."""
        return AutoAgreementKey(self)

    def early_exit(self, k: int) -> dict[str, Any]:
        """FanOut keyword arguments that stop the fan-out once ``k`` answers agree (as read for
        the question's form) and cancel the calls still running; ``select=`` this selector."""
        if k < 1:
            raise ConfigurationError(f"k must be >= 1 answers that agree, got {k}")
        return {"mode": "quorum", "quorum": k, "agree": self.agreement_key, "select": self}

    def vote_counts(self, request: ChatRequest, candidates: Sequence[Candidate]) -> list[float]:
        """The (confidence-weighted) votes per distinct answer, largest first: what adaptive
        sampling's stopping rule reads. Free text casts no votes."""
        a = self._analyse(request, candidates)
        return [a.group_weight[k] for k in a.groups]

    def confidence(self, request: ChatRequest, candidates: Sequence[Candidate]) -> float:
        """The calibrated probability that the answer `select` would choose is right
        (for free text, or nothing readable, what `select` would say: see there)."""
        a = self._analyse(request, candidates)
        if not a.ok:
            return 0.0
        if not a.groups and not a.form.comparable:
            return 0.0  # free text: no vote; adaptive sampling never stops on it early
        return self.calibration.probability(self.features(a, next(iter(a.groups), None)))

    def score(self, request: ChatRequest, candidates: Sequence[Candidate]) -> dict[int, Score]:
        """As a scorer (inside [`Select`][genfan.select.Select]): each answer's weighted vote
        share; answers with nothing readable, and free text, score 0."""
        a = self._analyse(request, candidates)
        out = {c.index: Score(0.0, "no answer to count") for c in a.ok}
        n = len(a.kept)
        for key, members in a.groups.items():
            share = a.group_weight[key] / a.total_weight if a.total_weight > 0 else 0.0
            for i in members:
                out[i] = Score(min(1.0, share), f"{len(members)} of {n} answers say {_show(key)}")
        return out

    def features(self, analysis: _Analysis, winner_key: str | None) -> dict[str, float]:
        """The evidence the calibration reads, for the group ``winner_key``."""
        n = len(analysis.kept) or 1
        votes = len(analysis.groups.get(winner_key, ())) if winner_key is not None else 0
        runner_up = max((len(v) for k, v in analysis.groups.items() if k != winner_key), default=0)
        out = {
            "share": votes / n,
            "margin": (votes - runner_up) / n,
            "votes": float(votes),
            "log_n": math.log(n),
            "choice": 1.0 if analysis.form.kind == "choice" else 0.0,
            "short": 1.0 if analysis.form.kind == "short" else 0.0,
        }
        members = analysis.groups.get(winner_key, []) if winner_key is not None else []
        confs = [analysis.confidence[i] for i in members if i in analysis.confidence]
        if confs:
            out["answer_conf"] = math.fsum(confs) / len(confs)
        return out

    def evidence(self, request: ChatRequest, candidates: Sequence[Candidate]) -> dict[str, float]:
        """The evidence behind the answer `select` would choose: its vote ``share``, its
        ``margin`` over the runner-up (a share), its ``votes``, ``log_n`` (the log of the
        answers counted), the answer form (``choice``: 1 for multiple choice; ``short``: 1 for a
        word, name or phrase; both 0 for a number or JSON) and, where log-probabilities exist,
        ``answer_conf`` (the model's mean confidence in the answer's tokens): what
        `Calibration.fit` learns from, paired with whether the answer was right."""
        a = self._analyse(request, candidates)
        return self.features(a, next(iter(a.groups), None))

    # -- selecting ---------------------------------------------------------------------

    async def select(self, request: ChatRequest, candidates: Sequence[Candidate]) -> Selection:
        """Infer the form, read the answers, vote (or find the consensus) and explain."""
        with telemetry.span(
            "genfan.select",
            **{"genfan.select.method": self.name, "genfan.select.candidates": len(candidates)},
        ) as span:
            selection = await self._select(request, candidates)
            if selection.chosen is not None:
                span.set_attribute("genfan.select.chosen", selection.chosen)
            if selection.confidence is not None:
                span.set_attribute("genfan.select.confidence", selection.confidence)
            span.set_attribute("genfan.select.form", selection.method)
            telemetry.event(
                "selection_made",
                method=selection.method,
                chosen=None if selection.chosen is None else candidates[selection.chosen].backend,
                confidence=selection.confidence,
            )
            return selection

    async def _select(self, request: ChatRequest, candidates: Sequence[Candidate]) -> Selection:
        a = self._analyse(request, candidates)
        method = f"{self.name}:{a.form.kind}"
        if not a.ok:
            return Selection(
                chosen=None, confidence=0.0, explanation="no candidate succeeded", method=method
            )
        inferred = f"{a.form.kind} answer inferred ({a.form.why})"
        if not a.groups:
            return await self._consensus(request, a, method, inferred)
        winner_key = next(iter(a.groups))
        members = a.groups[winner_key]
        by_index = {c.index: c for c in a.kept}
        winner = min(
            (by_index[i] for i in members),
            key=lambda c: (-a.confidence.get(c.index, 0.0), self._tie_key(c)),
        )
        n = len(a.kept)
        scores: dict[int, float] = {c.index: 0.0 for c in a.ok}
        reasons: dict[int, str] = {c.index: "no answer to count" for c in a.ok}
        kept_ids = {c.index for c in a.kept}
        for c in a.ok:
            if c.index not in kept_ids:
                reasons[c.index] = "left out: among the least confident replies"
        for key, group in a.groups.items():
            share = a.group_weight[key] / a.total_weight if a.total_weight > 0 else 0.0
            for i in group:
                scores[i] = min(1.0, share)
                reasons[i] = f"{len(group)} of {n} answers say {_show(key)}"
                if i in a.confidence:
                    reasons[i] += f" (model confidence {a.confidence[i]:.2f})"
        features = self.features(a, winner_key)
        confidence = self.calibration.probability(features)
        weighted = ""
        if self.weight != "none" and a.confidence:
            weighted = f", confidence-weighted share {scores[winner.index]:.2f}"
        kept = f" (the {n} most confident of {len(a.ok)})" if len(a.kept) < len(a.ok) else ""
        explanation = (
            f"{inferred}; {len(members)} of {n} answers{kept} say {_show(winner_key)}"
            f"{weighted}; P(right) {confidence:.2f}"
        )
        return Selection(
            chosen=winner.index,
            scores=scores,
            reasons=reasons,
            confidence=confidence,
            explanation=explanation,
            method=method,
            by_scorer={
                "vote": {i: len(g) / n for g in a.groups.values() for i in g},
                "model_confidence": dict(a.confidence),
            },
        )

    async def _consensus(
        self, request: ChatRequest, a: _Analysis, method: str, inferred: str
    ) -> Selection:
        from ._consensus import Consensus

        pool = a.kept
        scores = await Consensus(similarity=_clipped_rouge_l).score(request, pool)
        best = max(s.value for s in scores.values())
        tied = [c for c in pool if scores[c.index].value >= best - 1e-9]
        winner = min(tied, key=self._tie_key)
        if a.form.comparable:
            why = f"{inferred}, but no reply holds one: the reply most like the others"
            confidence = self.calibration.probability(self.features(a, None))
        else:
            why = f"{inferred}: the reply most like the others (consensus)"
            confidence = best
        return Selection(
            chosen=winner.index,
            scores={i: s.value for i, s in scores.items()},
            reasons={i: s.reason for i, s in scores.items()},
            confidence=confidence,
            explanation=f"{why}, mean similarity {best:.2f}",
            method=method,
            by_scorer={"consensus": {i: s.value for i, s in scores.items()}},
        )


class AutoAgreementKey:
    """The ``agree=`` key of a quorum fan-out from an [`AutoSelect`][genfan.select.AutoSelect] (bound per request)."""

    def __init__(self, auto: AutoSelect, request: ChatRequest | None = None) -> None:
        self._auto = auto
        self._request = request

    def __call__(self, completion: Completion) -> Hashable | None:
        return self._auto.key(completion.text, self._request)

    def for_request(self, request: ChatRequest) -> AutoAgreementKey:
        """This key, aware of ``request`` (what the fan-out calls before its race)."""
        return AutoAgreementKey(self._auto, request)

    def __repr__(self) -> str:
        return f"AutoAgreementKey({self._auto!r})"


#: Free text is compared on its first characters: ROUGE-L is quadratic in the words, and the
#: default selector of every fan-out must stay cheap on long replies.
_CONSENSUS_CHARS = 2000


def _clipped_rouge_l(a: str, b: str) -> float:
    from ._consensus import rouge_l

    return rouge_l(a[:_CONSENSUS_CHARS], b[:_CONSENSUS_CHARS])


def _show(key: str) -> str:
    return repr(key if len(key) <= 40 else key[:37] + "...")
