"""Spans with GenAI attributes and structlog events from a fan-out."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from genfan import AllBackendsFailedError, BackendError, ChatRequest, FanOut
from genfan.testing import Fail, FakeBackend, capture_events


@pytest.mark.anyio
async def test_fanout_emits_parent_and_child_spans(spans: InMemorySpanExporter) -> None:
    ok = FakeBackend("ok", ["hello world"])
    bad = FakeBackend("bad", [Fail(error=BackendError("down"))])
    await FanOut([ok, bad]).run(ChatRequest.from_prompt("hi", model="m1", temperature=0.3))
    finished = {s.name: s for s in spans.get_finished_spans()}
    fan = finished["genfan.fanout"]
    calls = [s for s in spans.get_finished_spans() if s.name == "chat m1"]
    assert len(calls) == 2
    assert all(c.parent is not None and c.parent.span_id == fan.context.span_id for c in calls)
    ok_span = next(c for c in calls if c.attributes["genfan.backend"] == "ok")
    assert ok_span.attributes["gen_ai.request.model"] == "m1"
    assert ok_span.attributes["gen_ai.usage.output_tokens"] == 2
    bad_span = next(c for c in calls if c.attributes["genfan.backend"] == "bad")
    assert bad_span.attributes["error.type"] == "BackendError"
    assert fan.attributes["genfan.fanout.chosen"] == "ok"


@pytest.mark.anyio
async def test_fanout_logs_call_and_outcome_events() -> None:
    with capture_events() as events:
        await FanOut(
            [FakeBackend("ok", ["x"]), FakeBackend("bad", [Fail(error=BackendError("no"))])]
        ).run("hi")
    names = [e["event"] for e in events]
    assert "backend_call_finished" in names and "backend_call_failed" in names
    finished = next(e for e in events if e["event"] == "fanout_finished")
    assert finished["chosen"] == "ok" and finished["successes"] == 1
    # every event of one fan-out carries the same request id
    assert len({e["request_id"] for e in events}) == 1


@pytest.mark.anyio
async def test_capture_sees_debug_events_under_an_app_level_filter() -> None:
    from genfan.telemetry import configure_logging

    configure_logging("error")
    with capture_events() as events:
        await FanOut([FakeBackend("ok", ["x"])]).run("hi")
    assert "backend_call_finished" in [e["event"] for e in events]


@pytest.mark.anyio
async def test_api_key_never_reaches_spans_or_events(spans: InMemorySpanExporter) -> None:
    import httpx
    import respx
    from genfan_providers.openai import OpenAIBackend

    key = "sk-test-SECRET-0123456789"
    backend = OpenAIBackend("gpt-test", base_url="https://llm.invalid/v1", api_key=key)
    with respx.mock, capture_events() as events:
        respx.post("https://llm.invalid/v1/chat/completions").mock(
            side_effect=[
                httpx.Response(
                    200,
                    json={
                        "id": "x",
                        "model": "gpt-test",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "hi"},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
                    },
                ),
                httpx.Response(401, json={"error": {"message": f"bad key {key}"}}),
            ]
        )
        await FanOut([backend]).run("hello")
        with pytest.raises(AllBackendsFailedError) as info:
            await FanOut([backend]).run("hello")
    await backend.aclose()
    dumped = " ".join(
        [repr(e) for e in events]
        + [
            str(dict(s.attributes or {})) + str([ev.attributes for ev in s.events])
            for s in spans.get_finished_spans()
        ]
    )
    assert events and spans.get_finished_spans()
    assert key not in dumped
    assert key not in str(info.value) and key not in repr(info.value.exceptions)


@pytest.mark.anyio
async def test_fanout_records_call_duration_and_token_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each backend call of a fan-out lands in the GenAI client metrics: its duration (a
    failure with its error type) and its tokens by type (answers only)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from genfan import telemetry

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    # A local meter provider (the global one can be set once per process).
    monkeypatch.setattr(telemetry, "get_meter", lambda: provider.get_meter("t"))
    instruments = telemetry._Instruments()
    monkeypatch.setattr(telemetry, "instruments", lambda: instruments)

    ok = FakeBackend("ok", ["hello world"])
    bad = FakeBackend("bad", [Fail(error=BackendError("down"))])
    await FanOut([ok, bad]).run(ChatRequest.from_prompt("hi there"))
    await FanOut([ok]).run("hi")

    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, list[Any]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)

    durations = {
        (p.attributes["genfan.backend"], p.attributes.get("error.type")): p
        for p in points["gen_ai.client.operation.duration"]
    }
    assert set(durations) == {("ok", None), ("bad", "BackendError")}
    assert durations["ok", None].count == 2
    assert durations["bad", "BackendError"].count == 1
    assert durations["ok", None].sum > 0
    assert durations["bad", "BackendError"].attributes["gen_ai.operation.name"] == "chat"

    tokens = {
        (p.attributes["genfan.backend"], p.attributes["gen_ai.token.type"]): (p.count, p.sum)
        for p in points["gen_ai.client.token.usage"]
    }
    # FakeBackend counts words: "hi there" and "hi" in, "hello world" twice out; a failure
    # records no tokens
    assert tokens == {("ok", "input"): (2, 3), ("ok", "output"): (2, 4)}
