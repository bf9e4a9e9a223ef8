"""A fan-out that stays up while its backends misbehave (runs offline, in about a second).

Three backends: a healthy one, a flaky one (30% of calls fail with 503s or 429s carrying
Retry-After) and one that is down. Each is wrapped in genfan's guard stack; the flaky one is also
a pool of two replicas, whose stacks share one retry budget (one object, given to both), and the
dead one sits in a fallback chain. Twenty fan-outs later every request has been answered, the
dead backend's breaker is open (so it is no longer called), and the retries and their budget are
visible in the statistics.

    python examples/resilient_fanout.py
"""

from __future__ import annotations

import random

import anyio

from genfan import BackendConnectionError, ChatRequest, FanOut, HTTPStatusError, RateLimitError
from genfan.resilience import (
    BreakerPolicy,
    Fallback,
    Pool,
    RetryBudget,
    RetryBudgetPolicy,
    RetryPolicy,
    guard,
)
from genfan.testing import Fail, FakeBackend, Reply


def flaky(name: str, seed: int) -> FakeBackend:
    rng = random.Random(seed)

    def reply(request: ChatRequest) -> Reply | Fail:
        roll = rng.random()
        if roll < 0.15:
            return Fail(error=HTTPStatusError("service unavailable", status_code=503))
        if roll < 0.30:
            return Fail(error=RateLimitError("slow down", retry_after=0.01))
        return Reply(text=f"answer from {name}", latency=0.01)

    return FakeBackend(name, reply)


async def main() -> None:
    retry = RetryPolicy(attempts=3, initial=0.01, max_delay=0.05)
    breaker = BreakerPolicy(minimum_throughput=3, failure_ratio=0.5, break_duration=30.0)

    healthy = guard(FakeBackend("healthy", ["answer from healthy"], latency=0.01), retry=retry)
    # The replicas share one provider key: one retry budget for both (20% extra load, 1/s floor).
    budget = RetryBudget(RetryBudgetPolicy(ratio=0.2, min_per_second=1.0))
    replicas = Pool(
        [
            guard(flaky("flaky-a", 1), retry=retry, retry_budget=budget),
            guard(flaky("flaky-b", 2), retry=retry, retry_budget=budget),
        ],
        name="flaky-pool",
    )
    down = FakeBackend("down", [Fail(error=BackendConnectionError("connection refused"))])
    guarded_down = guard(down, retry=retry, breaker=breaker)
    chain = Fallback([guarded_down, guard(FakeBackend("spare", ["answer from spare"]))])

    answered = 0
    async with FanOut([healthy, replicas, chain], mode="all", deadline=2.0) as fan:
        for i in range(20):
            result = await fan.run(f"question {i}")
            answered += bool(result.successes)

    stats = guarded_down.statistics()
    assert stats.breaker is not None
    print(f"answered {answered}/20 fan-outs")
    print(
        f"down: breaker {stats.breaker.state}, reached {len(down.calls)} times, "
        f"refused {stats.breaker.rejected} calls"
    )
    for replica in replicas.replicas:
        s = replica.statistics()  # type: ignore[attr-defined]
        print(
            f"{replica.name}: {s.retry.retries} retries, "
            f"{s.retry.budget_exhausted} refused by the shared retry budget"
        )
    print("pool shares:", {r.name: r.calls for r in replicas.statistics()})


if __name__ == "__main__":
    anyio.run(main)
