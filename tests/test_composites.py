"""Composites are backends: FanOut, Cascade, Synthesis, Pool and Fallback nest in one another."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from genfan import (
    AllBackendsFailedError,
    Backend,
    BackendConnectionError,
    BackendError,
    Cascade,
    ChatRequest,
    CircuitOpenError,
    FanOut,
    HTTPStatusError,
    NoAnswerError,
    StreamEnd,
    Synthesis,
    Target,
    TextDelta,
    Tier,
    ToolCall,
    collect_stream,
)
from genfan.agents import Agent, Chain, ModelTextDelta, tool
from genfan.resilience import BreakerPolicy, Fallback, Pool, RetryPolicy, guard
from genfan.select import Candidate, Selection
from genfan.testing import Fail, FakeBackend, FunctionBackend, Reply

REQ = ChatRequest.from_prompt("hi")
NO_WAIT_RETRY = RetryPolicy(attempts=3, initial=0.0, jitter="none", budget=None)


class SureSelector:
    """Chooses the first success; confident only when its text starts with ``sure``."""

    async def select(self, request: ChatRequest, candidates: Sequence[Candidate]) -> Selection:
        ok = [c for c in candidates if c.ok]
        if not ok:
            return Selection(chosen=None, explanation="nothing succeeded")
        best = ok[0]
        sure = best.text.startswith("sure")
        return Selection(chosen=best.index, confidence=1.0 if sure else 0.2, explanation="first")


def down(name: str) -> FakeBackend:
    return FakeBackend(name, [Fail(error=BackendConnectionError)])


def bad_request(name: str) -> FakeBackend:
    return FakeBackend(name, [Fail(error=HTTPStatusError("bad", status_code=400, backend=name))])


# the protocol ----------------------------------------------------------------------------------


def test_every_composite_is_a_backend_with_a_name() -> None:
    a, b, c = FakeBackend("a"), FakeBackend("b"), FakeBackend("c")
    fan = FanOut([a, b])
    cascade = Cascade([a, [b, c]], selector=SureSelector())
    moa = Synthesis([a, b], aggregator=c)
    pool = Pool([a, b])
    chain = Fallback([a, b])
    for composite in (fan, cascade, moa, pool, chain):
        assert isinstance(composite, Backend), composite
    assert fan.name == "fanout(a,b)"
    assert cascade.name == "cascade(a,fanout(b,c))"
    assert moa.name == "synthesis(a,b->c)"
    assert pool.name == "pool(a,b)" and chain.name == "fallback(a,b)"
    assert FanOut([a, a]).name == "fanout(a,a#2)"
    assert Cascade([FanOut([a, b], name="cheap"), c], selector=SureSelector()).name == (
        "cascade(cheap,c)"
    )
    assert FanOut([a], name="mine").name == "mine"
    assert Cascade([a], selector=SureSelector(), name="mine").name == "mine"
    assert Synthesis([a], aggregator=b, name="mine").name == "mine"
    assert repr(fan) == "FanOut(name='fanout(a,b)')"


@pytest.mark.anyio
async def test_fanout_complete_returns_the_chosen_completion() -> None:
    slow = FakeBackend("slow", ["late"], latency=0.05)
    fast = FakeBackend("fast", ["quick"])
    fan = FanOut([slow, fast])
    completion = await fan.complete(REQ)
    assert completion.text == "quick" and completion.backend == "fast"
    result = await fan.run(REQ)  # run() still returns every candidate
    assert [c.backend for c in result.candidates] == ["slow", "fast"]


@pytest.mark.anyio
async def test_fanout_stream_passes_the_chosen_answer_on() -> None:
    call = ToolCall(id="call_0", name="lookup", arguments='{"q": "x"}')
    fan = FanOut([FakeBackend("a", [Reply(text="let me look", tool_calls=(call,))])])
    events = [ev async for ev in fan.stream(REQ)]
    # the chosen candidate's own stream (FakeBackend streams word by word), then its end
    assert events[:3] == [TextDelta(text="let"), TextDelta(text=" me"), TextDelta(text=" look")]
    assert isinstance(events[3], StreamEnd) and events[3].completion.tool_calls == (call,)
    assert len(events) == 4
    completion = await collect_stream(fan.stream(REQ), backend=fan.name)
    assert completion.text == "let me look"


@pytest.mark.anyio
async def test_a_failed_fanout_raises_no_answer_error_and_run_keeps_its_error() -> None:
    fan = FanOut([down("a"), bad_request("b")])
    with pytest.raises(AllBackendsFailedError):
        await fan.run(REQ)
    with pytest.raises(NoAnswerError) as info:
        await fan.complete(REQ)
    err = info.value
    assert isinstance(err, BackendError) and err.backend == "fanout(a,b)"
    assert [type(e) for e in err.errors] == [BackendConnectionError, HTTPStatusError]
    assert err.retryable and err.counts_as_failure  # the connection error is retryable
    assert isinstance(err.__cause__, AllBackendsFailedError)
    assert err.explanation is None
    with pytest.raises(NoAnswerError):
        async for _ in fan.stream(REQ):
            pass

    only_client_errors = FanOut([bad_request("a"), bad_request("b")])
    with pytest.raises(NoAnswerError) as info:
        await only_client_errors.complete(REQ)
    assert not info.value.retryable and not info.value.counts_as_failure


@pytest.mark.anyio
async def test_nothing_chosen_raises_no_answer_error_with_the_explanation() -> None:
    def decline(request: ChatRequest, candidates: Sequence[Candidate]) -> None:
        return None

    fan = FanOut([FakeBackend("a"), down("b")], select=decline)
    result = await fan.run(REQ)
    assert result.chosen is None
    with pytest.raises(NoAnswerError, match="decline chose none") as info:
        await fan.complete(REQ)
    assert info.value.explanation == "decline chose none"
    assert [type(e) for e in info.value.errors] == [BackendConnectionError]


def test_no_answer_error_pickles() -> None:
    err = NoAnswerError(
        "nothing", backend="fan", errors=[BackendConnectionError("x", backend="a")], explanation="?"
    )
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is NoAnswerError and back.backend == "fan" and back.explanation == "?"
    assert [type(e) for e in back.errors] == [BackendConnectionError] and back.retryable
    assert str(back) == "[fan] nothing"


@pytest.mark.anyio
async def test_cascade_is_a_backend() -> None:
    cheap = FakeBackend("cheap", ["maybe 4"])
    strong = FakeBackend("strong", ["sure: 4"])
    cascade = Cascade([cheap, strong], selector=SureSelector(), threshold=0.5)
    completion = await cascade.complete(REQ)
    assert completion.text == "sure: 4" and completion.backend == "strong"
    completion = await collect_stream(cascade.stream(REQ))
    assert completion.text == "sure: 4"

    failing = Cascade([down("a"), down("b")], selector=SureSelector())
    with pytest.raises(AllBackendsFailedError):
        await failing.run(REQ)
    with pytest.raises(NoAnswerError) as info:
        await failing.complete(REQ)
    assert info.value.backend == "cascade(a,b)" and len(info.value.errors) == 2
    assert info.value.retryable


@pytest.mark.anyio
async def test_synthesis_is_a_backend() -> None:
    def aggregate(request: ChatRequest) -> str:
        system = request.messages[0].content or ""
        numbered = re.findall(r"\n\d+\. ", system)
        return f"{len(numbered)} references"

    moa = Synthesis([FakeBackend("a", ["x"]), FakeBackend("b", ["y"])], FunctionBackend(aggregate))
    completion = await moa.complete(REQ)
    assert completion.text == "2 references" and completion.backend == "aggregate"
    assert (await collect_stream(moa.stream(REQ))).text == "2 references"

    no_proposers = Synthesis([down("a"), down("b")], aggregator=FakeBackend("agg"))
    with pytest.raises(AllBackendsFailedError):
        await no_proposers.run(REQ)
    with pytest.raises(NoAnswerError) as info:
        await no_proposers.complete(REQ)
    assert info.value.backend == "synthesis(a,b->agg)"

    broken_aggregator = Synthesis([FakeBackend("a")], aggregator=bad_request("agg"))
    with pytest.raises(HTTPStatusError) as status:  # the aggregator's own error
        await broken_aggregator.complete(REQ)
    assert status.value.backend == "agg"


# nesting ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_fanout_of_cascades() -> None:
    first = Cascade(
        [FakeBackend("c1", ["maybe"]), FakeBackend("s1", ["sure: one"])],
        selector=SureSelector(),
        name="first",
    )
    broken = Cascade([down("c2"), down("s2")], selector=SureSelector(), name="broken")
    result = await FanOut([first, broken]).run(REQ)
    assert [c.backend for c in result.candidates] == ["first", "broken"]
    assert [c.status for c in result.candidates] == ["ok", "failed"]
    assert isinstance(result.candidates[1].error, NoAnswerError)
    assert result.text == "sure: one"


@pytest.mark.anyio
async def test_a_cascade_whose_tier_is_a_fanout() -> None:
    cheap = FanOut([FakeBackend("a", ["maybe"]), down("b")], name="cheap")
    strong = FakeBackend("strong", ["sure: yes"])
    cascade = Cascade([cheap, strong], selector=SureSelector())
    result = await cascade.run(REQ)
    assert result.tiers_used == ["tier1", "tier2"] and result.text == "sure: yes"
    tier1 = result.tiers[0].result
    assert tier1 is not None and [c.backend for c in tier1.candidates] == ["a", "b"]

    # a fan-out as one backend among others of a tier: one candidate, its chosen answer
    mixed = Cascade(
        [Tier(backends=[FanOut([FakeBackend("x", ["sure: x"])]), FakeBackend("y", ["y"])])],
        selector=SureSelector(),
    )
    outcome = await mixed.run(REQ)
    assert [c.backend for c in outcome.candidates] == ["fanout(x)", "y"]
    assert (await mixed.complete(REQ)).text == "sure: x"


@pytest.mark.anyio
async def test_a_fanout_inside_a_fanout() -> None:
    inner = FanOut([down("a"), FakeBackend("b", ["inner"])], mode="first")
    outer = FanOut([inner, FakeBackend("c", ["outer"], latency=0.05)])
    result = await outer.run(REQ)
    assert [c.backend for c in result.candidates] == ["fanout(a,b)", "c"]
    assert all(c.ok for c in result.candidates) and result.text == "inner"

    dead = FanOut([down("d"), down("e")])
    deeper = FanOut([FanOut([dead, bad_request("f")]), bad_request("g")])
    with pytest.raises(NoAnswerError) as info:
        await deeper.complete(REQ)
    nested = info.value.errors[0]
    assert isinstance(nested, NoAnswerError) and nested.backend == "fanout(fanout(d,e),f)"
    assert isinstance(nested.errors[0], NoAnswerError) and nested.errors[0].backend == "fanout(d,e)"
    assert info.value.retryable  # the connection errors two levels down are retryable


@pytest.mark.anyio
async def test_a_pool_inside_a_fanout() -> None:
    r1, r2 = FakeBackend("r1", ["one"]), FakeBackend("r2", ["two"])
    fan = FanOut([Pool([r1, r2], strategy="round_robin", name="replicas")])
    texts = [(await fan.complete(REQ)).text for _ in range(4)]
    assert texts == ["one", "two", "one", "two"]
    assert (await fan.run(REQ)).candidates[0].backend == "replicas"


@pytest.mark.anyio
async def test_a_synthesis_as_a_fanout_target() -> None:
    moa = Synthesis(
        [FakeBackend("p1", ["x"]), FakeBackend("p2", ["y"])],
        aggregator=FunctionBackend(lambda request: "synthesised", name="agg"),
    )
    result = await FanOut([moa, FakeBackend("solo", ["alone"], latency=0.05)]).run(REQ)
    assert [c.backend for c in result.candidates] == ["synthesis(p1,p2->agg)", "solo"]
    assert result.text == "synthesised"


@pytest.mark.anyio
async def test_an_agent_over_a_fanout() -> None:
    @tool
    def double(n: int) -> int:
        return n * 2

    ask = ToolCall(id="call_0", name="double", arguments=json.dumps({"n": 21}))
    a = FakeBackend("a", [Reply(tool_calls=(ask,)), "42"])
    fan = FanOut([a, down("b")], mode="first")
    agent = Agent(fan, tools=[double])
    assert "fanout(a,b)" in repr(agent)
    events = []
    async with agent.run_stream("?") as stream:
        async for event in stream:
            events.append(event)
    assert stream.result is not None and stream.result.text == "42"
    assert [(e.step, e.text) for e in events if isinstance(e, ModelTextDelta)] == [(1, "42")]

    cascade = Cascade([FakeBackend("c", ["sure: chained"])], selector=SureSelector())
    chain = Chain("over a cascade")
    step = chain.llm("ask", cascade, "Say {word}", word="it")
    assert (await chain.run())[step] == "sure: chained"


@pytest.mark.anyio
async def test_guards_around_a_fanout() -> None:
    flaky = FakeBackend("flaky", [Fail(error=BackendConnectionError), "ok"])
    guarded = guard(FanOut([flaky]), retry=NO_WAIT_RETRY, timeout=None)
    assert guarded.name == "fanout(flaky)"
    assert (await guarded.complete(REQ)).text == "ok"
    assert len(flaky.calls) == 2  # the retry guard retried the whole fan-out

    refused = bad_request("refused")
    no_retry = guard(FanOut([refused]), retry=NO_WAIT_RETRY, timeout=None)
    with pytest.raises(NoAnswerError):
        await no_retry.complete(REQ)
    assert len(refused.calls) == 1  # a 400 is not retried

    broken = FanOut([down("x"), down("y")])
    breaker = BreakerPolicy(failure_ratio=None, consecutive_failures=2, break_duration=60.0)
    tripping = guard(broken, retry=None, breaker=breaker, timeout=None)
    for _ in range(2):
        with pytest.raises(NoAnswerError):
            await tripping.complete(REQ)
    with pytest.raises(CircuitOpenError):
        await tripping.complete(REQ)


@pytest.mark.anyio
async def test_a_fallback_moves_past_a_failed_fanout() -> None:
    chain = Fallback([FanOut([down("a"), down("b")]), FakeBackend("backup", ["saved"])])
    assert (await chain.complete(REQ)).text == "saved"
    streamed = await collect_stream(chain.stream(REQ))
    assert streamed.text == "saved"


@pytest.mark.anyio
async def test_closing_a_composite_leaves_the_backends_passed_in_open() -> None:
    # whoever creates a backend owns it: composites close only what they created themselves
    a, b, c, agg, p = (FakeBackend(n) for n in ("a", "b", "c", "agg", "p"))
    given = FanOut([p])
    cascade = Cascade([a, b], selector=SureSelector())
    async with FanOut([cascade, Pool([c])]) as fan:
        await fan.complete(REQ)
    async with Synthesis(given, aggregator=agg), Synthesis([p], aggregator=agg):
        pass
    async with Fallback([a, b]), Pool([a, c]), cascade:
        pass
    assert not any(x.closed for x in (a, b, c, agg, p))
    # ... so they still answer afterwards, in new composites
    async with FanOut([cascade, Pool([c]), Fallback([agg])], mode="all") as fan:
        result = await fan.run(REQ)
    assert [x.status for x in result.candidates] == ["ok", "ok", "ok"]


class Spy:
    """Records which fan-outs are closed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.closed: list[FanOut] = []
        original = FanOut.aclose

        async def aclose(fan: FanOut) -> None:
            self.closed.append(fan)
            await original(fan)

        monkeypatch.setattr(FanOut, "aclose", aclose)


