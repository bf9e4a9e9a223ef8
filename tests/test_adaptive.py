"""Adaptive sampling: the stopping rule, waves in FanOut, n-sample waves (Sampling), Cascade."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from genfan import (
    AllBackendsFailedError,
    BackendConnectionError,
    BaseBackend,
    Cascade,
    ChatRequest,
    Completion,
    ConfigurationError,
    FanOut,
    MultiSampleBackend,
    Sampling,
    Target,
    Tier,
    Usage,
)
from genfan.select import (
    AdaptiveConsistency,
    AutoSelect,
    CannotLose,
    Majority,
    MajorityVote,
    StoppingRule,
    Waves,
    beta_leader_probability,
    regularized_beta,
)
from genfan.testing import FakeBackend

pytestmark = pytest.mark.anyio

Q = ChatRequest.from_prompt("What is 6 * 7?")


# -- the stopping rule ----------------------------------------------------------------------


def _binomial_tail(a: int, b: int) -> float:
    """P(X > 0.5) for X ~ Beta(a, b), integer a, b: P(Binomial(a + b - 1, 1/2) < a)."""
    n = a + b - 1
    return sum(math.comb(n, k) for k in range(a)) / 2**n


@pytest.mark.parametrize(("a", "b"), [(1, 1), (2, 1), (4, 1), (5, 2), (7, 3), (3, 6), (20, 15)])
def test_the_beta_criterion_matches_its_closed_form(a: int, b: int) -> None:
    assert 1 - regularized_beta(0.5, a, b) == pytest.approx(_binomial_tail(a, b), abs=1e-9)
    assert beta_leader_probability(a - 1, b - 1) == pytest.approx(_binomial_tail(a, b), abs=1e-9)


def test_regularized_beta_edges() -> None:
    assert regularized_beta(0.0, 2, 3) == 0.0
    assert regularized_beta(1.0, 2, 3) == 1.0
    assert regularized_beta(0.3, 1, 1) == pytest.approx(0.3)  # uniform
    assert regularized_beta(0.5, 2.5, 2.5) == pytest.approx(0.5)  # symmetric, non-integer
    with pytest.raises(ValueError):
        regularized_beta(0.5, 0, 1)


def test_adaptive_consistency_stops_when_the_leader_is_settled() -> None:
    rule = AdaptiveConsistency(0.95)
    assert isinstance(rule, StoppingRule)
    assert not rule.settled([3.0], remaining=6)  # 3 of 3: P = 0.9375 < 0.95
    assert rule.settled([4.0], remaining=5)  # 4 of 4: P = 0.969
    assert not rule.settled([4.0, 1.0], remaining=4)  # P = 0.89
    assert rule.settled([5.0, 1.0], remaining=3)  # cannot lose: lead 4 > 3 left
    assert AdaptiveConsistency(0.9).settled([3.0], remaining=6)
    assert not rule.settled([], remaining=3)
    assert not AdaptiveConsistency(0.5).settled([1.0], remaining=5)  # fewer than min_votes
    with pytest.raises(ConfigurationError):
        AdaptiveConsistency(threshold=1.0)


def test_cannot_lose() -> None:
    assert CannotLose().settled([5, 1], remaining=3)
    assert not CannotLose().settled([5, 2], remaining=3)
    assert CannotLose().settled([], remaining=0)


def test_wave_plans() -> None:
    assert Waves(size=3).plan(9) == [3, 3, 3]
    assert Waves(size=3).plan(7) == [3, 3, 1]
    assert Waves(first=4, size=2).plan(9) == [4, 2, 2, 1]
    assert Waves(size=5).plan(2) == [2]
    with pytest.raises(ConfigurationError):
        Waves(size=0)


# -- waves in a fan-out -----------------------------------------------------------------------


def counting(name: str, replies: Sequence[str]) -> FakeBackend:
    return FakeBackend(name, list(replies))


async def test_a_fan_out_stops_after_the_first_wave_when_it_agrees() -> None:
    backends = [counting(f"m{i}", ["The answer is 42."]) for i in range(9)]
    fan = FanOut(backends, waves=Waves(size=3, stop=AdaptiveConsistency(0.9)))
    result = await fan.run(Q)
    assert [c.status for c in result.candidates] == ["ok"] * 3 + ["cancelled"] * 6
    assert sum(len(b.calls) for b in backends) == 3  # the later waves were never called
    assert "42" in result.text
    assert isinstance(fan.selector, AutoSelect)  # waves without select= use auto


async def test_a_fan_out_keeps_drawing_while_the_answers_disagree() -> None:
    answers = ["41", "42", "43", "42", "44", "42", "45", "42", "46"]
    backends = [counting(f"m{i}", [a]) for i, a in enumerate(answers)]
    result = await FanOut(backends, waves=3).run(Q)
    assert all(c.ok for c in result.candidates)
    assert result.text == "42"


async def test_waves_settle_on_weighted_counts_with_a_custom_counter() -> None:
    backends = [counting(f"m{i}", ["x"]) for i in range(6)]
    vote = MajorityVote()

    class Counter:
        def vote_counts(self, request: ChatRequest, candidates: Sequence[object]) -> list[float]:
            return [float(len(vote.groups(request, candidates)["x"]))]  # type: ignore[arg-type]

    waves = Waves(size=2, stop=AdaptiveConsistency(0.8), counter=Counter())
    result = await FanOut(backends, waves=waves, select=vote.selector()).run(Q)
    assert sum(c.ok for c in result.candidates) == 2  # 2 of 2: P = 0.875 >= 0.8


# -- Sampling: a wave is one request with n samples ----------------------------------------


class MultiSample(BaseBackend):
    """A backend that draws n samples per request, scripted per call."""

    def __init__(self, script: Sequence[Sequence[str]]) -> None:
        super().__init__("multi")
        self.script = list(script)
        self.sample_calls: list[tuple[ChatRequest, int]] = []
        self.complete_calls = 0

    async def complete(self, request: ChatRequest) -> Completion:
        self.complete_calls += 1
        return Completion(text="single", usage=Usage(input_tokens=10, output_tokens=1))

    async def sample(self, request: ChatRequest, n: int) -> list[Completion]:
        texts = self.script[len(self.sample_calls)]
        self.sample_calls.append((request, n))
        assert len(texts) == n
        return [
            Completion(text=t, usage=Usage(input_tokens=10 if k == 0 else 0, output_tokens=2))
            for k, t in enumerate(texts)
        ]


async def test_sampling_draws_each_wave_as_one_request() -> None:
    model = MultiSample([["42", "41", "42"], ["42", "42", "42"], ["never"] * 3])
    assert isinstance(model, MultiSampleBackend)
    sampler = Sampling(model, 9, waves=Waves(size=3), temperature=0.7)
    result = await sampler.run(Q)
    assert [n for _, n in model.sample_calls] == [3, 3]  # settled after two waves
    assert model.complete_calls == 0
    request = model.sample_calls[0][0]
    assert request.temperature == 0.7 and request.logprobs  # logprobs asked for by default
    assert result.text == "42"
    assert [c.status for c in result.candidates] == ["ok"] * 6 + ["cancelled"] * 3
    assert result.usage.input_tokens == 20 and result.usage.output_tokens == 12
    assert result.selection.method == "auto:number"


async def test_sampling_by_default_draws_2_at_a_time_until_a_majority_agrees() -> None:
    agreed = MultiSample([["42", "42"], ["never"] * 2])
    result = await Sampling(agreed, 9).run(Q)
    assert [n for _, n in agreed.sample_calls] == [2]  # 2 of 2 agree: settled
    assert result.text == "42"
    split = MultiSample([["41", "42"], ["42", "43"], ["never"] * 2])
    result = await Sampling(split, 9).run(Q)
    assert [n for _, n in split.sample_calls] == [2, 2]  # 2 of 4 say 42: half, settled
    assert result.text == "42"
    assert len(result.successes) == 4
    scattered = MultiSample([["41", "42"], ["43", "44"], ["45", "42"], ["46", "47"], ["48"]])
    result = await Sampling(scattered, 9).run(Q)
    # never a majority (2 of 6, 2 of 8): every sample of the budget is drawn; the last wave
    # holds 1, a plain call
    assert [n for _, n in scattered.sample_calls] == [2, 2, 2, 2]
    assert scattered.complete_calls == 1
    assert result.text == "42"
    assert len(result.successes) == 9


async def test_sampling_all_at_once_is_one_request() -> None:
    model = MultiSample([["1", "2", "3", "4"]])
    result = await Sampling(model, 4, waves=None).run("How many legs does a cat have?")
    assert [n for _, n in model.sample_calls] == [4]
    assert len(result.successes) == 4


async def test_sampling_falls_back_to_separate_calls() -> None:
    model = FakeBackend("plain", ["42"])
    assert not isinstance(model, MultiSampleBackend)
    result = await Sampling(model, 6, waves=Waves(size=3, stop=AdaptiveConsistency(0.9))).run(Q)
    assert len(model.calls) == 3
    assert all(r.logprobs for r in model.calls)
    assert result.text == "42"


async def test_a_failed_wave_fails_its_samples() -> None:
    class Broken(MultiSample):
        async def sample(self, request: ChatRequest, n: int) -> list[Completion]:
            raise BackendConnectionError("down", backend="multi")

    with pytest.raises(AllBackendsFailedError):
        await Sampling(Broken([]), 4, waves=2).run(Q)


async def test_sampling_rejects_no_samples() -> None:
    with pytest.raises(ConfigurationError):
        Sampling(FakeBackend("x"), 0)


# -- adaptive sampling across the tiers of a cascade ----------------------------------------


def tier_of(texts: Sequence[str], name: str) -> list[Target]:
    return [
        Target(
            backend=FakeBackend(f"{name}{i}", [t], model="m"),
            name=f"{name}{i}",
        )
        for i, t in enumerate(texts)
    ]


async def test_a_cascade_stops_when_the_stopping_rule_is_settled() -> None:
    first = tier_of(["42", "42", "42"], "a")
    second = tier_of(["41", "41", "41"], "b")
    cascade = Cascade(
        [Tier(backends=first), Tier(backends=second)],
        carry=True,
        stop=AdaptiveConsistency(0.9),
    )
    result = await cascade.run(Q)
    assert result.tiers_used == ["tier1"]
    assert result.text == "42"
    assert isinstance(cascade.selector, AutoSelect)  # the default selector


async def test_a_cascade_escalates_while_unsettled_and_votes_over_all_tiers() -> None:
    first = tier_of(["42", "41", "43"], "a")
    second = tier_of(["41", "41", "44"], "b")
    cascade = Cascade(
        [Tier(backends=first), Tier(backends=second)],
        carry=True,
        stop=Waves(stop=AdaptiveConsistency(0.95)),
    )
    result = await cascade.run(Q)
    assert result.tiers_used == ["tier1", "tier2"]
    assert result.text == "41"  # 3 of 6 across both tiers


async def test_selector_names_are_accepted_where_selectors_are() -> None:
    backends = [
        FakeBackend("a", ["Paris."]),
        FakeBackend("b", ["Lyon"]),
        FakeBackend("c", ["Paris"]),
    ]
    result = await FanOut(backends, select="auto").run("What is the capital of France?")
    assert result.text.startswith("Paris")
    with pytest.raises(ConfigurationError):
        FanOut(backends, select="nonsense")


async def test_waves_can_also_stop_on_calibrated_confidence() -> None:
    from genfan.select import Calibration

    sure = AutoSelect(calibration=Calibration(weights={"share": 10.0}, intercept=-5.0))
    backends = [counting(f"m{i}", ["42", "41", "42"][i % 3 : i % 3 + 1]) for i in range(9)]
    never = AdaptiveConsistency(0.99)
    # 2 of 3 say 42: the Beta criterion is not settled, but P(right) = sigmoid(10 * 2/3 - 5)
    waves = Waves(size=3, stop=never, counter=sure, confident=0.8)
    result = await FanOut(backends, waves=waves, select=sure).run(Q)
    assert len(result.successes) == 3 and result.text == "42"
    assert sure.confidence(Q, result.candidates) == pytest.approx(1 / (1 + math.exp(-5 / 3)))
    plain = await FanOut(backends, waves=Waves(size=3, stop=never, counter=sure)).run(Q)
    assert len(plain.successes) == 9
    with pytest.raises(ConfigurationError):
        Waves(confident=0.0)


def test_majority_stops_once_the_leader_holds_half_the_votes() -> None:
    rule = Majority()
    assert isinstance(rule, StoppingRule)
    assert rule.settled([2, 1], remaining=6)  # two of three agree
    assert not rule.settled([1, 1, 1], remaining=6)  # all differ: keep drawing
    assert not rule.settled([1], remaining=8)  # one vote is not a majority of anything
    assert not rule.settled([2, 1, 1, 1], remaining=4)  # 2 of 5: under half
    assert Majority(votes=3).settled([3, 2], remaining=4)
    assert not Majority(votes=3).settled([2, 1], remaining=6)
    assert Majority().settled([4, 0], remaining=3)  # cannot be caught
    with pytest.raises(ConfigurationError):
        Majority(votes=0)
    with pytest.raises(ConfigurationError):
        Majority(share=1.5)


async def test_a_fan_out_stops_on_a_majority_of_the_first_wave() -> None:
    answers = ["42", "41", "42", "43", "44", "45", "46", "47", "48"]
    backends = [counting(f"m{i}", [a]) for i, a in enumerate(answers)]
    waves = Waves(first=3, size=6, stop=Majority(), counter=AutoSelect(weight="none"))
    result = await FanOut(backends, waves=waves).run(Q)
    assert [c.status for c in result.candidates] == ["ok"] * 3 + ["cancelled"] * 6
    assert result.text == "42"
    split = ["41", "42", "43", "42", "42", "44", "45", "46", "47"]
    backends = [counting(f"m{i}", [a]) for i, a in enumerate(split)]
    result = await FanOut(backends, waves=waves).run(Q)
    assert all(c.ok for c in result.candidates)  # 1-1-1: the second wave was drawn
    assert result.text == "42"
