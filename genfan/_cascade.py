"""Cascade (FrugalGPT): try the cheapest tier first; escalate only while the selector is unsure.

Chen et al. (2023) call LLMs from cheap to expensive and stop as soon as a scorer trusts the
answer; they matched GPT-4 at up to 98% lower cost. Here a tier is a fan-out (one backend, or
several samples of one, or several backends), the scorer is any selector whose
`Selection.confidence` is compared with the threshold, and the result reports what was
spent and what running every tier would have cost.

A cascade is a [`Backend`][genfan.Backend] too (`Cascade.complete` gives the chosen answer),
so it can be a fan-out target, or a tier of another cascade.

Closing a cascade closes only the fan-outs it built for tiers given as backends, never the
backends themselves nor a fan-out passed as a tier: whoever creates a backend owns it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from . import telemetry
from ._backend import Backend, BaseBackend, aclose_all
from ._errors import AllBackendsFailedError, AnswerRejectedError, ConfigurationError
from ._fanout import Cut, FanOut, FanOutResult, Target, check_max_cost, chosen_completion, no_answer
from ._output import AnswerValidator, ValidateLike, answer_validator
from ._sync import clip, not_awaited, run_sync
from ._types import ChatRequest, Completion, Usage
from .cost import MaxCostError, backend_price
from .select import Candidate, Selection, SelectorLike, StoppingRule, Waves, as_selector

__all__ = ["Cascade", "CascadeResult", "Tier", "TierOutcome"]


@dataclass(frozen=True, kw_only=True)
class Tier:
    """One step of a cascade.

    Attributes:
        backends: a [`FanOut`][genfan.FanOut], or backends/targets run together (``mode="all"``); several
            targets of one sampling backend give a vote something to count.
        name: shown in results (default ``tier1``, ``tier2``...).
        cost_per_token: price of a token, used when completions report no ``usage.cost``.
        expected_cost: what running this tier costs, for the saving estimate when it is skipped
            (default: the tokens per call seen so far at its targets' prices when they are
            known, else x its calls x ``cost_per_token``).
    """

    backends: FanOut | Sequence[Backend | Target] | Backend
    name: str | None = None
    cost_per_token: float = 1.0
    expected_cost: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cost_per_token) and self.cost_per_token >= 0):
            raise ConfigurationError(
                f"cost_per_token must be a finite number >= 0, got {self.cost_per_token!r}"
            )
        if self.expected_cost is not None and not (
            math.isfinite(self.expected_cost) and self.expected_cost >= 0
        ):
            raise ConfigurationError(
                f"expected_cost must be a finite number >= 0 or None, got {self.expected_cost!r}"
            )


@dataclass(frozen=True, kw_only=True)
class TierOutcome:
    """What one tier did.

    Attributes:
        ran: whether the tier was called (skipped tiers have ``ran=False`` and an estimated cost).
        confidence: the selector's confidence after this tier (0 when nothing was chosen).
        accepted: the confidence reached the threshold, so the cascade stopped here.
        cost: what the tier spent (or, if skipped, would have spent: an estimate).
    """

    name: str
    ran: bool
    cost: float
    tokens: int = 0
    result: FanOutResult | None = None
    error: AllBackendsFailedError | None = None
    selection: Selection | None = None
    confidence: float = 0.0
    accepted: bool = False


@dataclass(frozen=True, kw_only=True)
class CascadeResult:
    """The cascade's answer, and its cost against running every tier.

    Attributes:
        candidates: the candidates of the deciding selection (with ``carry``, from every tier
            run so far, backends prefixed ``tier/``).
        selection: the deciding selection.
        tiers: one outcome per tier, skipped ones included.
        cost: what the tiers that ran spent.
        cost_all_tiers: spent plus the estimated cost of the skipped tiers.
        threshold: the confidence thresholds between tiers.
        cut: what the cascade's ``max_cost`` cut: the tiers it did not run (a `Cut` with
            the tier's index and name), then the candidates cut inside the tiers that ran
            (backends prefixed ``tier/``).
        max_cost: the cap in USD (``None``: none).
    """

    request: ChatRequest
    candidates: tuple[Candidate, ...]
    selection: Selection
    tiers: tuple[TierOutcome, ...]
    cost: float
    cost_all_tiers: float
    threshold: tuple[float, ...]
    cut: tuple[Cut, ...] = ()
    max_cost: float | None = None

    @property
    def tiers_used(self) -> list[str]:
        return [t.name for t in self.tiers if t.ran]

    @property
    def escalations(self) -> int:
        return max(0, len(self.tiers_used) - 1)

    @property
    def accepted(self) -> bool:
        """The answer met its tier's threshold (False: the last tier's answer, taken anyway)."""
        return any(t.accepted for t in self.tiers)

    @property
    def confidence(self) -> float:
        return self.selection.confidence or 0.0

    @property
    def saved(self) -> float:
        """Cost saved against running every tier."""
        return max(0.0, self.cost_all_tiers - self.cost)

    @property
    def saved_fraction(self) -> float:
        return self.saved / self.cost_all_tiers if self.cost_all_tiers > 0 else 0.0

    @property
    def chosen(self) -> Candidate | None:
        i = self.selection.chosen
        return None if i is None else self.candidates[i]

    @property
    def completion(self) -> Completion:
        """The chosen completion (raises ``ValueError`` when none was chosen)."""
        c = self.chosen
        if c is None or c.completion is None:
            raise ValueError(f"no candidate was chosen: {self.selection.explanation}")
        return c.completion

    @property
    def text(self) -> str:
        return self.completion.text

    def __repr__(self) -> str:
        chosen = self.chosen
        text = clip(chosen.text) if chosen is not None else None
        return (
            f"CascadeResult(chosen={chosen.backend if chosen else None!r}, text={text!r}, "
            f"tiers_used={len(self.tiers_used)}/{len(self.tiers)}, "
            f"confidence={self.confidence:.2f}, accepted={self.accepted}, "
            f"cost={self.cost:.6g}, saved={self.saved:.6g})"
        )


def _completion_cost(c: Candidate, tier: Tier) -> tuple[float, int, int]:
    """``(cost, input tokens, output tokens)`` of one candidate's answer."""
    if c.completion is None:
        return 0.0, 0, 0
    usage = c.completion.usage
    cost = usage.cost if usage.cost is not None else usage.total_tokens * tier.cost_per_token
    return cost, usage.input_tokens, usage.output_tokens


