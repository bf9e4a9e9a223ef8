"""Batch APIs: what a job costs in real time and through the batch endpoint, and kills survived.

    .venv/bin/python -m benchmarks.batch_api [--rows 10000] [--chunk 1000] [--engine]

Figures:

* the same ``--rows`` job (default 10,000), priced with ``price=(0.15, 0.6)`` USD per million
  input/output tokens, run **real time** (a call per row, 64 in flight) and **through the batch
  API** (``--chunk`` rows per batch), for OpenAI and Anthropic, against genfan's fake server
  (its batch emulation): the cost of each path, their ratio, and the wall time (the batch's is
  the fake server's, which finishes at once; a real one takes minutes to hours);
* resume after SIGKILL of ``genfan batch run --via batch-api`` (a real process) during an upload,
  while polling and during a download, and after a create whose answer was lost: every row
  done, and the batches created counted **on the server** against the chunks (0 submitted twice);
* with ``--engine``: the local vLLM engine, ``--engine-rows`` rows real time (the default
  real-time path: 16 rows in flight) against ``via="offline"`` (every row at once).

Prints a table and writes benchmarks/results/batch_api.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "batch_api.json"
PRICE = (0.15, 0.6)


def write_rows(path: Path, n: int) -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(
                json.dumps({"id": f"r{i}", "prompt": f"Summarise item {i} in one line."}) + "\n"
            )
    return path


def write_config(path: Path, provider: str, url: str) -> Path:
    path.write_text(
        f'[backends.m]\ntype = "{provider}"\nmodel = "m1"\nbase_url = "{url}"\n'
        f"price = [{PRICE[0]}, {PRICE[1]}]\n"
    )
    return path


# -- cost: real time against the batch API ------------------------------------------------------


def cost(rows: int, chunk: int, provider: str) -> dict[str, Any]:
    from genfan.batching import BatchAPISettings, BatchJob, run_batch_job
    from genfan.testserver import FakeLLMServer

    out: dict[str, Any] = {"provider": provider, "rows": rows}
    with tempfile.TemporaryDirectory() as d, FakeLLMServer(record=0) as srv:
        tmp = Path(d)
        inp = write_rows(tmp / "in.jsonl", rows)
        cfg = write_config(tmp / "genfan.toml", provider, srv.url)
        for via in ("realtime", "batch-api"):
            job = BatchJob(
                input=inp,
                output=tmp / f"{via}.jsonl",
                config=cfg,
                via=via,
                max_in_flight=64,
                batch_api=BatchAPISettings(max_requests=chunk, poll_initial=0.05, poll_max=0.5),
            )
            t0 = time.perf_counter()
            summary = anyio.run(run_batch_job, job)
            wall = time.perf_counter() - t0
            assert summary.done_ok == rows, summary
            out[via] = {
                "cost": summary.cost,
                "wall": wall,
                "input_tokens": summary.input_tokens,
                "output_tokens": summary.output_tokens,
            }
        out["batches"] = srv.batches.creates[provider]
        out["chat_calls"] = srv.count("/v1/chat/completions") + srv.count("/v1/messages")
    out["ratio"] = out["batch-api"]["cost"] / out["realtime"]["cost"]
    return out


# -- kills --------------------------------------------------------------------------------------


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "genfan.cli", "batch", "run", *args]


def _wait(predicate: Callable[[], bool], timeout: float = 120) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def _chunks(state: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads(state.read_text())["chunks"])
    except (OSError, ValueError, KeyError):
        return []


def kill_and_resume(rows: int, chunk: int, phase: str) -> dict[str, Any]:
    """SIGKILL a ``genfan batch run --via batch-api`` in ``phase``, run it again to the end."""
    from genfan.testserver import FakeLLMServer

    n_chunks = -(-rows // chunk)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    with tempfile.TemporaryDirectory() as d, FakeLLMServer(record=0) as srv:
        tmp = Path(d)
        inp = write_rows(tmp / "in.jsonl", rows)
        cfg = write_config(tmp / "genfan.toml", "openai", srv.url)
        out, state = tmp / "out.jsonl", tmp / "out.jsonl.batches.json"
        args = [str(inp), "-o", str(out), "-c", str(cfg), "--via", "batch-api",
                "--max-requests", str(chunk), "--poll-interval", "0.05", "--no-progress",
                "--json"]  # fmt: skip
        killed_at: dict[str, Any] = {}
        if phase == "lost create":
            srv.batches.lose_next_create(n_chunks // 2 or 1)
        else:
            if phase == "upload":
                srv.batches.upload_latency = 0.5

                def ready() -> bool:
                    return srv.count("/v1/files") >= max(2, n_chunks // 2)

            elif phase == "polling":
                srv.batches.hold()

                def ready() -> bool:
                    submitted = sum(c["state"] == "submitted" for c in _chunks(state))
                    return submitted == n_chunks and srv.count() > 4 * n_chunks

            else:  # download: a batch's output file is being read when the kill comes
                srv.batches.download_latency = 0.5

                def ready() -> bool:
                    reads = sum(v for k, v in srv.counts.items() if k.endswith("/content"))
                    return reads >= max(2, n_chunks // 2)

            proc = subprocess.Popen(_cli(args), env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)  # fmt: skip
            if not _wait(ready):
                proc.kill()
                raise RuntimeError(f"{phase}: never reached: {proc.communicate()[1][-2000:]!r}")
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            chunks = _chunks(state)
            killed_at = {
                "rows_written": out.read_bytes().count(b"\n") if out.exists() else 0,
                "chunks": {s: sum(c["state"] == s for c in chunks) for s in
                           ("intent", "uploaded", "submitted", "collected")},
                "batches_created": srv.batches.creates["openai"],
            }  # fmt: skip
            srv.batches.complete_after(0)
            srv.batches.upload_latency = srv.batches.download_latency = 0.0
        t0 = time.perf_counter()
        done = subprocess.run(_cli(args), env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{phase}: resume failed: {done.stderr[-2000:]}")
        summary = json.loads(done.stdout)
        return {
            "phase": phase,
            "rows": rows,
            "chunks": n_chunks,
            "killed_at": killed_at,
            "resume_wall": time.perf_counter() - t0,
            "done_ok": summary["done_ok"],
            "batches_created_on_server": srv.batches.creates["openai"],
            "batches_adopted": summary["batches_adopted"],
            "submitted_twice": srv.batches.resubmitted(),
        }


# -- the local engine ---------------------------------------------------------------------------


def engine(rows: int, tokens: int) -> dict[str, Any]:
    from genfan.batching import BatchJob, Via, run_batch_job

    out: dict[str, Any] = {"rows": rows, "max_tokens": tokens}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        inp = write_rows(tmp / "in.jsonl", rows)
        cfg = tmp / "genfan.toml"
        cfg.write_text(
            f'[backends.local]\ntype = "vllm"\nmax_tokens = {tokens}\ntemperature = 0.0\n'
        )

        async def both() -> None:
            # Twice each, interleaved (load from elsewhere hits both alike); the best is kept.
            order: tuple[Via, ...] = ("realtime", "offline", "offline", "realtime")
            for n, via in enumerate(order):
                job = BatchJob(input=inp, output=tmp / f"{via}{n}.jsonl", config=cfg, via=via)
                t0 = time.perf_counter()
                summary = await run_batch_job(job)
                wall = time.perf_counter() - t0
                run = {"wall": wall, "rows_per_s": rows / wall, "ok": summary.done_ok,
                       "output_tokens": summary.output_tokens}  # fmt: skip
                out.setdefault("runs", []).append({"via": via, **run})
                if via not in out or wall < out[via]["wall"]:
                    out[via] = run

        async def all_runs() -> None:
            # One engine for both runs: a backend held open keeps it (the last to close stops
            # it), so neither run counts the engine's start.
            from genfan_providers.vllm import VLLMBackend

            holder = VLLMBackend(name="holder")
            t0 = time.perf_counter()
            await holder.start()
            out["engine_start_s"] = time.perf_counter() - t0
            try:
                await both()
            finally:
                await holder.aclose()

        anyio.run(all_runs)
    out["speedup"] = out["offline"]["rows_per_s"] / out["realtime"]["rows_per_s"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--chunk", type=int, default=1_000, help="rows per batch")
    parser.add_argument("--kill-rows", type=int, default=10_000, help="rows of the kill runs")
    parser.add_argument("--engine", action="store_true", help="also the local vLLM engine")
    parser.add_argument(
        "--engine-only", action="store_true", help="only the engine (kept beside earlier figures)"
    )
    parser.add_argument("--engine-rows", type=int, default=64)
    parser.add_argument("--engine-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    if args.engine_only:
        result = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        result["engine"] = engine(args.engine_rows, args.engine_tokens)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        e = result["engine"]
        for via in ("realtime", "offline"):
            print(f"{via:<10} {e[via]['rows_per_s']:>8.2f} rows/s  ({e[via]['wall']:.1f} s)")
        print(f"offline / real time: {e['speedup']:.2f}x")
        return result
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "price": PRICE,
        "cost": [cost(args.rows, args.chunk, p) for p in ("openai", "anthropic")],
        "kills": [
            kill_and_resume(args.kill_rows, args.chunk, phase)
            for phase in ("upload", "polling", "download", "lost create")
        ],
    }
    if args.engine:
        result["engine"] = engine(args.engine_rows, args.engine_tokens)

    print(f"\n{args.rows} rows, price {PRICE} USD per 1M tokens in/out (fake server)")
    print(f"{'provider':<10} {'real-time $':>12} {'batch $':>10} {'ratio':>6} {'batches':>8} "
          f"{'rt wall s':>10} {'batch wall s':>13}")  # fmt: skip
    for c in result["cost"]:
        rt, b = c["realtime"], c["batch-api"]
        print(f"{c['provider']:<10} {rt['cost']:>12.4f} {b['cost']:>10.4f} {c['ratio']:>6.2f} "
              f"{c['batches']:>8} {rt['wall']:>10.1f} {b['wall']:>13.1f}")  # fmt: skip
    print(f"\nSIGKILL and resume ({args.kill_rows} rows, {args.chunk} per batch)")
    print(f"{'killed during':<14} {'chunks':>6} {'at kill: created':>17} {'written':>8} "
          f"{'created':>8} {'adopted':>8} {'twice':>6} {'ok':>7}")  # fmt: skip
    for k in result["kills"]:
        at = k["killed_at"]
        print(f"{k['phase']:<14} {k['chunks']:>6} {at.get('batches_created', '-'):>17} "
              f"{at.get('rows_written', '-'):>8} {k['batches_created_on_server']:>8} "
              f"{k['batches_adopted']:>8} {k['submitted_twice']:>6} {k['done_ok']:>7}")  # fmt: skip
    if "engine" in result:
        e = result["engine"]
        print(f"\nlocal engine, {e['rows']} rows, {e['max_tokens']} tokens each")
        for via in ("realtime", "offline"):
            print(f"{via:<10} {e[via]['rows_per_s']:>8.1f} rows/s  ({e[via]['wall']:.1f} s)")
        print(f"offline / real time: {e['speedup']:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
