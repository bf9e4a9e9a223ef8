"""Issue 7's first figure: 1,000 interval schedules on one scheduler, drift and CPU per fire.

Run: ``.venv/bin/python -m benchmarks.schedule_drift [--schedules 1000] [--seconds 20]``.

1,000 schedules fire every second (their starts spread evenly over the first second, as
schedules added over time would be; ``--aligned`` puts them all on the same instant) into one
scheduler on the default SQLite store (a file, worker threads). The job is a no-op coroutine, so
what is measured is the scheduler itself: store transactions, claims, task start, telemetry.
Drift = actual start - planned start (fire time; no jitter), from the run history. CPU per
fire = process CPU time (user + system, every thread) / runs. Prints a table and writes JSON to
``benchmarks/results/schedule_drift.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio

from genfan.schedule import IntervalTrigger, SchedulePolicy, Scheduler, SQLiteStore

RESULTS = Path(__file__).parent / "results"


async def noop() -> None:
    return None


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def measure(n: int, seconds: float, aligned: bool, backend: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "bench.db")
        async with Scheduler(
            store, max_concurrent_runs=max(100, n), poll_interval=None, batch_size=1000
        ) as s:
            start = s.clock.now() + timedelta(seconds=2)
            for i in range(n):
                offset = 0.0 if aligned else i / n
                await s.add_schedule(
                    "benchmarks.schedule_drift:noop",
                    IntervalTrigger(seconds=1, start=start + timedelta(seconds=offset)),
                    id=f"s{i:04d}",
                    policy=SchedulePolicy(coalesce="all"),
                )
            await s.clock.sleep_until(start)
            cpu0 = time.process_time()
            await s.clock.sleep_until(start + timedelta(seconds=seconds))
            cpu = time.process_time() - cpu0
            window_end = start + timedelta(seconds=seconds)
            done = await s.history(limit=10_000_000, statuses=["succeeded"])
            # CPU over the window / runs started in it; drift over fires a second before its end
            started = sum(1 for r in done if r.started is not None and r.started < window_end)
            runs = [r for r in done if r.run_at < window_end - timedelta(seconds=1)]
            pending = await s.history(limit=10_000_000, statuses=["pending", "running"])
        await store.aclose()
    drifts = [r.drift for r in runs if r.drift is not None]
    expected = n * int(seconds - 1)
    return {
        "backend": backend,
        "schedules": n,
        "seconds": seconds,
        "aligned": aligned,
        "runs": len(drifts),
        "expected_runs": expected,
        "left_pending": len(pending),
        "drift_p50_ms": 1000 * statistics.median(drifts),
        "drift_p99_ms": 1000 * pct(drifts, 0.99),
        "drift_max_ms": 1000 * max(drifts),
        "cpu_per_fire_us": 1e6 * cpu / max(1, started),
        "cpu_share_of_one_core": cpu / seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schedules", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--aligned", action="store_true", help="every schedule on the same instant")
    ap.add_argument("--backends", default="asyncio,trio")
    args = ap.parse_args()
    rows = []
    for backend in args.backends.split(","):
        for aligned in [True] if args.aligned else [False, True]:
            rows.append(
                anyio.run(measure, args.schedules, args.seconds, aligned, backend, backend=backend)
            )
    print(
        f"\n{args.schedules} interval schedules (1 s) on one scheduler, SQLite file store, "
        f"{args.seconds:g} s\n"
    )
    head = (
        f"{'backend':8} {'fires':>8} {'runs':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'CPU/fire':>10} {'CPU':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        fires = "aligned" if r["aligned"] else "spread"
        print(
            f"{r['backend']:8} {fires:>8} {r['runs']:>7} {r['drift_p50_ms']:8.2f} "
            f"{r['drift_p99_ms']:8.2f} {r['drift_max_ms']:8.2f} {r['cpu_per_fire_us']:8.0f} us "
            f"{100 * r['cpu_share_of_one_core']:5.0f}%"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "schedule_drift.json"
    out.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
