"""Chains: the dependency graph, concurrency of independent steps, maps, joins, failure policies."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import BaseModel
from trio.testing import MockClock

from genfan import BackendConnectionError, ChatRequest, ConfigurationError, FanOut
from genfan.agents import (
    Chain,
    ChainFailedError,
    Input,
    LLMCall,
    StepTimeoutError,
    ToolArgumentsError,
    ToolError,
    tool,
)
from genfan.testing import Fail, FakeBackend, FunctionBackend, capture_events

mock_clock = pytest.mark.parametrize(
    "anyio_backend", [("trio", {"clock": MockClock(autojump_threshold=0)})]
)


def sleeper(seconds: float, log: list[tuple[str, float]] | None = None):  # type: ignore[no-untyped-def]
    async def step(x: object = None, name: str = "") -> object:
        if log is not None:
            log.append((f"start {name}", anyio.current_time()))
        await anyio.sleep(seconds)
        if log is not None:
            log.append((f"end {name}", anyio.current_time()))
        return x

    return step


# -- building ---------------------------------------------------------------------------------


def test_missing_and_unknown_inputs_are_rejected_when_declared() -> None:
    async def summarise(text: str, style: str = "short") -> str:
        return text

    chain = Chain("c")
    with pytest.raises(ConfigurationError, match=r"step 'sum' is missing input\(s\) 'text'"):
        chain.step("sum", summarise, style="long")
    with pytest.raises(
        ConfigurationError, match=r"has no parameter 'txt' \(its parameters: text, style\)"
    ):
        chain.step("sum", summarise, txt="x")
    chain.step("sum", summarise, text="x")
    with pytest.raises(ConfigurationError, match="already has a step named 'sum'"):
        chain.step("sum", summarise, text="y")
    other = Chain("other")
    ref = other.step("a", summarise, text="z")
    with pytest.raises(ConfigurationError, match="refers to step 'a' of another chain"):
        chain.step("b", summarise, text=ref)


def test_cycles_and_undefined_steps_are_rejected_at_build_naming_the_steps() -> None:
    async def f(x: object) -> object:
        return x

    chain = Chain("loopy")
    chain.step("a", f, x=chain.ref("c"))
    chain.step("b", f, x=chain.ref("a"))
    chain.step("c", f, x=chain.ref("b"))
    with pytest.raises(ConfigurationError, match="chain 'loopy' has a cycle: a -> c -> b -> a"):
        chain.compile()

    chain = Chain("gappy")
    chain.step("a", f, x=1)
    chain.step("b", f, x=chain.ref("summary"), after=["a", "nowhere"])
    with pytest.raises(
        ConfigurationError, match="step 'b' depends on 'summary', 'nowhere', which are not a step"
    ):
        chain.compile()

    chain = Chain("self")
    chain.step("a", f, x=chain.ref("a"))
    with pytest.raises(ConfigurationError, match="cycle: a -> a"):
        chain.compile()


@pytest.mark.anyio
async def test_missing_run_inputs_name_the_steps_that_need_them() -> None:
    async def f(x: object) -> object:
        return x

    chain = Chain("c")
    q = chain.input("q", str)
    chain.step("a", f, x=q)
    chain.step("b", f, x=Input("k", int, default=5))
    with pytest.raises(ConfigurationError, match=r"needs input 'q' \(used by step\(s\) 'a'\)"):
        await chain.run()
    with pytest.raises(ConfigurationError, match=r"unknown input\(s\) 'z'; its inputs: q, k"):
        await chain.run(q="x", z=1)
    result = await chain.run(q="x")
    assert result["a"] == "x" and result["b"] == 5


# -- running ----------------------------------------------------------------------------------


@mock_clock
@pytest.mark.anyio
async def test_independent_steps_run_at_once_and_dependants_as_soon_as_ready() -> None:
    log: list[tuple[str, float]] = []
    chain = Chain("research")
    q = chain.input("q", str)
    search = chain.step("search", sleeper(1.0, log), x=q, name="search")
    summarise = chain.step("summarise", sleeper(2.0, log), x=search, name="summarise")
    extract = chain.step("extract", sleeper(0.5, log), x=search, name="extract")
    side = chain.step("side", sleeper(2.5, log), x=q, name="side")
    merged = chain.join("merge", summary=summarise, facts=extract, side=side)
    result = await chain.run(q="llm compilers")

    t0 = log[0][1]
    times = {k: v - t0 for k, v in log}
    assert times["start search"] == times["start side"]  # roots together
    assert times["start summarise"] == times["start extract"] == pytest.approx(1.0)
    assert times["end extract"] == pytest.approx(1.5)  # did not wait for summarise
    assert result.elapsed == pytest.approx(3.0)  # critical path search+summarise, not the sum (6.0)
    assert result[merged] == {
        "summary": "llm compilers",
        "facts": "llm compilers",
        "side": "llm compilers",
    }
    rec = result.steps["merge"]
    assert rec.started == pytest.approx(3.0) and rec.status == "ok"
    assert list(result.steps) == ["search", "summarise", "extract", "side", "merge"]
    assert result.ok and result.status["summarise"] == "ok"


@mock_clock
@pytest.mark.anyio
async def test_eight_independent_tool_steps_take_one_step_of_time() -> None:
    @tool
    async def fetch(i: int) -> int:
        await anyio.sleep(0.1)
        return i

    chain = Chain("eight")
    refs = [chain.step(f"t{i}", fetch, i=i) for i in range(8)]
    joined = chain.join("all", *refs)
    result = await chain.run()
    assert result[joined] == tuple(range(8))
    assert result.elapsed == pytest.approx(0.1)  # sequential would be 0.8


@pytest.mark.anyio
async def test_independent_steps_are_running_at_the_same_time() -> None:
    n = 5
    inside = 0
    all_in = anyio.Event()

    async def meet(i: int) -> int:
        nonlocal inside
        inside += 1
        if inside == n:
            all_in.set()
        with anyio.fail_after(5):  # guards against a deadlock if they ran one by one
            await all_in.wait()
        return i

    chain = Chain("barrier")
    refs = [chain.step(f"s{i}", meet, i=i) for i in range(n)]
    total = chain.step(
        "total", lambda **kw: sum(kw.values()), inputs={f"s{i}": r for i, r in enumerate(refs)}
    )
    result = await chain.run()
    assert result[total] == sum(range(n))


@mock_clock
@pytest.mark.anyio
async def test_map_step_runs_items_concurrently_within_its_bound_and_keeps_order() -> None:
    running = 0
    peak = 0

    async def summarise(doc: str, style: str) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(1.0)
        running -= 1
        return f"{style}:{doc}"

    async def search(query: str) -> list[str]:
        return [f"{query}{i}" for i in range(7)]

    chain = Chain("map")
    hits = chain.step("search", search, query=Input("q"))
    summaries = chain.map("summaries", summarise, hits, max_concurrency=3, style="brief")
    result = await chain.run(q="doc")
    assert result[summaries] == [f"brief:doc{i}" for i in range(7)]
    assert peak == 3
    assert result.elapsed == pytest.approx(3.0)  # ceil(7 / 3) rounds of 1 s


@pytest.mark.anyio
async def test_map_over_a_constant_list_with_a_named_item_parameter() -> None:
    def scale(factor: int, value: int) -> int:
        return factor * value

    chain = Chain("m")
    out = chain.map("scaled", scale, [1, 2, 3], item_param="value", factor=10)
    assert (await chain.run())[out] == [10, 20, 30]
    with pytest.raises(ConfigurationError, match="also given as an input"):
        chain.map("bad", scale, [1], item_param="factor", factor=1)


@pytest.mark.anyio
async def test_a_failing_map_item_fails_the_step() -> None:
    async def check(n: int) -> int:
        if n == 2:
            raise ValueError("two")
        await anyio.lowlevel.checkpoint()
        return n

    chain = Chain("m", on_error="continue")
    out = chain.map("checked", check, [1, 2, 3])
    result = await chain.run()
    assert result.status["checked"] == "failed"
    err = result.errors["checked"]
    assert isinstance(err, ValueError)
    assert "item 1 of map step 'checked'" in err.__notes__
    with pytest.raises(KeyError, match="has no output"):
        result[out]


# -- failures ---------------------------------------------------------------------------------


@mock_clock
@pytest.mark.anyio
async def test_fail_policy_cancels_running_steps_and_raises_a_group() -> None:
    cancelled: list[str] = []

    async def slow(name: str) -> str:
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            cancelled.append(name)
            raise
        return name

    async def broken(name: str) -> str:
        await anyio.sleep(1)
        raise BackendConnectionError("search backend down", backend="search")

    chain = Chain("strict")
    a = chain.step("a", slow, name="a")
    b = chain.step("b", broken, name="b")
    chain.step("c", slow, name="c")
    chain.join("after_a", a)
    chain.join("after_b", b)
    start = anyio.current_time()
    with pytest.raises(ChainFailedError) as info:
        await chain.run()
    err = info.value
    assert "failed at step(s) 'b'" in str(err)
    assert sorted(cancelled) == ["a", "c"]
    assert anyio.current_time() - start == pytest.approx(1.0)  # did not wait for the slow steps
    status = err.result.status
    assert status == {
        "a": "cancelled",
        "b": "failed",
        "c": "cancelled",
        "after_a": "skipped",
        "after_b": "skipped",
    }
    # the group holds the step's own error, annotated with its step
    (inner,) = err.exceptions
    assert isinstance(inner, BackendConnectionError)
    assert "in step 'b' of chain 'strict'" in inner.__notes__
    try:
        raise err
    except* BackendConnectionError as group:
        assert len(group.exceptions) == 1


@pytest.mark.anyio
async def test_continue_policy_fails_only_the_dependants_of_a_failed_branch() -> None:
    async def ok(x: str) -> str:
        return x

    async def bad(x: str) -> str:
        raise RuntimeError("extraction failed")

    chain = Chain("tolerant", on_error="continue")
    q = chain.input("q", str)
    search = chain.step("search", ok, x=q)
    summary = chain.step("summarise", ok, x=search)
    facts = chain.step("extract", bad, x=search)
    tagged = chain.step("tag", ok, x=facts)
    report = chain.join("report", summary=summary, tags=tagged)
    polished = chain.step("polish", ok, x=summary)
    result = await chain.run(q="hi")

    assert result.status == {
        "search": "ok",
        "summarise": "ok",
        "extract": "failed",
        "tag": "skipped",
        "report": "skipped",
        "polish": "ok",
    }
    assert not result.ok
    assert result.steps["tag"].reason == "step(s) 'extract' did not succeed"
    assert result.steps["report"].reason == "step(s) 'tag' did not succeed"
    assert result[polished] == "hi" and result.get(report, "n/a") == "n/a"
    assert isinstance(result.errors["extract"], RuntimeError)
    assert set(result.outputs) == {"search", "summarise", "polish"}
    # the policy can be switched per run
    with pytest.raises(ChainFailedError):
        await chain.run(q="hi", on_error="fail")


@pytest.mark.anyio
async def test_cancelling_a_chain_cancels_every_running_step() -> None:
    n = 4
    started = 0
    all_started = anyio.Event()
    cancelled = 0

    async def block(i: int) -> int:
        nonlocal started, cancelled
        started += 1
        if started == n:
            all_started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled += 1
            raise
        return i

    chain = Chain("cancel")
    for i in range(n - 1):
        chain.step(f"b{i}", block, i=i)
    chain.map("mapped", block, [99])
    async with anyio.create_task_group() as tg:
        tg.start_soon(chain.run)
        await all_started.wait()
        tg.cancel_scope.cancel()
    assert cancelled == n


@mock_clock
@pytest.mark.anyio
async def test_step_timeout_and_retry() -> None:
    attempts = 0

    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await anyio.sleep(60)
        return "ok"

    async def hang() -> str:
        await anyio.sleep(3600)
        return "never"

    chain = Chain("t", on_error="continue")
    chain.step("flaky", flaky, timeout=2.0, retry=2)
    chain.step("hang", hang, timeout=5.0)
    result = await chain.run()
    assert result["flaky"] == "ok" and attempts == 2
    err = result.errors["hang"]
    assert isinstance(err, StepTimeoutError) and err.step == "hang"
    assert result.steps["hang"].elapsed == pytest.approx(5.0)


@pytest.mark.anyio
async def test_tool_steps_validate_their_inputs() -> None:
    @tool
    async def count(n: int) -> int:
        return n + 1

    chain = Chain("tools", on_error="continue")
    good = chain.step("good", count, n="41")  # coerced like model arguments
    chain.step("bad", count, n="many")
    result = await chain.run()
    assert result[good] == 42
    assert isinstance(result.errors["bad"], ToolArgumentsError)
    assert isinstance(result.errors["bad"], ToolError)


# -- LLM steps ------------------------------------------------------------------------------


class Facts(BaseModel):
    people: list[str]
    year: int


@pytest.mark.anyio
async def test_llm_steps_fill_templates_parse_models_and_use_fan_outs() -> None:
    def answer(request: ChatRequest) -> str:
        prompt = request.prompt
        if request.response_format is not None:
            return '{"people": ["Kim"], "year": 2023}'
        return f"summary of [{prompt}]"

    backend = FunctionBackend(answer, name="llm")
    fan = FanOut(
        [FakeBackend("x", replies=[Fail(error=BackendConnectionError("down"))]), backend],
        mode="first",
    )

    chain = Chain("llm")
    doc = chain.input("doc", str)
    summary = chain.llm("summarise", backend, "Summarise: {doc}", doc=doc, system="Be brief.")
    facts = chain.llm("extract", backend, "Facts in: {doc}", doc=doc, response_model=Facts)
    fanned = chain.llm("fan", fan, "Again: {text}", text=summary)
    result = await chain.run(doc="the paper")
    assert result[summary] == "summary of [Summarise: the paper]"
    assert result[facts] == Facts(people=["Kim"], year=2023)
    assert result[fanned] == "summary of [Again: summary of [Summarise: the paper]]"
    assert result.steps["summarise"].kind == "llm"

    with pytest.raises(ConfigurationError, match=r"missing input\(s\) 'doc'"):
        Chain().llm("x", backend, "Summarise: {doc}")
    with pytest.raises(ConfigurationError, match="must be named"):
        LLMCall(backend, "Summarise: {}")
    request = LLMCall(backend, "Hi {name}", system="S", temperature=0.1).request(name="Ann")
    assert request.messages[0].content == "S" and request.prompt == "Hi Ann"
    assert request.temperature == 0.1


@pytest.mark.anyio
async def test_spans_chain_parent_of_steps_linked_to_their_inputs(
    spans: InMemorySpanExporter,
) -> None:
    @tool
    async def search(q: str) -> str:
        return q

    async def merge(a: str, b: str) -> str:
        return a + b

    chain = Chain("traced")
    s = chain.step("search", search, q="x")
    t = chain.step("other", search, q="y")
    chain.step("merge", merge, a=s, b=t)
    await chain.run()
    finished = {sp.name: sp for sp in spans.get_finished_spans()}
    root = finished["chain traced"]
    steps = {n: finished[f"chain_step {n}"] for n in ("search", "other", "merge")}
    for sp in steps.values():
        assert sp.parent is not None and sp.parent.span_id == root.context.span_id
    # a tool call is a child of its step
    tool_spans = [sp for sp in spans.get_finished_spans() if sp.name == "execute_tool search"]
    assert {sp.parent.span_id for sp in tool_spans if sp.parent} == {
        steps["search"].context.span_id,
        steps["other"].context.span_id,
    }
    # the join links to the steps it waited for
    linked = {link.context.span_id for link in steps["merge"].links}
    assert linked == {steps["search"].context.span_id, steps["other"].context.span_id}
    assert root.attributes["genfan.chain.ok"] == 3


@pytest.mark.anyio
async def test_decorator_style_declares_steps_named_after_functions() -> None:
    chain = Chain("decorated")
    question = chain.input("question", str)

    @chain.task(query=question)
    async def search(query: str) -> list[str]:
        return [f"{query} {i}" for i in range(3)]

    @chain.task("counted", hits=search)
    def count(hits: list[str]) -> int:
        return len(hits)

    result = await chain.run(question="q")
    assert result[search] == ["q 0", "q 1", "q 2"]
    assert result[count] == 3
    assert chain.step_names == ["search", "counted"]


@pytest.mark.anyio
async def test_structlog_events_for_steps_and_the_chain() -> None:
    async def ok() -> int:
        return 1

    async def bad() -> int:
        raise RuntimeError("x")

    chain = Chain("logged", on_error="continue")
    chain.step("a", ok)
    b = chain.step("b", bad)
    chain.join("c", b)
    with capture_events() as events:
        await chain.run()
    by_name = {(e["event"], e.get("step")) for e in events}
    assert ("chain_step_finished", "a") in by_name
    assert ("chain_step_failed", "b") in by_name
    assert ("chain_step_skipped", "c") in by_name
    (done,) = [e for e in events if e["event"] == "chain_finished"]
    assert (done["ok"], done["failed"], done["skipped"]) == (1, 1, 1)
