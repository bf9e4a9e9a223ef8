"""Property tests: thousands of concurrent calls with random latencies and failures.

In flight never exceeds the bulkhead limit, and every call ends as exactly one result or one
typed error: nothing lost, nothing doubled. Runs on trio's mock clock, so simulated seconds are
free.
"""

from __future__ import annotations

import random

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from genfan import (
    BackendConnectionError,
    BackendError,
    BackendTimeoutError,
    ChatRequest,
    Completion,
    HTTPStatusError,
    RateLimitError,
    collect_stream,
)
from genfan.resilience import (
    BreakerPolicy,
    BulkheadPolicy,
    HedgePolicy,
    Pool,
    RetryPolicy,
    TimeoutPolicy,
    guard,
)
from genfan.testing import Fail, FakeBackend, Reply

REQ = ChatRequest.from_prompt("hi")
ERRORS: list[BackendError] = [
    BackendConnectionError("reset"),
    HTTPStatusError("oops", status_code=503),
    HTTPStatusError("bad", status_code=400),
    RateLimitError("slow down", retry_after=0.5),
    BackendTimeoutError("slow"),
]


def script(rng: random.Random, failure_rate: float, max_latency: float) -> FakeBackend:
    def reply(request: ChatRequest) -> Reply | Fail:
        latency = rng.uniform(0.0, max_latency)
        if rng.random() < failure_rate:
            return Fail(error=rng.choice(ERRORS), latency=latency)
        # Streams send their first word after ``ttft`` and the other two over the rest.
        return Reply(text="ok ok ok", latency=latency, ttft=rng.uniform(0.0, latency))

    return FakeBackend("fake", reply)


def run_trio(fn, *args):  # type: ignore[no-untyped-def]
    return anyio.run(
        fn, *args, backend="trio", backend_options={"clock": MockClock(autojump_threshold=0)}
    )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    calls=st.integers(200, 2000),
    max_concurrent=st.integers(1, 16),
    max_queued=st.integers(0, 50),
    failure_rate=st.floats(0.0, 0.9),
    max_latency=st.floats(0.0, 5.0),
    hedge=st.booleans(),
    deadline=st.one_of(st.none(), st.floats(0.5, 30.0)),
    stream=st.booleans(),
)
def test_bulkhead_bound_and_exactly_one_outcome(
    seed: int,
    calls: int,
    max_concurrent: int,
    max_queued: int,
    failure_rate: float,
    max_latency: float,
    hedge: bool,
    deadline: float | None,
    stream: bool,
) -> None:
    """Also for streams (hedged on their first token): each read to its end or to one error."""
    rng = random.Random(seed)
    fake = script(rng, failure_rate, max_latency)
    guarded = guard(
        fake,
        bulkhead=BulkheadPolicy(
            max_concurrent=max_concurrent, max_queued=max_queued, max_queue_wait=2.0
        ),
        breaker=BreakerPolicy(minimum_throughput=5, break_duration=1.0),
        retry=RetryPolicy(attempts=3, initial=0.1),
        timeout=TimeoutPolicy(timeout=3.0),
        hedge=HedgePolicy(delay=1.0, max_extra_ratio=0.5) if hedge else None,
        rng=random.Random(seed),
    )
    outcomes: list[list[object]] = [[] for _ in range(calls)]

    async def one(i: int) -> None:
        await anyio.sleep(rng.uniform(0, 10))
        try:
            with anyio.fail_after(deadline) if deadline else _nothing():
                if stream:
                    outcomes[i].append(await collect_stream(guarded.stream(REQ)))
                else:
                    outcomes[i].append(await guarded.complete(REQ))
        except BackendError as exc:
            outcomes[i].append(exc)
        except TimeoutError:
            outcomes[i].append("deadline")

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(calls):
                tg.start_soon(one, i)

    run_trio(main)
    assert fake.max_in_flight <= max_concurrent
    assert all(len(o) == 1 for o in outcomes)  # exactly one outcome per call
    assert all(isinstance(o[0], Completion | BackendError) or o[0] == "deadline" for o in outcomes)
    assert all(o[0].text == "ok ok ok" for o in outcomes if isinstance(o[0], Completion))
    assert fake.in_flight == 0
    assert guarded.bulkhead is not None
    stats = guarded.bulkhead.statistics()
    assert stats.running == 0 and stats.queued == 0


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), replicas=st.integers(2, 5), calls=st.integers(100, 1500))
def test_pool_of_guarded_replicas_never_loses_a_call(seed: int, replicas: int, calls: int) -> None:
    rng = random.Random(seed)
    fakes = [script(rng, rng.uniform(0, 0.8), 1.0) for _ in range(replicas)]
    limit = 4
    pool = Pool(
        [guard(f, bulkhead=BulkheadPolicy(max_concurrent=limit, max_queued=8)) for f in fakes],
        rng=random.Random(seed),
    )
    done = [0] * calls

    async def one(i: int) -> None:
        try:
            await pool.complete(REQ)
        except BackendError:
            pass
        done[i] += 1

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(calls):
                tg.start_soon(one, i)

    run_trio(main)
    assert done == [1] * calls
    assert all(f.max_in_flight <= limit and f.in_flight == 0 for f in fakes)
    assert all(r.outstanding == 0 for r in pool.statistics())
