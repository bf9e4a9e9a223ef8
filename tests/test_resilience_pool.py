"""Load-balanced pools: strategies, peak-EWMA, probing new replicas, skipping open breakers."""

from __future__ import annotations

import random
from collections import Counter

import anyio
import pytest
from trio.testing import MockClock

from genfan import BackendConnectionError, ChatRequest, CircuitOpenError, ConfigurationError
from genfan.resilience import (
    BreakerPolicy,
    BulkheadPolicy,
    CircuitBreaker,
    Hedge,
    HedgePolicy,
    Pool,
    guard,
)
from genfan.testing import Fail, FakeBackend, Reply

REQ = ChatRequest.from_prompt("hi")


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


async def run_load(pool: Pool, calls: int, concurrency: int) -> Counter[str]:
    served: Counter[str] = Counter()
    limiter = anyio.Semaphore(concurrency)

    async def one() -> None:
        async with limiter:
            c = await pool.complete(REQ)
            served[c.backend] += 1

    async with anyio.create_task_group() as tg:
        for _ in range(calls):
            tg.start_soon(one)
    return served


@pytest.mark.anyio
async def test_round_robin_and_weighted_are_exact() -> None:
    backends = [FakeBackend(n) for n in "abc"]
    rr = Pool(backends, strategy="round_robin")
    names = [(await rr.complete(REQ)).backend for _ in range(6)]
    assert names == ["a", "b", "c", "a", "b", "c"]
    weighted = Pool(backends, strategy="weighted", weights=[5, 1, 1])
    names = [(await weighted.complete(REQ)).backend for _ in range(7)]
    assert Counter(names) == {"a": 5, "b": 1, "c": 1}
    assert names[:3] == ["a", "a", "b"] or names.count("a") == 5  # smooth, not bursty


@pytest.mark.anyio
async def test_a_hedge_through_a_pool_goes_to_another_replica() -> None:
    slow = FakeBackend("a", ["slow"], latency=10.0)
    fast = FakeBackend("b", ["fast"], latency=0.5)
    # The weights alone would send the hedge to "a" again (smooth weighted: a, a, ..., b).
    pool = Pool([slow, fast], strategy="weighted", weights=[100, 1])
    hedged = Hedge(pool, HedgePolicy(delay=1.0, max_extra_ratio=1.0))
    hedged.budget.deposit()
    start = anyio.current_time()
    completion = await hedged.complete(REQ)
    assert completion.backend == "b" and anyio.current_time() - start == pytest.approx(1.5)
    assert len(slow.calls) == 1 and slow.cancelled == 1 and len(fast.calls) == 1
    # Outside a hedge, nothing is avoided: the weights decide.
    assert [(await pool.complete(REQ)).backend for _ in range(3)] == ["a", "a", "a"]


@pytest.mark.anyio
async def test_least_outstanding_prefers_idle_replica() -> None:
    slow, fast = FakeBackend("slow", latency=10.0), FakeBackend("fast", latency=0.1)
    pool = Pool([slow, fast], strategy="least_outstanding", rng=random.Random(1))
    served = await run_load(pool, 200, concurrency=4)
    assert served["fast"] > 5 * served["slow"]


def server(name: str, service: float, slots: int) -> FakeBackend:
    """A replica like a real model server: ``slots`` requests at a time, the rest queue."""
    gate: list[anyio.Semaphore] = []

    async def script(request: ChatRequest) -> Reply:
        if not gate:
            gate.append(anyio.Semaphore(slots))
        async with gate[0]:
            await anyio.sleep(service)
        return Reply(text="x")

    return FakeBackend(name, script)


@pytest.mark.anyio
async def test_p2c_peak_ewma_twice_as_slow_gets_about_half() -> None:
    pool = Pool([server("slow", 0.2, 2), server("fast", 0.1, 2)], rng=random.Random(5))
    served = await run_load(pool, 3000, concurrency=4)
    ratio = served["slow"] / served["fast"]
    assert 0.4 <= ratio <= 0.6, served


