"""FanOut: modes, deadline, cancellation, failures, selection hook, batch form."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest
from trio.testing import MockClock

from genfan import (
    AllBackendsFailedError,
    BackendError,
    BackendTimeoutError,
    CallCancelledError,
    ChatRequest,
    Completion,
    ConfigurationError,
    FanOut,
    GenfanError,
    HTTPStatusError,
    RateLimitError,
    Target,
)
from genfan.select import Candidate
from genfan.testing import Fail, FakeBackend, FunctionBackend, Reply

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    # Virtual time: latencies are exact and cost no real time.
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


async def test_all_mode_returns_every_candidate_in_target_order() -> None:
    a = FakeBackend("a", ["alpha"], latency=3)
    b = FakeBackend("b", ["beta"], latency=1)
    c = FakeBackend("c", [Fail(error=HTTPStatusError("boom", status_code=500, backend="c"))])
    start = anyio.current_time()
    result = await FanOut([a, b, c]).run("hi")
    assert anyio.current_time() - start == pytest.approx(3)  # concurrent, not 4 s
    assert [cand.backend for cand in result.candidates] == ["a", "b", "c"]
    assert [cand.status for cand in result.candidates] == ["ok", "ok", "failed"]
    assert isinstance(result.candidates[2].error, HTTPStatusError)
    # default selection: the first to finish
    assert result.chosen is not None and result.chosen.backend == "b"
    assert result.text == "beta"
    assert result.usage.output_tokens == 2
    assert result.quorum_met and not result.deadline_hit


async def test_first_mode_cancels_the_losers() -> None:
    fast = FakeBackend("fast", ["quick"], latency=1)
    slow = FakeBackend("slow", ["late"], latency=10)
    start = anyio.current_time()
    result = await FanOut([slow, fast], mode="first").run("hi")
    assert anyio.current_time() - start == pytest.approx(1)
    assert result.text == "quick"
    assert slow.cancelled == 1 and slow.in_flight == 0
    loser = result.candidates[0]
    assert loser.status == "cancelled"
    assert isinstance(loser.error, CallCancelledError)


async def test_first_mode_skips_failures() -> None:
    bad = FakeBackend(
        "bad", [Fail(error=RateLimitError("slow down", retry_after=2.0))], latency=0.5
    )
    good = FakeBackend("good", ["fine"], latency=2)
    result = await FanOut([bad, good], mode="first").run("hi")
    assert result.text == "fine"
    assert result.candidates[0].status == "failed"


async def test_quorum_returns_after_k_successes() -> None:
    backends = [FakeBackend(f"b{i}", [f"answer {i}"], latency=i + 1) for i in range(4)]
    start = anyio.current_time()
    result = await FanOut(backends, mode="quorum", quorum=2).run("hi")
    assert anyio.current_time() - start == pytest.approx(2)
    assert [c.status for c in result.candidates] == ["ok", "ok", "cancelled", "cancelled"]
    assert result.quorum_met
    assert backends[3].cancelled == 1


async def test_quorum_with_agreement_waits_for_k_equal_answers() -> None:
    replies = [("7", 1), ("8", 2), ("7", 3), ("7", 4), ("9", 5)]
    backends = [
        FakeBackend(f"b{i}", [Reply(text=t, latency=lat)]) for i, (t, lat) in enumerate(replies)
    ]
    fan = FanOut(backends, mode="quorum", quorum=2, agree=lambda c: c.text.strip())
    start = anyio.current_time()
    result = await fan.run("what is 3+4?")
    assert anyio.current_time() - start == pytest.approx(3)
    assert [c.status for c in result.candidates] == ["ok", "ok", "ok", "cancelled", "cancelled"]


async def test_quorum_not_met_is_reported() -> None:
    ok = FakeBackend("ok", ["x"], latency=1)
    bad = FakeBackend("bad", [Fail(error=BackendError("down"))], latency=1)
    result = await FanOut([ok, bad], mode="quorum", quorum=2).run("hi")
    assert not result.quorum_met
    assert result.text == "x"


async def test_deadline_returns_best_so_far_and_cancels_the_rest() -> None:
    quick = FakeBackend("quick", ["ready"], latency=1)
    slow = FakeBackend("slow", ["too late"], latency=60)
    start = anyio.current_time()
    result = await FanOut([quick, slow], deadline=5).run("hi")
    assert anyio.current_time() - start == pytest.approx(5)
    assert result.deadline_hit
    assert result.text == "ready"
    assert result.candidates[1].status == "cancelled"
    assert isinstance(result.candidates[1].error, BackendTimeoutError)
    assert slow.cancelled == 1


async def test_per_call_deadline_overrides_the_fanout_deadline() -> None:
    slow = FakeBackend("slow", ["x"], latency=10)
    quick = FakeBackend("quick", ["y"], latency=1)
    result = await FanOut([slow, quick], deadline=100).run("hi", deadline=2)
    assert result.deadline_hit and result.text == "y"


async def test_every_backend_failing_raises_one_group() -> None:
    a = FakeBackend("a", [Fail(error=RateLimitError("429", backend="a", retry_after=1.0))])
    b = FakeBackend("b", [Fail(error=HTTPStatusError("503", backend="b", status_code=503))])
    with pytest.raises(AllBackendsFailedError) as info:
        await FanOut([a, b]).run("hi")
    err = info.value
    assert isinstance(err, GenfanError) and isinstance(err, ExceptionGroup)
    assert [type(e) for e in err.exceptions] == [RateLimitError, HTTPStatusError]
    assert "a: RateLimitError" in str(err) and "b: HTTPStatusError" in str(err)
    # except* works on it
    caught: list[BaseException] = []
    try:
        raise err
    except* RateLimitError as group:
        caught.extend(group.exceptions)
    except* HTTPStatusError:
        pass
    assert len(caught) == 1


async def test_deadline_with_no_answer_raises_timeouts() -> None:
    slow = FakeBackend("slow", ["x"], latency=10)
    with pytest.raises(AllBackendsFailedError) as info:
        await FanOut([slow], deadline=1).run("hi")
    assert isinstance(info.value.exceptions[0], BackendTimeoutError)


async def test_unexpected_exception_in_a_backend_becomes_a_backend_error() -> None:
    def broken(request: ChatRequest) -> str:
        raise KeyError("bug")

    ok = FakeBackend("ok", ["fine"])
    result = await FanOut([FunctionBackend(broken, name="broken"), ok]).run("hi")
    err = result.candidates[0].error
    assert isinstance(err, BackendError) and err.backend == "broken"
    assert isinstance(err.__cause__, KeyError)


async def test_targets_apply_overrides_and_get_unique_names() -> None:
    engine = FakeBackend("local", ["x"])
    fan = FanOut(
        [
            Target(backend=engine, temperature=0.0),
            Target(backend=engine, temperature=0.9, system="Be creative."),
            Target(backend=engine, model="other", max_tokens=5),
        ]
    )
    assert fan.names == ["local", "local#2", "local#3"]
    request = ChatRequest.from_prompt("hi", system="Be brief.", temperature=0.5)
    await fan.run(request)
    sent = sorted(engine.calls, key=lambda r: (r.temperature or 0, r.model or ""))
    temps = sorted(r.temperature for r in engine.calls if r.temperature is not None)
    assert temps == [0.0, 0.5, 0.9]
    creative = next(r for r in sent if r.temperature == 0.9)
    assert creative.messages[0].content == "Be creative."
    assert sum(1 for m in creative.messages if m.role == "system") == 1
    other = next(r for r in engine.calls if r.model == "other")
    assert other.max_tokens == 5 and other.messages[0].content == "Be brief."


async def test_duplicate_explicit_names_are_rejected() -> None:
    b = FakeBackend("b")
    with pytest.raises(ConfigurationError, match="both named"):
        FanOut([Target(backend=b, name="x"), Target(backend=b, name="x")])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "quorum"}, "quorum"),
        ({"mode": "quorum", "quorum": 5}, "quorum"),
        ({"quorum": 1}, "only meaningful"),
        ({"mode": "fastest"}, "mode must be"),
        ({"deadline": 0}, "deadline"),
        ({"deadline": float("inf")}, "deadline"),
    ],
)
def test_bad_arguments_raise_configuration_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        FanOut([FakeBackend("a"), FakeBackend("b")], **kwargs)  # type: ignore[arg-type]


def test_empty_fanout_is_rejected() -> None:
    with pytest.raises(ConfigurationError):
        FanOut([])


async def test_custom_select_function_picks_the_answer() -> None:
    def longest(request: ChatRequest, candidates: Sequence[Candidate]) -> Candidate:
        return max((c for c in candidates if c.ok), key=lambda c: len(c.text))

    fan = FanOut([FakeBackend("a", ["short"]), FakeBackend("b", ["much longer"])], select=longest)
    result = await fan.run("hi")
    assert result.text == "much longer"
    assert result.selection.method == "longest"


async def test_select_function_returning_bad_index_is_a_configuration_error() -> None:
    fan = FanOut([FakeBackend("a")], select=lambda r, c: 7)
    with pytest.raises(ConfigurationError, match="index 7"):
        await fan.run("hi")


async def test_map_bounds_requests_in_flight_and_keeps_order() -> None:
    backend = FakeBackend("a", lambda r: Reply(text=r.prompt.upper(), latency=1))
    failing = FakeBackend(
        "f", lambda r: Fail(error=BackendError("no")) if r.prompt == "p3" else "ok"
    )
    fan = FanOut([backend], mode="all")
    start = anyio.current_time()
    results = await fan.map([f"p{i}" for i in range(10)], max_in_flight=3)
    assert anyio.current_time() - start == pytest.approx(4)  # ceil(10 / 3) rounds of 1 s
    assert backend.max_in_flight == 3
    assert [r.text for r in results if not isinstance(r, Exception)] == [f"P{i}" for i in range(10)]
    mixed = await FanOut([failing]).map(["p1", "p3"], max_in_flight=2)
    assert not isinstance(mixed[0], Exception) and isinstance(mixed[1], AllBackendsFailedError)


async def test_cancelling_the_caller_cancels_every_backend_call() -> None:
    slow = [FakeBackend(f"s{i}", ["x"], latency=100) for i in range(3)]
    fan = FanOut(slow)
    with anyio.move_on_after(1):
        await fan.run("hi")
    assert all(b.cancelled == 1 and b.in_flight == 0 for b in slow)


async def test_aclose_leaves_the_backends_to_their_owner() -> None:
    engine = FakeBackend("e")
    async with FanOut([Target(backend=engine), Target(backend=engine)]):
        pass
    assert not engine.closed  # whoever creates a backend owns it
    async with FanOut([Target(backend=engine), Target(backend=engine)], owns_backends=True):
        pass
    assert engine.closed  # handed over: closed once


class Strict(FakeBackend):
    """Refuses calls once closed, as the HTTP providers do."""

    async def complete(self, request: ChatRequest) -> Completion:
        if self.closed:
            raise ConfigurationError(f"backend {self.name!r} is closed; create a new one")
        return await super().complete(request)


# Made once, at module level, as the docs show.
SMALL = Strict("small", ["Paris."])
LARGE = Strict("large", ["The capital of France is Paris."], latency=0.01)


async def test_module_level_backends_serve_many_fanouts() -> None:
    for _ in range(3):
        async with FanOut([SMALL, LARGE], mode="all") as fan:
            result = await fan.run("What is the capital of France?")
        assert [c.status for c in result.candidates] == ["ok", "ok"]
    async with FanOut([SMALL], mode="first") as fan:
        assert (await fan.complete(ChatRequest.from_prompt("again"))).text == "Paris."
    assert not (SMALL.closed or LARGE.closed)


async def test_result_without_choice_raises_on_text() -> None:
    fan = FanOut([FakeBackend("a")], select=lambda r, c: None)
    result = await fan.run("hi")
    assert result.chosen is None
    with pytest.raises(ValueError, match="no candidate was chosen"):
        _ = result.text


async def test_a_single_target_keeps_deadline_cancellation_and_error_semantics() -> None:
    # One target runs without a task group; what callers see must not change.
    slow = FakeBackend("slow", ["x"], latency=100)
    with anyio.move_on_after(1):
        await FanOut([slow]).run("hi")
    assert slow.cancelled == 1 and slow.in_flight == 0

    late = FakeBackend("late", ["x"], latency=10)
    with pytest.raises(AllBackendsFailedError) as info:
        await FanOut([late], deadline=2).run("hi")
    assert isinstance(info.value.exceptions[0], BackendTimeoutError) and late.cancelled == 1

    def broken(request: ChatRequest) -> str:
        raise KeyError("bug")

    with pytest.raises(AllBackendsFailedError) as info:
        await FanOut([FunctionBackend(broken, name="broken")]).run("hi")
    assert isinstance(info.value.exceptions[0].__cause__, KeyError)

    result = await FanOut([FakeBackend("one", ["only"], latency=3)], mode="first").run("hi")
    assert result.text == "only" and result.quorum_met
