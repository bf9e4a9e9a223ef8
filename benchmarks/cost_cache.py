"""Issue 17's figure: what a response-cache hit costs, against a backend call.

Run: ``.venv/bin/python -m benchmarks.cost_cache [--quick]``.

The backend call is ``OpenAIBackend.complete`` over HTTP to the fake OpenAI server
(``python -m genfan.testserver``, 0 ms latency: the fastest a call can be; a real model adds
hundreds of milliseconds) in a separate process, so its CPU is not counted. For each
configuration, sequential calls measure the wall time (``time.perf_counter``) and the client
CPU (``time.process_time``) per call:

* the backend call alone;
* a miss through an exact ``ResponseCache`` on SQLite (a lookup, the call, the answer kept): a
  new prompt every call;
* a hit on each store: memory, SQLite (the default) and, when one listens on 127.0.0.1:6379,
  Redis: the same prompt every call.

Rounds are interleaved and the median kept. Prints a table and writes
``benchmarks/results/cost_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio

from genfan import Backend, ChatRequest
from genfan.cost import (
    CacheStore,
    MemoryCacheStore,
    RedisCacheStore,
    ResponseCache,
    SQLiteCacheStore,
    cached,
)

RESULTS = Path(__file__).parent / "results"
REQUEST = ChatRequest.from_prompt("What is the capital of France?", model="bench-model")


def redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.3):
            return True
    except OSError:
        return False


async def per_call(
    backend: Backend, n: int, request: Callable[[int], ChatRequest]
) -> tuple[float, float]:
    requests = [request(i) for i in range(n)]
    wall, cpu = time.perf_counter(), time.process_time()
    for r in requests:
        await backend.complete(r)
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


async def measure(url: str, folder: Path, n: int, rounds: int) -> dict[str, tuple[float, float]]:
    from genfan_providers.openai import OpenAIBackend

    provider = OpenAIBackend("bench-model", base_url=url, api_key_env=None, price=(0.15, 0.6))
    stores: dict[str, CacheStore] = {
        "memory": MemoryCacheStore(),
        "SQLite": SQLiteCacheStore(folder / "cache.db"),
    }
    if redis_up():
        stores["Redis"] = RedisCacheStore(key_prefix=f"genfan-bench:{time.time_ns()}:")
    caches = {name: ResponseCache(store) for name, store in stores.items()}
    same: Callable[[int], ChatRequest] = lambda i: REQUEST  # noqa: E731
    fresh_counter = iter(range(10**9))

    def fresh(i: int) -> ChatRequest:
        return ChatRequest.from_prompt(f"Question number {next(fresh_counter)}?", model="x")

    configs: dict[str, tuple[Backend, Callable[[int], ChatRequest]]] = {
        "backend call": (provider, same),
        "miss (SQLite)": (
            cached(provider, ResponseCache(SQLiteCacheStore(folder / "m.db"))),
            fresh,
        ),
    }
    for name, cache in caches.items():
        configs[f"hit ({name})"] = (cached(provider, cache), same)
    for backend, request in configs.values():  # warm up, and fill the caches
        for i in range(max(50, n // 10)):
            await backend.complete(request(i))
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in configs}
    for _ in range(rounds):
        for name, (backend, request) in configs.items():
            samples[name].append(await per_call(backend, n, request))
    for cache in caches.values():
        await cache.clear()
        await cache.aclose()
    await provider.aclose()
    return {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
        for k, v in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n, rounds = (300, 3) if args.quick else (1000, 5)

    from genfan.testserver import ServerProcess

    with ServerProcess(latency=0.0) as server, tempfile.TemporaryDirectory() as tmp:
        results = anyio.run(measure, server.url, Path(tmp), n, rounds)

    base_wall, base_cpu = results["backend call"]
    rows = [
        {
            "config": name,
            "latency_us": wall * 1e6,
            "cpu_us": cpu * 1e6,
            "latency_vs_call": wall / base_wall,
            "cpu_vs_call": cpu / base_cpu,
        }
        for name, (wall, cpu) in results.items()
    ]
    print(f"{'config':<16} {'latency':>11} {'x call':>7} {'CPU':>11} {'x call':>7}")
    for r in rows:
        print(
            f"{r['config']:<16} {r['latency_us']:>8.1f} us {r['latency_vs_call']:>7.3f}"
            f" {r['cpu_us']:>8.1f} us {r['cpu_vs_call']:>7.3f}"
        )
    out = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.system()}, shared",
        "calls_per_round": n,
        "rounds": rounds,
        "base": "OpenAIBackend.complete over HTTP to the fake server (0 ms) in another process",
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cost_cache.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
