"""Modes beyond picking: early exit on agreement, Cascade (FrugalGPT), Synthesis (MoA)."""

from __future__ import annotations

import pytest
from trio.testing import MockClock

from genfan import (
    AGGREGATE_PROMPT,
    AllBackendsFailedError,
    BackendConnectionError,
    Cascade,
    ChatRequest,
    ConfigurationError,
    FanOut,
    Message,
    Synthesis,
    Target,
    Tier,
    Usage,
    aggregate_request,
)
from genfan.select import MajorityVote
from genfan.testing import Fail, FakeBackend, Reply

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    # Latencies are slept on trio's mock clock: exact ordering, no real waiting.
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


Q = ChatRequest.from_prompt("What is 5 + 7?")


def sampler(name: str, text: str, latency: float, tokens: int = 2) -> FakeBackend:
    usage = Usage(input_tokens=10, output_tokens=tokens)
    return FakeBackend(name, [Reply(text=text, latency=latency, usage=usage)])


# --- early exit ------------------------------------------------------------------------------


async def test_fanout_stops_as_soon_as_k_answers_agree_and_cancels_the_rest() -> None:
    vote = MajorityVote(extract="number")
    backends = [
        sampler("a", "5 + 7 = 12", 1),
        sampler("b", "13", 2),
        sampler("c", "It is 12.", 3),
        sampler("d", "12", 4),
        sampler("e", "12", 50),
        sampler("f", "11", 60),
    ]
    async with FanOut(backends, **vote.early_exit(3)) as fan:
        result = await fan.run(Q)
    assert result.quorum_met
    assert [c.status for c in result.candidates] == [
        "ok",
        "ok",
        "ok",
        "ok",
        "cancelled",
        "cancelled",
    ]
    assert [b.cancelled for b in backends] == [0, 0, 0, 0, 1, 1]
    assert result.text == "5 + 7 = 12"
    assert result.selection.confidence == pytest.approx(3 / 4)
    assert result.selection.method == "vote"


async def test_echoes_of_the_question_do_not_count_towards_agreement() -> None:
    vote = MajorityVote(extract="number")
    backends = [
        sampler("a", "5 + 7", 1),  # echo: no vote
        sampler("b", "5 and 7", 2),  # echo: no vote
        sampler("c", "12", 3),
        sampler("d", "the sum is 12", 4),
        sampler("e", "12", 50),
    ]
    fan = FanOut(backends, **vote.early_exit(2))
    result = await fan.run(Q)
    assert [c.status for c in result.candidates] == ["ok", "ok", "ok", "ok", "cancelled"]
    assert result.chosen is not None and result.chosen.backend == "c"
    assert backends[4].cancelled == 1


async def test_without_agreement_every_call_finishes() -> None:
    vote = MajorityVote(extract="number")
    backends = [sampler("a", "1", 1), sampler("b", "2", 2), sampler("c", "3", 3)]
    result = await FanOut(backends, **vote.early_exit(2)).run(Q)
    assert not result.quorum_met
    assert all(c.ok for c in result.candidates)
    assert result.selection.confidence == pytest.approx(1 / 3)


def test_early_exit_validates_k() -> None:
    with pytest.raises(ConfigurationError, match="k must be >= 1"):
        MajorityVote().early_exit(0)


def test_agreement_key_binds_to_the_request() -> None:
    from genfan import Completion

    key = MajorityVote(extract="number").agreement_key
    assert key(Completion(text="5 + 7")) == "7"  # unbound: nothing to call an echo
    assert key.for_request(Q)(Completion(text="5 + 7")) is None
    assert key.for_request(Q)(Completion(text="5 + 7 = 12")) == "12"


# --- cascade ---------------------------------------------------------------------------------


def _tiers(
    cheap_answers: list[str], dear_answer: str = "12", dear_fails: bool = False
) -> tuple[list[FakeBackend], FakeBackend, list[Tier]]:
    cheap = [sampler(f"small{i}", t, 1 + i) for i, t in enumerate(cheap_answers)]
    dear = (
        FakeBackend("large", [Fail(error=BackendConnectionError)])
        if dear_fails
        else sampler("large", dear_answer, 5, tokens=4)
    )
    tiers = [
        Tier(backends=cheap, name="small", cost_per_token=1.0),
        Tier(backends=[dear], name="large", cost_per_token=10.0),
    ]
    return cheap, dear, tiers


