"""Cheap pass/fail checks on one answer: length, patterns, refusals, a clean finish.

Each scores 1 (passes) or 0 (fails, with the reason), so they work as scorers and as hard
filters of [`Select`][genfan.select.Select].
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .._errors import ConfigurationError
from .._types import ChatRequest
from ._base import Candidate
from ._scorer import CandidateScorer, Score

__all__ = ["Finished", "LengthBounds", "Patterns", "RefusalDetector"]

_PASS = Score(1.0, "passes")


def _check_bound(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 0):
        raise ConfigurationError(f"{name} must be an integer >= 0 or None, got {value!r}")


class LengthBounds(CandidateScorer):
    """The answer's length (characters and/or words) lies within the bounds (inclusive).

    Args:
        min_chars: lower bound on ``len(text.strip())``.
        max_chars: upper bound on ``len(text.strip())``.
        min_words: lower bound on the number of whitespace-separated words.
        max_words: upper bound on the number of whitespace-separated words.
    """

    def __init__(
        self,
        *,
        min_chars: int | None = None,
        max_chars: int | None = None,
        min_words: int | None = None,
        max_words: int | None = None,
        name: str = "length",
    ) -> None:
        for field, value in (
            ("min_chars", min_chars),
            ("max_chars", max_chars),
            ("min_words", min_words),
            ("max_words", max_words),
        ):
            _check_bound(field, value)
        if min_chars is not None and max_chars is not None and min_chars > max_chars:
            raise ConfigurationError(f"min_chars ({min_chars}) must be <= max_chars ({max_chars})")
        if min_words is not None and max_words is not None and min_words > max_words:
            raise ConfigurationError(f"min_words ({min_words}) must be <= max_words ({max_words})")
        self.min_chars, self.max_chars = min_chars, max_chars
        self.min_words, self.max_words = min_words, max_words
        self.name = name

    def score_one(self, request: ChatRequest, candidate: Candidate) -> Score:
        text = candidate.text.strip()
        chars, words = len(text), len(text.split())
        if self.min_chars is not None and chars < self.min_chars:
            return Score(0.0, f"{chars} chars < {self.min_chars}")
        if self.max_chars is not None and chars > self.max_chars:
            return Score(0.0, f"{chars} chars > {self.max_chars}")
        if self.min_words is not None and words < self.min_words:
            return Score(0.0, f"{words} words < {self.min_words}")
        if self.max_words is not None and words > self.max_words:
            return Score(0.0, f"{words} words > {self.max_words}")
        return Score(1.0, f"{chars} chars, {words} words")


def _compile(patterns: Iterable[str | re.Pattern[str]], field: str) -> tuple[re.Pattern[str], ...]:
    out = []
    for p in patterns:
        try:
            out.append(p if isinstance(p, re.Pattern) else re.compile(p, re.IGNORECASE))
        except re.error as exc:
            raise ConfigurationError(f"{field} pattern {p!r} is invalid: {exc}") from exc
    return tuple(out)


class Patterns(CandidateScorer):
    """Every ``required`` pattern occurs in the answer and no ``forbidden`` one does.

    Patterns are regular expressions, searched case-insensitively unless compiled otherwise.
    """

    def __init__(
        self,
        *,
        required: Iterable[str | re.Pattern[str]] = (),
        forbidden: Iterable[str | re.Pattern[str]] = (),
        name: str = "patterns",
    ) -> None:
        self.required = _compile(required, "required")
        self.forbidden = _compile(forbidden, "forbidden")
        if not self.required and not self.forbidden:
            raise ConfigurationError("Patterns needs at least one required or forbidden pattern")
        self.name = name

    def score_one(self, request: ChatRequest, candidate: Candidate) -> Score:
        text = candidate.text
        for p in self.required:
            if not p.search(text):
                return Score(0.0, f"missing {p.pattern!r}")
        for p in self.forbidden:
            if p.search(text):
                return Score(0.0, f"contains forbidden {p.pattern!r}")
        return _PASS


DEFAULT_REFUSALS: tuple[str, ...] = (
    r"\bI(?:'m| am) (?:sorry|afraid),? (?:but )?I (?:can(?:'|no)t|cannot|am unable|'m unable|won't)",
    r"\bI (?:can(?:'|no)t|cannot|won't|am unable to|'m unable to) (?:help|assist|provide|comply|do that|answer)",
    r"\bas an AI(?: language model)?\b",
    r"\bI(?:'m| am) not able to (?:help|assist|provide|answer)",
    r"\bI must (?:decline|refuse)\b",
)


class RefusalDetector(CandidateScorer):
    """Scores 0 for an answer that refuses (``"I'm sorry, but I can't help with that"``).

    Only the first ``window`` characters are searched: refusals come first, and a long answer
    that quotes a refusal later is not one.

    Args:
        patterns: regular expressions of refusals (default: common English refusals).
        window: how many leading characters to search.
    """

    def __init__(
        self,
        patterns: Iterable[str | re.Pattern[str]] = DEFAULT_REFUSALS,
        *,
        window: int = 300,
        name: str = "refusal",
    ) -> None:
        if window < 1:
            raise ConfigurationError(f"window must be >= 1 characters, got {window}")
        self.patterns = _compile(patterns, "refusal")
        self.window = window
        self.name = name

    def score_one(self, request: ChatRequest, candidate: Candidate) -> Score:
        head = candidate.text[: self.window].replace("’", "'")
        for p in self.patterns:
            if p.search(head):
                return Score(0.0, "refuses")
        if not head.strip():
            return Score(0.0, "empty answer")
        return Score(1.0, "answers")


class Finished(CandidateScorer):
    """Scores 0 for an answer cut short (``finish_reason`` ``length``, ``content_filter``, ``error``)."""

    def __init__(self, *, name: str = "finished") -> None:
        self.name = name

    def score_one(self, request: ChatRequest, candidate: Candidate) -> Score:
        reason = candidate.completion.finish_reason if candidate.completion else "error"
        if reason in ("length", "content_filter", "error"):
            return Score(0.0, f"finish_reason={reason}")
        return Score(1.0, f"finish_reason={reason}")