class Cascade(BaseBackend):
    """FrugalGPT-style cascade over tiers from cheapest to dearest.

    Each tier's candidates go to ``selector``; when it chooses an answer with confidence at or
    above the tier's threshold the cascade stops, otherwise it escalates to the next tier. The
    last tier's answer is taken whatever its confidence (if the last tier fails entirely, the
    latest earlier answer is). A tier whose backends all fail escalates, and so does one whose
    answers ``validate`` all rejects.

    A cascade is a [`Backend`][genfan.Backend]: `complete` (and `stream`, which replays
    it) returns the chosen completion and raises [`NoAnswerError`][genfan.NoAnswerError] where
    `run` raises [`AllBackendsFailedError`][genfan.AllBackendsFailedError].

    Args:
        tiers: [`Tier`][genfan.Tier] s, or what a tier takes (a fan-out, backends, a backend).
        selector: picks and gives the confidence (default: the ``auto`` selector, whose
            confidence is the calibrated probability that its answer is right; a plain vote's
            is the share that agrees).
        threshold: the confidence needed to stop: one number, or one per tier but the last.
        stop: instead of the threshold, stop when this stopping rule (a
            [`StoppingRule`][genfan.select.StoppingRule], or the rule and vote counter of a
            [`Waves`][genfan.select.Waves]) says the vote over the answers so far is settled,
            given the samples the later tiers could still add (adaptive sampling across tiers;
            best with ``carry=True``).
        carry: also show the selector the candidates of earlier tiers (votes accumulate: 3
            cheap samples, then 6 more, voted over all 9).
        name: the cascade's backend name (default ``"cascade(tier,tier,...)"``, each tier by
            its backend's name, or its fan-out's).
        validate: what a good answer is (see `ValidateLike`): every tier's
            answers are checked, those it rejects become failed candidates (an
            [`AnswerRejectedError`][genfan.AnswerRejectedError]), so the selector never sees them, and a tier
            left with none escalates. A fan-out given as a tier keeps its own ``validate=``
            too (which makes its ``first`` mode race on to an answer that passes).
        max_cost: a cap in USD on a run: each tier runs under what is left of it (its
            fan-out skips the calls whose estimate does not fit, see `FanOut`'s
            ``max_cost``), and once nothing is left the tiers still to come are not run
            (`CascadeResult.cut` says which). Every backend needs a known price.

    Example:
        ```python
        vote = MajorityVote(extract="number")
        cascade = Cascade(
            [Tier(backends=[small] * 3), Tier(backends=[large])],
            selector=vote.selector(),
            threshold=0.66,
        )
        result = await cascade.run("What is 17 * 3?")
        print(result.text, result.tiers_used, result.saved)
        # from sync code: result = cascade.run_sync("What is 17 * 3?")
        ```
    """

    def __init__(
        self,
        tiers: Sequence[Tier | FanOut | Sequence[Backend | Target] | Backend],
        *,
        selector: SelectorLike | None = None,
        threshold: float | Sequence[float] = 0.5,
        carry: bool = False,
        name: str | None = None,
        stop: StoppingRule | Waves | None = None,
        validate: ValidateLike | None = None,
        max_cost: float | None = None,
    ) -> None:
        not_awaited(tiers, "Cascade()")
        check_max_cost(max_cost)
        self.max_cost = max_cost
        if not tiers:
            raise ConfigurationError("Cascade needs at least one tier")
        normal: list[Tier] = []
        for i, t in enumerate(tiers, 1):
            tier = t if isinstance(t, Tier) else Tier(backends=t)
            if tier.name is None:
                tier = dataclasses.replace(tier, name=f"tier{i}")
            normal.append(tier)
        names = [t.name for t in normal]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"tier names must be unique, got {names}")
        self.tiers: tuple[Tier, ...] = tuple(normal)
        self._fanouts: tuple[FanOut, ...] = tuple(self._fanout(t) for t in normal)
        # What closing the cascade closes: the fan-outs it built (they leave their backends
        # open); the fan-outs and backends it was given belong to whoever made them.
        self._built: tuple[FanOut, ...] = tuple(
            f for t, f in zip(normal, self._fanouts, strict=True) if f is not t.backends
        )
        n_thresholds = max(1, len(normal) - 1)
        if isinstance(threshold, int | float):
            thresholds = (float(threshold),) * n_thresholds
        else:
            thresholds = tuple(float(x) for x in threshold)
            if len(thresholds) != n_thresholds:
                raise ConfigurationError(
                    f"threshold needs {n_thresholds} values (one per tier but the last), "
                    f"got {len(thresholds)}"
                )
        for x in thresholds:
            if not 0.0 <= x <= 1.0:
                raise ConfigurationError(f"threshold must be in [0, 1], got {x!r}")
        self.threshold = thresholds
        self.selector = as_selector(selector if selector is not None else "auto")
        self.stop: Waves | None = (
            Waves(stop=stop) if stop is not None and not isinstance(stop, Waves) else stop
        )
        self.carry = carry
        self.validator: AnswerValidator | None = answer_validator(validate)
        labels = [
            fan.names[0]
            if len(fan.targets) == 1 and not isinstance(t.backends, FanOut)
            else fan.name
            for t, fan in zip(self.tiers, self._fanouts, strict=True)
        ]
        super().__init__(name or "cascade(" + ",".join(labels) + ")")

    @staticmethod
    def _fanout(tier: Tier) -> FanOut:
        b = tier.backends
        if isinstance(b, FanOut):
            return b
        if isinstance(b, Sequence):
            return FanOut(b, mode="all")
        return FanOut([b], mode="all")

    def _estimate(
        self, tier: Tier, fan: FanOut, per_call: tuple[float, float] | None, req: ChatRequest
    ) -> float:
        """What a tier not run would have cost: ``expected_cost``, else the tokens per call
        seen so far at its targets' prices (in USD) when all of them are known, else at
        ``cost_per_token``."""
        if tier.expected_cost is not None:
            return tier.expected_cost
        if per_call is None:
            return 0.0
        tokens_in, tokens_out = per_call
        usage = Usage(input_tokens=round(tokens_in), output_tokens=round(tokens_out))
        prices = [backend_price(t.backend, t.prepare(req)) for t in fan.targets]
        if all(p is not None for p in prices):
            return sum(p.cost(usage) for p in prices if p is not None)
        return (tokens_in + tokens_out) * len(fan.targets) * tier.cost_per_token

    async def run(self, request: ChatRequest | str) -> CascadeResult:
        """Run the tiers in order until one is confident enough:
        ``result = await cascade.run("...")`` (from sync code: `run_sync`).

        Raises:
            AllBackendsFailedError: every backend of every tier failed.
        """
        not_awaited(request, "Cascade.run()")
        req = ChatRequest.from_prompt(request) if isinstance(request, str) else request
        outcomes: list[TierOutcome] = []
        errors: list[AllBackendsFailedError] = []
        pool: list[Candidate] = []
        decided: tuple[Selection, tuple[Candidate, ...]] | None = None
        calls, in_seen, out_seen = 0, 0, 0
        usd = 0.0  # what the tiers spent, in USD (for max_cost)
        cut: list[Cut] = []
        stopped = False
        last = len(self.tiers) - 1
        with telemetry.span("genfan.cascade", **{"genfan.cascade.tiers": len(self.tiers)}) as span:
            for i, (tier, fan) in enumerate(zip(self.tiers, self._fanouts, strict=True)):
                name = tier.name or f"tier{i + 1}"
                if stopped:
                    per_call = (in_seen / calls, out_seen / calls) if calls else None
                    would_cost = self._estimate(tier, fan, per_call, req)
                    outcomes.append(TierOutcome(name=name, ran=False, cost=would_cost))
                    continue
                left = None if self.max_cost is None else self.max_cost - usd
                if left is not None and left <= 0 and self.max_cost is not None:
                    estimate = fan.estimate_cost(req)
                    skipped = MaxCostError(
                        f"tier {name!r} not run: max_cost=${self.max_cost:g} is spent",
                        backend=name,
                        action="skipped",
                        max_cost=self.max_cost,
                        spent=usd,
                        estimate=estimate,
                    )
                    errors.append(AllBackendsFailedError(str(skipped), [skipped]))
                    cut.append(Cut(index=i, backend=name, action="skipped", estimate=estimate))
                    outcomes.append(TierOutcome(name=name, ran=False, cost=0.0))
                    telemetry.event("cascade_tier_cut", tier=name, max_cost=self.max_cost)
                    continue
                try:
                    if left is None:
                        result = await fan.run(req)
                    else:
                        own = fan.max_cost
                        result = await fan.run(
                            req, max_cost=left if own is None else min(left, own)
                        )
                    cut.extend(
                        dataclasses.replace(c, backend=f"{name}/{c.backend}") for c in result.cut
                    )
                    usd += result.cost or 0.0
                    if self.validator is not None:
                        result = await self._rejecting(name, result, req, self.validator)
                except AllBackendsFailedError as exc:
                    errors.append(exc)
                    if all(isinstance(e, MaxCostError) for e in exc.exceptions):
                        # max_cost left no room for any of its calls: a tier not run
                        cut.append(Cut(index=i, backend=name, action="skipped", estimate=None))
                        outcomes.append(TierOutcome(name=name, ran=False, cost=0.0))
                        telemetry.event("cascade_tier_cut", tier=name, max_cost=self.max_cost)
                        continue
                    outcomes.append(TierOutcome(name=name, ran=True, cost=0.0, error=exc))
                    telemetry.event("cascade_tier_failed", level="info", tier=name)
                    continue
                cost, tokens = 0.0, 0
                for c in result.candidates:
                    c_cost, c_in, c_out = _completion_cost(c, tier)
                    cost += c_cost
                    tokens += c_in + c_out
                    in_seen += c_in
                    out_seen += c_out
                    if c.completion is not None:
                        calls += 1
                if self.carry:
                    fresh = [
                        dataclasses.replace(c, index=len(pool) + k, backend=f"{name}/{c.backend}")
                        for k, c in enumerate(result.candidates)
                    ]
                    pool.extend(fresh)
                    candidates = tuple(pool)
                else:
                    candidates = result.candidates
                selection = await self.selector.select(req, candidates)
                confidence = (selection.confidence or 0.0) if selection.chosen is not None else 0.0
                if self.stop is not None:
                    later = sum(len(f.targets) for f in self._fanouts[i + 1 :])
                    accepted = selection.chosen is not None and self.stop.settled(
                        req, candidates, later
                    )
                else:
                    accepted = (
                        selection.chosen is not None
                        and confidence >= self.threshold[min(i, len(self.threshold) - 1)]
                    )
                if selection.chosen is not None:
                    decided = (selection, candidates)
                outcomes.append(
                    TierOutcome(
                        name=name,
                        ran=True,
                        cost=cost,
                        tokens=tokens,
                        result=result,
                        selection=selection,
                        confidence=confidence,
                        accepted=accepted,
                    )
                )
                stopped = accepted
                if i < last and not accepted:
                    telemetry.event(
                        "cascade_escalated",
                        tier=name,
                        confidence=round(confidence, 4),
                        threshold=self.threshold[i],
                    )
            if decided is None:
                raise AllBackendsFailedError(
                    f"every tier of the cascade failed ({len(self.tiers)} tiers)",
                    [e for err in errors for e in err.exceptions] or errors,
                )
            selection, candidates = decided
            spent = sum(t.cost for t in outcomes if t.ran)
            total = sum(t.cost for t in outcomes)
            final = CascadeResult(
                request=req,
                candidates=candidates,
                selection=selection,
                tiers=tuple(outcomes),
                cost=spent,
                cost_all_tiers=total,
                threshold=self.threshold,
                cut=tuple(cut),
                max_cost=self.max_cost,
            )
            span.set_attribute("genfan.cascade.tiers_used", len(final.tiers_used))
            span.set_attribute("genfan.cascade.cost", spent)
            span.set_attribute("genfan.cascade.saved", final.saved)
            span.set_attribute("genfan.select.confidence", final.confidence)
            telemetry.event(
                "cascade_finished",
                tiers_used=final.tiers_used,
                confidence=round(final.confidence, 4),
                cost=spent,
                saved=final.saved,
            )
            return final

    @staticmethod
    async def _rejecting(
        name: str, result: FanOutResult, request: ChatRequest, validator: AnswerValidator
    ) -> FanOutResult:
        """``result`` with every answer ``validator`` rejects made a failed candidate.

        Raises:
            AllBackendsFailedError: it rejected every answer of the tier (or none came).
        """
        checked: list[Candidate] = []
        for c in result.candidates:
            if c.ok and c.completion is not None:
                try:
                    await validator(c.completion, request=request, backend=c.backend)
                except AnswerRejectedError as exc:
                    c = dataclasses.replace(c, status="failed", error=exc)
            checked.append(c)
        if not any(c.ok for c in checked):
            raise AllBackendsFailedError(
                f"every answer of tier {name} was rejected or failed",
                [c.error for c in checked if c.error is not None],
            )
        selection = result.selection
        if selection.chosen is not None and not checked[selection.chosen].ok:
            selection = dataclasses.replace(
                selection, chosen=None, explanation=f"{selection.explanation} (answer rejected)"
            )
        return dataclasses.replace(
            result,
            candidates=tuple(checked),
            selection=selection,
            outputs={i: v for i, v in result.outputs.items() if checked[i].ok},
        )

    def run_sync(self, request: ChatRequest | str) -> CascadeResult:
        """`run` for sync code: ``result = cascade.run_sync("...")``.

        It blocks until the cascade is decided, in a plain script or inside a running event
        loop (a notebook), whose loop it blocks meanwhile, as a sync HTTP client would: in
        async code, ``await cascade.run(...)`` instead.

        Raises:
            AllBackendsFailedError: every backend of every tier failed.
        """
        return run_sync(self.run, request)

    async def complete(self, request: ChatRequest) -> Completion:
        """Run the cascade and return the chosen completion (the Backend protocol).

        Raises:
            NoAnswerError: every backend of every tier failed.
        """
        try:
            result = await self.run(request)
        except AllBackendsFailedError as exc:
            raise no_answer(exc, backend=self.name) from exc
        return chosen_completion(result.chosen, result.candidates, result.selection, self.name)

    async def aclose(self) -> None:
        """Close what the cascade created: the fan-outs it built for tiers given as backends
        (they leave those backends open). The backends and fan-outs passed in stay open."""
        await aclose_all(self._built)
