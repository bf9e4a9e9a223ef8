"""Circuit breaker: exact break durations, half-open probes and retry_after, on a mock clock."""

from __future__ import annotations

import math

import anyio
import pytest
from trio.testing import MockClock

from genfan import (
    BackendConnectionError,
    BulkheadFullError,
    ChatRequest,
    CircuitOpenError,
    ConfigurationError,
    HTTPStatusError,
)
from genfan.resilience import BreakerPolicy, CircuitBreaker
from genfan.testing import Fail, FakeBackend, Reply, capture_events

REQ = ChatRequest.from_prompt("hi")


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


class Switch:
    """A script whose health can be flipped."""

    def __init__(self) -> None:
        self.healthy = False
        self.error: type[Exception] | Exception = BackendConnectionError

    def __call__(self, request: ChatRequest) -> Reply | Fail:
        return Reply(text="ok") if self.healthy else Fail(error=self.error)  # type: ignore[arg-type]


async def fail_n(breaker: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        with pytest.raises((BackendConnectionError, HTTPStatusError)):
            await breaker.complete(REQ)


@pytest.mark.anyio
async def test_opens_at_failure_ratio_after_minimum_throughput() -> None:
    switch = Switch()
    fake = FakeBackend("b", switch)
    breaker = CircuitBreaker(
        fake, BreakerPolicy(minimum_throughput=4, failure_ratio=0.5, break_duration=7.0)
    )
    switch.healthy = True
    await breaker.complete(REQ)
    await breaker.complete(REQ)
    switch.healthy = False
    await fail_n(breaker, 1)
    assert breaker.state == "closed"  # 1/3 failed, below the minimum throughput
    opened_at = anyio.current_time()
    await fail_n(breaker, 1)  # 2/4 = 0.5 -> open
    assert breaker.state == "open"
    assert breaker.retry_at == pytest.approx(opened_at + 7.0)
    calls = len(fake.calls)
    await anyio.sleep(2.5)
    with pytest.raises(CircuitOpenError) as info:
        await breaker.complete(REQ)
    assert info.value.retry_after == pytest.approx(4.5)
    assert info.value.retry_at == pytest.approx(opened_at + 7.0)
    assert info.value.backend == "b"
    assert len(fake.calls) == calls  # an open circuit never calls the backend
    assert breaker.statistics().rejected == 1


@pytest.mark.anyio
async def test_half_open_admits_exactly_the_probes_then_closes() -> None:
    switch = Switch()
    probe_gate = anyio.Event()

    async def script(request: ChatRequest) -> Reply | Fail:
        if switch.healthy:
            await probe_gate.wait()
            return Reply(text="ok")
        return Fail(error=BackendConnectionError)

    fake = FakeBackend("b", script)
    breaker = CircuitBreaker(
        fake,
        BreakerPolicy(
            minimum_throughput=2, failure_ratio=1.0, break_duration=5.0, half_open_probes=2
        ),
    )
    await fail_n(breaker, 2)
    assert breaker.state == "open"
    await anyio.sleep(5.0)
    assert breaker.state == "half_open"
    switch.healthy = True
    results: list[str] = []

    async def call() -> None:
        try:
            results.append((await breaker.complete(REQ)).text)
        except CircuitOpenError as exc:
            results.append(f"open {exc.retry_after}")

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(call)
        await anyio.sleep(0.1)
        assert fake.in_flight == 2  # exactly half_open_probes reached the backend
        probe_gate.set()
    assert sorted(results) == ["ok", "ok", "open 0.0", "open 0.0", "open 0.0"]
    assert breaker.state == "closed"


@pytest.mark.anyio
async def test_failed_probe_reopens_with_growing_break() -> None:
    fake = FakeBackend("b", [Fail(error=BackendConnectionError)])
    policy = BreakerPolicy(
        consecutive_failures=1,
        failure_ratio=None,
        break_duration=2.0,
        break_duration_growth=3.0,
        break_duration_max=10.0,
    )
    breaker = CircuitBreaker(fake, policy)
    durations = []
    for _ in range(4):
        await fail_n(breaker, 1)  # the first opens; later ones are failed probes
        t0 = anyio.current_time()
        assert breaker.state == "open"
        assert breaker.retry_at is not None
        durations.append(breaker.retry_at - t0)
        await anyio.sleep(breaker.retry_at - t0)
    assert durations == pytest.approx([2.0, 6.0, 10.0, 10.0])


@pytest.mark.anyio
async def test_consecutive_failures_mode() -> None:
    switch = Switch()
    breaker = CircuitBreaker(
        FakeBackend("b", switch), BreakerPolicy(failure_ratio=None, consecutive_failures=3)
    )
    await fail_n(breaker, 2)
    switch.healthy = True
    await breaker.complete(REQ)  # resets the run
    switch.healthy = False
    await fail_n(breaker, 2)
    assert breaker.state == "closed"
    await fail_n(breaker, 1)
    assert breaker.state == "open"


@pytest.mark.anyio
async def test_client_errors_do_not_count_by_default() -> None:
    fake = FakeBackend("b", [Fail(error=HTTPStatusError("bad request", status_code=400))])
    breaker = CircuitBreaker(fake, BreakerPolicy(minimum_throughput=2, failure_ratio=0.5))
    await fail_n(breaker, 10)
    assert breaker.state == "closed"
    stats = breaker.statistics()
    assert stats.failures == 0 and stats.calls == 10


@pytest.mark.anyio
async def test_counts_can_be_error_types() -> None:
    fake = FakeBackend("b", [Fail(error=HTTPStatusError("nope", status_code=404))])
    breaker = CircuitBreaker(
        fake, BreakerPolicy(minimum_throughput=2, failure_ratio=0.5, counts=(HTTPStatusError,))
    )
    await fail_n(breaker, 2)
    assert breaker.state == "open"


@pytest.mark.anyio
async def test_not_sent_errors_are_not_recorded() -> None:
    fake = FakeBackend("b", [Fail(error=BulkheadFullError)])
    breaker = CircuitBreaker(fake, BreakerPolicy(minimum_throughput=1, failure_ratio=0.1))
    for _ in range(5):
        with pytest.raises(BulkheadFullError):
            await breaker.complete(REQ)
    assert breaker.state == "closed"
    assert breaker.statistics().calls == 0


@pytest.mark.anyio
async def test_slow_calls_open_the_circuit() -> None:
    fake = FakeBackend("b", [Reply(text="slow", latency=3.0)])
    breaker = CircuitBreaker(
        fake,
        BreakerPolicy(minimum_throughput=3, slow_call_duration=2.0, slow_call_ratio=1.0),
    )
    for _ in range(3):
        await breaker.complete(REQ)
    assert breaker.state == "open"


@pytest.mark.anyio
async def test_time_window_forgets_old_failures() -> None:
    switch = Switch()
    breaker = CircuitBreaker(
        FakeBackend("b", switch),
        BreakerPolicy(
            window="time", sampling_duration=10.0, minimum_throughput=3, failure_ratio=1.0
        ),
    )
    await fail_n(breaker, 2)
    await anyio.sleep(10.0)  # both leave the window
    await fail_n(breaker, 2)
    assert breaker.state == "closed"
    assert breaker.statistics().calls == 2
    await fail_n(breaker, 1)
    assert breaker.state == "open"


@pytest.mark.anyio
async def test_count_window_keeps_the_last_n() -> None:
    switch = Switch()
    breaker = CircuitBreaker(
        FakeBackend("b", switch),
        BreakerPolicy(window="count", window_size=4, minimum_throughput=4, failure_ratio=0.75),
    )
    await fail_n(breaker, 2)
    switch.healthy = True
    for _ in range(4):
        await breaker.complete(REQ)  # pushes the failures out of the window
    switch.healthy = False
    await fail_n(breaker, 2)
    assert breaker.state == "closed"  # 2/4
    await fail_n(breaker, 1)
    assert breaker.state == "open"  # 3/4


@pytest.mark.anyio
async def test_isolate_and_close_by_hand_with_events_and_listeners() -> None:
    fake = FakeBackend("b")
    breaker = CircuitBreaker(fake)
    seen: list[tuple[str, str]] = []
    breaker.add_listener(lambda old, new, b: seen.append((old, new)))
    with capture_events() as events:
        breaker.isolate()
        with pytest.raises(CircuitOpenError) as info:
            await breaker.complete(REQ)
        assert info.value.retry_after == math.inf
        await anyio.sleep(3600)
        assert breaker.state == "isolated"
        breaker.close()
        assert (await breaker.complete(REQ)).text == "ok"
    assert seen == [("closed", "isolated"), ("isolated", "closed")]
    names = [e["event"] for e in events]
    assert names == ["breaker_isolated", "breaker_rejected", "breaker_closed"]
    assert events[0]["backend"] == "b"


@pytest.mark.anyio
async def test_disabled_breaker_lets_everything_through_and_records_nothing() -> None:
    fake = FakeBackend("b", [Fail(error=BackendConnectionError("down"))])
    breaker = CircuitBreaker(fake, BreakerPolicy(minimum_throughput=2, consecutive_failures=2))
    with capture_events() as events:
        breaker.disable()
        for _ in range(20):
            with pytest.raises(BackendConnectionError):
                await breaker.complete(REQ)
        assert breaker.state == "disabled" and breaker.available()
        assert len(fake.calls) == 20 and breaker.statistics().calls == 0
        breaker.close()
        for _ in range(2):
            with pytest.raises(BackendConnectionError):
                await breaker.complete(REQ)
    assert breaker.state == "open"  # enabled again: two failures open it
    names = [e["event"] for e in events]
    assert names == ["breaker_disabled", "breaker_closed", "breaker_opened"]


@pytest.mark.anyio
async def test_state_change_events_on_open_and_recovery() -> None:
    switch = Switch()
    breaker = CircuitBreaker(
        FakeBackend("b", switch), BreakerPolicy(minimum_throughput=2, break_duration=1.0)
    )
    with capture_events() as events:
        await fail_n(breaker, 2)
        await anyio.sleep(1.0)
        switch.healthy = True
        await breaker.complete(REQ)
    names = [e["event"] for e in events]
    assert names == ["breaker_opened", "breaker_half_open", "breaker_closed"]
    opened = events[0]
    assert opened["break_duration"] == 1.0 and opened["failures"] == 2
    assert opened["log_level"] == "warning"


@pytest.mark.anyio
async def test_cancelled_probe_frees_its_slot() -> None:
    switch = Switch()
    breaker = CircuitBreaker(
        FakeBackend("b", switch, latency=0.0),
        BreakerPolicy(minimum_throughput=1, break_duration=1.0),
    )
    await fail_n(breaker, 1)
    await anyio.sleep(1.0)
    switch.healthy = True
    fake = breaker.inner
    assert isinstance(fake, FakeBackend)
    fake.latency = 10.0
    with anyio.move_on_after(1.0):
        await breaker.complete(REQ)  # the probe is cancelled
    assert breaker.state == "half_open"
    fake.latency = 0.0
    assert (await breaker.complete(REQ)).text == "ok"
    assert breaker.state == "closed"


def test_policy_validation_names_the_field() -> None:
    with pytest.raises(ConfigurationError, match=r"BreakerPolicy.failure_ratio must be .*> 0"):
        BreakerPolicy(failure_ratio=0.0)
    with pytest.raises(ConfigurationError, match=r"break_duration_max"):
        BreakerPolicy(break_duration=5, break_duration_max=1)
    with pytest.raises(ConfigurationError, match=r"failure_ratio .* or consecutive_failures"):
        BreakerPolicy(failure_ratio=None)
    with pytest.raises(ConfigurationError, match=r"window must be one of"):
        BreakerPolicy(window="rolling")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"minimum_throughput must be <= window_size"):
        BreakerPolicy(window="count", window_size=5, minimum_throughput=10)
    with pytest.raises(TypeError):
        BreakerPolicy(0.5)  # type: ignore[misc]
