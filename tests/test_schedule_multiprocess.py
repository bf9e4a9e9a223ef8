"""Real replicas: scheduler processes sharing one SQLite file or one PostgreSQL database.

Every process adds the same 120 one-second schedules and runs for a few seconds; each run appends
``schedule fire_time pid`` to one log. Every (schedule, fire time) must appear exactly once: no
duplicates, none missed. A replica killed mid-run loses its run to another after the lease.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests._services import port_open, require_service

ROOT = Path(__file__).resolve().parents[1]
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"

WORKER = textwrap.dedent(
    """
    import os, sys
    from datetime import UTC, datetime, timedelta

    import anyio

    from genfan.schedule import (
        DateTrigger, IntervalTrigger, Scheduler, SchedulePolicy, store_from_url,
    )
    from genfan.resilience import RetryPolicy

    URL, LOG, START, STOP, MODE = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]


    def log(line):
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\\n").encode())
        finally:
            os.close(fd)


    async def record(context):
        log(f"{context.schedule_id} {context.fire_time.timestamp():.6f} {os.getpid()}")


    async def slow(context):
        log(f"start {os.getpid()} {context.attempt}")
        await anyio.sleep(3)
        log(f"done {os.getpid()} {context.attempt}")


    async def main():
        start = datetime.fromtimestamp(START, UTC)
        stop = datetime.fromtimestamp(STOP, UTC)
        async with Scheduler(
            store_from_url(URL), identity=f"p{os.getpid()}", poll_interval=0.25,
            lease_time=1.5, max_concurrent_runs=500,
        ) as s:
            if MODE == "many":
                policy = SchedulePolicy(coalesce="all", overlap="buffer_all")
                for i in range(120):
                    await s.add_schedule(
                        "__main__:record", IntervalTrigger(seconds=1, start=start),
                        id=f"s{i:03d}", policy=policy,
                    )
            else:
                await s.add_schedule(
                    "__main__:slow", DateTrigger(at=start), id="slow",
                    policy=SchedulePolicy(retry=RetryPolicy(attempts=2, initial=0)),
                    conflict="keep",
                )
            log(f"ready {os.getpid()}")
            await s.clock.sleep_until(stop)


    anyio.run(main)
    """
)


def _spawn(
    script: Path, url: str, log: Path, start: float, stop: float, mode: str
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, str(script), url, str(log), f"{start:.6f}", f"{stop:.6f}", mode],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _run_replicas(tmp_path: Path, url: str, *, seconds: float = 8.0) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    log = tmp_path / "runs.log"
    start = float(int(time.time()) + 4)  # time for three interpreters to start
    stop = start + seconds
    procs = [_spawn(script, url, log, start, stop, "many") for _ in range(3)]
    try:
        outs = [p.communicate(timeout=seconds + 40)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    lines = [ln.split() for ln in log.read_text().splitlines() if not ln.startswith("ready")]
    runs = Counter((sid, float(fire)) for sid, fire, _ in lines)
    duplicates = {k: n for k, n in runs.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} (schedule, fire time) ran more than once"
    # Every fire time from start to 1.5 s before the stop ran (later ones may be cut short).
    expected = {(f"s{i:03d}", start + k) for i in range(120) for k in range(int(seconds - 1.5) + 1)}
    missing = expected - {(sid, round(f, 3)) for sid, f in runs}
    assert not missing, f"{len(missing)} fire times never ran, e.g. {sorted(missing)[:5]}"
    pids = Counter(pid for _, _, pid in lines)
    assert len(pids) >= 2, f"the work should spread over the replicas: {pids}"


def test_three_processes_sharing_one_sqlite_file(tmp_path: Path) -> None:
    _run_replicas(tmp_path, f"sqlite:///{tmp_path / 'shared.db'}")


@pytest.mark.postgres
def test_three_processes_sharing_one_postgres_database(tmp_path: Path) -> None:
    require_service("PostgreSQL", port_open("127.0.0.1", 5432), "nothing listens on 127.0.0.1:5432")
    schema = f"genfan_mp_{uuid.uuid4().hex[:10]}"
    try:
        _run_replicas(tmp_path, f"{PG_DSN}?schema={schema}")
    finally:
        import psycopg

        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def test_killed_replica_loses_its_run_to_another_after_the_lease(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    log = tmp_path / "runs.log"
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    start = float(int(time.time()) + 3)
    stop = start + 6.5  # lease 1.5 s + the 3 s run, with room
    procs = {p.pid: p for p in (_spawn(script, url, log, start, stop, "slow") for _ in range(2))}
    try:
        deadline = time.time() + 30
        victim = None
        while victim is None and time.time() < deadline:
            for line in log.read_text().splitlines() if log.exists() else []:
                if line.startswith("start "):
                    victim = int(line.split()[1])
            time.sleep(0.05)
        assert victim is not None, "no replica started the run"
        procs[victim].send_signal(signal.SIGKILL)  # dies mid-run: no clean release
        survivor = next(p for pid, p in procs.items() if pid != victim)
        out = survivor.communicate(timeout=40)[0].decode()
        assert survivor.returncode == 0, out[-3000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
    events = [ln.split() for ln in log.read_text().splitlines() if not ln.startswith("ready")]
    assert events == [
        ["start", str(victim), "1"],
        ["start", str(survivor.pid), "2"],
        ["done", str(survivor.pid), "2"],
    ]
