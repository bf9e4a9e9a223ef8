"""Issue 4's figure: the guard stack's CPU overhead per call.

Run: ``.venv/bin/python -m benchmarks.resilience_overhead [--quick]``.

The base call is a realistic provider call: ``OpenAIBackend.complete`` over HTTP to the fake
OpenAI server (``python -m genfan.testserver``, 0 ms latency) running in a separate process, so
its CPU is not counted. Client CPU per call (``time.process_time``) is measured over sequential
calls for: the bare backend, the default guard stack (bulkhead, retry with budget, breaker,
timeout) and the full stack (plus a hedge that never fires and a rate limit that never waits).
Configurations are interleaved over several rounds and the median round is kept, so drift on a
shared machine hits all of them alike. The absolute cost of the stack is also measured on a
0-latency in-process ``FakeBackend`` (microseconds per call).

Prints a table and writes ``benchmarks/results/resilience_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio

from genfan import Backend, ChatRequest
from genfan.resilience import HedgePolicy, RateLimitPolicy, guard

RESULTS = Path(__file__).parent / "results"
REQUEST = ChatRequest.from_prompt("Say hello to the bench.", model="bench-model")


def stacks(base: Backend) -> dict[str, Backend]:
    return {
        "bare": base,
        "default stack": guard(base),
        "full stack": guard(
            base,
            hedge=HedgePolicy(delay=30.0),
            rate_limit=RateLimitPolicy(requests_per_minute=1e9, tokens_per_minute=1e12),
        ),
    }


async def cpu_per_call(backend: Backend, n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        await backend.complete(REQUEST)
    return (time.process_time() - start) / n


async def measure(make: Callable[[], Backend], n: int, rounds: int) -> dict[str, float]:
    base = make()
    configs = stacks(base)
    for b in configs.values():  # warm up connections, caches and the hedge's learning
        for _ in range(max(50, n // 10)):
            await b.complete(REQUEST)
    samples: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for name, b in configs.items():
            samples[name].append(await cpu_per_call(b, n))
    await base.aclose()
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n, rounds = (300, 3) if args.quick else (1000, 5)

    from genfan_providers.openai import OpenAIBackend

    from genfan.testing import FakeBackend
    from genfan.testserver import ServerProcess

    with ServerProcess(latency=0.0) as server:
        http = anyio.run(
            measure,
            lambda: OpenAIBackend("bench-model", base_url=server.url, api_key_env=None),
            n,
            rounds,
        )
    fake = anyio.run(measure, lambda: FakeBackend("fake"), n * 4, rounds)

    base = http["bare"]
    rows = []
    for name in http:
        rows.append(
            {
                "config": name,
                "http_cpu_us": http[name] * 1e6,
                "http_overhead_pct": (http[name] / base - 1.0) * 100.0,
                "fake_cpu_us": fake[name] * 1e6,
                "fake_added_us": (fake[name] - fake["bare"]) * 1e6,
            }
        )
    print(
        f"{'config':<15} {'CPU/call (HTTP)':>16} {'overhead':>9} {'CPU/call (fake)':>16} "
        f"{'added':>9}"
    )
    for r in rows:
        print(
            f"{r['config']:<15} {r['http_cpu_us']:>13.1f} us {r['http_overhead_pct']:>8.1f}% "
            f"{r['fake_cpu_us']:>13.1f} us {r['fake_added_us']:>6.1f} us"
        )
    out = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.system()}, shared",
        "calls_per_round": n,
        "rounds": rounds,
        "base": "OpenAIBackend.complete over HTTP to the fake server in another process",
        "rows": rows,
        "target": "default stack adds <= 15% CPU per call",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "resilience_overhead.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
