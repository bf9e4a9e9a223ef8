"""Sync entry points (``run_sync``, ``complete_sync``), misuse errors, and one-line reprs.

``run_sync`` must work from plain sync code and from inside a running event loop (asyncio and
trio, as a notebook or an ``asyncio.run`` caller would call it), keep one backend usable across
any number of calls (an HTTP backend's connections outlive a single event loop), carry the
caller's context variables, and hand exceptions back unchanged.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from genfan import (
    AllBackendsFailedError,
    BackendConnectionError,
    BaseBackend,
    Cascade,
    ChatRequest,
    Completion,
    FanOut,
    FanOutResult,
    Synthesis,
    ToolCall,
    create_backend,
)
from genfan.agents import Agent, Chain, ChainResult, tool
from genfan.resilience import Fallback, Pool, guard
from genfan.select import MajorityVote
from genfan.testing import Fail, FakeBackend, FunctionBackend, Reply
from genfan.testserver import FakeLLMServer

REQ = ChatRequest.from_prompt("hi")
LONG = "The capital of France is Paris, which has been the seat of government for centuries."


def fan() -> FanOut:
    return FanOut([FakeBackend("a", ["alpha"]), FakeBackend("b", ["beta"], latency=0.01)])


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


# -- from plain sync code --------------------------------------------------------------------


def test_every_entry_point_has_a_sync_twin_from_plain_code() -> None:
    result = fan().run_sync("q", deadline=5)
    assert isinstance(result, FanOutResult) and result.text == "alpha"
    assert len(result.candidates) == 2

    assert FakeBackend("x", ["ex"]).complete_sync(REQ).text == "ex"
    assert Pool([FakeBackend("p", ["pooled"])]).complete_sync(REQ).text == "pooled"
    assert guard(FakeBackend("g", ["guarded"])).complete_sync(REQ).text == "guarded"
    chain_of_two = Fallback(
        [FakeBackend("d", [Fail(error=BackendConnectionError)]), FakeBackend("u")]
    )
    assert chain_of_two.complete_sync(REQ).text == "ok"

    vote = MajorityVote()
    cascade = Cascade(
        [[FakeBackend("s", ["7"])], FakeBackend("l", ["7"])], selector=vote.selector()
    )
    assert cascade.run_sync("q").text == "7"
    assert cascade.complete_sync(REQ).text == "7"

    moa = Synthesis([FakeBackend("p1", ["one"])], aggregator=FakeBackend("agg", ["merged"]))
    assert moa.run_sync("q").text == "merged"

    model = FakeBackend(
        "m",
        [Reply(tool_calls=(ToolCall(id="1", name="double", arguments='{"x": 21}'),)), "42"],
    )

    @tool
    def double(x: int) -> int:
        """Double x."""
        return 2 * x

    agent_result = Agent(model, tools=[double]).run_sync("double 21")
    assert agent_result.text == "42" and agent_result.tool_calls[0].value == 42

    chain = Chain("c")
    question = chain.input("question", str)
    shout = chain.step("shout", lambda text: text.upper(), text=question)
    chained = chain.run_sync(question="hey")
    assert isinstance(chained, ChainResult) and chained[shout] == "HEY"
    assert chain.run_sync({"question": "ho"}, on_error="continue")[shout] == "HO"


def test_an_http_backend_made_once_serves_many_sync_calls(server: FakeLLMServer) -> None:
    # A fresh event loop per call would break here: httpx keeps keep-alive connections bound
    # to the loop that opened them ("Event loop is closed" on the second call).
    backend = create_backend("openai:m", base_url=server.url, api_key="k")
    for _ in range(3):
        assert backend.complete_sync(REQ).text == "echo: hi"
    fanout = FanOut([backend, FakeBackend("local", ["x"], latency=0.05)])
    for _ in range(3):
        result = fanout.run_sync("hello")
        assert result.chosen is not None and result.chosen.backend.startswith("openai")


@pytest.mark.anyio
async def test_an_http_backend_serves_many_async_fanouts(server: FakeLLMServer) -> None:
    # closing a fan-out no longer closes the backends it was given
    backend = create_backend("openai:m", base_url=server.url, api_key="k")
    async with backend:
        for _ in range(3):
            async with FanOut([backend, FakeBackend("local")]) as fanout:
                result = await fanout.run("hi")
            assert [c.status for c in result.candidates] == ["ok", "ok"]


def test_the_callers_context_variables_are_carried() -> None:
    tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="none")
    seen: list[str] = []

    def answer(request: ChatRequest) -> str:
        seen.append(tenant.get())
        tenant.set("changed inside")  # local to the call
        return "ok"

    token = tenant.set("acme")
    try:
        FunctionBackend(answer).complete_sync(REQ)
    finally:
        tenant.reset(token)
    assert seen == ["acme"] and tenant.get() == "none"


# -- exceptions come back unchanged ----------------------------------------------------------


class Broken(BaseBackend):
    def __init__(self, error: BaseException) -> None:
        super().__init__("broken")
        self.error = error

    async def complete(self, request: ChatRequest) -> Completion:
        raise self.error


def test_exceptions_propagate_unchanged() -> None:
    error = ValueError("bad input")
    with pytest.raises(ValueError, match="bad input") as info:
        Broken(error).complete_sync(REQ)
    assert info.value is error

    down = [FakeBackend(f"d{i}", [Fail(error=BackendConnectionError)]) for i in range(2)]
    with pytest.raises(AllBackendsFailedError) as failed:
        FanOut(down).run_sync("q")
    assert [type(e) for e in failed.value.exceptions] == [BackendConnectionError] * 2

    # a BaseException raised inside the call reaches the caller and leaves the loop serving
    with pytest.raises(KeyboardInterrupt):
        Broken(KeyboardInterrupt()).complete_sync(REQ)
    assert FakeBackend("after").complete_sync(REQ).text == "ok"


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX interval timers")
def test_ctrl_c_while_waiting_cancels_the_call() -> None:
    slow = FakeBackend("slow", ["late"], latency=30)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        with pytest.raises(KeyboardInterrupt):
            slow.complete_sync(REQ)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    deadline = time.monotonic() + 5
    while slow.cancelled == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert slow.cancelled == 1 and slow.in_flight == 0


# -- from inside a running event loop --------------------------------------------------------


@pytest.mark.anyio
async def test_run_sync_inside_a_running_loop(anyio_backend: str) -> None:
    # as a notebook cell or a sync helper called from async code would: blocks this loop,
    # runs on genfan's own
    result = fan().run_sync("q")
    assert result.text == "alpha"
    assert FakeBackend("x", ["ex"]).complete_sync(REQ).text == "ex"
    with pytest.raises(AllBackendsFailedError):
        FanOut([FakeBackend("d", [Fail(error=BackendConnectionError)])]).run_sync("q")
    # the caller's loop still works afterwards
    assert (await fan().run("q")).text == "alpha"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_run_sync_under_anyio_run(backend: str) -> None:
    async def main() -> str:
        return fan().run_sync("q").text

    assert anyio.run(main, backend=backend) == "alpha"


def test_run_sync_under_asyncio_run() -> None:
    async def main() -> str:
        agent = Agent(FakeBackend("m", ["done"]))
        return agent.run_sync("go").text

    assert asyncio.run(main()) == "done"


def test_run_sync_from_genfan_own_loop_does_not_deadlock() -> None:
    # a backend that calls sync code which calls run_sync again, on genfan's loop thread
    inner = FakeBackend("inner", ["nested"])

    def outer(request: ChatRequest) -> str:
        return "outer+" + inner.complete_sync(request).text

    assert FunctionBackend(outer).complete_sync(REQ).text == "outer+nested"


def test_run_sync_from_many_threads_at_once() -> None:
    # 1 s a call, so all 8 threads are in a call at once even on a slow, loaded machine.
    backend = FakeBackend("shared", ["ok"], latency=1.0)
    out: list[str] = []

    def worker() -> None:
        out.append(backend.complete_sync(REQ).text)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == ["ok"] * 8
    assert backend.max_in_flight == 8  # they ran concurrently on the one loop


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_its_own_loop() -> None:
    assert FakeBackend().complete_sync(REQ).text == "ok"  # the parent's loop is running
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = 0 if FakeBackend("c", ["child"]).complete_sync(REQ).text == "child" else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# -- misuse: with instead of async with, a forgotten await ---------------------------------


def test_with_instead_of_async_with_says_what_to_do() -> None:
    for obj, method in [
        (fan(), "run_sync"),
        (Cascade([FakeBackend("a")], selector=MajorityVote().selector()), "run_sync"),
        (FakeBackend("x"), "complete_sync"),
        (Pool([FakeBackend("p")]), "complete_sync"),
        (Fallback([FakeBackend("f")]), "complete_sync"),
        (guard(FakeBackend("g")), "complete_sync"),
    ]:
        with pytest.raises(TypeError) as info:
            with obj:  # type: ignore[attr-defined]
                pass
        message = str(info.value)
        assert "\n" not in message
        assert "'async with'" in message and f".{method}()" in message
        assert message.startswith(type(obj).__name__)


@pytest.mark.anyio
async def test_a_forgotten_await_is_named() -> None:
    f = fan()
    pending = f.run("q")
    with pytest.raises(TypeError, match=r"FanOut\.run\(\) got a coroutine .*forget 'await'"):
        await f.run(pending)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="forget 'await'"):
        await f.map([f.run("q")])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"Agent\.run\(\) got a coroutine"):
        await Agent(FakeBackend()).run(f.run("q"))  # type: ignore[arg-type]
    chain = Chain("c")
    chain.step("s", lambda text: text, text=chain.input("text"))
    with pytest.raises(TypeError, match=r"Chain\.run\(\) input 'text' got a coroutine"):
        await chain.run(text=f.run("q"))
    moa = Synthesis([FakeBackend("p")], aggregator=FakeBackend("a"))
    with pytest.raises(TypeError, match=r"Synthesis\.run\(\) got a coroutine"):
        await moa.run(f.run("q"))  # type: ignore[arg-type]


def test_a_forgotten_await_warns_no_more(recwarn: pytest.WarningsRecorder) -> None:
    async def main() -> None:
        f = fan()
        with pytest.raises(TypeError):
            await f.run(f.run("q"))  # type: ignore[arg-type]

    anyio.run(main)
    import gc

    gc.collect()
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


# -- one-line reprs ------------------------------------------------------------------------


def test_results_print_on_one_short_line() -> None:
    f = FanOut(
        [FakeBackend("big", [LONG * 50]), FakeBackend("down", [Fail(error=BackendConnectionError)])]
    )
    result = f.run_sync("q")
    text = repr(result)
    assert text.startswith("FanOutResult(chosen='big', text='The capital of France is Paris")
    assert "ok=1/2" in text and "mode='all'" in text and "elapsed=" in text
    assert "\n" not in text and len(text) < 200
    for c in result.candidates:
        assert "\n" not in repr(c) and len(repr(c)) < 200
    assert "error='BackendConnectionError: scripted" in repr(result.candidates[1])
    assert len(repr(result.selection)) < 200

    cascade = Cascade([FakeBackend("s", [LONG * 50])], selector=MajorityVote().selector())
    assert repr(cascade.run_sync("q")).startswith("CascadeResult(chosen='s', text='The capital")
    assert len(repr(cascade.run_sync("q"))) < 250

    moa = Synthesis([FakeBackend("p", [LONG])], aggregator=FakeBackend("agg", [LONG * 50]))
    synthesis = repr(moa.run_sync("q"))
    assert synthesis.startswith("SynthesisResult(aggregator='agg', text='The capital")
    assert "proposals=1/1" in synthesis and len(synthesis) < 200

    agent = repr(Agent(FakeBackend("m", [LONG * 50])).run_sync("q"))
    assert agent.startswith("AgentResult(text='The capital") and len(agent) < 200

    chain = Chain("c")
    chain.step("big", lambda: {"rows": list(range(10_000))})
    chained = chain.run_sync()
    assert repr(chained).startswith("ChainResult(chain='c', ok=1/1") and len(repr(chained)) < 200
    assert len(repr(chained.steps["big"])) < 200
    json.dumps(repr(chained))  # plain text
