"""The fan-out on both event loops in real time (asyncio and trio)."""

from __future__ import annotations

import pytest

from genfan import CallCancelledError, ChatRequest, FanOut, StreamEnd, TextDelta, collect_stream
from genfan.testing import FakeBackend

pytestmark = pytest.mark.anyio


async def test_first_mode_on_both_event_loops() -> None:
    fast = FakeBackend("fast", ["quick"], latency=0.01)
    slow = FakeBackend("slow", ["late"], latency=5)
    result = await FanOut([slow, fast], mode="first").run("hi")
    assert result.text == "quick"
    assert slow.cancelled == 1 and slow.in_flight == 0
    assert isinstance(result.candidates[0].error, CallCancelledError)
    assert result.elapsed < 5


async def test_streaming_fake_backend_yields_words_then_end() -> None:
    backend = FakeBackend("s", ["one two three"])
    events = [e async for e in backend.stream(ChatRequest.from_prompt("x"))]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "one two three"
    assert isinstance(events[-1], StreamEnd)
    completion = await collect_stream(backend.stream(ChatRequest.from_prompt("x")))
    assert completion.text == "one two three"
