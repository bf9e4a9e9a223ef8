"""Answer extractors: turn an answer's text into a short key that votes can be counted on.

An extractor is called as ``extractor(text, request)`` and returns the key, or ``None`` when the
answer has nothing to extract (such answers cast no vote). The request lets an extractor ignore
what merely echoes the question: small models often repeat the question's numbers, and counting
those as votes would make the echo win.
"""

from __future__ import annotations

import inspect
import re
import unicodedata
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Protocol, TypeAlias

from .._errors import ConfigurationError
from .._types import ChatRequest

__all__ = [
    "Extractor",
    "ExtractorLike",
    "FinalNumber",
    "Normalized",
    "NovelWords",
    "RegexExtract",
    "as_extractor",
    "normalize_text",
    "numbers_in",
]


class Extractor(Protocol):
    """``(text, request) -> key | None``."""

    def __call__(self, text: str, request: ChatRequest | None = None, /) -> str | None: ...


#: An extractor; ``"normalize"``, ``"number"`` or ``"words"``; a regular expression (a compiled
#: pattern, or a string starting with ``re:``); or a function ``text -> key | None`` or
#: ``(text, request) -> key | None``.
ExtractorLike: TypeAlias = (
    Extractor | str | re.Pattern[str] | Callable[[str], str | None] | Callable[..., str | None]
)

_WS = re.compile(r"\s+")
_EDGE = re.compile(r"^[\s\"'`*_.,;:!?()\[\]{}]+|[\s\"'`*_.,;:!?()\[\]{}]+$")
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")

_STOPWORDS = frozenset(
    """a an the is are was were be been am of in on at to for from by with and or but it its
    this that these those as so than then there here what which who whom whose when where why how
    answer answers question i you he she we they me my your our their his her is's it's
    equals equal approximately about just only number result final correct""".split()
)