@pytest.mark.anyio
async def test_p2c_equal_replicas_are_even() -> None:
    backends = [FakeBackend(n, latency=0.1) for n in "abc"]
    pool = Pool(backends, rng=random.Random(11))
    served = await run_load(pool, 3000, concurrency=9)
    assert max(served.values()) - min(served.values()) <= 0.05 * 1000, served


@pytest.mark.anyio
async def test_new_replica_is_probed_not_flooded() -> None:
    old = FakeBackend("old", latency=0.1)
    new = FakeBackend("new", latency=5.0)
    pool = Pool([old, new], rng=random.Random(2))
    # warm the old replica's history only
    for _ in range(3):
        pool._replicas[0].observe(0.1, anyio.current_time(), 10.0)
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(pool.complete, REQ)
        await anyio.sleep(1.0)
        assert new.in_flight == 1  # one probe, the rest go to the replica with history


@pytest.mark.anyio
async def test_open_breaker_replicas_are_skipped_and_all_open_raises() -> None:
    bad = FakeBackend("bad", [Fail(error=BackendConnectionError)])
    good = FakeBackend("good")
    policy = BreakerPolicy(minimum_throughput=1, failure_ratio=1.0, break_duration=30.0)
    guarded_bad = guard(bad, breaker=policy, retry=None, bulkhead=None)
    pool = Pool([guarded_bad, guard(good, retry=None)], strategy="round_robin")
    with pytest.raises(BackendConnectionError):
        await pool.complete(REQ)  # round robin picks bad first; its breaker opens
    assert guarded_bad.breaker is not None and guarded_bad.breaker.state == "open"
    before = len(bad.calls)
    for _ in range(10):
        assert (await pool.complete(REQ)).backend == "good"
    assert len(bad.calls) == before
    assert pool.statistics()[0].skipped == 10

    only_bad = Pool(
        [CircuitBreaker(FakeBackend("x", [Fail(error=BackendConnectionError)]), policy)]
    )
    with pytest.raises(BackendConnectionError):
        await only_bad.complete(REQ)
    with pytest.raises(CircuitOpenError) as info:
        await only_bad.complete(REQ)
    assert info.value.retry_after == pytest.approx(30.0)


@pytest.mark.anyio
async def test_refused_replica_moves_to_the_next() -> None:
    busy = FakeBackend("busy", latency=10.0)
    guarded_busy = guard(busy, bulkhead=BulkheadPolicy(max_concurrent=1, max_queued=0), retry=None)
    spare = FakeBackend("spare")
    pool = Pool([guarded_busy, spare], strategy="round_robin")
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.complete, REQ)  # takes busy's only slot
        await anyio.sleep(0.1)
        pool._next = 0
        assert (await pool.complete(REQ)).backend == "spare"
        tg.cancel_scope.cancel()


def test_pool_validation() -> None:
    with pytest.raises(ConfigurationError, match=r"at least one replica"):
        Pool([])
    with pytest.raises(ConfigurationError, match=r"strategy"):
        Pool([FakeBackend()], strategy="random")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"weights"):
        Pool([FakeBackend(), FakeBackend()], weights=[1])


@pytest.mark.anyio
async def test_a_pool_leaves_its_replicas_to_their_owner() -> None:
    a, b = FakeBackend("a"), FakeBackend("b")
    async with Pool([a, b]) as pool:
        await pool.complete(REQ)
    assert not (a.closed or b.closed)  # whoever creates a backend owns it
    async with Pool([a, b]) as again:  # so they serve the next pool
        await again.complete(REQ)
    async with Pool([a, b, a], owns_backends=True):  # handed over: each closed once
        pass
    assert a.closed and b.closed


def test_a_pool_answers_sync_code() -> None:
    pool = Pool([FakeBackend("a", ["from a"])], strategy="round_robin")
    assert pool.complete_sync(REQ).text == "from a"
    with pytest.raises(TypeError, match=r"use 'async with'.*complete_sync"):
        with pool:  # type: ignore[attr-defined]
            pass
