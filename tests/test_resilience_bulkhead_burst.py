"""A burst through the default guard stack is served, not shed.

5,000 calls started at once over three backends used to fail 4,712 times with
``BulkheadFullError`` (32 running + 64 queued per backend), where the openai SDK, LiteLLM and
LangChain complete the same burst, only later. The default bulkhead now queues every call in
memory (waiting is bounded by the caller's deadline, never by a queue length) and sheds only
when asked (``BulkheadPolicy(max_queued=N)`` or ``max_queue_wait``).
"""

from __future__ import annotations

import anyio
import pytest
from trio.testing import MockClock

from genfan import BulkheadFullError, ChatRequest, create_backend
from genfan.resilience import BulkheadPolicy, GuardedBackend, guard
from genfan.testing import FakeBackend

CALLS = 5_000
REQ = ChatRequest.from_prompt("hi")
MOCK_TRIO = ("trio", {"clock": MockClock(autojump_threshold=0)})


async def burst(stacks: list[GuardedBackend], calls: int = CALLS) -> tuple[int, list[Exception]]:
    """Start ``calls`` calls at once, spread over ``stacks``: (answers, failures)."""
    answers = 0
    failures: list[Exception] = []

    async def call(i: int) -> None:
        nonlocal answers
        try:
            await stacks[i % len(stacks)].complete(REQ)
        except Exception as exc:
            failures.append(exc)
        else:
            answers += 1

    async with anyio.create_task_group() as tg:
        for i in range(calls):
            tg.start_soon(call, i)
    return answers, failures


def test_the_default_bulkhead_caps_at_1000_and_queues_without_limit() -> None:
    policy = BulkheadPolicy()
    assert (policy.max_concurrent, policy.max_queued, policy.max_queue_wait) == (1000, None, None)


@pytest.mark.anyio
async def test_5000_calls_at_once_through_the_default_guards_all_succeed() -> None:
    fakes = [FakeBackend(f"b{i}", latency=0.01) for i in range(3)]
    stacks = [guard(f) for f in fakes]
    answers, failures = await burst(stacks)
    assert failures == []
    assert answers == CALLS
    for fake, stack in zip(fakes, stacks, strict=True):
        assert fake.max_in_flight == 1000  # one cap per backend, reached and never passed
        assert stack.bulkhead is not None
        stats = stack.bulkhead.statistics()
        assert (stats.running, stats.queued, stats.rejected) == (0, 0, 0)
    admitted = [s.bulkhead.statistics().admitted for s in stacks if s.bulkhead is not None]
    assert sum(admitted) == CALLS


@pytest.mark.anyio
async def test_5000_calls_at_once_through_create_backend_all_succeed() -> None:
    stacks = [create_backend("fake:m", name=f"b{i}", latency=0.01) for i in range(3)]
    assert all(isinstance(s, GuardedBackend) for s in stacks)
    answers, failures = await burst(stacks)  # type: ignore[arg-type]
    assert (answers, failures) == (CALLS, [])


@pytest.mark.anyio
async def test_max_queued_sheds_the_rest_at_once() -> None:
    shed = BulkheadPolicy(max_concurrent=64, max_queued=100)
    fakes = [FakeBackend(f"b{i}", latency=0.2) for i in range(3)]
    stacks = [guard(f, bulkhead=shed) for f in fakes]
    start = anyio.current_time()
    answers, failures = await burst(stacks)
    assert all(isinstance(e, BulkheadFullError) for e in failures)
    # every call arrived before any finished: 64 ran and 100 queued per backend, the rest shed
    assert answers == 3 * (64 + 100)
    assert len(failures) == CALLS - answers
    assert sum(f.completed for f in fakes) == answers  # a shed call never reached its backend
    rejected = [s.bulkhead.statistics().rejected for s in stacks if s.bulkhead is not None]
    assert sum(rejected) == len(failures)
    assert anyio.current_time() - start < 5.0  # shed at once, not after waiting


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", [MOCK_TRIO])
async def test_a_queued_call_waits_until_its_deadline_not_for_a_queue_length() -> None:
    fake = FakeBackend("b", latency=1.0)
    stack = guard(fake, bulkhead=BulkheadPolicy(max_concurrent=64))
    outcomes: list[str] = []

    async def call() -> None:
        with anyio.move_on_after(2.5) as scope:
            await stack.complete(REQ)
            outcomes.append("answered")
        if scope.cancelled_caught:
            outcomes.append("deadline")

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(call)
    # two waves of 64 fit in 2.5 s; the others waited (no BulkheadFullError) until the deadline
    assert outcomes.count("answered") == 128
    assert outcomes.count("deadline") == 72
    assert stack.bulkhead is not None
    stats = stack.bulkhead.statistics()
    assert (stats.running, stats.queued, stats.rejected) == (0, 0, 0)