async def test_cascade_stops_at_the_cheap_tier_when_confident_and_reports_the_saving() -> None:
    _, dear, tiers = _tiers(["12", "12", "twelve: 12"])
    vote = MajorityVote(extract="number")
    result = await Cascade(tiers, selector=vote.selector(), threshold=0.6).run(Q)
    assert result.text == "12"
    assert result.tiers_used == ["small"]
    assert result.accepted and result.escalations == 0
    assert len(dear.calls) == 0
    assert result.cost == 3 * 12  # three calls of 12 tokens at 1 per token
    # skipped tier estimated: 12 tokens per call x 1 call x 10 per token
    assert result.cost_all_tiers == 36 + 120
    assert result.saved == 120
    assert result.saved_fraction == pytest.approx(120 / 156)
    assert [t.ran for t in result.tiers] == [True, False]


async def test_cascade_escalates_when_unsure_and_takes_the_last_tier_anyway() -> None:
    cheap, dear, tiers = _tiers(["11", "12", "13"], dear_answer="maybe 14")
    result = await Cascade(tiers, selector=MajorityVote(extract="number").selector()).run(Q)
    assert [len(b.calls) for b in cheap] == [1, 1, 1] and len(dear.calls) == 1
    assert result.tiers_used == ["small", "large"]
    assert result.escalations == 1
    assert result.text == "maybe 14"
    assert result.tiers[0].confidence == pytest.approx(1 / 3) and not result.tiers[0].accepted
    assert result.tiers[1].accepted  # one answer: full agreement
    assert result.cost == 36 + 140 and result.saved == 0


async def test_cascade_threshold_equal_to_confidence_stops() -> None:
    _, dear, tiers = _tiers(["12", "12", "13"])
    result = await Cascade(
        tiers, selector=MajorityVote(extract="number").selector(), threshold=2 / 3
    ).run(Q)
    assert result.tiers_used == ["small"] and len(dear.calls) == 0


async def test_cascade_carry_lets_votes_accumulate_across_tiers() -> None:
    cheap, _, _ = _tiers(["12", "13", "12"])
    more = [sampler(f"more{i}", t, 2) for i, t in enumerate(["13", "13", "13"])]
    cascade = Cascade(
        [cheap, more], selector=MajorityVote(extract="number").selector(), threshold=0.9, carry=True
    )
    result = await cascade.run(Q)
    assert result.tiers_used == ["tier1", "tier2"]
    assert len(result.candidates) == 6
    assert [c.backend for c in result.candidates][:2] == ["tier1/small0", "tier1/small1"]
    assert result.text == "13"  # 4 of 6 over both tiers
    assert result.confidence == pytest.approx(4 / 6)


async def test_cascade_escalates_past_a_failed_tier_and_falls_back_when_the_last_fails() -> None:
    failing = FakeBackend("down", [Fail(error=BackendConnectionError)])
    good = sampler("ok", "12", 1)
    result = await Cascade([failing, good], selector=MajorityVote().selector()).run(Q)
    assert result.tiers_used == ["tier1", "tier2"]
    assert result.tiers[0].error is not None and result.text == "12"

    _, _, tiers = _tiers(["11", "12", "13"], dear_fails=True)
    result = await Cascade(tiers, selector=MajorityVote(extract="number").selector()).run(Q)
    assert result.tiers_used == ["small", "large"]
    assert result.text == "11"  # the cheap tier's (unsure) pick, since the last tier failed
    assert not result.accepted


async def test_cascade_raises_when_every_tier_fails() -> None:
    down = [FakeBackend(f"down{i}", [Fail(error=BackendConnectionError)]) for i in range(2)]
    with pytest.raises(AllBackendsFailedError) as info:
        await Cascade(down, selector=MajorityVote().selector()).run(Q)
    assert all(isinstance(e, BackendConnectionError) for e in info.value.exceptions)


async def test_cascade_uses_reported_cost_and_expected_cost() -> None:
    cheap = FakeBackend("s", [Reply(text="12", usage=Usage(input_tokens=5, cost=0.001))])
    tiers = [Tier(backends=cheap), Tier(backends=FakeBackend("l"), expected_cost=0.05)]
    result = await Cascade(tiers, selector=MajorityVote().selector(), threshold=0.5).run(Q)
    assert result.cost == pytest.approx(0.001)
    assert result.saved == pytest.approx(0.05)


async def test_cascade_leaves_the_backends_it_was_given_open() -> None:
    # Whoever creates a backend owns it: the cascade closes only the fan-outs it built.
    shared = FakeBackend("shared")
    async with Cascade([shared, [shared, FakeBackend("x")]], selector=MajorityVote().selector()):
        pass
    assert not shared.closed


