"""Falling back on a bad answer: ``validate=`` sends Fallback, Cascade and FanOut on to the next
backend when an answer fails a check (a schema, a refusal detector, your own function), streams
included with ``validate_streams=True``."""

from __future__ import annotations

import pickle
from collections.abc import AsyncIterator
from contextlib import aclosing

import anyio
import anyio.lowlevel
import pytest
from pydantic import BaseModel

from genfan import (
    AllBackendsFailedError,
    AnswerCheck,
    AnswerRejectedError,
    BackendConnectionError,
    BackendError,
    BackendTimeoutError,
    BaseBackend,
    Cascade,
    ChatRequest,
    Completion,
    ConfigurationError,
    FanOut,
    MalformedResponseError,
    NoAnswerError,
    OutputValidationError,
    StreamEnd,
    StreamEvent,
    TextDelta,
    Tier,
    ToolCall,
    collect_stream,
)
from genfan.resilience import Fallback
from genfan.select import LengthBounds, RefusalDetector, SchemaValid, Selection
from genfan.testing import Fail, FakeBackend, Reply, capture_events

REQ = ChatRequest.from_prompt("What is the capital of France?")
REFUSAL = "I'm sorry, but I can't help with that."


class City(BaseModel):
    name: str
    country: str


CITY = '{"name": "Paris", "country": "France"}'


def mentions_paris(completion: Completion) -> str | None:
    return None if "Paris" in completion.text else "does not mention Paris"


async def drain(events: AsyncIterator[StreamEvent]) -> list[StreamEvent]:
    async with aclosing(events) as stream:
        return [event async for event in stream]


