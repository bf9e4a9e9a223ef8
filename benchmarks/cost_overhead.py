"""Issue 17's figure: the CPU a price and a budget check add to a call.

Run: ``.venv/bin/python -m benchmarks.cost_overhead [--quick]``.

The base call is a realistic provider call: ``OpenAIBackend.complete`` over HTTP to the fake
OpenAI server (``python -m genfan.testserver``, 0 ms latency) in a separate process, so its CPU
is not counted. Client CPU per call (``time.process_time``, worker threads included) is
measured over sequential calls for: the backend without a price, with a price (``Usage.cost``
filled), and priced inside a budget (``budgeted``: a reservation before the call and a
settlement after) on a ``MemoryBudgetStore``, a ``SQLiteBudgetStore`` file (the default) and,
when one listens on 127.0.0.1:6379, a ``RedisBudgetStore``; the shared stores with leases (the
default for a budget used as ``async with``: room for up to 32 calls per step with the store,
flushed every second) and without (``lease=None``: two steps per call). Configurations are
interleaved
over several rounds and the median round is kept, so drift on a shared machine hits all of
them alike.

Prints a table and writes ``benchmarks/results/cost_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import tempfile
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path

import anyio

from genfan import Backend, ChatRequest
from genfan.cost import (
    Budget,
    BudgetStore,
    MemoryBudgetStore,
    RedisBudgetStore,
    SQLiteBudgetStore,
    budgeted,
)

RESULTS = Path(__file__).parent / "results"
REQUEST = ChatRequest.from_prompt("Say hello to the bench.", model="bench-model")


def redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.3):
            return True
    except OSError:
        return False


async def cpu_per_call(backend: Backend, n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        await backend.complete(REQUEST)
    return (time.process_time() - start) / n


async def check_alone(budget: Budget, n: int) -> float:
    """CPU of one budget check with no call around it: a reservation and its settlement."""
    start = time.process_time()
    for _ in range(n):
        await budget.settle(await budget.reserve("bench-alone", 0.001), 0.001)
    return (time.process_time() - start) / n


async def measure(
    url: str, folder: Path, n: int, rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    from genfan_providers.openai import OpenAIBackend

    plain = OpenAIBackend("bench-model", base_url=url, api_key_env=None)
    priced = OpenAIBackend("bench-model", base_url=url, api_key_env=None, price=(0.15, 0.6))

    def budget(store: BudgetStore, lease: int | None = 32) -> Budget:
        return Budget(1e9, period="day", store=store, per_call_reserve=0.001, lease=lease)

    budgets = {"memory": budget(MemoryBudgetStore())}
    for lease in (None, 32):
        tag = "lease" if lease else "no lease"
        budgets[f"SQLite, {tag}"] = budget(SQLiteBudgetStore(folder / f"{tag}.db"), lease)
        if redis_up():
            prefix = f"genfan-bench:{time.time_ns()}:"
            budgets[f"Redis, {tag}"] = budget(RedisBudgetStore(key_prefix=prefix), lease)
    configs: dict[str, Backend] = {"no price": plain, "priced": priced}
    async with AsyncExitStack() as stack:
        for store, b in budgets.items():
            await stack.enter_async_context(b)  # leasing while entered, as applications do
            configs[f"budget ({store})"] = budgeted(priced, b, scope="bench")
        for backend in configs.values():  # warm up connections, tables, prices
            for _ in range(max(50, n // 10)):
                await backend.complete(REQUEST)
        samples: dict[str, list[float]] = {k: [] for k in configs}
        for _ in range(rounds):
            for name, backend in configs.items():
                samples[name].append(await cpu_per_call(backend, n))
        alone: dict[str, list[float]] = {k: [] for k in budgets}
        for _ in range(rounds):
            for name, b in budgets.items():
                alone[name].append(await check_alone(b, n))
        for b in budgets.values():
            await b.reset("bench")
            await b.reset("bench-alone")
    for b in budgets.values():
        await b.store.aclose()
    await plain.aclose()
    await priced.aclose()
    return (
        {k: statistics.median(v) for k, v in samples.items()},
        {k: statistics.median(v) for k, v in alone.items()},
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    args = parser.parse_args()
    n, rounds = (300, 3) if args.quick else (1000, 5)
    rounds = args.rounds or rounds

    from genfan.testserver import ServerProcess

    with ServerProcess(latency=0.0) as server, tempfile.TemporaryDirectory() as tmp:
        cpu, alone = anyio.run(measure, server.url, Path(tmp), n, rounds)

    base = cpu["no price"]
    rows = [
        {
            "config": name,
            "cpu_us": value * 1e6,
            "added_us": (value - base) * 1e6,
            "overhead_pct": (value / base - 1.0) * 100.0,
        }
        for name, value in cpu.items()
    ]
    print(f"{'config':<28} {'CPU/call':>11} {'added':>10} {'overhead':>9}")
    for r in rows:
        print(
            f"{r['config']:<28} {r['cpu_us']:>8.1f} us {r['added_us']:>7.1f} us"
            f" {r['overhead_pct']:>8.1f}%"
        )
    print(f"\n{'budget check alone':<28} {'CPU/check':>11} {'of a call':>10}")
    checks = [
        {"store": name, "cpu_us": value * 1e6, "of_base_call_pct": value / base * 100.0}
        for name, value in alone.items()
    ]
    for c in checks:
        print(f"{c['store']:<28} {c['cpu_us']:>8.1f} us {c['of_base_call_pct']:>9.1f}%")
    out = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.system()}, shared",
        "calls_per_round": n,
        "rounds": rounds,
        "base": "OpenAIBackend.complete over HTTP to the fake server in another process",
        "rows": rows,
        "check_alone": checks,
        "target": "pricing and a budget check add < 5% CPU per call",
        "budgets": "limit 1e9/day, per_call_reserve 0.001; lease = 32 calls (default) or None",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cost_overhead.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
