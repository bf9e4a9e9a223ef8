"""The ``auto`` selector: answer-form inference, answer extraction, confidence-weighted voting."""

from __future__ import annotations

import math

import pytest

from genfan import (
    ChatRequest,
    Completion,
    ConfigurationError,
    FanOut,
    ResponseFormat,
    Target,
    TokenLogprob,
    Usage,
)
from genfan.select import (
    AnswerForm,
    AutoSelect,
    Calibration,
    Candidate,
    FirstSuccess,
    Select,
    extract_answer,
    infer_form,
    parse_options,
    selector_from_name,
)
from genfan.testing import FakeBackend, FunctionBackend

from ._select_helpers import cancelled, failed, ok

pytestmark = pytest.mark.anyio


def ask(prompt: str, **fields: object) -> ChatRequest:
    return ChatRequest.from_prompt(prompt, **fields)  # type: ignore[arg-type]


# -- form inference --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "kind"),
    [
        ("What is 17 * 3?", "number"),
        ("Calculate 45 minus 18.", "number"),
        ("How many legs does a spider have?", "number"),
        ("What is the next number in the sequence 2, 4, 6, 8?", "number"),
        ("If a train travels 60 miles in 2 hours, what is its speed?", "number"),
        ("What is the capital of Peru?", "short"),
        ("Who wrote 'Romeo and Juliet'?", "short"),
        ("Which animal says 'moo'?\nAnswer in one or two words.", "short"),
        ("Which of these is a fruit?\nA) car\nB) apple\nC) chair\nD) shoe", "choice"),
        ("Which planet is closest to the sun? (A) Venus (B) Mercury (C) Mars", "choice"),
        ("Is the earth flat?", "choice"),
        ("Return the user's name and age as JSON.", "json"),
        ("Explain the CAP theorem in two sentences.", "text"),
        ("Write a haiku about autumn.", "text"),
        ("Tell me a joke.", "text"),
    ],
)
def test_the_answer_form_is_inferred_from_the_request(prompt: str, kind: str) -> None:
    form = infer_form(ask(prompt))
    assert form.kind == kind
    assert form.why  # explanations say why
    assert form.comparable == (kind != "text")


def test_a_json_response_format_means_json_whatever_the_wording() -> None:
    request = ask(
        "How many legs does a spider have?", response_format=ResponseFormat(type="json_object")
    )
    assert infer_form(request).kind == "json"
    assert "response_format" in infer_form(request).why


def test_options_are_parsed_only_when_they_are_lettered_in_order() -> None:
    assert parse_options("Pick one:\nA) red\nB) blue\nC) green") == (
        ("A", "red"),
        ("B", "blue"),
        ("C", "green"),
    )
    assert parse_options("(A) Venus (B) Mercury") == (("A", "Venus"), ("B", "Mercury"))
    assert parse_options("A) only one") == ()
    assert parse_options("B) blue\nC) green") == ()  # not from A


# -- extraction --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "reply", "key"),
    [
        ("What is 22 + 14?", "22 + 14 = 36.", "36"),
        ("What is 22 + 14?", "22 + 14", None),  # an echo of the question is not a vote
        ("What is 22 + 14?", "The answer is 36. Then 36 + 10 is 46.", "36"),
        ("How many legs does a spider have?", "A spider has eight legs.", "8"),
        ("How many legs does a spider have?", "Spiders have 8 legs, not 1 or 2.", "2"),
        ("How many cents are in a dollar?", "There are 1,000 cents", "1000"),
        ("What is the capital of France?", "The capital of France is Paris.", "paris"),
        ("What is the capital of Malaysia?", "Kuala Lumpur, a big city.", "kuala lumpur"),
        ("What is the capital of Colombia?", "It is Bogotá.", "bogota"),
        ("What is the opposite of 'hot'?", 'The opposite is "cold".', "cold"),
        ("When did the war end?", "The war ended in 1945.", "1945"),
        ("What is the capital of France?", "The capital of France.", None),
    ],
)
def test_answers_are_read_for_the_inferred_form(prompt: str, reply: str, key: str | None) -> None:
    request = ask(prompt)
    found = extract_answer(infer_form(request), reply, request)
    assert (found.key if found else None) == key
    if found is not None:
        assert found.key.replace(" ", "") in reply.casefold().replace(",", "").replace(" ", "") or (
            found.key in ("8", "bogota")
        )


