"""Issue 6's batch-job figures: 10,000 rows x 3 backends, and resuming after a kill at 50%.

Run: ``.venv/bin/python -m benchmarks.batching_job [--rows 10000] [--quick]``.

A fake OpenAI-compatible server (``python -m genfan.testserver``, its own process) answers every
chat completion after 20 ms. Each row is fanned out to three ``OpenAIBackend`` s on it. Every run
is a real ``genfan batch run`` process (``--fanout benchmarks.batching_job:make_fanout``):

1. a full run: rows/s and the client's CPU time per row (user + system of the child process,
   fsync'ing writer thread included);
2. the same job killed with SIGKILL once half the rows are in the output, then run again: the
   resume overhead is (killed wall + resumed wall) - full wall, and the resumed run's start-up
   (process start, reading the input, scanning the output) is reported on its own; every id must
   be in the output exactly once.

Prints a table and writes JSON to ``benchmarks/results/batching_job.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def make_fanout() -> Any:
    """The job's fan-out: three backends on the server named by ``GENFAN_BENCH_URL``."""
    from genfan_providers.openai import OpenAIBackend

    from genfan import FanOut

    url = os.environ["GENFAN_BENCH_URL"]
    return FanOut(
        [
            OpenAIBackend(f"model-{n}", name=n, base_url=url, api_key_env=None)
            for n in ("a", "b", "c")
        ]
    )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def _run(
    inp: Path, out: Path, url: str, in_flight: int, kill_at: int | None = None
) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "genfan.cli", "batch", "run", str(inp), "-o", str(out),
        "--fanout", "benchmarks.batching_job:make_fanout",
        "--max-in-flight", str(in_flight), "--no-progress", "--json",
    ]  # fmt: skip
    env = {**os.environ, "GENFAN_BENCH_URL": url, "PYTHONPATH": str(ROOT)}
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if kill_at is not None:
        while _lines(out) < kill_at and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    result: dict[str, Any] = {"wall": wall, "cpu": _children_cpu() - cpu0, "rc": proc.returncode}
    if kill_at is None:
        if proc.returncode != 0:
            raise RuntimeError(f"batch run failed ({proc.returncode}): {stderr.decode()[-2000:]}")
        result["summary"] = json.loads(stdout)
    else:
        result["lines_at_kill"] = _lines(out)
    return result


def _scan_cost(inp: Path, out: Path, tmp: Path) -> float:
    """Seconds a resumed job spends reading the input and indexing (and repairing) the output."""
    import shutil

    from genfan.batching._output import OutputFile
    from genfan.batching._rows import scan_input

    copy = tmp / "scan-copy.jsonl"
    shutil.copyfile(out, copy)
    t0 = time.perf_counter()
    scan_input(inp)
    output = OutputFile(copy)
    output.open()
    output.close()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--latency", type=float, default=0.02, help="server seconds per answer")
    parser.add_argument("--in-flight", type=int, default=64, help="rows in flight")
    parser.add_argument("--quick", action="store_true", help="1,000 rows")
    args = parser.parse_args(argv)
    rows = 1_000 if args.quick else args.rows

    from genfan.testserver import ServerProcess

    with tempfile.TemporaryDirectory() as tmp, ServerProcess(latency=args.latency) as server:
        inp = Path(tmp) / "in.jsonl"
        inp.write_text(
            "".join(
                json.dumps({"id": f"row-{i}", "prompt": f"Summarise item {i} in one line."}) + "\n"
                for i in range(rows)
            )
        )
        full = _run(inp, Path(tmp) / "full.jsonl", server.url, args.in_flight)
        out = Path(tmp) / "resumed.jsonl"
        killed = _run(inp, out, server.url, args.in_flight, kill_at=rows // 2)
        scan_s = _scan_cost(inp, out, Path(tmp))
        resumed = _run(inp, out, server.url, args.in_flight)
        ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
        exactly_once = ids == [f"row-{i}" for i in range(rows)]

    s_full, s_res = full["summary"], resumed["summary"]
    result = {
        "benchmark": "batching_job",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} (shared)",
        "rows": rows,
        "backends": 3,
        "server_latency_s": args.latency,
        "max_in_flight": args.in_flight,
        "full": {
            "process_wall": full["wall"],
            "job_wall": s_full["wall"],
            "rows_per_s": s_full["throughput"],
            "cpu_ms_per_row": full["cpu"] / rows * 1000,
            "ok": s_full["done_ok"],
        },
        "killed": {"wall": killed["wall"], "lines_at_kill": killed["lines_at_kill"]},
        "resumed": {
            "process_wall": resumed["wall"],
            "job_wall": s_res["wall"],
            "skipped": s_res["skipped"],
            "ran": s_res["ran"],
            "repaired_bytes": s_res["repaired"],
            "startup_s": resumed["wall"] - s_res["wall"],
            "scan_s": scan_s,
        },
        "resume_overhead_s": killed["wall"] + resumed["wall"] - full["wall"],
        "exactly_once": exactly_once,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batching_job.json").write_text(json.dumps(result, indent=2))

    f, r = result["full"], result["resumed"]
    print(
        f"batch job: {rows:,} rows x 3 backends, server latency {args.latency * 1e3:g} ms, "
        f"{args.in_flight} rows in flight"
    )
    print(f"{'run':<10}{'wall s':>9}{'rows/s':>9}{'CPU ms/row':>12}")
    print(
        f"{'full':<10}{f['process_wall']:>9.2f}{f['rows_per_s']:>9.0f}{f['cpu_ms_per_row']:>12.2f}"
    )
    print(
        f"{'killed':<10}{killed['wall']:>9.2f}{'':>9}{'':>12}  ({killed['lines_at_kill']} rows in output)"
    )
    print(
        f"{'resumed':<10}{r['process_wall']:>9.2f}{'':>9}{'':>12}  ({r['skipped']} skipped, "
        f"{r['ran']} run, start-up {r['startup_s']:.2f} s, of which input+output scan "
        f"{r['scan_s'] * 1e3:.0f} ms)"
    )
    print(
        f"resume overhead (killed + resumed - full wall): {result['resume_overhead_s']:+.2f} s; "
        "every id exactly once: "
        f"{exactly_once}"
    )
    return result


if __name__ == "__main__":
    main()