@pytest.mark.anyio
async def test_a_cascade_closes_the_fanouts_it_built_not_the_backends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = Spy(monkeypatch)
    small, large, own = FakeBackend("small"), FakeBackend("large"), FakeBackend("own")
    given = FanOut([own], name="given")
    cascade = Cascade([[small, small], large, given], selector=SureSelector())
    async with cascade:
        await cascade.run(REQ)
    built = [t for t in spy.closed if t.name != "given"]
    assert len(built) == len(spy.closed) == 2  # the list tier and the single-backend tier
    assert {tuple(f.names) for f in built} == {("small", "small#2"), ("large",)}
    assert not (small.closed or large.closed or own.closed)

    spy.closed.clear()
    moa = Synthesis([small, large], aggregator=own)
    async with moa:
        pass
    assert spy.closed == [moa.fanout] and not (small.closed or large.closed or own.closed)
    async with Synthesis(given, aggregator=own):
        pass
    assert spy.closed == [moa.fanout]  # the fan-out passed in stays open


@pytest.mark.anyio
async def test_owns_backends_hands_them_over_and_closes_each_once() -> None:
    a, b, c = FakeBackend("a"), FakeBackend("b"), FakeBackend("c")
    async with FanOut([a, b, Target(backend=a, name="again")], owns_backends=True):
        pass
    assert a.closed and b.closed and not c.closed
    d, e = FakeBackend("d"), FakeBackend("e")
    async with Pool([d, e], owns_backends=True), Fallback([c], owns_backends=True):
        pass
    assert c.closed and d.closed and e.closed


