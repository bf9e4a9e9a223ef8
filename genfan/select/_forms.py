"""What form the answer to a request takes, and how to read that answer out of a reply.

[`infer_form`][genfan.select.infer_form] reads the request (its response format, the options it lists, its wording)
and says whether the answer is a number, a choice (lettered options, or yes/no), JSON, a short
phrase or name, or free text, and why. [`extract_answer`][genfan.select.extract_answer] then reads the answer of that form
out of a reply, with its position in the text (so that the model's confidence in exactly those
tokens can be read):

* number: a number right after an answer marker (``answer is``, ``=``, ``is``), else the last
  number; numbers echoed from the question ignored; numbers in words (``eight``) only when there
  is no digit (then the first);
* choice: a letter named as the answer (``answer is B``), else a letter standing alone or
  leading (``B``, ``(B)``, ``B) ...``), else the one option whose text the reply names
  (``A banana`` is an article, not option A); ``yes``/``no`` for a yes/no question;
* short: a quoted or bold phrase, else the first run of up to three words after a copula
  (``is``, ``called``, ``known as``) in the first sentence, else the first such run anywhere in
  it, of words neither in the question (nor inflections of its words) nor filler
  (``The capital of France is Paris.`` -> ``paris``);
* JSON: the JSON value, canonical (keys sorted, no spaces);
* text: nothing to extract (free text is compared whole, by consensus).
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal, TypeAlias

from .._types import ChatRequest
from ._extract import _NUMBER, _NUMBER_WORDS, _canonical_number, _words_values, numbers_in

__all__ = [
    "AnswerForm",
    "AnswerKind",
    "Extracted",
    "extract_answer",
    "infer_form",
    "parse_options",
]

#: The forms an answer can take.
AnswerKind: TypeAlias = Literal["number", "choice", "short", "json", "text"]


@dataclass(frozen=True, slots=True)
class AnswerForm:
    """The form the answer to a request is expected to take.

    Attributes:
        kind: ``number``, ``choice``, ``short`` (a word, name or phrase), ``json`` or ``text``.
        why: what in the request gave it away, for explanations.
        options: for ``choice``, the options listed, as ``(letter, text)``.
    """

    kind: AnswerKind
    why: str
    options: tuple[tuple[str, str], ...] = ()

    @property
    def comparable(self) -> bool:
        """Whether answers of this form can be voted on (all but free text)."""
        return self.kind != "text"


@dataclass(frozen=True, slots=True)
class Extracted:
    """An answer read out of a reply: its key (what votes are counted on) and where it stands
    in the text (``text[start:end]``)."""

    key: str
    start: int
    end: int


_OPTION = re.compile(
    r"^[ \t]*(?:\(([A-Ja-j])\)|([A-J])[).:]|\[([A-J])\])[ \t]*(\S.*?)[ \t]*$", re.MULTILINE
)
_INLINE_OPTION = re.compile(r"(?:^|\s)\(([A-J])\)\s*([^()\n]+?)(?=\s*\([A-J]\)|\s*$|\n)")
_ARITH = re.compile(
    r"\d[\d,.]*\s*(?:[-+*/×x÷^]|times|plus|minus|divided by|multiplied by|squared|cubed)\s*\d?",
    re.IGNORECASE,
)
_NUMBER_CUES = re.compile(
    r"\b(?:how many|how much|how old|how long|how far|how tall|how fast|what year|which year|"
    r"in what year|calculate|compute|evaluate|solve|sum of|product of|difference between|"
    r"percent(?:age)?|next number|comes next|number comes|the sequence|as a number|"
    r"the number|a number|numeric(?:al)? answer|digits?|square root|average|total|"
    r"boiling point|freezing point|melting point|temperature|speed|distance|area|perimeter|"
    r"volume|population|how (?:hot|cold|big|heavy|wide|deep|high)|^when (?:did|was|were|is))\b",
    re.IGNORECASE | re.MULTILINE,
)
_YES_NO_Q = re.compile(
    r"^\s*(?:is|are|was|were|do|does|did|can|could|will|would|should|has|have|had)\b[^\n]*\?\s*$",
    re.IGNORECASE,
)
_JSON_CUES = re.compile(r"\bjson\b", re.IGNORECASE)
_TEXT_CUES = re.compile(
    r"\b(?:explain|describe|discuss|write|essay|story|poem|summari[sz]e|summary|compare|"
    r"contrast|elaborate|outline|draft|translate|rewrite|paraphrase|list|why|how (?:do|does|"
    r"can|could|would|should|to)|what are (?:the )?(?:benefits|advantages|pros|reasons|ways)|"
    r"in detail|step by step|paragraph|sentences|advice|recommend|opinion|tell me about)\b",
    re.IGNORECASE,
)
_SHORT_CUES = re.compile(
    r"\b(?:one word|a single word|single word|one or two words|a word|few words|briefly|"
    r"short answer|just the name|only the name|name (?:the|a|one)|who (?:is|was|wrote|"
    r"invented|discovered|painted|founded)|what is the (?:capital|name|color|colour|"
    r"opposite|symbol|currency|language|largest|smallest|tallest|longest|highest|main|first|"
    r"last)|which (?:\w+ ){0,3}(?:is|was|comes|says|do|does|has)|what (?:color|colour|animal|"
    r"language|country|city|planet|continent|month|day|season)|what do \w+ make|what is a "
    r"(?:baby|young)|called\??$)",
    re.IGNORECASE,
)
_WH = re.compile(r"^\s*(?:who|what|which|where|when|name)\b", re.IGNORECASE | re.MULTILINE)

#: The options of a yes/no question.
YES_NO: tuple[tuple[str, str], ...] = (("yes", "yes"), ("no", "no"))
_YES_NO_ANSWER = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_options(question: str) -> tuple[tuple[str, str], ...]:
    """The lettered options a question lists (``A) ...``, ``(B) ...``, ``C. ...``), in order.

    Two or more options with consecutive letters from ``A`` count; otherwise none.
    """
    found: list[tuple[str, str]] = []
    for m in _OPTION.finditer(question):
        letter = (m.group(1) or m.group(2) or m.group(3)).upper()
        found.append((letter, m.group(4).strip()))
    if len(found) < 2:
        found = [(m.group(1), m.group(2).strip()) for m in _INLINE_OPTION.finditer(question)]
    letters = [letter for letter, _ in found]
    expected = [chr(ord("A") + i) for i in range(len(found))]
    if len(found) >= 2 and letters == expected:
        return tuple(found)
    return ()


def _question(request: ChatRequest) -> str:
    return request.prompt


def _instructions(request: ChatRequest) -> str:
    return "\n".join(m.content or "" for m in request.messages if m.role in ("system", "user"))


def infer_form(request: ChatRequest) -> AnswerForm:
    """The form the answer to ``request`` is expected to take, and why (see the module docs)."""
    fmt = request.response_format
    if fmt is not None and fmt.type in ("json_object", "json_schema"):
        return AnswerForm("json", f"the request asks for {fmt.type} (response_format)")
    question = _question(request)
    options = parse_options(question)
    if options:
        letters = f"{options[0][0]}-{options[-1][0]}"
        return AnswerForm("choice", f"the question lists options {letters}", options)
    everything = _instructions(request)
    if _JSON_CUES.search(everything):
        return AnswerForm("json", "the request mentions JSON")
    text_cue = _TEXT_CUES.search(question)
    number_cue = _NUMBER_CUES.search(everything)
    arith = _ARITH.search(question)
    short_cue = _SHORT_CUES.search(everything)
    words = len(question.split())
    if number_cue and not text_cue:
        return AnswerForm("number", f"it asks {number_cue.group(0).lower()!r}")
    if arith and not text_cue and words <= 40:
        return AnswerForm("number", f"it asks about {arith.group(0).strip()!r}")
    if (
        not text_cue
        and len(numbers_in(question)) >= 2
        and question.rstrip().endswith("?")
        and _WH.search(re.split(r"(?<=[.!])\s+", question)[-1]) is not None
    ):
        return AnswerForm("number", "a question about the numbers it gives")
    if short_cue and not text_cue:
        return AnswerForm("short", f"it asks {short_cue.group(0).lower().rstrip('?')!r}")
    if text_cue:
        return AnswerForm("text", f"it asks to {text_cue.group(0).lower()!r}: free text")
    if _WH.search(question) and words <= 25 and question.rstrip().endswith(("?", ".")):
        return AnswerForm("short", "a short wh-question")
    if _YES_NO_Q.search(question) and words <= 30:
        return AnswerForm("choice", "a yes/no question", YES_NO)
    return AnswerForm("text", "no answer form recognised: free text")


# -- extraction ----------------------------------------------------------------------------

_MARKER = re.compile(
    r"(?:\banswer(?: is)?|\bresult(?: is)?|\bequals|\bis equal to|=|\bgives|\bmakes|\bis)"
    r"\s*[:=]?\s*\**\s*",
    re.IGNORECASE,
)


def _fold(text: str) -> str:
    """Case-folded, accents removed (``Bogotá`` -> ``bogota``)."""
    decomposed = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def _numbers_with_spans(text: str) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []
    for m in _NUMBER.finditer(text):
        n = _canonical_number(m.group(0))
        if n is not None:
            out.append((n, m.start(), m.end()))
    return out


def _word_numbers_with_spans(text: str) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []
    for m in _NUMBER_WORDS.finditer(text):
        values = _words_values(m.group(0))
        if len(values) == 1:
            out.append((str(values[0]), m.start(), m.end()))
    return out


def _extract_number(text: str, request: ChatRequest) -> Extracted | None:
    echoed = set(numbers_in(_question(request))) | set(numbers_in(_question(request), words=True))
    found = [n for n in _numbers_with_spans(text) if n[0] not in echoed]
    if not found:
        # Numbers in words only when there is no digit; the first, since later ones are
        # often pronouns ("two wheels: one for ...").
        words = [n for n in _word_numbers_with_spans(text) if n[0] not in echoed]
        return Extracted(*words[0]) if words else None
    # A number right after an answer marker ("the answer is 36", "= 36") wins over the last.
    for m in _MARKER.finditer(text):
        for value, start, end in found:
            if start == m.end() or (start > m.end() and not text[m.end() : start].strip(" *$")):
                return Extracted(value, start, end)
    value, start, end = found[-1]
    return Extracted(value, start, end)


_LETTER_PATTERNS = (
    # a letter named as the answer: "the answer is B", "Answer: (C)", "option D"
    re.compile(
        r"\b(?i:answer|option|choice)\b[^\w\n]{0,3}(?:(?i:is|would be|must be)\b)?[^\w\n]{0,4}"
        r"(?:(?i:option)\s+)?\(?([A-J])\b(?![\w'])"
    ),
    re.compile(r"^\W{0,3}\(?([A-J])\)?\s*$"),  # "B", "(B)", "**B**"
    re.compile(r"^\W{0,3}\(?([A-J])\)?\s*[).:,\-]"),  # "B) ...", "(B) ...", "B. ...", "B: ..."
    re.compile(r"(?:^|\s)\(([A-J])\)"),
    re.compile(r"(?:^|\s)([A-J])\)"),
)


def _extract_choice(text: str, form: AnswerForm) -> Extracted | None:
    if form.options == YES_NO:
        m = _YES_NO_ANSWER.search(text)
        return None if m is None else Extracted(m.group(1).lower(), m.start(1), m.end(1))
    letters = {letter for letter, _ in form.options}
    stripped = text.strip()
    lead = len(text) - len(text.lstrip())
    for pattern in _LETTER_PATTERNS:
        m = pattern.search(stripped)
        if m and m.group(1).upper() in letters:
            # "A banana" is an article, not option A: only the bare-letter patterns need care.
            return Extracted(m.group(1).upper(), lead + m.start(1), lead + m.end(1))
    folded = _fold(text)
    hits: list[tuple[int, int, str]] = []
    for letter, option in form.options:
        o = _fold(option).strip(" .")
        if not o:
            continue
        m = re.search(rf"(?<!\w){re.escape(o)}(?!\w)", folded)
        if m:
            hits.append((m.start(), m.end(), letter))
    if len(hits) == 1:
        start, end, letter = hits[0]
        return Extracted(letter, start, end)
    return None


_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_FILLER = frozenset(
    """a an the is are was were be been being am of in on at to for from by with and or but it
    its it's this that these those as so than then there here what which who whom whose when
    where why how answer answers question i you he she we they me my your our their his her
    just only correct right called known named name also very well sure yes no not okay ok
    would could should will can may might do does did has have had one word words correct
    response reply final simply basically actually typically usually indeed often generally
    commonly considered refer refers referred referring type kind sort also really probably
    likely certainly definitely mostly most more very quite about around approximately always
    never sometimes officially specifically particular particularly perhaps maybe said says
    think believe means mean following follows here's there's that's""".split()
)
_COPULA = re.compile(
    r"\b(?:is|are|was|were|be|called|named|known as|referred to as|means)\b\s*:?\s*"
    r"|:\s*",
    re.IGNORECASE,
)
_HIGHLIGHT = re.compile(r"\*\*([^*\n]{1,40})\*\*|\"([^\"\n]{1,40})\"|“([^”\n]{1,40})”")
_LEADIN = re.compile(
    r"^\s*(?:(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:\-]?|a\s*:|answer\s*:)\s*", re.IGNORECASE
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s|\n")


def _extract_short(text: str, request: ChatRequest, max_words: int = 3) -> Extracted | None:
    asked = {_fold(w) for w in _WORD.findall(_question(request))}
    stems = [w for w in asked if len(w) >= 3]

    def novel(word: str) -> bool:
        f = _fold(word)
        if f in asked or f in _FILLER:
            return False
        # an inflection of a word of the question ("ended" for "end") is an echo too
        return not any(f.startswith(w) and len(f) - len(w) <= 3 for w in stems)

    for m in _HIGHLIGHT.finditer(text):
        phrase = next(g for g in m.groups() if g is not None)
        words = [w for w in _WORD.findall(phrase) if novel(w)]
        if words and len(_WORD.findall(phrase)) <= max_words + 1:
            start = m.start() + m.group(0).find(phrase)
            return Extracted(" ".join(_fold(w) for w in words), start, start + len(phrase))
    body = text
    lead = _LEADIN.match(body)
    offset = lead.end() if lead else 0
    end_first = _SENTENCE_END.search(body, offset)
    spans = [(offset, end_first.start() if end_first else len(body))]
    if end_first:
        spans.append((end_first.end(), len(body)))

    def first_run(lo: int, hi: int) -> Extracted | None:
        run: list[re.Match[str]] = []
        for w in _WORD.finditer(body, lo, hi):
            if novel(w.group(0)):
                if run and body[run[-1].end() : w.start()].strip(" -"):
                    break  # punctuation between: the run has ended
                run.append(w)
                if len(run) == max_words:
                    break
            elif run:
                break
        if not run:
            return None
        key = " ".join(_fold(w.group(0)) for w in run)
        return Extracted(key, run[0].start(), run[-1].end())

    lo, hi = spans[0]
    # "The capital of Peru is Lima", "also known as a lamb": what follows the copula first.
    for m in _COPULA.finditer(body, lo, hi):
        found = first_run(m.end(), hi)
        if found is not None:
            return found
    for lo, hi in spans:
        found = first_run(lo, hi)
        if found is not None:
            return found
    return None


def _extract_json(text: str) -> Extracted | None:
    from ._schema import extract_json

    try:
        value = extract_json(text)
    except ValueError:
        return None
    key = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return Extracted(key, 0, len(text))


def extract_answer(form: AnswerForm, text: str, request: ChatRequest) -> Extracted | None:
    """The answer of ``form`` in ``text`` (``None``: nothing of that form, or free text)."""
    if not text.strip():
        return None
    if form.kind == "number":
        return _extract_number(text, request)
    if form.kind == "choice":
        return _extract_choice(text, form)
    if form.kind == "short":
        return _extract_short(text, request)
    if form.kind == "json":
        return _extract_json(text)
    return None
