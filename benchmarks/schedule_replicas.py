"""Issue 7's second figure: scheduler replicas on PostgreSQL, runs claimed per second, duplicates.

Run: ``.venv/bin/python -m benchmarks.schedule_replicas [--runs 6000] [--replicas 1,3]``.

``--runs`` one-off schedules all fire at the same instant in a fresh PostgreSQL schema
(127.0.0.1:5432, database ``test``); then 1 (baseline) and 3 replica processes, each a
:class:`~genfan.Scheduler` on a :class:`~genfan.PostgresStore`, drain them. Every run appends its
schedule id to one log file; a duplicate is an id logged twice. Claimed per second = runs /
(last claim - first claim), from the run history. Prints a table and writes JSON to
``benchmarks/results/schedule_replicas.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio

from genfan.schedule import DateTrigger, PostgresStore, SchedulePolicy, Scheduler

RESULTS = Path(__file__).parent / "results"
DSN = "postgresql://postgres@127.0.0.1:5432/test"
LOG = os.environ.get("GENFAN_BENCH_LOG", "")


async def record(context: Any) -> None:
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{context.schedule_id} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


async def child(schema: str, stop: float) -> None:
    store = PostgresStore(DSN, schema=schema, pool_size=3)
    async with Scheduler(
        store, max_concurrent_runs=500, poll_interval=0.05, lease_time=30, batch_size=1000
    ) as s:
        await s.clock.sleep_until(datetime.fromtimestamp(stop, UTC))
    await store.aclose()


async def prepare(schema: str, n: int, at: datetime) -> None:
    store = PostgresStore(DSN, schema=schema, pool_size=4)
    async with Scheduler(store, process_runs=False) as s:
        limiter = anyio.CapacityLimiter(4)

        async def add(i: int) -> None:
            async with limiter:
                await s.add_schedule(
                    "benchmarks.schedule_replicas:record",
                    DateTrigger(at=at),
                    id=f"r{i:06d}",
                    policy=SchedulePolicy(),
                )

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(add, i)
    await store.aclose()


async def collect(schema: str) -> tuple[list[Any], int]:
    store = PostgresStore(DSN, schema=schema)
    runs = await store.history(limit=10_000_000)
    await store.drop()
    await store.aclose()
    return runs, 0


def run_once(n: int, replicas: int) -> dict[str, Any]:
    schema = f"genfan_bench_{uuid.uuid4().hex[:8]}"
    at = datetime.now(UTC) + timedelta(seconds=600)  # far enough: nothing fires while adding
    anyio.run(prepare, schema, n, at)
    # Move the fire time to "soon" for every schedule at once.
    import psycopg

    fire = datetime.now(UTC) + timedelta(seconds=4)
    fire_us = int(fire.timestamp() * 1_000_000)
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f"UPDATE {schema}.schedules SET next_fire = %s", (fire_us,))
    stop = fire.timestamp() + max(8.0, n / 400)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "runs.log"
        env = {**os.environ, "GENFAN_BENCH_LOG": str(log)}
        cpu0 = os.times()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.schedule_replicas",
                    "--child",
                    schema,
                    f"{stop:.6f}",
                ],
                env=env,
            )
            for _ in range(replicas)
        ]
        for p in procs:
            p.wait(timeout=stop - time.time() + 60)
        cpu1 = os.times()
        lines = log.read_text().split("\n") if log.exists() else []
    runs, _ = anyio.run(collect, schema)
    done = [r for r in runs if r.status == "succeeded"]
    counts = Counter(ln.split()[0] for ln in lines if ln)
    by_pid = Counter(ln.split()[1] for ln in lines if ln)
    starts = sorted(r.started for r in done if r.started is not None)
    span = (starts[-1] - starts[0]).total_seconds() if len(starts) > 1 else float("nan")
    drifts = sorted(r.drift for r in done if r.drift is not None)
    child_cpu = (cpu1.children_user + cpu1.children_system) - (
        cpu0.children_user + cpu0.children_system
    )
    return {
        "replicas": replicas,
        "runs": n,
        "succeeded": len(done),
        "executions_logged": sum(counts.values()),
        "duplicates": sum(c - 1 for c in counts.values() if c > 1),
        "missed": n - len(counts),
        "claim_span_s": span,
        "runs_per_second_claimed": len(done) / span if span else float("nan"),
        "per_replica": sorted(by_pid.values(), reverse=True),
        "last_start_after_fire_ms": 1000 * drifts[-1] if drifts else None,
        "cpu_per_run_us": 1e6 * child_cpu / max(1, len(done)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=6000)
    ap.add_argument("--replicas", default="1,3")
    ap.add_argument("--child", nargs=2, metavar=("SCHEMA", "STOP"))
    args = ap.parse_args()
    if args.child:
        anyio.run(child, args.child[0], float(args.child[1]))
        return
    rows = [run_once(args.runs, int(r)) for r in args.replicas.split(",")]
    print(f"\n{args.runs} runs due at once, PostgreSQL store, replicas drain them\n")
    head = (
        f"{'replicas':>8} {'succeeded':>9} {'dupes':>6} {'missed':>6} {'claimed/s':>10} "
        f"{'span s':>7} {'CPU/run':>9}  per replica"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['replicas']:>8} {r['succeeded']:>9} {r['duplicates']:>6} {r['missed']:>6} "
            f"{r['runs_per_second_claimed']:>10.0f} {r['claim_span_s']:>7.2f} "
            f"{r['cpu_per_run_us']:>6.0f} us  {r['per_replica']}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "schedule_replicas.json"
    out.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": platform.machine(),
                "rows": rows,
            },
            indent=2,
            default=str,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