@pytest.mark.parametrize(
    ("reply", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B) apple", "B"),
        ("The answer is B.", "B"),
        ("**Answer: C**", "C"),
        ("An apple is a fruit.", "B"),  # the one option it names
        ("A car and an apple.", None),  # two options named: no vote
        ("A banana is yellow.", None),  # "A" is an article, and banana is no option
    ],
)
def test_choice_letters_are_read_and_articles_are_not_letters(
    reply: str, letter: str | None
) -> None:
    request = ask("Which of these is a fruit?\nA) car\nB) apple\nC) chair\nD) shoe")
    found = extract_answer(infer_form(request), reply, request)
    assert (found.key if found else None) == letter


def test_yes_no_answers_are_votes() -> None:
    request = ask("Is the earth flat?")
    form = infer_form(request)
    assert extract_answer(form, "No, it is round.", request).key == "no"  # type: ignore[union-attr]
    assert extract_answer(form, "Yes.", request).key == "yes"  # type: ignore[union-attr]


def test_json_answers_vote_on_their_canonical_form() -> None:
    request = ask("Give the name and age as JSON.")
    form = infer_form(request)
    a = extract_answer(form, '{"name": "Ann", "age": 3}', request)
    b = extract_answer(form, 'Sure: ```json\n{"age":3,"name":"Ann"}\n```', request)
    assert a is not None and b is not None and a.key == b.key
    assert extract_answer(form, "no json here", request) is None


def test_free_text_has_nothing_to_extract() -> None:
    request = ask("Write a poem about the sea.")
    assert extract_answer(infer_form(request), "The sea is wide.", request) is None


# -- the selector --------------------------------------------------------------------------


def with_logprobs(index: int, text: str, probs: list[float], order: int | None = None) -> Candidate:
    """A candidate whose reply is one token per word, with these probabilities."""
    words = text.split(" ")
    assert len(words) == len(probs)
    tokens = tuple(
        TokenLogprob(token=w if i == 0 else " " + w, logprob=math.log(p))
        for i, (w, p) in enumerate(zip(words, probs, strict=True))
    )
    return Candidate(
        index=index,
        backend=f"b{index}",
        status="ok",
        completion=Completion(text=text, logprobs=tokens),
        finished_order=index if order is None else order,
    )


async def test_auto_votes_on_the_number_not_the_wording() -> None:
    request = ask("What is 22 + 14?")
    cands = [
        ok(0, "22 + 14"),  # echo: no vote
        ok(1, "The answer is 36."),
        ok(2, "36"),
        ok(3, "I think it is 35"),
        ok(4, "22 + 14 = 36, easy."),
        failed(5),
        cancelled(6),
    ]
    sel = await AutoSelect().select(request, cands)
    assert sel.chosen in (1, 2, 4)
    assert sel.method == "auto:number"
    assert "number answer inferred" in sel.explanation and "3 of 5 answers" in sel.explanation
    assert sel.scores[0] == 0.0 and sel.scores[3] < sel.scores[1]
    assert 5 not in sel.scores and 6 not in sel.scores
    assert sel.confidence is not None and 0.0 < sel.confidence < 1.0


async def test_plain_vote_is_fooled_by_wording_where_auto_is_not() -> None:
    request = ask("What is the capital of France?")
    cands = [
        ok(0, "Lyon."),
        ok(1, "The capital of France is Paris."),
        ok(2, "Paris."),
        ok(3, "Paris is the capital of France."),
    ]
    plain = await selector_from_name("vote").select(request, cands)
    auto = await AutoSelect().select(request, cands)
    assert cands[plain.chosen or 0].text == "Lyon."  # every wording is its own group: tie-break
    assert auto.chosen in (1, 2, 3)
    assert "3 of 4 answers say 'paris'" in auto.explanation


