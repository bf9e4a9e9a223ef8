"""Every built-in scorer, on constructed candidates: exact scores, ties, empties, failures."""

from __future__ import annotations

import re

import anyio
import anyio.lowlevel
import pytest
from pydantic import BaseModel

from genfan import (
    BackendTimeoutError,
    ChatRequest,
    ConfigurationError,
    MissingExtraError,
    ResponseFormat,
)
from genfan.select import (
    Consensus,
    FinalNumber,
    Finished,
    LengthBounds,
    LLMJudge,
    MajorityVote,
    Normalized,
    NovelWords,
    Patterns,
    RefusalDetector,
    RegexExtract,
    SchemaValid,
    Score,
    as_extractor,
    char_ngram_jaccard,
    extract_json,
    numbers_in,
    parse_rating,
    parse_verdict,
    rouge_l,
    run_scorer,
    scorer,
    token_jaccard,
)
from genfan.testing import Fail, FakeBackend

from ._select_helpers import Q, cancelled, failed, ok, texts

pytestmark = pytest.mark.anyio


# --- Score -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_score_must_lie_in_unit_interval(value: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Score(value)


# --- extractors ------------------------------------------------------------------------------


def test_numbers_are_canonicalised() -> None:
    assert numbers_in("1,000 and 3.50, -4, 12. then 0.0 and 5-3") == [
        "1000",
        "3.5",
        "-4",
        "12",
        "0",
        "5",
        "3",
    ]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("12", "12"),
        ("5 + 7 = 12.", "12"),
        ("The answer is 12 apples", "12"),
        ("5 + 7", None),  # only echoes of the question: no vote
        ("I don't know", None),
        ("", None),
        ("1,200", "1200"),
    ],
)
def test_final_number_ignores_echoes_of_the_question(text: str, key: str | None) -> None:
    assert FinalNumber()(text, Q) == key


def test_final_number_options() -> None:
    assert FinalNumber(ignore_echo=False)("5 + 7", Q) == "7"
    assert FinalNumber(first=True)("12 or 13", Q) == "12"
    assert FinalNumber()("5 + 7", None) == "7"  # without the request nothing is an echo


@pytest.mark.parametrize(
    ("text", "numbers"),
    [
        ("twenty-one apples", ["21"]),
        ("Three hundred and five", ["305"]),
        ("one thousand two hundred thirty four", ["1234"]),
        ("two million five hundred thousand", ["2500000"]),
        ("a hundred", ["100"]),
        ("one two three", ["1", "2", "3"]),  # a run of units is several numbers
        ("twenty thirty", ["20", "30"]),
        ("3 cats and twelve dogs, then 4", ["3", "12", "4"]),  # in order with the digits
        ("someone has gone often", []),  # words inside words are not numbers
    ],
)
def test_numbers_written_in_words(text: str, numbers: list[str]) -> None:
    assert numbers_in(text, words=True) == numbers
    assert numbers_in("twenty-one and 5") == ["5"]  # off by default


def test_number_words_extractor_votes_and_ignores_echoes() -> None:
    seven = ChatRequest.from_prompt("What is five plus seven?")
    extract = as_extractor("number_words")
    assert extract("Five plus seven is twelve.", seven) == "12"
    assert extract("The answer is 12", seven) == "12"  # digits and words agree
    assert extract("five plus seven", seven) is None  # only echoes
    assert FinalNumber()("Five plus seven is twelve.", seven) is None  # digits only


def test_other_extractors() -> None:
    assert Normalized()('  "Paris."  ', None) == "paris"
    assert Normalized()("  ", None) is None
    capital = ChatRequest.from_prompt("What is the capital of France?")
    assert NovelWords()("The capital of France is Paris.", capital) == "paris"
    assert NovelWords(max_words=3)("It is Paris, France's capital city", capital) == (
        "paris france's city"
    )
    assert RegexExtract(r"answer:\s*(\w+)")("Answer: Lyon. answer: Nice", None) == "lyon"
    assert RegexExtract(r"answer:\s*(\w+)", last=True)("Answer: Lyon. answer: Nice", None) == "nice"
    assert RegexExtract(r"\d+")("none", None) is None