def text_of(events: list[StreamEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


class BreaksMidway(BaseBackend):
    """Streams one word, then fails: a stream cut after its first piece."""

    def __init__(self, name: str = "broken") -> None:
        super().__init__(name)

    async def complete(self, request: ChatRequest) -> Completion:
        raise BackendConnectionError("reset", backend=self.name)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        yield TextDelta(text="Par")
        await anyio.lowlevel.checkpoint()
        raise BackendConnectionError("reset mid-stream", backend=self.name)


# -- the error and the checks ---------------------------------------------------------------------


def test_answer_rejected_error_is_a_retryable_backend_error_with_its_answer() -> None:
    answer = Completion(text="nope", backend="gpt")
    err = AnswerRejectedError(
        "answer rejected by refusal: refuses",
        backend="gpt",
        reason="refuses",
        completion=answer,
        check="refusal",
    )
    assert isinstance(err, BackendError)
    assert err.retryable and not err.counts_as_failure  # the backend itself worked
    assert (err.reason, err.completion, err.check) == ("refuses", answer, "refusal")
    assert str(err) == "[gpt] answer rejected by refusal: refuses"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.reason, copy.completion, copy.backend) == ("refuses", answer, "gpt")
    # a wrong output_type is one kind of rejection: one mechanism
    assert issubclass(OutputValidationError, AnswerRejectedError)
    assert issubclass(OutputValidationError, MalformedResponseError)


@pytest.mark.anyio
async def test_every_form_of_validate_rejects_with_a_reason() -> None:
    class NoRefusals:
        name = "no-refusals"

        def check(self, completion: Completion, /) -> str | None:
            return "refuses" if "sorry" in completion.text else None

    assert isinstance(NoRefusals(), AnswerCheck)

    def raises(completion: Completion) -> None:
        if "Paris" not in completion.text:
            raise ValueError("no Paris in it")

    async def slow_check(completion: Completion) -> bool:
        await anyio.lowlevel.checkpoint()
        return "Paris" in completion.text

    forms: list[tuple[object, str]] = [
        (mentions_paris, "does not mention Paris"),
        (lambda c: "Paris" in c.text, "rejected by validate"),
        (raises, "no Paris in it"),
        (slow_check, "rejected by slow_check"),
        (NoRefusals(), "refuses"),
        (RefusalDetector(), "refuses"),
        (City, "no JSON found in the answer"),
        (SchemaValid(City), "no JSON found in the answer"),
        ([LengthBounds(max_words=5), RefusalDetector()], "8 words > 5"),
    ]
    for validate, reason in forms:
        chain = Fallback([FakeBackend("bad", [REFUSAL])], validate=validate)
        with pytest.raises(AnswerRejectedError) as info:
            await chain.complete(REQ)
        assert reason in info.value.reason, (validate, info.value.reason)
        assert info.value.backend == "bad"
        assert info.value.completion is not None and info.value.completion.text == REFUSAL
        good = Fallback([FakeBackend("good", [CITY])], validate=validate)
        assert (await good.complete(REQ)).text == CITY

    with pytest.raises(OutputValidationError):  # a type rejects with its own subclass
        await Fallback([FakeBackend("b", ['{"name": "Paris"}'])], validate=City).complete(REQ)


def test_validate_refuses_what_is_not_a_check() -> None:
    for junk in (42, "City", []):
        with pytest.raises(ConfigurationError, match="validate"):
            Fallback([FakeBackend("a")], validate=junk)
    with pytest.raises(ConfigurationError):
        FanOut([FakeBackend("a")], validate=object())


@pytest.mark.anyio
async def test_a_check_returning_nonsense_is_a_configuration_error() -> None:
    chain = Fallback([FakeBackend("a"), FakeBackend("b")], validate=lambda c: 0.5)
    with pytest.raises(ConfigurationError, match="must return None or True"):
        await chain.complete(REQ)


# -- Fallback -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_fallback_moves_on_to_the_second_backend_on_a_bad_answer() -> None:
    cheap = FakeBackend("cheap", [REFUSAL])
    strong = FakeBackend("strong", ["Paris."])
    chain = Fallback([cheap, strong], validate=[RefusalDetector(), mentions_paris])
    with capture_events() as events:
        answer = await chain.complete(REQ)
    assert answer.text == "Paris." and answer.backend == "strong"
    assert len(cheap.calls) == len(strong.calls) == 1
    moved = [e for e in events if e["event"] == "fallback_next"]
    assert len(moved) == 1
    assert moved[0]["backend"] == "cheap" and moved[0]["to"] == "strong"
    assert moved[0]["error"] == "AnswerRejectedError" and moved[0]["reason"] == "refuses"


@pytest.mark.anyio
async def test_when_every_backend_rejects_the_error_carries_every_reason() -> None:
    chain = Fallback(
        [
            FakeBackend("a", [REFUSAL]),
            FakeBackend("b", ["Lyon."]),
            FakeBackend("c", [Fail(error=BackendTimeoutError)]),
            FakeBackend("d", ["Marseille."]),
        ],
        validate=[RefusalDetector(), mentions_paris],
    )
    with pytest.raises(AnswerRejectedError) as info:
        await chain.complete(REQ)
    err = info.value
    assert err.backend == "d" and err.reason == "does not mention Paris"
    notes = "\n".join(err.__notes__)
    assert "[a] answer rejected by refusal: refuses" in notes
    assert "[b] answer rejected by mentions_paris: does not mention Paris" in notes
    assert "BackendTimeoutError" in notes


@pytest.mark.anyio
async def test_a_rejection_moves_on_whatever_fallback_on_says() -> None:
    only_timeouts = Fallback(
        [FakeBackend("a", ["Lyon."]), FakeBackend("b", ["Paris."])],
        validate=mentions_paris,
        fallback_on=lambda e: isinstance(e, BackendTimeoutError),
    )
    assert (await only_timeouts.complete(REQ)).text == "Paris."


@pytest.mark.anyio
async def test_answers_that_ask_for_tools_are_not_checked() -> None:
    call = ToolCall(id="1", name="lookup", arguments="{}")
    chain = Fallback(
        [FakeBackend("a", [Reply(tool_calls=(call,))]), FakeBackend("b", ["Paris."])],
        validate=mentions_paris,
    )
    assert (await chain.complete(REQ)).tool_calls == (call,)


# -- Fallback streams -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_validated_streams_are_buffered_checked_and_fall_back() -> None:
    cheap = FakeBackend("cheap", [Reply(text=REFUSAL, ttft=0.01, latency=0.02)])
    strong = FakeBackend("strong", [Reply(text="Paris is the capital.", ttft=0.01, latency=0.02)])
    chain = Fallback([cheap, strong], validate=RefusalDetector(), validate_streams=True)
    events = await drain(chain.stream(REQ))
    assert text_of(events) == "Paris is the capital."  # nothing of the refusal was passed on
    assert isinstance(events[-1], StreamEnd) and events[-1].completion.backend == "strong"
    assert len(cheap.calls) == 1

    # every stream rejected: the last rejection, with the others' reasons
    with pytest.raises(AnswerRejectedError) as info:
        await drain(
            Fallback([cheap, cheap], validate=RefusalDetector(), validate_streams=True).stream(REQ)
        )
    assert "refuses" in "\n".join(info.value.__notes__)


@pytest.mark.anyio
async def test_validated_streams_also_fall_back_from_a_stream_cut_midway() -> None:
    chain = Fallback([BreaksMidway(), FakeBackend("b", ["Paris."])], validate_streams=True)
    assert text_of(await drain(chain.stream(REQ))) == "Paris."
    # live (the default), the piece already passed on cannot be taken back: the cut raises
    live = Fallback([BreaksMidway(), FakeBackend("b", ["Paris."])])
    seen: list[StreamEvent] = []
    with pytest.raises(BackendConnectionError):
        async with aclosing(live.stream(REQ)) as events:
            async for event in events:
                seen.append(event)
    assert text_of(seen) == "Par"


@pytest.mark.anyio
async def test_unvalidated_streams_pass_through_live_and_unchecked() -> None:
    cheap = FakeBackend("cheap", [Reply(text=REFUSAL, ttft=0.01, latency=0.05)])
    strong = FakeBackend("strong", ["Paris."])
    chain = Fallback([cheap, strong], validate=RefusalDetector())  # validate_streams=False
    first_piece_at: float | None = None
    start = anyio.current_time()
    events: list[StreamEvent] = []
    async with aclosing(chain.stream(REQ)) as stream:
        async for event in stream:
            if first_piece_at is None:
                first_piece_at = anyio.current_time() - start
            events.append(event)
    assert text_of(events) == REFUSAL  # passed on as it came: not checked
    assert first_piece_at is not None and first_piece_at < 0.04  # live, before the stream ended
    assert strong.calls == []
    # complete() on the same chain is checked
    assert (await chain.complete(REQ)).text == "Paris."


# -- Cascade --------------------------------------------------------------------------------------


class Sure:
    """Chooses the first answer, always sure of it."""

    async def select(self, request: ChatRequest, candidates: object) -> Selection:
        ok = [c for c in candidates if c.ok]  # type: ignore[attr-defined]
        if not ok:
            return Selection(chosen=None, explanation="none")
        return Selection(chosen=ok[0].index, confidence=1.0, explanation="sure")


@pytest.mark.anyio
async def test_a_cascade_escalates_past_a_tier_whose_answers_are_all_rejected() -> None:
    small = FakeBackend("small", [REFUSAL])
    large = FakeBackend("large", ["Paris."])
    cascade = Cascade(
        [Tier(backends=[small, small]), Tier(backends=[large])],
        selector=Sure(),
        threshold=0.5,
        validate=RefusalDetector(),
    )
    result = await cascade.run(REQ)
    assert result.text == "Paris." and result.tiers_used == ["tier1", "tier2"]
    first = result.tiers[0]
    assert first.error is not None and not first.accepted
    assert all(isinstance(e, AnswerRejectedError) for e in first.error.exceptions)
    assert (await cascade.complete(REQ)).text == "Paris."

    # without validate= the confident refusal is taken at the first tier
    plain = Cascade([Tier(backends=[small]), Tier(backends=[large])], selector=Sure())
    assert (await plain.run(REQ)).text == REFUSAL


@pytest.mark.anyio
async def test_a_cascade_chooses_among_the_answers_that_pass() -> None:
    cascade = Cascade(
        [Tier(backends=[FakeBackend("a", [REFUSAL]), FakeBackend("b", ["Paris."])])],
        selector=Sure(),
        validate=RefusalDetector(),
    )
    result = await cascade.run(REQ)
    assert result.text == "Paris."
    assert isinstance(result.candidates[0].error, AnswerRejectedError)
    assert result.candidates[0].completion is not None  # kept: its tokens count in the cost
    assert result.cost > 0


@pytest.mark.anyio
async def test_a_cascade_whose_every_answer_is_rejected_fails_with_every_reason() -> None:
    cascade = Cascade(
        [
            Tier(backends=[FakeBackend("a", [REFUSAL])]),
            Tier(backends=[FakeBackend("b", ["Lyon."])]),
        ],
        selector=Sure(),
        validate=[RefusalDetector(), mentions_paris],
    )
    with pytest.raises(AllBackendsFailedError) as info:
        await cascade.run(REQ)
    reasons = [e.reason for e in info.value.exceptions if isinstance(e, AnswerRejectedError)]
    assert reasons == ["refuses", "does not mention Paris"]
    with pytest.raises(NoAnswerError):
        await cascade.complete(REQ)


# -- FanOut ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_fanout_first_mode_skips_a_bad_fast_answer() -> None:
    fast = FakeBackend("fast", [REFUSAL], latency=0.01)
    slow = FakeBackend("slow", ["Paris."], latency=0.05)
    slower = FakeBackend("slower", ["Paris, too."], latency=0.5)
    fan = FanOut([fast, slow, slower], mode="first", validate=RefusalDetector())
    with capture_events() as events:
        result = await fan.run(REQ)
    assert result.text == "Paris." and result.chosen is not None
    assert result.chosen.backend == "slow"
    bad = result.candidates[0]
    assert bad.status == "failed" and isinstance(bad.error, AnswerRejectedError)
    assert bad.error.reason == "refuses" and bad.completion is not None
    assert result.candidates[2].status == "cancelled"  # the race ended at the first good answer
    assert result.usage.output_tokens > 2  # the rejected answer's tokens count
    failed = [e for e in events if e["event"] == "backend_call_failed"]
    assert (
        failed and failed[0]["error"] == "AnswerRejectedError" and "refuses" in failed[0]["detail"]
    )


@pytest.mark.anyio
async def test_fanout_with_every_answer_rejected_has_no_answer() -> None:
    fan = FanOut(
        [FakeBackend("a", [REFUSAL]), FakeBackend("b", ["Lyon."])], validate=mentions_paris
    )
    with pytest.raises(AllBackendsFailedError) as info:
        await fan.run(REQ)
    assert all(isinstance(e, AnswerRejectedError) for e in info.value.exceptions)
    with pytest.raises(NoAnswerError) as no:
        await fan.complete(REQ)
    assert not no.value.counts_as_failure and no.value.retryable


@pytest.mark.anyio
async def test_validate_and_output_type_work_together() -> None:
    fan = FanOut(
        [
            FakeBackend("lyon", ['{"name": "Lyon", "country": "France"}']),
            FakeBackend("prose", ["Paris, France."], latency=0.01),
            FakeBackend("paris", [CITY], latency=0.02),
        ],
        output_type=City,
        validate=mentions_paris,
    )
    result = await fan.run(REQ)
    assert result.output == City(name="Paris", country="France")
    assert set(result.outputs) == {2}  # a valid City that is rejected keeps no output
    errors = [type(c.error) for c in result.candidates]
    assert errors == [AnswerRejectedError, OutputValidationError, type(None)]


@pytest.mark.anyio
async def test_fanout_validated_streams_race_on_to_a_good_answer() -> None:
    def backends() -> list[FakeBackend]:
        return [
            FakeBackend("fast", [Reply(text=REFUSAL, ttft=0.005, latency=0.02)]),
            FakeBackend("slow", [Reply(text="Paris is the capital.", ttft=0.03, latency=0.06)]),
        ]

    fan = FanOut(backends(), mode="first", validate=RefusalDetector(), validate_streams=True)
    events = await drain(fan.stream(REQ))
    assert text_of(events) == "Paris is the capital."
    assert isinstance(events[-1], StreamEnd) and events[-1].completion.backend == "slow"

    async with fan.run_stream(REQ) as stream:
        seen = [event async for event in stream]
    finished = {e.backend: e.candidate for e in seen if e.type == "candidate"}
    assert finished["fast"].status == "failed"
    assert isinstance(finished["fast"].error, AnswerRejectedError)
    assert seen[-1].type == "final" and seen[-1].result.text == "Paris is the capital."

    # by default the first token wins: its refusal, passed on live, then fails the fan-out
    live = FanOut(backends(), mode="first", validate=RefusalDetector())
    with pytest.raises(NoAnswerError):
        await drain(live.stream(REQ))


@pytest.mark.anyio
async def test_a_validated_fallback_nests_in_a_fanout() -> None:
    chain = Fallback(
        [FakeBackend("a", [REFUSAL]), FakeBackend("b", ["Paris."])],
        validate=RefusalDetector(),
        validate_streams=True,
    )
    fan = FanOut([chain], mode="first")
    assert (await fan.complete(REQ)).text == "Paris."
    completion = await collect_stream(fan.stream(REQ))
    assert completion.text == "Paris."
