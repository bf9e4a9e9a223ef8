"""LLM-as-judge: a judge backend rates each answer (pointwise) or compares pairs (pairwise).

The prompts follow MT-Bench (Zheng et al. 2023): a 1-10 rating as ``Rating: [[N]]``, or a verdict
``[[A]]`` / ``[[B]]`` / ``[[C]]`` (tie). Pairwise comparisons are asked twice with the answers'
positions swapped, so a judge that prefers the first position cancels itself out. A judge that
answers off-format, or fails, is counted in `LLMJudge.statistics` and never crashes the
selection: its verdict is simply missing (`LLMJudge.last_error` says why the last failed
call failed).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Literal, cast

import anyio

from .. import telemetry
from .._backend import Backend
from .._errors import ConfigurationError
from .._types import ChatRequest, Message
from ._base import Candidate
from ._scorer import Score

__all__ = [
    "DEFAULT_RUBRIC",
    "JudgeStatistics",
    "LLMJudge",
    "parse_rating",
    "parse_verdict",
]

DEFAULT_RUBRIC = (
    "Your evaluation should consider correctness above all, then helpfulness, relevance and "
    "concision."
)

POINTWISE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an "
    "AI assistant to the user question displayed below. {rubric} Be as objective as possible. "
    'Reply with your rating only, strictly in this format: "Rating: [[N]]", where N is an '
    "integer from 1 to 10."
)
POINTWISE_USER = (
    "[Question]\n{question}\n\n"
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
PAIRWISE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two "
    "AI assistants to the user question displayed below. {rubric} Avoid any position biases and "
    "ensure that the order in which the responses were presented does not influence your "
    "decision. Do not allow the length of the responses to influence your evaluation. Be as "
    'objective as possible. Output your final verdict strictly in this format: "[[A]]" if '
    'assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)
PAIRWISE_USER = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]"
)

_RATING_PATTERNS = (
    re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]"),
    re.compile(r"\brating\b\s*(?:is|of)?\s*[:=]?\s*\[?\s*(\d+(?:\.\d+)?)", re.IGNORECASE),
    re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10\b", re.IGNORECASE),
    re.compile(r"^\s*(\d+(?:\.\d+)?)\s*\.?\s*$"),
)
_VERDICT_PATTERNS = (
    re.compile(r"\[\[\s*([ABC])\s*\]\]"),
    re.compile(r"\b(?:assistant|answer|response)\s+([AB])\s+is\s+better\b", re.IGNORECASE),
    re.compile(r"^\s*\[?([ABC])\]?\s*\.?\s*$"),
)


def parse_rating(text: str) -> float | None:
    """The 1-10 rating in a judge's answer, or ``None`` when there is no readable one."""
    for pattern in _RATING_PATTERNS:
        found = pattern.findall(text)
        if found:
            value = float(found[-1])
            return value if 1.0 <= value <= 10.0 else None
    return None


def parse_verdict(text: str) -> Literal["A", "B", "C"] | None:
    """``"A"``, ``"B"`` or ``"C"`` (tie) from a pairwise judge's answer; ``None`` if unreadable."""
    for pattern in _VERDICT_PATTERNS:
        found = pattern.findall(text)
        if found:
            verdicts = {v.upper() for v in found}
            if len(verdicts) > 1:
                return None  # "[[A]] ... [[B]]": contradicts itself
            return cast(Literal["A", "B", "C"], verdicts.pop())
    if re.search(r"\b(?:tie|equally good|both (?:are )?equal)\b", text, re.IGNORECASE):
        return "C"
    return None


@dataclass(frozen=True, slots=True)
class JudgeStatistics:
    """Counts over a judge's life.

    Attributes:
        calls: judge calls made.
        parsed: answers with a readable rating or verdict.
        unparsed: answers the judge gave off-format (no readable rating or verdict).
        failed: calls that raised (the judge backend failed).
    """

    calls: int = 0
    parsed: int = 0
    unparsed: int = 0
    failed: int = 0