def test_as_extractor_accepts_names_patterns_and_functions() -> None:
    assert isinstance(as_extractor("number"), FinalNumber)
    assert isinstance(as_extractor("re:(\\d+)"), RegexExtract)
    assert isinstance(as_extractor(re.compile("x")), RegexExtract)
    one = as_extractor(lambda text: text[:1])
    two = as_extractor(lambda text, request: request.prompt[:4] if request else None)
    assert one("abc", Q) == "a"
    assert two("abc", Q) == "What"
    with pytest.raises(ConfigurationError, match="extract must be"):
        as_extractor("final")
    with pytest.raises(ConfigurationError, match="invalid"):
        as_extractor("re:(")


# --- majority vote ---------------------------------------------------------------------------


async def test_vote_scores_are_group_shares_over_answered_candidates() -> None:
    cands = [
        ok(0, "12"),
        ok(1, "The answer is 12"),
        ok(2, "13"),
        ok(3, ""),
        failed(4),
        cancelled(5),
        ok(6, "5 + 7"),  # echo only: no vote, but it answered
    ]
    scores = await run_scorer(MajorityVote(extract="number"), Q, cands)
    assert {i: s.value for i, s in scores.items()} == {0: 0.4, 1: 0.4, 2: 0.2, 3: 0.0, 6: 0.0}
    assert scores[0].reason == "2 of 5 answers say '12'"
    assert scores[6].reason == "no answer to count"


async def test_vote_ties_and_groups() -> None:
    vote = MajorityVote()
    cands = texts("Paris", "paris.", "Lyon", "LYON")
    scores = await run_scorer(vote, Q, cands)
    assert [scores[i].value for i in range(4)] == [0.5, 0.5, 0.5, 0.5]
    assert vote.groups(Q, cands) == {"paris": [0, 1], "lyon": [2, 3]}


async def test_vote_with_no_answers_at_all() -> None:
    assert await run_scorer(MajorityVote(), Q, [failed(0), cancelled(1)]) == {}


# --- consensus -------------------------------------------------------------------------------


def test_lexical_similarities() -> None:
    assert token_jaccard("the cat sat", "the cat ran") == pytest.approx(2 / 4)
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(
        2 * (5 / 6) * 1.0 / (5 / 6 + 1.0)
    )
    assert rouge_l("a", "") == 0.0
    assert rouge_l("", "") == 1.0
    assert char_ngram_jaccard("abcd", "abce") == pytest.approx(1 / 3)
    assert char_ngram_jaccard("same", "same") == 1.0


async def test_consensus_picks_the_medoid_and_zeroes_empty_answers() -> None:
    cands = [
        ok(0, "the cat sat"),
        ok(1, "the cat ran"),
        ok(2, "a dog barked loudly"),
        ok(3, "   "),
        failed(4),
    ]
    scores = await run_scorer(Consensus("token_jaccard"), Q, cands)
    # pairwise: (0,1)=2/4, (0,2)=0, (1,2)=0
    assert scores[0].value == pytest.approx(0.25)
    assert scores[1].value == pytest.approx(0.25)
    assert scores[2].value == 0.0
    assert scores[3] == Score(0.0, "empty answer")
    assert 4 not in scores


async def test_consensus_lone_answer_and_custom_similarity() -> None:
    scores = await run_scorer(Consensus(), Q, [ok(0, "x"), ok(1, ""), failed(2)])
    assert scores[0] == Score(1.0, "the only answer")
    same_length = Consensus(lambda a, b: 1.0 if len(a) == len(b) else 0.0)
    s = await run_scorer(same_length, Q, texts("aa", "bb", "ccc"))
    assert [s[i].value for i in range(3)] == [0.5, 0.5, 0.0]
    with pytest.raises(ConfigurationError, match="similarity must be"):
        Consensus("cosine")


