"""Issue 4's figure: one of three backends down; the fan-out keeps succeeding, and calls to the
dead backend stop within the breaker's threshold.

Run: ``.venv/bin/python -m benchmarks.resilience_outage [--quick]``.

Three ``FakeBackend`` s with real latency (20 ms); one fails every call with a connection error
after 2 ms. Each sits in the default guard stack (``guard(backend)``: bulkhead, retry with its
budget, breaker with a 30 s window, 10 calls minimum throughput, 50% failure ratio, 5 s break;
timeout), except that the break is 1 s here so that half-open probes show within the run. A
workload of fan-outs (mode ``all``, 8 at a time, 2 s deadline) runs for a few seconds.

Reported: fan-out success rate; requests that reached the dead backend before its breaker
opened (the threshold is ``minimum_throughput`` failed calls), and after (half-open probes only);
calls the breaker refused; retries the budget allowed.

Prints a table and writes ``benchmarks/results/resilience_outage.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio

from genfan import AllBackendsFailedError, BackendConnectionError, FanOut
from genfan.resilience import BreakerPolicy, guard
from genfan.testing import Fail, FakeBackend

RESULTS = Path(__file__).parent / "results"


async def bench(fanouts: int) -> dict[str, object]:
    healthy = [FakeBackend(f"up{i}", latency=0.02) for i in (1, 2)]
    dead = FakeBackend("down", [Fail(error=BackendConnectionError, latency=0.002)])
    breaker = BreakerPolicy(break_duration=1.0)
    guarded = [guard(b, breaker=breaker) for b in (*healthy, dead)]
    dead_guard = guarded[2]
    assert dead_guard.breaker is not None
    opened_at: list[float] = []
    calls_at_open: list[int] = []

    def on_change(old: str, new: str, _: object) -> None:
        if new == "open":
            opened_at.append(time.perf_counter())
            calls_at_open.append(len(dead.calls))

    dead_guard.breaker.add_listener(on_change)  # type: ignore[arg-type]
    ok = failed = 0
    limiter = anyio.Semaphore(8)
    fan = FanOut(guarded, mode="all", deadline=2.0)
    start = time.perf_counter()

    async def one() -> None:
        nonlocal ok, failed
        async with limiter:
            try:
                result = await fan.run("ping")
                ok += bool(result.successes)
            except AllBackendsFailedError:
                failed += 1

    async with anyio.create_task_group() as tg:
        for _ in range(fanouts):
            tg.start_soon(one)
    wall = time.perf_counter() - start
    stats = dead_guard.statistics()
    assert stats.breaker is not None and stats.retry is not None
    first_open = calls_at_open[0] if calls_at_open else None
    return {
        "fanouts": fanouts,
        "wall_s": wall,
        "success_rate_pct": 100.0 * ok / fanouts,
        "all_failed": failed,
        "dead_backend_requests": len(dead.calls),
        "requests_before_first_open": first_open,
        "requests_after_first_open": len(dead.calls) - (first_open or 0),
        "breaker_threshold": breaker.minimum_throughput,
        "times_opened": stats.breaker.opened,
        "refused_by_breaker": stats.breaker.rejected,
        "retries_allowed": stats.retry.retries,
        "retries_refused_by_budget": stats.retry.budget_exhausted,
        "healthy_requests": [len(b.calls) for b in healthy],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    r = anyio.run(bench, 400 if args.quick else 2000)
    print(f"{r['fanouts']} fan-outs over 3 backends (1 down) in {r['wall_s']:.1f} s")
    print(f"fan-out success rate          {r['success_rate_pct']:.1f}%")
    print(
        f"requests to the dead backend  {r['dead_backend_requests']} "
        f"({r['requests_before_first_open']} before the breaker opened, threshold "
        f"{r['breaker_threshold']}; {r['requests_after_first_open']} half-open probes after)"
    )
    print(
        f"refused by its breaker        {r['refused_by_breaker']} "
        f"(opened {r['times_opened']} times)"
    )
    print(
        f"retries allowed / refused     {r['retries_allowed']} / "
        f"{r['retries_refused_by_budget']} (retry budget)"
    )
    r.update(
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=f"{platform.machine()} {platform.system()}, shared",
        target="success 100%; dead-backend calls stop within the breaker threshold",
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "resilience_outage.json").write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
