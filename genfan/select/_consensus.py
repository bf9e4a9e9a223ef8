"""Consensus without parsing: the answer most similar to the others wins (medoid / MBR pick).

Minimum-Bayes-risk selection with a similarity as the utility: each answer's score is its mean
similarity to the other answers, so the answer in the middle of the crowd wins, whatever its
format. Cheap lexical similarities are built in; an embedding function can be plugged in.
"""

from __future__ import annotations

import inspect
import math
import re
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeAlias

from .._errors import ConfigurationError
from .._types import ChatRequest
from ._base import Candidate
from ._scorer import Score

__all__ = [
    "Consensus",
    "Embedder",
    "Similarity",
    "char_ngram_jaccard",
    "rouge_l",
    "token_jaccard",
]

#: ``(a, b) -> similarity in [0, 1]``.
Similarity: TypeAlias = Callable[[str, str], float]
#: ``texts -> one vector per text`` (plain or ``async``).
Embedder: TypeAlias = Callable[
    [list[str]], Sequence[Sequence[float]] | Awaitable[Sequence[Sequence[float]]]
]

_TOKEN = re.compile(r"\w+")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


def token_jaccard(a: str, b: str) -> float:
    """Jaccard similarity of the two texts' sets of lower-cased word tokens."""
    sa, sb = set(_tokens(a)), set(_tokens(b))
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def char_ngram_jaccard(a: str, b: str, n: int = 3) -> float:
    """Jaccard similarity of the sets of character ``n``-grams (whitespace collapsed)."""

    def grams(t: str) -> set[str]:
        t = " ".join(unicodedata.normalize("NFKC", t).casefold().split())
        return {t[i : i + n] for i in range(max(1, len(t) - n + 1))} if t else set()

    ga, gb = grams(a), grams(b)
    if not ga and not gb:
        return 1.0
    return len(ga & gb) / len(ga | gb)


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1: the longest common subsequence of word tokens, as an F-measure."""
    ta, tb = _tokens(a), _tokens(b)
    if not ta or not tb:
        return 1.0 if not ta and not tb else 0.0
    prev = [0] * (len(tb) + 1)
    for x in ta:
        cur = [0] * (len(tb) + 1)
        for j, y in enumerate(tb, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(ta), lcs / len(tb)
    return 2 * p * r / (p + r)


_SIMILARITIES: dict[str, Similarity] = {
    "rouge_l": rouge_l,
    "token_jaccard": token_jaccard,
    "char_ngram": char_ngram_jaccard,
}


def _cosine(u: Sequence[float], v: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(u, v, strict=True))
    nu = math.sqrt(sum(x * x for x in u))
    nv = math.sqrt(sum(y * y for y in v))
    if nu == 0 or nv == 0:
        return 0.0
    return max(0.0, min(1.0, dot / (nu * nv)))


class Consensus:
    """Each answer scores its mean similarity to the other answers (medoid / MBR pick).

    Empty answers score 0 and are left out of the others' means. A lone answer scores 1: there
    is nothing to compare it with.

    Args:
        similarity: ``"rouge_l"`` (default), ``"token_jaccard"``, ``"char_ngram"`` (character
            3-gram Jaccard) or a function ``(a, b) -> [0, 1]``.
        embed: an embedding function ``texts -> vectors`` (plain or ``async``); when given,
            similarity is the cosine of the vectors (negatives count as 0) instead.
        name: the scorer's name in explanations.
    """

    def __init__(
        self,
        similarity: str | Similarity = "rouge_l",
        *,
        embed: Embedder | None = None,
        name: str = "consensus",
    ) -> None:
        if isinstance(similarity, str):
            if similarity not in _SIMILARITIES:
                raise ConfigurationError(
                    f"similarity must be one of {sorted(_SIMILARITIES)} or a function, "
                    f"got {similarity!r}"
                )
            self.similarity = _SIMILARITIES[similarity]
        elif callable(similarity):
            self.similarity = similarity
        else:
            raise ConfigurationError(f"similarity must be a name or a function, got {similarity!r}")
        self.embed = embed
        self.name = name

    async def _matrix(self, texts: list[str]) -> list[list[float]]:
        n = len(texts)
        if self.embed is not None:
            vectors = self.embed(texts)
            if inspect.isawaitable(vectors):
                vectors = await vectors
            vecs = list(vectors)
            if len(vecs) != n:
                raise ConfigurationError(
                    f"embed returned {len(vecs)} vectors for {n} texts; it must return one per text"
                )

            def sim(i: int, j: int) -> float:
                return _cosine(vecs[i], vecs[j])
        else:
            similarity = self.similarity

            def sim(i: int, j: int) -> float:
                return similarity(texts[i], texts[j])

        m = [[1.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                v = float(sim(i, j))
                if not (0.0 <= v <= 1.0):
                    raise ConfigurationError(f"similarity must be in [0, 1], got {v!r}")
                m[i][j] = m[j][i] = v
        return m

    async def score(
        self, request: ChatRequest, candidates: Sequence[Candidate]
    ) -> dict[int, Score]:
        ok = [c for c in candidates if c.ok]
        out: dict[int, Score] = {
            c.index: Score(0.0, "empty answer") for c in ok if not c.text.strip()
        }
        voters = [c for c in ok if c.text.strip()]
        if len(voters) == 1:
            out[voters[0].index] = Score(1.0, "the only answer")
        elif voters:
            m = await self._matrix([c.text for c in voters])
            n = len(voters)
            for i, c in enumerate(voters):
                mean = sum(m[i][j] for j in range(n) if j != i) / (n - 1)
                out[c.index] = Score(mean, f"mean similarity {mean:.2f} to {n - 1} others")
        return out

    def __repr__(self) -> str:
        sim = getattr(self.similarity, "__name__", "custom")
        return f"Consensus(similarity={sim!r}, embed={self.embed is not None}, name={self.name!r})"