async def test_consensus_with_embeddings_sync_and_async() -> None:
    vectors = {"a": [1.0, 0.0], "b": [1.0, 0.0], "c": [0.0, 1.0]}

    def embed(items: list[str]) -> list[list[float]]:
        return [vectors[t] for t in items]

    async def aembed(items: list[str]) -> list[list[float]]:
        await anyio.lowlevel.checkpoint()
        return embed(items)

    for fn in (embed, aembed):
        s = await run_scorer(Consensus(embed=fn), Q, texts("a", "b", "c"))
        assert [s[i].value for i in range(3)] == [0.5, 0.5, 0.0]

    with pytest.raises(ConfigurationError, match="one per text"):
        await run_scorer(Consensus(embed=lambda items: [[1.0]]), Q, texts("a", "b"))


async def test_consensus_rejects_out_of_range_similarity() -> None:
    with pytest.raises(ConfigurationError, match=r"\[0, 1\]"):
        await run_scorer(Consensus(lambda a, b: 2.0), Q, texts("a", "b"))


# --- LLM judge -------------------------------------------------------------------------------


def test_parse_rating() -> None:
    assert parse_rating("Rating: [[7]]") == 7
    assert parse_rating("I'd say [[8.5]] overall") == 8.5
    assert parse_rating("rating: 6") == 6
    assert parse_rating("This deserves 9/10.") == 9
    assert parse_rating("  4 ") == 4
    assert parse_rating("[[11]]") is None
    assert parse_rating("[[0]]") is None
    assert parse_rating("Great answer!") is None
    assert parse_rating("") is None


def test_parse_verdict() -> None:
    assert parse_verdict("Verdict: [[B]]") == "B"
    assert parse_verdict("[[C]]") == "C"
    assert parse_verdict("Assistant A is better.") == "A"
    assert parse_verdict("A") == "A"
    assert parse_verdict("It's a tie.") == "C"
    assert parse_verdict("[[A]] no wait [[B]]") is None
    assert parse_verdict("both are fine I guess") is None


def _judge_by_content(request: ChatRequest) -> str:
    user = request.messages[-1].content or ""
    answer = user.split("[The Start of Assistant's Answer]\n", 1)[1]
    if "Paris" in answer:
        return "Rating: [[10]]"
    if "Lyon" in answer:
        return "The answer is wrong. Rating: [[3]]"
    if "boom" in answer:
        return Fail(error=BackendTimeoutError)  # type: ignore[return-value]
    return "What a lovely question!"  # off-format


async def test_pointwise_judge_scores_and_counts_garbage() -> None:
    judge_backend = FakeBackend("judge", _judge_by_content)  # type: ignore[arg-type]
    judge = LLMJudge(judge_backend)
    cands = [ok(0, "Paris"), ok(1, "Lyon"), ok(2, "Nice"), ok(3, "boom"), ok(4, ""), failed(5)]
    capital = ChatRequest.from_prompt("What is the capital of France?")
    scores = await run_scorer(judge, capital, cands)
    assert scores[0] == Score(1.0, "rated 10/10")
    assert scores[1] == Score(2 / 9, "rated 3/10")
    assert scores[2] == Score(0.0, "judge answer unreadable")
    assert scores[3] == Score(0.0, "judge failed")
    assert scores[4] == Score(0.0, "empty answer")
    assert 5 not in scores
    stats = judge.statistics()
    assert (stats.calls, stats.parsed, stats.unparsed, stats.failed) == (4, 2, 1, 1)
    # the judge sees the rubric, the question and the answer; it is asked at temperature 0
    sent = judge_backend.calls[0]
    assert sent.temperature == 0.0
    assert "impartial judge" in (sent.messages[0].content or "")
    assert "correctness above all" in (sent.messages[0].content or "")
    assert (sent.messages[1].content or "").startswith(
        "[Question]\nWhat is the capital of France?\n\n[The Start of Assistant's Answer]\n"
    )


async def test_pointwise_judge_rates_identical_answers_once() -> None:
    backend = FakeBackend("judge", ["[[7]]"])
    judge = LLMJudge(backend)
    scores = await run_scorer(judge, Q, texts("12", "12 ", "13", "12"))
    assert len(backend.calls) == 2
    assert {s.value for s in scores.values()} == {6 / 9}
    assert judge.statistics().calls == 2


