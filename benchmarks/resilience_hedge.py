"""Issue 4's figure: hedging at the learned p95 against a backend whose calls are 1% 10x slower.

Run: ``.venv/bin/python -m benchmarks.resilience_hedge [--quick]``.

Open-loop load (Poisson arrivals, 400/s) of ``complete()`` calls. A ``FakeBackend`` takes
``base`` seconds (+-5% jitter, real time, ``anyio.sleep``) per call, its first token at 20% of
that, and 10x that for a random 1% of calls. Three shapes of slowness (``SHAPES``): the whole
answer, a stall before the first token, or slow tokens after an on-time first token. The same
seeded workload is run without hedging and through ``Hedge(HedgePolicy(percentile=0.95,
max_extra_ratio=0.05, trigger=...))``, which learns its delay: the p95 of whole answers
(``trigger="answer"``) or of times to first token (``"first_token"``, run over the stream).
Reported: p50/p99/p99.9 latency of the whole answer, the p99 cut, and the extra requests
hedging sent (hedges / calls).

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

from genfan import Backend, ChatRequest, collect_stream
from genfan.resilience import Hedge, HedgePolicy
from genfan.testing import FakeBackend, Reply

RESULTS = Path(__file__).parent / "results"
REQUEST = ChatRequest.from_prompt("hi")


#: Where the 1% of slow calls lose their time.
#: ``answer``: the whole call is 10x slower (no streaming view of it).
#: ``first_token``: the call stalls before its first token (queueing, prefill, a cold replica);
#: once it starts, it streams at the normal pace.
#: ``decode``: the first token is on time and the tokens then come 10x slower.
SHAPES = ("answer", "first_token", "decode")
#: A normal call: first token after 20% of the answer's time, then 5 words.
TTFT_SHARE = 0.2
TEXT = " ".join(["word"] * 5)


def slow_backend(seed: int, base: float, shape: str = "answer") -> FakeBackend:
    rng = random.Random(seed)

    def reply(request: ChatRequest) -> Reply:
        jitter = rng.uniform(0.95, 1.05)
        latency = base * jitter
        ttft = TTFT_SHARE * latency
        if rng.random() < 0.01:
            if shape == "first_token":
                ttft += 9 * latency
            elif shape == "decode":
                ttft = TTFT_SHARE * latency
            latency *= 10
        return Reply(text=TEXT, latency=latency, ttft=None if shape == "answer" else ttft)

    return FakeBackend("tail", reply)


def quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


async def run(
    backend: Backend, calls: int, rate: float, seed: int, *, stream: bool = False
) -> list[float]:
    """Open-loop load: ``calls`` requests arriving at ``rate`` per second (Poisson).

    ``stream``: each call reads the backend's stream to its end (the path a hedge on the first
    token takes, paced by the fake's ``ttft``), instead of calling ``complete()``.
    """
    latencies: list[float] = []
    arrivals = random.Random(seed + 1)

    async def one() -> None:
        start = time.perf_counter()
        if stream:
            await collect_stream(backend.stream(REQUEST))
        else:
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


async def scenario(
    shape: str, triggers: tuple[str, ...], calls: int, rate: float, base: float, seed: int
) -> dict[str, Any]:
    """The same seeded workload without hedging and with each hedge trigger."""
    out: dict[str, Any] = {"shape": shape}
    out["no_hedge"] = summary(await run(slow_backend(seed, base, shape), calls, rate, seed))
    if "first_token" in triggers:
        # The baseline for hedging over the stream: the same fake, read as a stream.
        plain = slow_backend(seed, base, shape)
        out["no_hedge_stream"] = summary(await run(plain, calls, rate, seed, stream=True))
    for trigger in triggers:
        inner = slow_backend(seed, base, shape)
        policy = HedgePolicy(
            percentile=0.95,
            max_extra_ratio=0.05,
            budget_ttl=60.0,
            trigger=trigger,  # type: ignore[arg-type]
        )
        hedge = Hedge(inner, policy)
        hedged = summary(await run(hedge, calls, rate, seed))
        stats = hedge.statistics()
        delay = stats.first_token_delay if trigger == "first_token" else stats.delay
        baseline = out["no_hedge_stream" if trigger == "first_token" else "no_hedge"]
        out[trigger] = {
            **hedged,
            "baseline": "no_hedge_stream" if trigger == "first_token" else "no_hedge",
            "p99_cut": baseline["p99_ms"] / hedged["p99_ms"],
            "p999_cut": baseline["p999_ms"] / hedged["p999_ms"],
            "extra_requests_pct": stats.extra_ratio * 100,
            "hedges_sent": stats.hedges_sent,
            "hedge_wins": stats.hedge_wins,
            "budget_refused": stats.budget_refused,
            "learned_delay_ms": (delay or 0.0) * 1e3,
            "backend_requests": len(inner.calls),
        }
    return out


async def bench(calls: int, rate: float, base: float, seed: int) -> dict[str, Any]:
    plan = {
        "answer": ("answer",),
        "first_token": ("answer", "first_token"),
        "decode": ("answer", "first_token"),
    }
    scenarios = [await scenario(s, plan[s], calls, rate, base, seed) for s in SHAPES]
    return {"calls": calls, "arrivals_per_s": rate, "base_ms": base * 1e3, "scenarios": scenarios}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    calls = 2000 if args.quick else 8000
    r = anyio.run(bench, calls, 400.0, 0.05, args.seed)
    print(
        f"{calls} calls arriving at 400/s, base {r['base_ms']:.0f} ms (first token at 20%), "
        "1% of calls 10x slower"
    )
    print(
        f"{'slow part':<12} {'hedge on':<12} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} "
        f"{'p99 cut':>8} {'extra':>7} {'delay ms':>8}"
    )
    for sc in r["scenarios"]:
        for key in ("no_hedge", "answer", "no_hedge_stream", "first_token"):
            if key not in sc:
                continue
            row = sc[key]
            cut = f"{row['p99_cut']:.2f}x" if "p99_cut" in row else ""
            extra = f"{row['extra_requests_pct']:.2f}%" if "p99_cut" in row else ""
            delay = f"{row['learned_delay_ms']:.1f}" if "p99_cut" in row else ""
            label = {"no_hedge": "- (complete)", "no_hedge_stream": "- (stream)"}.get(key, key)
            print(
                f"{sc['shape']:<12} {label:<12} {row['p50_ms']:>7.1f} {row['p99_ms']:>7.1f} "
                f"{row['p999_ms']:>8.1f} {cut:>8} {extra:>7} {delay:>8}"
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
