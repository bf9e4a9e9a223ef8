"""Issue 4's figure: hedging at the learned p95 against a backend whose calls are 1% 10x slower.

Run: ``.venv/bin/python -m benchmarks.resilience_hedge [--quick]``.

Open-loop load (Poisson arrivals, 400/s). A ``FakeBackend`` sleeps (real time, ``anyio.sleep``) ``base`` seconds (+-5% jitter) per call,
and 10x that for a random 1% of calls. The same seeded workload is run without hedging and
through ``Hedge(HedgePolicy(percentile=0.95, max_extra_ratio=0.05))``, which learns the delay
from the backend's latencies. Reported: p50/p99/p99.9 latency, the p99 cut, and the extra
requests hedging sent (hedges / calls).

Prints a table and writes ``benchmarks/results/resilience_hedge.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from genfan import ChatRequest
from genfan.backend import Backend
from genfan.resilience import Hedge, HedgePolicy
from genfan.testing import FakeBackend, Reply

RESULTS = Path(__file__).parent / "results"
REQUEST = ChatRequest.from_prompt("hi")


def slow_backend(seed: int, base: float) -> FakeBackend:
    rng = random.Random(seed)

    def reply(request: ChatRequest) -> Reply:
        latency = base * rng.uniform(0.95, 1.05)
        if rng.random() < 0.01:
            latency *= 10
        return Reply(text="ok", latency=latency)

    return FakeBackend("tail", reply)


def quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


async def run(backend: Backend, calls: int, rate: float, seed: int) -> list[float]:
    """Open-loop load: ``calls`` requests arriving at ``rate`` per second (Poisson)."""
    latencies: list[float] = []
    arrivals = random.Random(seed + 1)

    async def one() -> None:
        start = time.perf_counter()
        await backend.complete(REQUEST)
        latencies.append(time.perf_counter() - start)

    async with anyio.create_task_group() as tg:
        for _ in range(calls):
            tg.start_soon(one)
            await anyio.sleep(arrivals.expovariate(rate))
    return sorted(latencies)


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "p50_ms": quantile(latencies, 0.50) * 1e3,
        "p99_ms": quantile(latencies, 0.99) * 1e3,
        "p999_ms": quantile(latencies, 0.999) * 1e3,
        "max_ms": latencies[-1] * 1e3,
    }


async def bench(calls: int, rate: float, base: float, seed: int) -> dict[str, Any]:
    plain_backend = slow_backend(seed, base)
    plain = summary(await run(plain_backend, calls, rate, seed))
    inner = slow_backend(seed, base)
    hedge = Hedge(inner, HedgePolicy(percentile=0.95, max_extra_ratio=0.05, budget_ttl=60.0))
    hedged = summary(await run(hedge, calls, rate, seed))
    stats = hedge.statistics()
    return {
        "calls": calls,
        "arrivals_per_s": rate,
        "base_ms": base * 1e3,
        "no_hedge": plain,
        "hedge": hedged,
        "p99_cut": plain["p99_ms"] / hedged["p99_ms"],
        "p999_cut": plain["p999_ms"] / hedged["p999_ms"],
        "extra_requests_pct": stats.extra_ratio * 100,
        "hedge_wins": stats.hedge_wins,
        "hedges_sent": stats.hedges_sent,
        "budget_refused": stats.budget_refused,
        "learned_delay_ms": (stats.delay or 0.0) * 1e3,
        "backend_requests": len(inner.calls),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    calls = 2000 if args.quick else 8000
    r = anyio.run(bench, calls, 400.0, 0.05, args.seed)
    print(f"{calls} calls arriving at 400/s, base {r['base_ms']:.0f} ms, 1% of calls 10x slower")
    print(f"{'':<10} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9}")
    for k in ("no_hedge", "hedge"):
        s = r[k]
        print(f"{k:<10} {s['p50_ms']:>8.1f} {s['p99_ms']:>8.1f} {s['p999_ms']:>9.1f}")
    print(
        f"p99 cut {r['p99_cut']:.2f}x, p99.9 cut {r['p999_cut']:.2f}x, extra requests "
        f"{r['extra_requests_pct']:.2f}% (learned delay {r['learned_delay_ms']:.1f} ms, "
        f"{r['hedge_wins']} hedge wins, {r['budget_refused']} refused by the budget)"
    )
    r.update(
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=f"{platform.machine()} {platform.system()}, shared",
        target="p99 cut >= 5x with <= 5% extra requests",
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "resilience_hedge.json").write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
