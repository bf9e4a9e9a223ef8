"""Select: weights, filters, tie-breaks, confidence, explanations, telemetry; the name factory."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import genfan
from genfan import ChatRequest, ConfigurationError, Usage, register_backend
from genfan.select import (
    SELECTOR_NAMES,
    Consensus,
    FirstSuccess,
    LLMJudge,
    MajorityVote,
    RefusalDetector,
    SchemaValid,
    Score,
    Select,
    Selection,
    scorer,
    selector_from_name,
)
from genfan.testing import FakeBackend, capture_events

from ._select_helpers import Q, cancelled, failed, ok, texts

pytestmark = pytest.mark.anyio


async def test_vote_selector_picks_the_majority_with_share_as_confidence() -> None:
    cands = [ok(0, "13"), ok(1, "12"), failed(2), ok(3, "it is 12"), ok(4, ""), cancelled(5)]
    sel = await Select(MajorityVote(extract="number")).select(Q, cands)
    assert sel.chosen == 1  # 12 wins; among the two 12s the first to finish
    assert sel.confidence == pytest.approx(2 / 4)
    assert sel.scores == {0: 0.25, 1: 0.5, 3: 0.5, 4: 0.0}
    assert sel.reasons[1] == "vote 0.50 (2 of 4 answers say '12')"
    assert sel.method == "vote"
    assert sel.by_scorer == {"vote": {0: 0.25, 1: 0.5, 3: 0.5, 4: 0.0}}
    assert sel.explanation == (
        "b1 scored 0.50: vote 0.50 (2 of 4 answers say '12'); tie among 2 broken by first_finished"
    )


async def test_weighted_scores_are_a_weighted_mean() -> None:
    @scorer(name="long")
    def long(request: ChatRequest, candidate: object) -> float:
        return 1.0 if len(candidate.text) > 2 else 0.0  # type: ignore[attr-defined]

    select = Select(scorers=[(MajorityVote(), 1.0), (long, 2.0)])
    assert select.name == "vote+long*2"
    sel = await select.select(Q, texts("ab", "ab", "abcd"))
    # ab: (2/3 + 0)/3 = 0.222; abcd: (1/3 + 2)/3 = 0.778
    assert sel.chosen == 2
    assert sel.scores[0] == pytest.approx((2 / 3) / 3)
    assert sel.scores[2] == pytest.approx((1 / 3 + 2) / 3)
    assert sel.confidence == pytest.approx((1 / 3 + 2) / 3)


@pytest.mark.parametrize(
    ("tie_break", "expected"),
    [("first_finished", 1), ("fastest", 2), ("cheapest", 0), ("index", 0)],
)
async def test_tie_breaks(tie_break: str, expected: int) -> None:
    cands = [
        ok(0, "x", order=2, latency=3.0, usage=Usage(input_tokens=1, output_tokens=1, cost=0.1)),
        ok(1, "y", order=0, latency=2.0, usage=Usage(input_tokens=1, output_tokens=1, cost=0.3)),
        ok(2, "z", order=1, latency=1.0, usage=Usage(input_tokens=1, output_tokens=1, cost=0.2)),
    ]
    sel = await Select(MajorityVote(), tie_break=tie_break).select(Q, cands)  # type: ignore[arg-type]
    assert sel.chosen == expected
    assert sel.explanation.endswith(f"tie among 3 broken by {tie_break}")


async def test_cheapest_falls_back_to_tokens_and_custom_tie_break() -> None:
    cands = [
        ok(0, "x", usage=Usage(input_tokens=5, output_tokens=5)),
        ok(1, "y", usage=Usage(input_tokens=2, output_tokens=2)),
    ]
    assert (await Select(MajorityVote(), tie_break="cheapest").select(Q, cands)).chosen == 1

    def longest(c: object) -> int:
        return -len(c.text)  # type: ignore[attr-defined]

    sel = await Select(MajorityVote(), tie_break=longest).select(Q, texts("a", "abc", "ab"))
    assert sel.chosen == 1 and sel.explanation.endswith("broken by longest")


async def test_filters_reject_and_scorers_see_only_what_passes() -> None:
    seen: list[list[int]] = []

    class Spy:
        name = "spy"

        def score(self, request: ChatRequest, candidates: list[object]) -> dict[int, Score]:
            seen.append([c.index for c in candidates if c.ok])  # type: ignore[attr-defined]
            return {c.index: Score(0.5) for c in candidates if c.ok}  # type: ignore[attr-defined]

    cands = [ok(0, "I'm sorry, but I can't help with that."), ok(1, "12"), failed(2), ok(3, "13")]
    sel = await Select(Spy(), filters=[RefusalDetector()]).select(Q, cands)
    assert seen == [[1, 3]]
    assert sel.rejected == {0: "refusal: refuses"}
    assert sel.reasons[0] == "refusal: refuses"
    assert sel.chosen == 1
    assert "1 rejected by filters" in sel.explanation


async def test_filters_only_means_first_valid_answer() -> None:
    schema = {"type": "object", "required": ["n"]}
    cands = [ok(0, "no", order=0), ok(1, '{"n": 1}', order=2), ok(2, '{"n": 2}', order=1)]
    sel = await Select(filters=[SchemaValid(schema)]).select(Q, cands)
    assert sel.chosen == 2
    assert sel.scores == {1: 1.0, 2: 1.0}
    assert sel.reasons[2] == "passes every filter"
    assert sel.rejected[0].startswith("schema:")


async def test_when_nothing_passes_the_filters() -> None:
    cands = texts("I cannot help with that.", "As an AI, no.")
    none = await Select(MajorityVote(), filters=[RefusalDetector()]).select(Q, cands)
    assert none.chosen is None and none.confidence == 0.0
    assert none.explanation == "no candidate passed the filters (2 answered)"
    best = await Select(MajorityVote(), filters=[RefusalDetector()], if_none_pass="best").select(
        Q, cands
    )
    assert best.chosen == 0 and best.confidence == 0.0
    assert "filters ignored" in best.explanation
    assert "failed filter refusal" in best.reasons[0]


async def test_no_successful_candidate() -> None:
    sel = await Select(Consensus()).select(Q, [failed(0), cancelled(1)])
    assert sel == Selection(
        chosen=None, confidence=0.0, explanation="no candidate succeeded", method="consensus"
    )


async def test_a_judge_returning_garbage_still_yields_a_pick() -> None:
    judge = LLMJudge(FakeBackend("judge", ["lol", "Rating: ten"]))
    sel = await Select(judge, tie_break="index").select(Q, [failed(0), ok(1, "a"), ok(2, "b")])
    assert sel.chosen == 1 and sel.confidence == 0.0
    assert sel.reasons[1] == "judge 0.00 (judge answer unreadable)"
    assert judge.statistics().unparsed == 2


async def test_a_scorer_that_skips_a_candidate_gives_it_zero() -> None:
    class Partial:
        name = "partial"

        async def score(self, request: ChatRequest, candidates: list[object]) -> dict[int, Score]:
            return {1: Score(0.7, "liked")}

    sel = await Select(Partial()).select(Q, texts("a", "b"))
    assert sel.scores == {0: 0.0, 1: 0.7}
    assert sel.reasons[0] == "partial 0.00 (not scored)"


async def test_a_scorer_with_a_bad_result_is_a_configuration_error() -> None:
    class Bad:
        name = "bad"

        def score(self, request: ChatRequest, candidates: list[object]) -> object:
            return {99: Score(1.0)}

    with pytest.raises(ConfigurationError, match="unknown candidate index 99"):
        await Select(Bad()).select(Q, texts("a"))  # type: ignore[arg-type]


def test_select_validates_its_options() -> None:
    vote = MajorityVote()
    with pytest.raises(ConfigurationError, match="weight"):
        Select(scorers=[(vote, 0.0)])
    with pytest.raises(ConfigurationError, match="weight"):
        Select(scorers=[(vote, float("inf"))])
    with pytest.raises(ConfigurationError, match="unique"):
        Select(scorers=[vote, MajorityVote()])
    with pytest.raises(ConfigurationError, match="tie_break"):
        Select(vote, tie_break="random")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="if_none_pass"):
        Select(vote, if_none_pass="all")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="Scorer or a function"):
        Select(scorers=[42])  # type: ignore[list-item]


# --- telemetry -------------------------------------------------------------------------------


async def test_scores_and_pick_are_span_attributes_events_and_log_events(
    spans: InMemorySpanExporter,
) -> None:
    with capture_events() as events:
        sel = await Select(MajorityVote()).select(Q, [ok(0, "a"), ok(1, "a"), failed(2)])
    (span,) = [s for s in spans.get_finished_spans() if s.name == "genfan.select"]
    attrs = dict(span.attributes or {})
    assert attrs["genfan.select.method"] == "vote"
    assert attrs["genfan.select.chosen"] == sel.chosen == 0
    assert attrs["genfan.select.chosen_backend"] == "b0"
    assert attrs["genfan.select.confidence"] == 1.0
    score_events = [e for e in span.events if e.name == "genfan.select.score"]
    assert [dict(e.attributes or {}).get("genfan.select.score") for e in score_events] == [
        1.0,
        1.0,
        None,
    ]
    assert dict(score_events[2].attributes or {})["genfan.candidate.status"] == "failed"
    (made,) = [e for e in events if e["event"] == "selection_made"]
    assert made["chosen"] == "b0" and made["scores"] == {"b0": 1.0, "b1": 1.0}


# --- factory ---------------------------------------------------------------------------------


def test_selector_from_name_builds_each_selector() -> None:
    assert SELECTOR_NAMES == ("auto", "first", "vote", "consensus", "judge", "schema")
    assert isinstance(selector_from_name("first"), FirstSuccess)
    vote = selector_from_name("vote", extract="number", tie_break="fastest")
    assert isinstance(vote, Select) and vote.name == "vote" and vote.tie_break == "fastest"
    assert isinstance(vote.scorers[0][0], MajorityVote)
    cons = selector_from_name("consensus", similarity="token_jaccard")
    assert isinstance(cons, Select) and isinstance(cons.scorers[0][0], Consensus)
    judge = selector_from_name("judge", judge=FakeBackend("j"), mode="pairwise")
    assert isinstance(judge, Select)
    j = judge.scorers[0][0]
    assert isinstance(j, LLMJudge) and j.mode == "pairwise"
    schema = selector_from_name("schema", schema={"type": "object"})
    assert isinstance(schema, Select) and isinstance(schema.filters[0], SchemaValid)


def test_selector_from_name_resolves_a_judge_spec_through_the_registry() -> None:
    register_backend("selftestjudge", lambda model=None, **kw: FakeBackend(f"judge:{model}"))
    sel = selector_from_name("judge", judge="selftestjudge:tiny")
    assert isinstance(sel, Select)
    j = sel.scorers[0][0]
    assert isinstance(j, LLMJudge) and j.judge.name == "judge:tiny"


def test_selector_from_name_errors() -> None:
    with pytest.raises(
        ConfigurationError, match="unknown selector 'best'; available: auto, first, vote"
    ):
        selector_from_name("best")
    with pytest.raises(ConfigurationError, match="bad options for selector 'vote'"):
        selector_from_name("vote", colour="red")
    with pytest.raises(ConfigurationError, match="needs judge="):
        selector_from_name("judge")
    with pytest.raises(ConfigurationError, match="bad options for selector 'first'"):
        selector_from_name("first", extract="number")


def test_selection_names_have_one_home() -> None:
    # Scorers and selectors live in genfan.select; strategies that run fan-outs in genfan.
    for name in ("Select", "MajorityVote", "Consensus", "LLMJudge", "SchemaValid"):
        assert name in genfan.select.__all__
        assert name not in genfan.__all__
        assert getattr(genfan.select, name).__module__ == "genfan.select"
    assert "Cascade" in genfan.__all__ and "Cascade" not in genfan.select.__all__
    assert genfan.select.selector_from_name is selector_from_name