async def test_confidence_weighting_breaks_a_split_vote() -> None:
    request = ask("What is 6 * 7?")
    cands = [
        with_logprobs(0, "It is 41", [0.9, 0.9, 0.2]),
        with_logprobs(1, "It is 42", [0.9, 0.9, 0.95]),
    ]
    weighted = await AutoSelect().select(request, cands)
    unweighted = await AutoSelect(weight="none").select(request, cands)
    assert weighted.chosen == 1  # the answer token the model was sure of
    assert unweighted.chosen == 0  # a tie: the first to finish
    assert weighted.by_scorer["model_confidence"][1] == pytest.approx(0.95)
    assert "confidence-weighted" in weighted.explanation


async def test_low_confidence_samples_can_be_filtered_out() -> None:
    request = ask("What is 6 * 7?")
    cands = [
        with_logprobs(0, "41", [0.1]),
        with_logprobs(1, "41", [0.2]),
        with_logprobs(2, "42", [0.9]),
    ]
    sel = await AutoSelect(weight="none", keep=1 / 3).select(request, cands)
    assert sel.chosen == 2
    assert "least confident" in sel.reasons[0]
    assert "(the 1 most confident of 3)" in sel.explanation
    with pytest.raises(ConfigurationError):
        AutoSelect(keep=0)
    with pytest.raises(ConfigurationError):
        AutoSelect(weight="loud")  # type: ignore[arg-type]


async def test_free_text_falls_back_to_consensus() -> None:
    request = ask("Describe the sea in one sentence.")
    cands = [
        ok(0, "The sea is wide and blue and deep."),
        ok(1, "Bananas."),
        ok(2, "The sea is blue and very deep."),
    ]
    sel = await AutoSelect().select(request, cands)
    assert sel.method == "auto:text"
    assert sel.chosen in (0, 2)
    assert "consensus" in sel.explanation


async def test_nothing_readable_falls_back_to_consensus_with_low_confidence() -> None:
    request = ask("What is 22 + 14?")
    cands = [ok(0, "22 + 14"), ok(1, "Adding 22 and 14."), ok(2, "I cannot say.")]
    sel = await AutoSelect().select(request, cands)
    assert sel.chosen is not None
    assert "no reply holds one" in sel.explanation
    assert sel.confidence is not None and sel.confidence < 0.2


async def test_no_success_chooses_none() -> None:
    sel = await AutoSelect().select(ask("What is 2 + 3?"), [failed(0), cancelled(1)])
    assert sel.chosen is None and sel.confidence == 0.0


async def test_auto_is_a_scorer_too() -> None:
    request = ask("What is 22 + 14?")
    cands = [ok(0, "36"), ok(1, "36"), ok(2, "35"), ok(3, "hmm")]
    sel = await Select(AutoSelect()).select(request, cands)
    assert sel.chosen == 0
    assert sel.scores[3] == 0.0


async def test_calibration_maps_more_agreement_to_more_confidence() -> None:
    request = ask("What is 22 + 14?")
    split = await AutoSelect().select(request, [ok(0, "36"), ok(1, "35"), ok(2, "34")])
    agreed = await AutoSelect().select(request, [ok(0, "36"), ok(1, "36"), ok(2, "36")])
    assert split.confidence is not None and agreed.confidence is not None
    assert agreed.confidence > split.confidence
    custom = AutoSelect(calibration=Calibration(weights={"share": 0.0}, intercept=0.0))
    assert (await custom.select(request, [ok(0, "36")])).confidence == pytest.approx(0.5)


def test_evidence_is_what_calibration_reads() -> None:
    request = ask("What is 22 + 14?")
    ev = AutoSelect().evidence(request, [ok(0, "36"), ok(1, "36"), ok(2, "35"), ok(3, "x")])
    assert ev["share"] == pytest.approx(0.5)
    assert ev["margin"] == pytest.approx(0.25)
    assert ev["choice"] == 0.0 and ev["short"] == 0.0
    assert "answer_conf" not in ev  # no log-probabilities
    short = AutoSelect().evidence(ask("What is the capital of Peru?"), [ok(0, "Lima.")])
    assert short["short"] == 1.0 and short["choice"] == 0.0
    choice = AutoSelect().evidence(ask("Which is a fruit?\nA) car\nB) apple"), [ok(0, "B")])
    assert choice["choice"] == 1.0 and choice["short"] == 0.0


