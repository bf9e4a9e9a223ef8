"""Streaming a fan-out: live tokens, tagged candidates, early exit, deadline, real HTTP streams.

Every test runs on asyncio and on trio (the conftest's ``anyio_backend``), in real time: the
paced fakes' gaps (tens of milliseconds against hundreds) keep the orders exact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing

import anyio
import pytest

from genfan import (
    AllBackendsFailedError,
    AnswerChosen,
    BackendTimeoutError,
    BaseBackend,
    CallCancelledError,
    CandidateDelta,
    CandidateFinished,
    ChatRequest,
    Completion,
    FanOut,
    FanOutEvent,
    FanOutFinished,
    HTTPStatusError,
    NoAnswerError,
    StreamEnd,
    StreamEvent,
    TextDelta,
)
from genfan.testing import Fail, FakeBackend, Reply
from genfan.testserver import FakeLLMServer

pytestmark = pytest.mark.anyio

REQ = ChatRequest.from_prompt("Tell me something.")


def paced(name: str, text: str, *, ttft: float, latency: float) -> FakeBackend:
    """A fake that streams ``text`` word by word: the first word after ``ttft``."""
    return FakeBackend(name, [Reply(text=text, ttft=ttft, latency=latency)])


async def collect(fan: FanOut, request: ChatRequest | str = REQ) -> list[FanOutEvent]:
    async with fan.run_stream(request) as events:
        return [event async for event in events]


def deltas(events: list[FanOutEvent], index: int) -> str:
    return "".join(e.text for e in events if isinstance(e, CandidateDelta) and e.index == index)


def finished(events: list[FanOutEvent]) -> dict[str, CandidateFinished]:
    return {e.backend: e for e in events if isinstance(e, CandidateFinished)}


class BreaksMidStream(BaseBackend):
    """Streams two pieces, then fails (a dropped connection, a 502 mid-stream)."""

    def __init__(self, name: str = "flaky", *, gap: float = 0.05) -> None:
        super().__init__(name)
        self.gap = gap
        self.closed_streams = 0

    async def complete(self, request: ChatRequest) -> Completion:
        raise HTTPStatusError("stream broke", status_code=502, backend=self.name)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        try:
            yield TextDelta(text="par")
            await anyio.sleep(self.gap)
            yield TextDelta(text="tial")
            await anyio.sleep(self.gap)
            raise HTTPStatusError("stream broke", status_code=502, backend=self.name)
        finally:
            self.closed_streams += 1


# -- first mode ----------------------------------------------------------------------------------


async def test_first_mode_first_token_wins_and_the_losers_streams_are_closed() -> None:
    fast = paced("fast", "alpha beta gamma", ttft=0.02, latency=0.3)
    slow = paced("slow", "one two three", ttft=0.25, latency=0.5)
    broken = FakeBackend("broken", [Fail(error=HTTPStatusError("no", status_code=500))])
    fan = FanOut([slow, broken, fast], mode="first")

    events = await collect(fan)

    # only the winner's pieces, live; the loser is cancelled at the winner's first token
    assert [e.index for e in events if isinstance(e, CandidateDelta)] == [2, 2, 2]
    assert deltas(events, 2) == "alpha beta gamma"
    order = [(e.type, getattr(e, "backend", None)) for e in events]
    assert order.index(("candidate", "slow")) < order.index(("delta", "fast")) + 2
    assert order.index(("candidate", "slow")) < order.index(("candidate", "fast"))
    ends = finished(events)
    assert ends["broken"].candidate.status == "failed"  # failed first: skipped, not a winner
    assert ends["slow"].candidate.status == "cancelled"
    assert isinstance(ends["slow"].candidate.error, CallCancelledError)
    assert slow.cancelled == 1 and slow.in_flight == 0  # its stream was really closed
    assert isinstance(events[-2], AnswerChosen) and events[-2].backend == "fast"
    last = events[-1]
    assert isinstance(last, FanOutFinished)
    assert last.result.text == "alpha beta gamma" and last.result.mode == "first"
    assert last.result.completion.ttft is not None and last.result.completion.ttft < 0.2


async def test_first_mode_stream_passes_the_winners_tokens_on_live() -> None:
    fast = paced("fast", "alpha beta gamma", ttft=0.02, latency=0.4)
    slow = paced("slow", "one two", ttft=0.3, latency=0.5)
    fan = FanOut([slow, fast], mode="first")
    start = anyio.current_time()
    seen: list[tuple[float, StreamEvent]] = []
    async with aclosing(fan.stream(REQ)) as events:
        async for event in events:
            seen.append((anyio.current_time() - start, event))
    texts = [e.text for _, e in seen if isinstance(e, TextDelta)]
    assert texts == ["alpha", " beta", " gamma"]
    assert seen[0][0] < 0.2  # the first token arrives long before the answer is complete
    end = seen[-1][1]
    assert isinstance(end, StreamEnd) and end.completion.backend == "fast"
    assert slow.cancelled == 1

    # closing the stream early cancels the winner too
    fan = FanOut([paced("w", "a b c d e f", ttft=0.01, latency=2.0)], mode="first")
    async with aclosing(fan.stream(REQ)) as events:
        async for _event in events:
            break
    winner = fan.targets[0].backend
    assert isinstance(winner, FakeBackend)
    assert winner.cancelled == 1 and winner.in_flight == 0


# -- all mode ------------------------------------------------------------------------------------


async def test_all_mode_tags_every_candidate_as_its_pieces_arrive() -> None:
    a = paced("a", "alpha beta gamma", ttft=0.02, latency=0.62)  # pieces .02 .22 .42, end .62
    b = paced("b", "one two", ttft=0.12, latency=0.32)  # pieces .12 .22, end .32
    fan = FanOut([a, b])

    events = await collect(fan)

    tagged = [(e.index, e.backend, e.text) for e in events if isinstance(e, CandidateDelta)]
    assert [t for t in tagged if t[0] == 0] == [
        (0, "a", "alpha"),
        (0, "a", " beta"),
        (0, "a", " gamma"),
    ]
    assert [t for t in tagged if t[0] == 1] == [(1, "b", "one"), (1, "b", " two")]
    # live and interleaved: a starts, b streams while a does, b ends before a's last piece
    assert tagged[0] == (0, "a", "alpha") and tagged[-1] == (0, "a", " gamma")
    assert tagged[1] == (1, "b", "one")
    order = [(e.type, getattr(e, "backend", None)) for e in events]
    last_a = max(i for i, step in enumerate(order) if step == ("delta", "a"))
    assert order.index(("candidate", "b")) < last_a
    assert order[-3:] == [("candidate", "a"), ("chosen", "b"), ("final", None)]
    chosen = events[-2]
    assert isinstance(chosen, AnswerChosen) and chosen.index == 1  # b finished first
    result = events[-1].result  # type: ignore[union-attr]
    assert [c.text for c in result.candidates] == ["alpha beta gamma", "one two"]
    assert all(c.completion.ttft is not None for c in result.candidates)


async def test_all_mode_stream_gives_the_chosen_answer_once_selected() -> None:
    a = paced("a", "alpha beta", ttft=0.02, latency=0.3)
    b = paced("b", "one two", ttft=0.1, latency=0.15)
    fan = FanOut([a, b], select=lambda request, candidates: 0)  # the slower one
    start = anyio.current_time()
    first_at: float | None = None
    pieces: list[str] = []
    async with aclosing(fan.stream(REQ)) as events:
        async for event in events:
            if first_at is None:
                first_at = anyio.current_time() - start
            if isinstance(event, TextDelta):
                pieces.append(event.text)
            elif isinstance(event, StreamEnd):
                assert event.completion.backend == "a"
    assert pieces == ["alpha", " beta"]  # the chosen candidate's own pieces
    assert first_at is not None and first_at >= 0.25  # not before the selector chose


# -- early exit ------------------------------------------------------------------------------------


async def test_quorum_agreement_cancels_the_rest_while_streaming() -> None:
    a = paced("a", "42", ttft=0.03, latency=0.05)
    b = paced("b", "42", ttft=0.05, latency=0.1)
    c = paced("c", "it is 7 I think", ttft=0.01, latency=2.0)  # streams early, never finishes
    fan = FanOut([a, b, c], mode="quorum", quorum=2, agree=lambda comp: comp.text)
    start = anyio.current_time()

    events = await collect(fan)

    assert anyio.current_time() - start < 1.0
    assert deltas(events, 2).startswith("it")  # c's pieces were passed on while it ran
    ends = finished(events)
    assert ends["c"].candidate.status == "cancelled"
    assert isinstance(ends["c"].candidate.error, CallCancelledError)
    assert c.cancelled == 1 and c.in_flight == 0
    order = [e.type for e in events]
    assert order.index("chosen") > max(i for i, e in enumerate(events) if e.type == "candidate")
    result = events[-1].result  # type: ignore[union-attr]
    assert result.quorum_met and result.text == "42"
    assert [x.status for x in result.candidates] == ["ok", "ok", "cancelled"]


async def test_leaving_the_block_early_cancels_every_call() -> None:
    a = paced("a", "alpha beta gamma delta", ttft=0.02, latency=1.0)
    b = paced("b", "one two three four", ttft=0.03, latency=1.0)
    start = anyio.current_time()
    async with FanOut([a, b]).run_stream(REQ) as events:
        async for event in events:
            if isinstance(event, CandidateDelta):
                break
    assert anyio.current_time() - start < 0.5
    assert a.cancelled == b.cancelled == 1 and a.in_flight == b.in_flight == 0


# -- deadline and failures -------------------------------------------------------------------------


async def test_the_deadline_cancels_the_unfinished_streams() -> None:
    fast = paced("fast", "done", ttft=0.02, latency=0.05)
    slow = paced("slow", "still talking on and on", ttft=0.02, latency=5.0)
    fan = FanOut([fast, slow], deadline=0.3)
    start = anyio.current_time()

    events = await collect(fan)

    assert anyio.current_time() - start < 1.5
    assert deltas(events, 1).startswith("still")
    ends = finished(events)
    assert ends["slow"].candidate.status == "cancelled"
    assert isinstance(ends["slow"].candidate.error, BackendTimeoutError)
    assert slow.cancelled == 1 and slow.in_flight == 0
    result = events[-1].result  # type: ignore[union-attr]
    assert result.deadline_hit and result.text == "done"

    # a deadline that cuts the only answer short fails the stream
    only_slow = FanOut(
        [paced("s", "a b c d e f", ttft=0.01, latency=5.0)], mode="first", deadline=0.1
    )
    with pytest.raises(NoAnswerError) as info:
        async with aclosing(only_slow.stream(REQ)) as stream:
            async for _ in stream:
                pass
    assert isinstance(info.value.__cause__, AllBackendsFailedError)
    with pytest.raises(AllBackendsFailedError):
        async with only_slow.run_stream(REQ, deadline=0.05) as events_:
            async for _ in events_:
                pass


async def test_a_candidate_failing_mid_stream_is_a_failed_candidate() -> None:
    flaky = BreaksMidStream()
    steady = paced("steady", "all good here", ttft=0.03, latency=0.3)

    events = await collect(FanOut([flaky, steady]))

    assert deltas(events, 0) == "partial"  # its pieces were passed on before it broke
    ends = finished(events)
    failed = ends["flaky"].candidate
    assert failed.status == "failed" and isinstance(failed.error, HTTPStatusError)
    assert failed.error.status_code == 502 and flaky.closed_streams == 1
    result = events[-1].result  # type: ignore[union-attr]
    assert result.text == "all good here"

    # in first mode a winner that breaks mid-stream fails the stream (its tokens were sent)
    first = FanOut(
        [BreaksMidStream(gap=0.05), paced("late", "x", ttft=0.5, latency=0.6)], mode="first"
    )
    pieces: list[str] = []
    with pytest.raises(NoAnswerError) as info:
        async with aclosing(first.stream(REQ)) as stream:
            async for ev in stream:
                if isinstance(ev, TextDelta):
                    pieces.append(ev.text)
    assert pieces == ["par", "tial"]
    assert [type(e) for e in info.value.errors] == [HTTPStatusError, CallCancelledError]


# -- composites ------------------------------------------------------------------------------------


async def test_a_composite_nested_in_a_streaming_fanout_streams_too() -> None:
    x = paced("x", "inner fast answer", ttft=0.02, latency=0.2)
    y = paced("y", "inner slow answer", ttft=0.3, latency=0.6)
    inner = FanOut([x, y], mode="first", name="inner")
    z = paced("z", "outer answer", ttft=0.05, latency=0.3)
    outer = FanOut([inner, z])

    events = await collect(outer)

    # the inner fan-out's winner streams live through the outer one
    assert deltas(events, 0) == "inner fast answer"
    assert deltas(events, 1) == "outer answer"
    assert y.cancelled == 1 and y.in_flight == 0
    result = events[-1].result  # type: ignore[union-attr]
    assert [c.backend for c in result.candidates] == ["inner", "z"]
    assert result.candidates[0].completion.backend == "x"

    # an outer race cancels a nested fan-out mid-stream: its own calls are closed
    a = paced("a", "nested a b c d", ttft=0.2, latency=2.0)
    b = paced("b", "nested e f g h", ttft=0.25, latency=2.0)
    quick = paced("quick", "quick", ttft=0.02, latency=0.05)
    race = FanOut([FanOut([a, b], name="nested"), quick], mode="first")
    events = await collect(race)
    assert finished(events)["nested"].candidate.status == "cancelled"
    assert a.cancelled == b.cancelled == 1 and a.in_flight == b.in_flight == 0


# -- over real HTTP --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


async def test_streaming_fanout_over_real_http(server: FakeLLMServer) -> None:
    from genfan_providers.anthropic import AnthropicBackend
    from genfan_providers.openai import OpenAIBackend

    server.reset()
    server.chunk_delay = 0.01
    server.set_latency(0.0)
    server.set_latency(1.0, model="slow-gpt")
    server.set_latency(1.0, model="slow-claude")
    before = server.abandoned
    prompt = "one two three four five six"
    try:
        async with (
            OpenAIBackend("fast-gpt", base_url=server.url, api_key="sk-local") as fast,
            OpenAIBackend("slow-gpt", base_url=server.url, api_key="sk-local") as slow,
            AnthropicBackend("slow-claude", base_url=server.url, api_key="sk-ant-local") as claude,
        ):
            fan = FanOut([slow, claude, fast], mode="first")
            pieces: list[str] = []
            async with aclosing(fan.stream(ChatRequest.from_prompt(prompt))) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        pieces.append(event.text)
                    elif isinstance(event, StreamEnd):
                        assert event.completion.backend == "openai:fast-gpt"
            assert "".join(pieces) == f"echo: {prompt}" and len(pieces) > 3
            # the losers' requests were abandoned: their connections closed mid-request
            for _ in range(300):
                if server.abandoned >= before + 2:
                    break
                await anyio.sleep(0.01)
            assert server.abandoned == before + 2

            # all mode over HTTP: every candidate tagged, both providers streaming
            server.set_latency(0.0, model="slow-gpt")
            server.set_latency(0.0, model="slow-claude")
            async with FanOut([slow, claude]).run_stream(prompt) as stream:
                got = [e async for e in stream]
            assert deltas(got, 0) == deltas(got, 1) == f"echo: {prompt}"
            assert stream.result is not None and len(stream.result.successes) == 2
    finally:
        server.chunk_delay = 0.0
        server.reset()