def test_the_docs_example_runs(tmp_path: Path) -> None:
    text = (Path(__file__).parent.parent / "docs" / "fanout.md").read_text()
    section = text.split("## Composites are backends", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    script = tmp_path / "composites.py"
    script.write_text(blocks[0])
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "('frugal', '17 * 3 = 51')" in out.stdout and "chosen: 51" in out.stdout


@pytest.mark.anyio
async def test_a_hedged_stream_over_a_pool_of_fanouts_goes_to_the_other_replica() -> None:
    """Each hedged attempt's stream (a fan-out's, which holds its task group across its events)
    is read in one task of its own; the hedge goes to the other replica."""
    import anyio

    from genfan.resilience import HedgePolicy

    stalled = Reply(text="stalled", latency=2.0, ttft=1.5)
    s1, s2 = FakeBackend("s1", [stalled]), FakeBackend("s2", [stalled])
    f1 = FakeBackend("f1", [Reply(text="from the other replica", latency=0.06, ttft=0.01)])
    f2 = FakeBackend("f2", [Reply(text="slower", latency=0.5, ttft=0.3)])
    replicas = [FanOut([s1, s2], mode="first"), FanOut([f1, f2], mode="first")]
    # No timeout guard: Timeout.stream reads each event under a scope of its own, which a
    # fan-out's stream cannot be read under (a separate fix).
    hedged = guard(
        Pool(replicas, strategy="round_robin"),
        hedge=HedgePolicy(delay=0.05, max_extra_ratio=1.0),
    )
    assert hedged.hedge is not None
    hedged.hedge.budget.deposit()
    with anyio.fail_after(1.0):
        completion = await collect_stream(hedged.stream(REQ))
    assert completion.text == "from the other replica" and completion.backend == "f1"
    assert hedged.hedge.statistics().hedge_wins == 1
    assert [len(f.calls) for f in (s1, s2, f1, f2)] == [1, 1, 1, 1]
    assert all(f.in_flight == 0 for f in (s1, s2, f1, f2))
    assert (s1.cancelled, s2.cancelled, f2.cancelled) == (1, 1, 1)