def _split(n: int, votes: int, runner_up: bool) -> list[Candidate]:
    """``n`` replies without log-probabilities: ``votes`` say 36, the rest a runner-up 35
    (``runner_up``) or each a different wrong number."""
    rest = [("35" if runner_up else str(100 + i)) for i in range(n - votes)]
    return [ok(i, t) for i, t in enumerate(["36"] * votes + rest)]


@pytest.mark.parametrize("runner_up", [False, True])
async def test_default_confidence_rises_with_the_vote_share_and_stays_a_probability(
    runner_up: bool,
) -> None:
    request = ask("What is 22 + 14?")
    auto = AutoSelect()
    for n in (1, 2, 3, 5, 7, 9, 15):
        # a strict majority, so that 36 stays the winner as its votes grow
        confidences = []
        for votes in range(n // 2 + 1, n + 1):
            cands = _split(n, votes, runner_up)
            sel = await auto.select(request, cands)
            assert sel.chosen is not None and cands[sel.chosen].text == "36"
            assert sel.confidence is not None and 0.0 <= sel.confidence <= 1.0
            confidences.append(sel.confidence)
        assert confidences == sorted(confidences), (n, confidences)
        assert len(set(confidences)) == len(confidences)  # strictly: each vote counts


async def test_default_confidence_rises_with_the_models_confidence_in_the_answer() -> None:
    request = ask("What is 6 * 7?")
    auto = AutoSelect()
    seen = []
    for p in (0.05, 0.3, 0.6, 0.9, 0.99):
        cands = [with_logprobs(i, "It is 42", [0.9, 0.9, p]) for i in range(3)]
        sel = await auto.select(request, cands)
        assert sel.confidence is not None and 0.0 <= sel.confidence <= 1.0
        seen.append(sel.confidence)
    assert seen == sorted(seen) and seen[0] < seen[-1]


def test_auto_by_name() -> None:
    assert isinstance(selector_from_name("auto"), AutoSelect)
    sel = selector_from_name("auto", weight="none", keep=0.5)
    assert isinstance(sel, AutoSelect) and sel.weight == "none" and sel.keep == 0.5
    with pytest.raises(ConfigurationError):
        selector_from_name("auto", extract="number")


async def test_auto_in_a_fan_out_end_to_end() -> None:
    samples = [
        FakeBackend("a", ["It is Paris."]),
        FakeBackend("b", ["Lyon"]),
        FakeBackend("c", ["Paris!"]),
    ]
    async with FanOut(samples, select="auto") as fan:
        result = await fan.run("What is the capital of France?")
    assert result.chosen is not None and "Paris" in result.text
    assert result.selection.method == "auto:short"


async def test_logprobs_reach_the_selector_through_a_fan_out() -> None:
    def answer(request: ChatRequest) -> Completion:
        assert request.logprobs
        text = "42" if request.temperature == 0.1 else "41"
        p = 0.9 if text == "42" else 0.3
        return Completion(
            text=text,
            usage=Usage(output_tokens=1),
            logprobs=(TokenLogprob(token=text, logprob=math.log(p)),),
        )

    model = FunctionBackend(answer, name="m")
    targets = [
        Target(backend=model, name="a", temperature=0.5, overrides={"logprobs": True}),
        Target(backend=model, name="b", temperature=0.1, overrides={"logprobs": True}),
    ]
    result = await FanOut(targets, select=AutoSelect()).run("What is 6 * 7?")
    assert result.text == "42"


def test_answer_form_is_a_value() -> None:
    assert AnswerForm("number", "x") == AnswerForm("number", "x")


# -- the default selector --------------------------------------------------------------------


async def test_a_fan_out_that_compares_answers_defaults_to_auto() -> None:
    # The first to answer is the odd one out: a first-success default would return it.
    backends = [
        FakeBackend("a", ["The answer is 41."]),
        FakeBackend("b", ["It is 42."]),
        FakeBackend("c", ["42"]),
    ]
    for fan in (FanOut(backends), FanOut(backends, mode="quorum", quorum=3)):
        result = await fan.run("What is 6 * 7?")
        assert isinstance(fan.selector, AutoSelect)
        assert result.selection.method == "auto:number"
        assert "42" in result.text
        assert "number answer inferred" in result.selection.explanation


async def test_a_race_and_a_single_target_keep_the_first_answer() -> None:
    backends = [FakeBackend("a", ["The answer is 41."]), FakeBackend("b", ["42"])]
    for fan in (
        FanOut(backends, mode="first"),
        FanOut(backends, mode="quorum", quorum=1),
        FanOut(backends[:1]),
    ):
        result = await fan.run("What is 6 * 7?")
        assert result.selection.method == "first", fan
        assert isinstance(fan.selector, FirstSuccess)
        first = min(result.successes, key=lambda c: c.finished_order or 0)
        assert result.text == first.text  # the first to finish, whatever it says


async def test_a_named_selector_still_wins_over_the_default() -> None:
    backends = [FakeBackend("a", ["The answer is 41."]), FakeBackend("b", ["42"])]
    fan = FanOut(backends, select="first")
    result = await fan.run("What is 6 * 7?")
    assert isinstance(fan.selector, FirstSuccess)
    assert result.selection.method == "first"
    first = min(result.successes, key=lambda c: c.finished_order or 0)
    assert result.text == first.text


async def test_by_default_every_reply_votes_and_keep_leaves_out_the_least_confident() -> None:
    request = ask("What is 6 * 7?")
    cands = [
        with_logprobs(0, "41", [0.05]),
        with_logprobs(1, "42", [0.9]),
        with_logprobs(2, "41", [0.06]),
        with_logprobs(3, "41", [0.07]),
    ]
    # By default all four vote: three unweighted votes for 41 beat one for 42.
    default = await AutoSelect(weight="none").select(request, cands)
    assert AutoSelect().keep == 1.0
    assert "most confident" not in default.explanation
    assert cands[default.chosen or 0].text == "41"
    # keep=0.5: only the two most confident vote (42 at 0.9, 41 at 0.07), weighted by their
    # confidence, so 42 wins; the least confident half is left out, with a reason.
    sel = await AutoSelect(weight="answer", keep=0.5).select(request, cands)
    assert "(the 2 most confident of 4)" in sel.explanation
    assert "least confident" in sel.reasons[0]
    assert cands[sel.chosen or 0].text == "42"
    # keep=0.75 leaves out nothing of three replies or fewer (rounded up).
    few = await AutoSelect(weight="none", keep=0.75).select(request, cands[:3])
    assert "most confident" not in few.explanation


async def test_replies_without_logprobs_are_never_filtered_out() -> None:
    request = ask("What is 6 * 7?")
    cands = [
        ok(0, "41"),
        ok(1, "41"),
        with_logprobs(2, "42", [0.9]),
        with_logprobs(3, "42", [0.8]),
    ]
    sel = await AutoSelect(weight="none", keep=0.5).select(request, cands)
    assert "most confident" not in sel.explanation
    assert all("least confident" not in r for r in sel.reasons.values())


async def test_long_free_text_is_compared_on_its_opening() -> None:
    request = ask("Write a story about the sea.")
    shared = "The sea was calm and grey that morning. " * 60  # past the compared opening
    cands = [
        ok(0, "Once upon a time a dragon flew over the hills. " * 3 + shared),
        ok(1, "The sea was calm and grey that morning. " * 100),
        ok(2, "The sea was calm and grey that morning. " * 90 + "The end."),
    ]
    sel = await AutoSelect().select(request, cands)
    assert sel.method == "auto:text"
    assert sel.chosen in (1, 2)
