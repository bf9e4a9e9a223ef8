"""The selector that combines weighted scorers, hard filters and a tie-break, and says why."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeAlias

import anyio

from .. import telemetry
from .._errors import ConfigurationError
from .._types import ChatRequest
from ._base import Candidate, Selection
from ._scorer import Score, Scorer, ScorerLike, as_scorer, run_scorer

__all__ = ["Select", "TieBreak"]

#: How equal scores are settled: a name, or a key function (the lowest key wins).
TieBreak: TypeAlias = (
    Literal["first_finished", "fastest", "cheapest", "index"] | Callable[[Candidate], Any]
)

_EPS = 1e-9
_NEVER = 1 << 30


def _first_finished(c: Candidate) -> tuple[int, int]:
    return (c.finished_order if c.finished_order is not None else _NEVER, c.index)


def _fastest(c: Candidate) -> tuple[float, int]:
    return (c.latency, c.index)


def _cheapest(c: Candidate) -> tuple[float, int, int]:
    usage = c.completion.usage if c.completion is not None else None
    cost = usage.cost if usage is not None and usage.cost is not None else math.inf
    tokens = usage.total_tokens if usage is not None else _NEVER
    return (cost, tokens, c.index)


def _index(c: Candidate) -> int:
    return c.index


_TIE_BREAKS: dict[str, Callable[[Candidate], Any]] = {
    "first_finished": _first_finished,
    "fastest": _fastest,
    "cheapest": _cheapest,
    "index": _index,
}


class Select:
    """Pick the answer with the best weighted score among those that pass every filter.

    Each scorer gives every successful candidate a score in 0..1; a candidate's score is the
    weighted mean of its scorers' scores. Filters are hard constraints: a candidate passes a
    filter when the filter's score for it is above 0 (schema valid, no refusal, length in
    bounds...). Among equal best scores the tie-break decides. The confidence is the chosen
    candidate's score (for a vote alone: the share of answers that agree with it), which is
    what cascades compare with their threshold.

    Args:
        scorers: scorers (or per-candidate functions), each alone (weight 1) or as
            ``(scorer, weight)``. None: every candidate that passes the filters scores 1.
        filters: hard constraints, as scorers or per-candidate functions.
        tie_break: ``first_finished`` (default), ``fastest``, ``cheapest`` (reported cost, then
            tokens), ``index`` (target order), or a key function (lowest wins).
        if_none_pass: when no candidate passes the filters: ``none`` chooses nothing (the
            fan-out result then has no answer), ``best`` ignores the filters.
        name: the method name shown in the selection (default: the scorers' names).

    Example:
        ```python
        select = Select(
            scorers=[(MajorityVote(extract="number"), 1.0), (LLMJudge(judge), 0.5)],
            filters=[RefusalDetector()],
            tie_break="cheapest",
        )
        ```
    """

    def __init__(
        self,
        scorers: ScorerLike | Sequence[ScorerLike | tuple[ScorerLike, float]] = (),
        *,
        filters: Sequence[ScorerLike] = (),
        tie_break: TieBreak = "first_finished",
        if_none_pass: Literal["none", "best"] = "none",
        name: str | None = None,
    ) -> None:
        items: Sequence[ScorerLike | tuple[ScorerLike, float]]
        if isinstance(scorers, Scorer) or (callable(scorers) and not isinstance(scorers, Sequence)):
            items = [scorers]
        else:
            items = scorers
        weighted: list[tuple[Scorer, float]] = []
        for item in items:
            if isinstance(item, tuple):
                if len(item) != 2:
                    raise ConfigurationError(f"a weighted scorer is (scorer, weight), got {item!r}")
                s, w = item
            else:
                s, w = item, 1.0
            if not (isinstance(w, int | float) and math.isfinite(w) and w > 0):
                raise ConfigurationError(
                    f"scorer weight must be a finite number > 0, got {w!r} for {s!r}"
                )
            weighted.append((as_scorer(s), float(w)))
        names = [s.name for s, _ in weighted]
        if len(set(names)) != len(names):
            raise ConfigurationError(
                f"scorer names must be unique within a selector, got {names}; pass name=..."
            )
        self.scorers: tuple[tuple[Scorer, float], ...] = tuple(weighted)
        self.filters: tuple[Scorer, ...] = tuple(as_scorer(f) for f in filters)
        if callable(tie_break):
            self._tie_key = tie_break
            self.tie_break = getattr(tie_break, "__name__", "custom")
        elif tie_break in _TIE_BREAKS:
            self._tie_key = _TIE_BREAKS[tie_break]
            self.tie_break = tie_break
        else:
            raise ConfigurationError(
                f"tie_break must be one of {sorted(_TIE_BREAKS)} or a key function, got {tie_break!r}"
            )
        if if_none_pass not in ("none", "best"):
            raise ConfigurationError(f"if_none_pass must be 'none' or 'best', got {if_none_pass!r}")
        self.if_none_pass = if_none_pass
        self.name = name or (
            "+".join(
                n if w == 1.0 else f"{n}*{w:g}" for n, (_, w) in zip(names, weighted, strict=True)
            )
            or ("filter" if self.filters else "first")
        )

    def __repr__(self) -> str:
        return (
            f"Select(name={self.name!r}, scorers={[s.name for s, _ in self.scorers]}, "
            f"filters={[f.name for f in self.filters]}, tie_break={self.tie_break!r})"
        )

    async def _run_all(
        self, scorers: Sequence[Scorer], request: ChatRequest, candidates: Sequence[Candidate]
    ) -> list[dict[int, Score]]:
        results: list[dict[int, Score]] = [{} for _ in scorers]

        async def one(i: int, s: Scorer) -> None:
            results[i] = await run_scorer(s, request, candidates)

        if len(scorers) == 1:
            await one(0, scorers[0])
        elif scorers:
            async with anyio.create_task_group() as tg:
                for i, s in enumerate(scorers):
                    tg.start_soon(one, i, s)
        return results

    async def select(self, request: ChatRequest, candidates: Sequence[Candidate]) -> Selection:
        """Score the candidates and choose one (see the class docstring for the rules)."""
        with telemetry.span(
            "genfan.select",
            **{"genfan.select.method": self.name, "genfan.select.candidates": len(candidates)},
        ) as span:
            selection = await self._select(request, candidates)
            span.set_attribute(
                "genfan.select.outcome", "chosen" if selection.chosen is not None else "none"
            )
            if selection.chosen is not None:
                span.set_attribute("genfan.select.chosen", selection.chosen)
                span.set_attribute(
                    "genfan.select.chosen_backend", candidates[selection.chosen].backend
                )
            if selection.confidence is not None:
                span.set_attribute("genfan.select.confidence", selection.confidence)
            for c in candidates:
                attrs: dict[str, Any] = {
                    "genfan.candidate.index": c.index,
                    "genfan.backend": c.backend,
                    "genfan.candidate.status": c.status,
                }
                if c.index in selection.scores:
                    attrs["genfan.select.score"] = selection.scores[c.index]
                if c.index in selection.reasons:
                    attrs["genfan.select.reason"] = selection.reasons[c.index]
                span.add_event("genfan.select.score", attrs)
            telemetry.event(
                "selection_made",
                method=self.name,
                chosen=None if selection.chosen is None else candidates[selection.chosen].backend,
                confidence=selection.confidence,
                scores={candidates[i].backend: round(v, 4) for i, v in selection.scores.items()},
                rejected=len(selection.rejected),
            )
            return selection

    async def _select(self, request: ChatRequest, candidates: Sequence[Candidate]) -> Selection:
        ok = [c for c in candidates if c.ok]
        if not ok:
            return Selection(
                chosen=None, confidence=0.0, explanation="no candidate succeeded", method=self.name
            )

        rejected: dict[int, str] = {}
        if self.filters:
            verdicts = await self._run_all(self.filters, request, candidates)
            for c in ok:
                for f, scores in zip(self.filters, verdicts, strict=True):
                    verdict = scores.get(c.index)
                    if verdict is None or verdict.value <= 0.0:
                        why = verdict.reason if verdict is not None and verdict.reason else "fails"
                        rejected[c.index] = f"{f.name}: {why}"
                        break
        passing = [c for c in ok if c.index not in rejected]
        fallback = False
        if not passing:
            if self.if_none_pass == "none":
                return Selection(
                    chosen=None,
                    confidence=0.0,
                    reasons=dict(rejected),
                    rejected=rejected,
                    explanation=f"no candidate passed the filters ({len(ok)} answered)",
                    method=self.name,
                )
            passing, fallback = ok, True

        pool = [c for c in candidates if not c.ok] + passing
        pool.sort(key=lambda c: c.index)
        per_scorer = await self._run_all([s for s, _ in self.scorers], request, pool)
        total_weight = sum(w for _, w in self.scorers)
        combined: dict[int, float] = {}
        reasons: dict[int, str] = dict(rejected)
        by_scorer: dict[str, dict[int, float]] = {}
        for (sc_, _), scores in zip(self.scorers, per_scorer, strict=True):
            by_scorer[sc_.name] = {
                c.index: scores[c.index].value for c in passing if c.index in scores
            }
        for c in passing:
            if not self.scorers:
                combined[c.index] = 1.0
                reasons[c.index] = "passes every filter" if self.filters else "answered"
                continue
            value = 0.0
            parts = []
            for (sc_, w), scores in zip(self.scorers, per_scorer, strict=True):
                sc = scores.get(c.index, Score(0.0, "not scored"))
                value += w * sc.value
                parts.append(
                    f"{sc_.name} {sc.value:.2f}" + (f" ({sc.reason})" if sc.reason else "")
                )
            combined[c.index] = value / total_weight
            reasons[c.index] = "; ".join(parts)
            if fallback and c.index in rejected:
                reasons[c.index] += f"; failed filter {rejected[c.index]}"

        best = max(combined.values())
        tied = [c for c in passing if combined[c.index] >= best - _EPS]
        winner = min(tied, key=self._tie_key)
        explanation = f"{winner.backend} scored {best:.2f}: {reasons[winner.index]}"
        if len(tied) > 1:
            explanation += f"; tie among {len(tied)} broken by {self.tie_break}"
        if rejected:
            explanation += f"; {len(rejected)} rejected by filters"
        if fallback:
            explanation += " (none passed the filters: filters ignored)"
        return Selection(
            chosen=winner.index,
            scores=combined,
            reasons=reasons,
            confidence=0.0 if fallback else min(1.0, max(0.0, best)),
            explanation=explanation,
            method=self.name,
            by_scorer=by_scorer,
            rejected=rejected,
        )