class LLMJudge:
    """A judge model scores the answers against a rubric.

    Pointwise: one call per distinct answer (identical answers share the rating); score
    ``(rating - 1) / 9``; an unreadable rating scores 0.
    Pairwise: every pair is judged in both orders (2·n·(n-1)/2 calls); a win is 1 point, a tie
    ½; the score is the points over the comparisons the judge answered readably.

    Args:
        judge: the judge backend.
        rubric: what a good answer is (inserted into the judge's prompt).
        mode: ``pointwise`` (default) or ``pairwise``.
        max_concurrency: judge calls in flight at once.
        temperature: for the judge calls (0: the same answer gets the same verdict).
        max_tokens: for the judge calls (a verdict is short).
        model: a model override for the judge calls.
        name: the scorer's name in explanations.
    """

    def __init__(
        self,
        judge: Backend,
        *,
        rubric: str = DEFAULT_RUBRIC,
        mode: Literal["pointwise", "pairwise"] = "pointwise",
        max_concurrency: int = 8,
        temperature: float = 0.0,
        max_tokens: int = 64,
        model: str | None = None,
        name: str = "judge",
    ) -> None:
        if mode not in ("pointwise", "pairwise"):
            raise ConfigurationError(f"mode must be 'pointwise' or 'pairwise', got {mode!r}")
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ConfigurationError(
                f"max_concurrency must be an integer >= 1, got {max_concurrency!r}"
            )
        if not 0.0 <= temperature <= 2.0:
            raise ConfigurationError(f"temperature must be in [0, 2], got {temperature!r}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ConfigurationError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        self.judge = judge
        self.rubric = rubric
        self.mode = mode
        self.max_concurrency = max_concurrency
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.model = model
        self.name = name
        self._stats = {"calls": 0, "parsed": 0, "unparsed": 0, "failed": 0}
        self._last_error: str | None = None

    def statistics(self) -> JudgeStatistics:
        """A snapshot of the judge's counters."""
        return JudgeStatistics(**self._stats)

    @property
    def last_error(self) -> str | None:
        """Why the judge's last failed call failed, in one line (``None``: none failed)."""
        return self._last_error

    def _request(self, system: str, user: str) -> ChatRequest:
        return ChatRequest(
            messages=(Message.system(system), Message.user(user)),
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            model=self.model,
        )

    def pointwise_request(self, question: str, answer: str) -> ChatRequest:
        """The judge request that rates ``answer`` to ``question``."""
        return self._request(
            POINTWISE_SYSTEM.format(rubric=self.rubric),
            POINTWISE_USER.format(question=question, answer=answer),
        )

    def pairwise_request(self, question: str, a: str, b: str) -> ChatRequest:
        """The judge request that compares answer ``a`` (shown first) with ``b``."""
        return self._request(
            PAIRWISE_SYSTEM.format(rubric=self.rubric),
            PAIRWISE_USER.format(question=question, a=a, b=b),
        )

    async def _ask(self, request: ChatRequest) -> str | None:
        """The judge's answer, or ``None`` when the call failed (`last_error` says why)."""
        self._stats["calls"] += 1
        try:
            completion = await self.judge.complete(request)
        except Exception as exc:  # a judge that fails must not sink the selection
            self._stats["failed"] += 1
            detail = str(getattr(exc, "message", None) or exc)
            self._last_error = " ".join(f"{type(exc).__name__}: {detail}".split())
            telemetry.event(
                "judge_call_failed",
                level="info",
                backend=self.judge.name,
                error=type(exc).__name__,
                detail=detail,
            )
            return None
        return completion.text

    def _failed(self) -> Score:
        return Score(0.0, "judge failed")  # why: last_error

    async def score(
        self, request: ChatRequest, candidates: Sequence[Candidate]
    ) -> dict[int, Score]:
        ok = [c for c in candidates if c.ok]
        if self.mode == "pointwise":
            return await self._pointwise(request.prompt, ok)
        return await self._pairwise(request.prompt, ok)

    async def _pointwise(self, question: str, ok: list[Candidate]) -> dict[int, Score]:
        # Identical answers are rated once (samples of a small model often repeat).
        by_text: dict[str, list[int]] = {}
        out: dict[int, Score] = {}
        for c in ok:
            if c.text.strip():
                by_text.setdefault(c.text.strip(), []).append(c.index)
            else:
                out[c.index] = Score(0.0, "empty answer")
        limiter = anyio.CapacityLimiter(self.max_concurrency)

        async def rate(answer: str, indices: list[int]) -> None:
            async with limiter:
                text = await self._ask(self.pointwise_request(question, answer))
            if text is None:
                score = self._failed()
            elif (rating := parse_rating(text)) is None:
                self._stats["unparsed"] += 1
                score = Score(0.0, "judge answer unreadable")
            else:
                self._stats["parsed"] += 1
                score = Score((rating - 1.0) / 9.0, f"rated {rating:g}/10")
            for i in indices:
                out[i] = score

        async with anyio.create_task_group() as tg:
            for answer, indices in by_text.items():
                tg.start_soon(rate, answer, indices)
        return out

    async def _pairwise(self, question: str, ok: list[Candidate]) -> dict[int, Score]:
        voters = [c for c in ok if c.text.strip()]
        out: dict[int, Score] = {
            c.index: Score(0.0, "empty answer") for c in ok if not c.text.strip()
        }
        if len(voters) == 1:
            out[voters[0].index] = Score(1.0, "the only answer")
            return out
        points = {c.index: 0.0 for c in voters}
        judged = {c.index: 0 for c in voters}
        failed = {c.index: 0 for c in voters}
        limiter = anyio.CapacityLimiter(self.max_concurrency)

        async def compare(first: Candidate, second: Candidate) -> None:
            async with limiter:
                text = await self._ask(self.pairwise_request(question, first.text, second.text))
            if text is None:
                failed[first.index] += 1
                failed[second.index] += 1
                return
            verdict = parse_verdict(text)
            if verdict is None:
                self._stats["unparsed"] += 1
                return
            self._stats["parsed"] += 1
            judged[first.index] += 1
            judged[second.index] += 1
            if verdict == "A":
                points[first.index] += 1.0
            elif verdict == "B":
                points[second.index] += 1.0
            else:
                points[first.index] += 0.5
                points[second.index] += 0.5

        async with anyio.create_task_group() as tg:
            for a, b in combinations(voters, 2):
                tg.start_soon(compare, a, b)
                tg.start_soon(compare, b, a)  # positions swapped
        for c in voters:
            n = judged[c.index]
            if n == 0 and failed[c.index]:
                out[c.index] = self._failed()
            elif n == 0:
                out[c.index] = Score(0.0, "no readable verdict")
            else:
                out[c.index] = Score(
                    points[c.index] / n, f"{points[c.index]:g} points in {n} comparisons"
                )
        return out

    def __repr__(self) -> str:
        return f"LLMJudge(judge={self.judge.name!r}, mode={self.mode!r}, name={self.name!r})"
