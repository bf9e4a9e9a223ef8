"""Issue 14's figure: adaptive concurrency against fixed caps, on a server of capacity C.

Run: ``.venv/bin/python -m benchmarks.resilience_adaptive [--quick]``.

The server is a separate process (this module with ``--serve``): an OpenAI-compatible HTTP/1.1
server on 127.0.0.1 with ``C`` service slots. A request that finds fewer than ``C`` in service
is answered after the base latency ``L`` (±10%); beyond ``C`` it queues (FIFO) for a slot; a
request that arrives while ``2C`` are already in the system (in service or queued) is answered
429 at once. Its capacity is ``C / L`` answers a second, and the latency of an answer grows
with the queue in front of it.

The client is genfan's OpenAI provider in a guard stack of a bulkhead and a 10 s timeout (no
retry and no breaker, so that what is measured is the cap): ``guard(backend,
bulkhead=BulkheadPolicy(max_concurrent=N, max_queued=0, ...), retry=None, breaker=None)``.
Load is open-loop (Poisson arrivals) at 1.5x the server's capacity, so some calls must be
refused somewhere; the bulkhead sheds at once what does not fit in its cap (``max_queued=0``,
as Netflix's concurrency limiter does: under a sustained overload a client queue only turns
into latency). Each cap runs against a fresh server, in two scenarios:

* **steady**: the capacity is ``C`` throughout;
* **shared**: halfway through, another tenant takes half of it (``C`` becomes ``C/2``, and the
  429 threshold ``C``).

Caps: fixed ``C/4``, ``C`` and ``4C``; adaptive ``"aimd"`` and ``"gradient"`` with their
defaults (between 1 and 64, starting at 16), knowing nothing of ``C``.

Reported per cap: successful answers a second, p50 and p99 of their latency as the caller saw
it, the 429s the server sent, the calls the bulkhead shed, and the mean cap in force.

Prints the tables and writes ``benchmarks/results/resilience_adaptive.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"

_OK = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ok"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
).encode()
_LIMITED = json.dumps(
    {"error": {"message": "over capacity", "type": "rate_limit_error", "code": "rate_limited"}}
).encode()


# -- the server (a separate process) ------------------------------------------------------------


class CapacityServer:
    """``capacity`` service slots of ``latency`` seconds each, a FIFO queue in front of them, and
    a 429 for a request that finds ``2 * capacity`` in the system."""

    def __init__(self, capacity: int, latency: float, seed: int = 0) -> None:
        self.capacity = capacity
        self.latency = latency
        self.in_service = 0
        self.waiting: deque[asyncio.Future[None]] = deque()
        self.random = random.Random(seed)
        self.answered = 0
        self.refused = 0
        self.max_in_system = 0

    @property
    def in_system(self) -> int:
        return self.in_service + len(self.waiting)

    def _start_next(self) -> None:
        while self.waiting and self.in_service < self.capacity:
            fut = self.waiting.popleft()
            if not fut.done():
                self.in_service += 1
                fut.set_result(None)

    async def serve_one(self) -> bool:
        """Serve one request: False when it was refused (429)."""
        if self.in_system >= 2 * self.capacity:
            self.refused += 1
            return False
        if self.in_service < self.capacity and not self.waiting:
            self.in_service += 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiting.append(fut)
            self.max_in_system = max(self.max_in_system, self.in_system)
            await fut
        self.max_in_system = max(self.max_in_system, self.in_system)
        try:
            await asyncio.sleep(self.latency * self.random.uniform(0.9, 1.1))
        finally:
            self.in_service -= 1
            self._start_next()
        self.answered += 1
        return True

    def set_capacity(self, capacity: int) -> None:
        self.capacity = capacity
        self._start_next()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                if path.startswith("/admin/capacity"):
                    self.set_capacity(int(json.loads(body)["capacity"]))
                    status, payload = 200, b"{}"
                elif path.startswith("/admin/stats"):
                    stats = {
                        "answered": self.answered,
                        "refused": self.refused,
                        "max_in_system": self.max_in_system,
                    }
                    status, payload = 200, json.dumps(stats).encode()
                elif method == "POST":
                    ok = await self.serve_one()
                    status, payload = (200, _OK) if ok else (429, _LIMITED)
                else:
                    status, payload = 200, b"{}"
                reason = "OK" if status == 200 else "Too Many Requests"
                writer.write(
                    f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def serve(capacity: int, latency: float) -> None:
    """Serve until terminated, after printing the URL."""
    server = CapacityServer(capacity, latency)

    async def run() -> None:
        srv = await asyncio.start_server(server.handle, "127.0.0.1", 0, backlog=1024)
        port = srv.sockets[0].getsockname()[1]
        print(f"http://127.0.0.1:{port}/v1", flush=True)
        async with srv:
            await srv.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


class ServerProcess:
    """The capacity server in a child process."""

    def __init__(self, capacity: int, latency: float) -> None:
        cmd = [sys.executable, "-m", "benchmarks.resilience_adaptive", "--serve"]
        cmd += ["--capacity", str(capacity), "--latency", str(latency)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http"):
            self.close()
            raise RuntimeError(f"capacity server did not start (said {self.url!r})")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# -- the client ---------------------------------------------------------------------------------


@dataclass
class Run:
    cap: str
    scenario: str
    latencies: list[float] = field(default_factory=list)
    limited: int = 0
    shed: int = 0
    other: dict[str, int] = field(default_factory=dict)
    limits: list[int] = field(default_factory=list)
    sent: int = 0
    wall: float = 0.0
    server: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            return 1000 * lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

        return {
            "cap": self.cap,
            "scenario": self.scenario,
            "calls": self.sent,
            "ok": len(lat),
            "throughput_per_s": len(lat) / self.wall,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "http_429": self.limited,
            "shed": self.shed,
            "other_errors": dict(self.other),
            "mean_cap": statistics.fmean(self.limits) if self.limits else float("nan"),
            "cap_trace": self.limits[::10],
            "server": self.server,
        }


async def _admin(url: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient() as client:
        r = await client.post(url.removesuffix("/v1") + path, json=body or {})
        result: dict[str, Any] = r.json()
        return result


async def one_run(
    cap: str, policy: Any, scenario: str, capacity: int, latency: float, duration: float, seed: int
) -> Run:
    import anyio
    from genfan_providers.openai import OpenAIBackend

    from genfan import BulkheadFullError, ChatRequest, RateLimitError
    from genfan.resilience import guard

    run = Run(cap=cap, scenario=scenario)
    server = ServerProcess(capacity, latency)
    try:
        backend = OpenAIBackend("bench-model", base_url=server.url, api_key_env=None, timeout=30)
        stack = guard(backend, bulkhead=policy, retry=None, breaker=None, timeout=10.0)
        assert stack.bulkhead is not None
        bulkhead = stack.bulkhead
        request = ChatRequest.from_prompt("Say hello to the bench.", model="bench-model")
        rate = 1.5 * capacity / latency
        rng = random.Random(seed)

        async def call() -> None:
            t0 = time.perf_counter()
            try:
                await stack.complete(request)
            except RateLimitError:
                run.limited += 1
            except BulkheadFullError:
                run.shed += 1
            except Exception as exc:
                run.other[type(exc).__name__] = run.other.get(type(exc).__name__, 0) + 1
            else:
                run.latencies.append(time.perf_counter() - t0)

        async def watch(stop: anyio.Event) -> None:
            while not stop.is_set():
                run.limits.append(bulkhead.statistics().limit)
                await anyio.sleep(0.05)

        # warm the connection pool and the server: a few calls, not counted
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(backend.complete, request)
        stop = anyio.Event()
        start = time.perf_counter()
        shrunk = scenario != "shared"
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, stop)
            next_at = start
            while (now := time.perf_counter()) - start < duration:
                if not shrunk and now - start >= duration / 2:
                    shrunk = True
                    await _admin(server.url, "/admin/capacity", {"capacity": capacity // 2})
                if now >= next_at:
                    run.sent += 1
                    tg.start_soon(call)
                    next_at += rng.expovariate(rate)
                    continue
                await anyio.sleep(max(0.0, next_at - now))
            run.wall = time.perf_counter() - start
            stop.set()
        run.server = await _admin(server.url, "/admin/stats")
        await stack.aclose()
    finally:
        server.close()
    return run


def caps(capacity: int) -> list[tuple[str, Any]]:
    from genfan.resilience import BulkheadPolicy

    fixed = [("C/4", capacity // 4), ("C", capacity), ("4C", 4 * capacity)]
    out: list[tuple[str, Any]] = [
        (f"fixed {name} = {n}", BulkheadPolicy(max_concurrent=n, max_queued=0)) for name, n in fixed
    ]
    out.append(("adaptive aimd", BulkheadPolicy(adaptive="aimd", max_queued=0)))
    out.append(("adaptive gradient", BulkheadPolicy(adaptive="gradient", max_queued=0)))
    out.append(("adaptive vegas", BulkheadPolicy(adaptive="vegas", max_queued=0)))
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | cap | answers/s | p50 ms | p99 ms | 429s | shed | mean cap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['cap']} | {r['throughput_per_s']:.1f} | {r['p50_ms']:.0f}"
            f" | {r['p99_ms']:.0f} | {r['http_429']:,} | {r['shed']:,} | {r['mean_cap']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="run the capacity server")
    parser.add_argument("--capacity", type=int, default=20, help="C: service slots")
    parser.add_argument("--latency", type=float, default=0.5, help="L: seconds per answer")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per run")
    parser.add_argument("--quick", action="store_true", help="5 s runs")
    parser.add_argument("--scenario", choices=("steady", "shared", "both"), default="both")
    parser.add_argument("--only", default="", help="run only the caps whose name has this")
    ns = parser.parse_args()
    if ns.serve:
        serve(ns.capacity, ns.latency)
        return

    import anyio

    duration = 5.0 if ns.quick else ns.duration
    scenarios = ("steady", "shared") if ns.scenario == "both" else (ns.scenario,)
    rows: list[dict[str, Any]] = []
    for scenario in scenarios:
        for i, (name, policy) in enumerate(caps(ns.capacity)):
            if ns.only not in name:
                continue
            run = anyio.run(
                one_run, name, policy, scenario, ns.capacity, ns.latency, duration, 1000 + i
            )
            rows.append(run.row())
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    load = os.getloadavg()
    print()
    print(
        f"C = {ns.capacity}, L = {ns.latency * 1000:.0f} ms (capacity {ns.capacity / ns.latency:.0f}"
        f" answers/s), open-loop load {1.5 * ns.capacity / ns.latency:.0f} calls/s,"
        f" {duration:g} s per run; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(table(rows))
    RESULTS.mkdir(exist_ok=True)
    out = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "load_average": load,
        "capacity": ns.capacity,
        "latency_s": ns.latency,
        "load_per_s": 1.5 * ns.capacity / ns.latency,
        "duration_s": duration,
        "rows": rows,
    }
    (RESULTS / "resilience_adaptive.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