def test_cascade_validation() -> None:
    vote = MajorityVote().selector()
    with pytest.raises(ConfigurationError, match="at least one tier"):
        Cascade([], selector=vote)
    with pytest.raises(ConfigurationError, match="needs 2 values"):
        Cascade([FakeBackend(), FakeBackend(), FakeBackend()], selector=vote, threshold=[0.5])
    with pytest.raises(ConfigurationError, match=r"threshold must be in \[0, 1\]"):
        Cascade([FakeBackend(), FakeBackend()], selector=vote, threshold=1.5)
    with pytest.raises(ConfigurationError, match="cost_per_token"):
        Tier(backends=FakeBackend(), cost_per_token=-1)
    with pytest.raises(ConfigurationError, match="unique"):
        Cascade(
            [Tier(backends=FakeBackend(), name="x"), Tier(backends=FakeBackend(), name="x")],
            selector=vote,
        )


# --- synthesis -------------------------------------------------------------------------------


def test_aggregate_request_shape() -> None:
    req = ChatRequest.from_prompt("Name a prime.", system="Be brief.", temperature=0.3)
    agg = aggregate_request(req, ["2", "3 is prime"])
    assert agg.messages == (
        Message.system(f"Be brief.\n\n{AGGREGATE_PROMPT}\n1. 2\n2. 3 is prime"),
        Message.user("Name a prime."),
    )
    assert agg.temperature == 0.3
    plain = aggregate_request(ChatRequest.from_prompt("Hi"), ["a"], prompt="Merge:")
    assert plain.messages == (Message.system("Merge:\n1. a"), Message.user("Hi"))
    assert AGGREGATE_PROMPT.startswith(
        "You have been provided with a set of responses from various models"
    )
    assert AGGREGATE_PROMPT.endswith("Responses from models:")


async def test_synthesis_runs_proposer_layers_then_the_aggregator() -> None:
    p1 = FakeBackend("p1", [Reply(text="two", latency=2), Reply(text="two, refined", latency=2)])
    p2 = FakeBackend("p2", [Reply(text="three", latency=1), Fail(error=BackendConnectionError)])
    p3 = FakeBackend("p3", [Reply(text="", latency=1), Reply(text="", latency=1)])
    agg = FakeBackend("agg", ["2 and 3"])
    async with Synthesis([p1, p2, p3], aggregator=agg, layers=2) as moa:
        result = await moa.run("Name a prime.")
    assert result.text == "2 and 3"
    assert len(result.layers) == 2
    # layer 2 proposers saw layer 1's non-empty answers, in finishing order
    layer2 = p1.calls[1]
    assert layer2.messages == (
        Message.system(f"{AGGREGATE_PROMPT}\n1. three\n2. two"),
        Message.user("Name a prime."),
    )
    # the aggregator saw layer 2's surviving answer only
    (sent,) = agg.calls
    assert sent.messages == (
        Message.system(f"{AGGREGATE_PROMPT}\n1. two, refined"),
        Message.user("Name a prime."),
    )
    assert result.aggregate_request == sent
    assert result.usage.total_tokens > 0
    assert not (agg.closed or p1.closed)  # the caller made them, the caller closes them


async def test_synthesize_over_given_candidates_with_max_references() -> None:
    agg = FakeBackend("agg", ["merged"])
    fan = FanOut([sampler("a", "A", 3), sampler("b", "B", 1), sampler("c", "C", 2)])
    moa = Synthesis(fan, aggregator=agg, max_references=2)
    result = await fan.run("q")
    completion = await moa.synthesize(result.request, result.candidates)
    assert completion.text == "merged"
    assert agg.calls[0].messages[0].content == f"{AGGREGATE_PROMPT}\n1. B\n2. C"


def test_synthesis_validation() -> None:
    with pytest.raises(ConfigurationError, match="layers"):
        Synthesis([FakeBackend()], aggregator=FakeBackend(), layers=0)
    with pytest.raises(ConfigurationError, match="max_references"):
        Synthesis([FakeBackend()], aggregator=FakeBackend(), max_references=0)


async def test_targets_of_one_backend_work_as_samplers() -> None:
    engine = FakeBackend("engine", ["12", "12", "13"])
    targets = [Target(backend=engine, temperature=0.7) for _ in range(3)]
    vote = MajorityVote(extract="number")
    result = await FanOut(targets, select=vote.selector()).run(Q)
    assert result.text == "12"
    assert {c.backend for c in result.candidates} == {"engine", "engine#2", "engine#3"}
    assert all(r.temperature == 0.7 for r in engine.calls)