def normalize_text(text: str) -> str:
    """Lower case, Unicode NFKC, whitespace collapsed, surrounding quotes/punctuation removed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _WS.sub(" ", text).strip()
    return _EDGE.sub("", text)


def _canonical_number(raw: str) -> str | None:
    try:
        value = Decimal(raw.replace(",", ""))
    except InvalidOperation:
        return None
    if value == 0:
        return "0"
    text = format(value.normalize(), "f")
    return text


_UNITS = {
    w: i
    for i, w in enumerate(
        """zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen
        fifteen sixteen seventeen eighteen nineteen""".split()
    )
}
_TENS = {
    w: 10 * i
    for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)
}
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}
_NUMBER_WORD = "|".join(sorted([*_UNITS, *_TENS, "hundred", *_SCALES], key=len, reverse=True))
_NUMBER_WORDS = re.compile(
    rf"\b(?:{_NUMBER_WORD})(?:(?:[\s-]+|\s+and\s+)(?:{_NUMBER_WORD}))*\b", re.IGNORECASE
)


def _words_values(phrase: str) -> list[int]:
    """The numbers in a run of number words: ``"three hundred and twenty-one"`` -> [321],
    ``"one two three"`` -> [1, 2, 3]."""
    values: list[int] = []
    total = current = 0
    previous = ""

    def flush() -> None:
        nonlocal total, current
        if previous:
            values.append(total + current)
        total = current = 0

    for word in re.findall(r"[a-z]+", phrase.casefold()):
        if word == "and":
            continue
        if word in _UNITS or word in _TENS:
            value = _UNITS[word] if word in _UNITS else _TENS[word]
            # "twenty one" is 21; "one two", "twenty thirty" or "twenty twelve" are two numbers.
            if previous in _UNITS or (previous in _TENS and value >= 10):
                flush()
            current += value
        elif word == "hundred":
            if previous in ("", "hundred", *_SCALES):
                flush()
                current = 1
            current *= 100
        else:
            if previous in _SCALES and _SCALES[previous] <= _SCALES[word]:
                flush()
            total += (current or 1) * _SCALES[word]
            current = 0
        previous = word
    flush()
    return values


def numbers_in(text: str, *, words: bool = False) -> list[str]:
    """The numbers in ``text``, in order, canonicalised (``"1,000.50"`` -> ``"1000.5"``).

    Args:
        text: the text.
        words: also read cardinal numbers written in English words (``"twenty-one"`` -> ``"21"``,
            ``"three hundred and five"`` -> ``"305"``). Off by default: "one" is often a pronoun.
    """
    found: list[tuple[float, str]] = []
    for m in _NUMBER.finditer(text):
        n = _canonical_number(m.group(0))
        if n is not None:
            found.append((m.start(), n))
    if words:
        for m in _NUMBER_WORDS.finditer(text):
            found.extend((m.start() + i * 1e-3, str(v)) for i, v in enumerate(_words_values(m[0])))
        found.sort(key=lambda item: item[0])
    return [n for _, n in found]


def _question(request: ChatRequest | None) -> str:
    if request is None:
        return ""
    return "\n".join(m.content or "" for m in request.messages if m.role == "user")


class Normalized:
    """The whole answer, normalised (`normalize_text`); empty answers give ``None``."""

    def __call__(self, text: str, request: ChatRequest | None = None, /) -> str | None:
        key = normalize_text(text)
        return key or None

    def __repr__(self) -> str:
        return "Normalized()"


class FinalNumber:
    """The last number in the answer (self-consistency's usual extractor).

    Args:
        ignore_echo: skip numbers that appear in the question (user messages). An answer whose
            only numbers come from the question gives ``None``: it casts no vote. The price: a
            correct answer equal to a number of the question is not counted either.
        first: take the first number instead of the last.
        words: also read numbers written in words (``"twelve"``, ``"twenty-one"``); see
            `numbers_in`.
    """

    def __init__(
        self, *, ignore_echo: bool = True, first: bool = False, words: bool = False
    ) -> None:
        self.ignore_echo = ignore_echo
        self.first = first
        self.words = words

    def __call__(self, text: str, request: ChatRequest | None = None, /) -> str | None:
        found = numbers_in(text, words=self.words)
        if self.ignore_echo and found:
            echoed = set(numbers_in(_question(request), words=self.words))
            found = [n for n in found if n not in echoed]
        if not found:
            return None
        return found[0] if self.first else found[-1]

    def __repr__(self) -> str:
        return (
            f"FinalNumber(ignore_echo={self.ignore_echo}, first={self.first}, words={self.words})"
        )


class RegexExtract:
    """The first (or last) match of a regular expression (its ``group``), normalised.

    Args:
        pattern: the expression (case-insensitive unless compiled with other flags).
        group: the group to take (default: group 1 when the pattern has groups, else the match).
        last: take the last match instead of the first.
    """

    def __init__(
        self, pattern: str | re.Pattern[str], *, group: int | str | None = None, last: bool = False
    ) -> None:
        try:
            self.pattern = (
                pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, re.IGNORECASE)
            )
        except re.error as exc:
            raise ConfigurationError(f"extract pattern {pattern!r} is invalid: {exc}") from exc
        self.group = group if group is not None else (1 if self.pattern.groups else 0)
        self.last = last

    def __call__(self, text: str, request: ChatRequest | None = None, /) -> str | None:
        matches = list(self.pattern.finditer(text))
        if not matches:
            return None
        value = (matches[-1] if self.last else matches[0]).group(self.group)
        return (normalize_text(value) or None) if value is not None else None

    def __repr__(self) -> str:
        return f"RegexExtract({self.pattern.pattern!r}, group={self.group!r}, last={self.last})"


class NovelWords:
    """The first ``max_words`` content words of the answer that are not in the question.

    ``"The capital of France is Paris."`` asked ``"What is the capital of France?"`` gives
    ``"paris"``: a cheap way to vote on short factual answers wrapped in a sentence.
    """

    def __init__(self, max_words: int = 2) -> None:
        if max_words < 1:
            raise ConfigurationError(f"max_words must be >= 1, got {max_words}")
        self.max_words = max_words

    def __call__(self, text: str, request: ChatRequest | None = None, /) -> str | None:
        asked = {w.casefold() for w in _WORD.findall(_question(request))}
        words = [
            w
            for w in (x.casefold() for x in _WORD.findall(unicodedata.normalize("NFKC", text)))
            if w not in asked and w not in _STOPWORDS
        ]
        return " ".join(words[: self.max_words]) or None

    def __repr__(self) -> str:
        return f"NovelWords(max_words={self.max_words})"


class _Function:
    def __init__(self, fn: Callable[..., str | None]) -> None:
        self._fn = fn
        try:
            params = [
                p
                for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
            ]
            self._two = len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
        except (TypeError, ValueError):
            self._two = False

    def __call__(self, text: str, request: ChatRequest | None = None, /) -> str | None:
        value = self._fn(text, request) if self._two else self._fn(text)
        if value is None:
            return None
        return str(value)

    def __repr__(self) -> str:
        return f"extractor {getattr(self._fn, '__name__', self._fn)!r}"


def as_extractor(spec: ExtractorLike) -> Extractor:
    """Build an extractor from a name, a pattern or a function.

    Names: ``"normalize"`` (whole answer, normalised), ``"number"`` (the final number, echoes of
    the question ignored), ``"number_words"`` (the same, numbers written in words read too),
    ``"words"`` ([`NovelWords`][genfan.select.NovelWords]). A string starting with ``re:`` or a compiled pattern
    becomes a [`RegexExtract`][genfan.select.RegexExtract].
    """
    if isinstance(spec, Normalized | FinalNumber | RegexExtract | NovelWords | _Function):
        return spec
    if isinstance(spec, re.Pattern):
        return RegexExtract(spec)
    if isinstance(spec, str):
        if spec in ("normalize", "normalized", "text"):
            return Normalized()
        if spec in ("number", "final_number"):
            return FinalNumber()
        if spec == "number_words":
            return FinalNumber(words=True)
        if spec in ("words", "novel_words"):
            return NovelWords()
        if spec.startswith("re:"):
            return RegexExtract(spec[3:])
        raise ConfigurationError(
            "extract must be 'normalize', 'number', 'number_words', 'words', 're:<pattern>' or a "
            f"function, "
            f"got {spec!r}"
        )
    if callable(spec):
        return _Function(spec)
    raise ConfigurationError(f"extract must be a name, a pattern or a function, got {spec!r}")