async def test_judge_calls_run_concurrently_up_to_the_limit() -> None:
    for limit, expected in ((8, 5), (2, 2)):
        backend = FakeBackend("judge", ["[[5]]"], latency=0.01)
        await run_scorer(LLMJudge(backend, max_concurrency=limit), Q, texts(*"abcde"))
        assert backend.max_in_flight == expected


async def test_pairwise_judge_swaps_positions_so_position_bias_cancels() -> None:
    always_first = FakeBackend("judge", ["[[A]]"])
    judge = LLMJudge(always_first, mode="pairwise")
    scores = await run_scorer(judge, Q, texts("x", "y", "z"))
    assert len(always_first.calls) == 6  # 3 pairs x 2 orders
    assert [scores[i].value for i in range(3)] == [0.5, 0.5, 0.5]


async def test_pairwise_judge_finds_the_better_answer_in_either_position() -> None:
    def prefer_paris(request: ChatRequest) -> str:
        user = request.messages[-1].content or ""
        a = user.split("[The Start of Assistant A's Answer]\n", 1)[1].split("\n[The End", 1)[0]
        b = user.split("[The Start of Assistant B's Answer]\n", 1)[1].split("\n[The End", 1)[0]
        if "Paris" in a:
            return "[[A]]"
        if "Paris" in b:
            return "Final verdict: [[B]]"
        return "[[C]]" if a != "garbage" and b != "garbage" else "hmm"

    judge = LLMJudge(FakeBackend("judge", prefer_paris), mode="pairwise")  # type: ignore[arg-type]
    scores = await run_scorer(judge, Q, texts("Paris", "Lyon", "Nice", "garbage", ""))
    assert scores[0].value == 1.0
    # Lyon: lost twice to Paris, tied twice with Nice; its comparisons with garbage unreadable
    assert scores[1].value == 0.25
    assert scores[1].reason == "1 points in 4 comparisons"
    assert scores[3].value == 0.0
    assert scores[4] == Score(0.0, "empty answer")
    stats = judge.statistics()
    assert stats.calls == 12 and stats.unparsed == 4 and stats.parsed == 8


async def test_pairwise_judge_that_only_babbles_never_crashes() -> None:
    judge = LLMJudge(FakeBackend("judge", ["???", "I like both"]), mode="pairwise")
    scores = await run_scorer(judge, Q, texts("x", "y"))
    assert scores == {0: Score(0.0, "no readable verdict"), 1: Score(0.0, "no readable verdict")}
    assert judge.statistics().unparsed == 2


def test_judge_options_are_validated() -> None:
    backend = FakeBackend()
    with pytest.raises(ConfigurationError, match="mode"):
        LLMJudge(backend, mode="listwise")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_concurrency"):
        LLMJudge(backend, max_concurrency=0)
    with pytest.raises(ConfigurationError, match="max_tokens"):
        LLMJudge(backend, max_tokens=0)


# --- schema ----------------------------------------------------------------------------------


class Person(BaseModel):
    name: str
    age: int


def test_extract_json_finds_json_in_prose_and_fences() -> None:
    assert extract_json('{"a": 1}') == {"a": 1}
    assert extract_json('Sure!\n```json\n{"a": 2}\n```\nDone.') == {"a": 2}
    assert extract_json('Here: {"a": 3} and more {') == {"a": 3}
    assert extract_json("[1, 2]") == [1, 2]
    with pytest.raises(ValueError, match="no JSON"):
        extract_json("no json here {")
    with pytest.raises(ValueError, match="empty"):
        extract_json("  ")


async def test_schema_valid_with_a_pydantic_model() -> None:
    cands = [
        ok(0, '```json\n{"name": "Ada", "age": 36}\n```'),
        ok(1, '{"name": "Ada", "age": "old"}'),
        ok(2, "Ada is 36"),
        failed(3),
    ]
    scores = await run_scorer(SchemaValid(Person), Q, cands)
    assert scores[0] == Score(1.0, "valid Person")
    assert scores[1].value == 0.0 and scores[1].reason.startswith("age:")
    assert scores[2] == Score(0.0, "no JSON found in the answer")
    assert 3 not in scores


