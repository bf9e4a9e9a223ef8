"""Issue 4's figures: P2C peak-EWMA load balancing.

Run: ``.venv/bin/python -m benchmarks.resilience_p2c [--quick]``.

Replicas are ``FakeBackend`` s shaped like model servers: each serves ``slots`` requests at a
time (real ``anyio.sleep`` of its service time) and queues the rest. A closed-loop workload keeps
``concurrency`` calls in flight through ``Pool(strategy="p2c_peak_ewma", decay=1.0)``: the
latencies are scaled down from LLM calls (~1 s) to 10 ms, and the EWMA's memory with them (the
default ``decay=10`` s would remember 1,000 calls of 10 ms, and a single scheduling hiccup on
this shared machine would skew the shares for seconds).

(a) two replicas, one twice as slow (20 ms vs 10 ms service): the slow one's share of calls
    relative to the fast one's (target: about half);
(b) three equal replicas: the largest deviation of a replica's share from an even third
    (target: within 1%);
(c) for reference, (a) with replicas that never queue (unlimited slots): peak-EWMA's
    ``rtt x (pending + 1)`` cost then sends the slow one only about a quarter of the fast one's.

Prints a table and writes ``benchmarks/results/resilience_p2c.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import anyio

from genfan import ChatRequest
from genfan.resilience import Pool
from genfan.testing import FakeBackend, Reply

RESULTS = Path(__file__).parent / "results"
REQUEST = ChatRequest.from_prompt("hi")


def server(name: str, service: float, slots: int | None) -> FakeBackend:
    gate: list[anyio.Semaphore] = []

    async def reply(request: ChatRequest) -> Reply:
        if slots is None:
            await anyio.sleep(service)
            return Reply(text="ok")
        if not gate:
            gate.append(anyio.Semaphore(slots))
        async with gate[0]:
            await anyio.sleep(service)
        return Reply(text="ok")

    return FakeBackend(name, reply)


async def load(pool: Pool, calls: int, concurrency: int) -> Counter[str]:
    served: Counter[str] = Counter()
    limiter = anyio.Semaphore(concurrency)

    async def one() -> None:
        async with limiter:
            served[(await pool.complete(REQUEST)).backend] += 1

    async with anyio.create_task_group() as tg:
        for _ in range(calls):
            tg.start_soon(one)
    return served


DECAY = 1.0  # peak-EWMA memory: 100 service times (the default 10 s suits ~1 s LLM calls)


async def bench(calls: int, seed: int) -> dict[str, object]:
    def pool(replicas: list[FakeBackend]) -> Pool:
        return Pool(replicas, rng=random.Random(seed), decay=DECAY)

    two = pool([server("slow", 0.02, 4), server("fast", 0.01, 4)])
    a = await load(two, calls, 8)
    equal = pool([server(f"r{i}", 0.01, 4) for i in range(3)])
    b = await load(equal, calls, 12)
    inf = pool([server("slow", 0.02, None), server("fast", 0.01, None)])
    c = await load(inf, calls // 2, 8)
    even = calls / 3
    return {
        "calls": calls,
        "decay_s": DECAY,
        "twice_slow": dict(a),
        "slow_to_fast_ratio": a["slow"] / a["fast"],
        "equal": dict(b),
        "max_deviation_from_even_pct": max(abs(v - even) for v in b.values()) / even * 100,
        "unqueued_twice_slow": dict(c),
        "unqueued_slow_to_fast_ratio": c["slow"] / c["fast"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    r = anyio.run(bench, 3000 if args.quick else 12_000, args.seed)
    print(f"{r['calls']} calls per scenario, p2c_peak_ewma")
    print(
        f"(a) twice as slow, 4 slots each: {r['twice_slow']}  slow/fast = "
        f"{r['slow_to_fast_ratio']:.3f} (target ~0.5)"
    )
    print(
        f"(b) three equal replicas:       {r['equal']}  max deviation from even = "
        f"{r['max_deviation_from_even_pct']:.2f}% (target <= 1%)"
    )
    print(
        f"(c) twice as slow, no queueing: {r['unqueued_twice_slow']}  slow/fast = "
        f"{r['unqueued_slow_to_fast_ratio']:.3f} (reference)"
    )
    r.update(
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=f"{platform.machine()} {platform.system()}, shared",
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "resilience_p2c.json").write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