async def test_schema_valid_with_a_json_schema_or_the_request_format() -> None:
    schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
    cands = texts('{"n": 3}', '{"n": "x"}', "{}", "[]")
    scores = await run_scorer(SchemaValid(schema), Q, cands)
    assert [scores[i].value for i in range(4)] == [1.0, 0.0, 0.0, 0.0]
    assert scores[1].reason.startswith("n:")
    req = ChatRequest.from_prompt(
        "json please", response_format=ResponseFormat(type="json_schema", json_schema=schema)
    )
    assert [s.value for s in (await run_scorer(SchemaValid(), req, cands)).values()] == [
        1.0,
        0.0,
        0.0,
        0.0,
    ]
    # no schema anywhere: any JSON passes
    anyjson = await run_scorer(SchemaValid(), Q, texts("[]", "nope"))
    assert [anyjson[0].value, anyjson[1].value] == [1.0, 0.0]


def test_schema_valid_rejects_bad_schemas() -> None:
    with pytest.raises(ConfigurationError, match="invalid JSON schema"):
        SchemaValid({"type": "no-such-type"})
    with pytest.raises(ConfigurationError, match="pydantic model class or a JSON schema"):
        SchemaValid("Person")  # type: ignore[arg-type]


def test_missing_jsonschema_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "jsonschema", None)
    with pytest.raises(MissingExtraError, match=r"genfan\[schema\]"):
        SchemaValid({"type": "object"})


# --- heuristics ------------------------------------------------------------------------------


async def test_length_bounds() -> None:
    s = await run_scorer(LengthBounds(min_chars=2, max_words=3), Q, texts("a", "ab", "a b c d"))
    assert s[0] == Score(0.0, "1 chars < 2")
    assert s[1].value == 1.0
    assert s[2] == Score(0.0, "4 words > 3")
    with pytest.raises(ConfigurationError, match="min_chars"):
        LengthBounds(min_chars=5, max_chars=2)
    with pytest.raises(ConfigurationError, match="max_words"):
        LengthBounds(max_words=-1)


async def test_patterns() -> None:
    p = Patterns(required=[r"\d+"], forbidden=["maybe"])
    s = await run_scorer(p, Q, texts("12", "maybe 12", "twelve"))
    assert s[0] == Score(1.0, "passes")
    assert s[1] == Score(0.0, "contains forbidden 'maybe'")
    assert s[2] == Score(0.0, "missing '\\\\d+'")
    with pytest.raises(ConfigurationError, match="at least one"):
        Patterns()


async def test_refusal_detector() -> None:
    s = await run_scorer(
        RefusalDetector(),
        Q,
        texts(
            "I'm sorry, but I can't help with that.",
            "As an AI language model, I cannot do arithmetic.",
            "I can’t assist with that request.",
            "12. Sorry for the delay!",
            "",
        ),
    )
    assert [s[i].value for i in range(5)] == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert s[4].reason == "empty answer"


async def test_finished() -> None:
    cands = [ok(0, "x", finish="stop"), ok(1, "x", finish="length")]
    s = await run_scorer(Finished(), Q, cands)
    assert s[0].value == 1.0 and s[1] == Score(0.0, "finish_reason=length")


# --- user callables --------------------------------------------------------------------------


async def test_function_scorers_sync_and_async() -> None:
    @scorer
    def short(request: ChatRequest, candidate: object) -> bool:
        return len(candidate.text) < 3  # type: ignore[attr-defined]

    @scorer(name="half")
    async def half(request: ChatRequest, candidate: object) -> tuple[float, str]:
        await anyio.lowlevel.checkpoint()
        return 0.5, "always half"

    cands = [ok(0, "ab"), ok(1, "abcd"), failed(2)]
    assert await run_scorer(short, Q, cands) == {0: Score(1.0, "passes"), 1: Score(0.0, "fails")}
    assert short.name == "short"
    assert await run_scorer(half, Q, cands) == {
        0: Score(0.5, "always half"),
        1: Score(0.5, "always half"),
    }

    bad = scorer(lambda request, candidate: 7)
    with pytest.raises(ConfigurationError, match="number in \\[0, 1\\]"):
        await run_scorer(bad, Q, cands)
