"""Issue 18, the gateway: what ``genfan serve`` adds over a direct call, and how many requests a
second it answers, side by side with LiteLLM's proxy in front of the same fake server.

Run: ``.venv/bin/python -m benchmarks.gateway [--seconds 5] [--no-litellm]``.

One fake OpenAI server (``python -m genfan.testserver``, its own process, uvloop, no latency)
answers every request. In front of it, each in its own processes:

* ``direct``: no gateway (the baseline of "added latency");
* ``genfan`` (uvicorn, 1 worker), ``genfan+key`` (the same with a virtual key, a ledger row
  per request and a USD budget reserved and settled per request, SQLite),
  ``genfan granian`` (granian, 1 worker), ``genfan hypercorn`` (hypercorn, 1 worker, uvloop),
  ``genfan 2 workers`` (uvicorn);
* ``litellm``: LiteLLM's proxy (``litellm[proxy]==1.106.0``, one worker, its defaults and a
  master key, without which it refuses to start), from a
  virtual environment of its own (``benchmarks/.litellm-venv``, created and filled with pip on
  the first run; ``--no-litellm`` skips it).

The load generator is a separate process (aiohttp, one connection per concurrent client, kept
alive), so that its CPU is not the gateway's. Each target gets, in turn, 1 client at a time for
``--seconds`` (p50 and p99 latency) and 64 at once (requests a second). "Added" is the target's
p50 (or p99) minus the direct call's in the same run.

Prints a table and writes JSON to ``benchmarks/results/gateway.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from genfan.testserver import ServerProcess

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
LITELLM_VENV = Path(__file__).parent / ".litellm-venv"
LITELLM = "litellm[proxy]==1.106.0"
#: LiteLLM's proxy refuses to start without a master key (its one key, checked per request).
LITELLM_KEY = "sk-" + "0123456789abcdef" * 4


# -- the load generator (its own process) ---------------------------------------------------------


async def _load(url: str, key: str, model: str, concurrency: int, seconds: float) -> dict[str, Any]:
    import aiohttp

    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            nonlocal errors
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    errors += 1

        for _ in range(concurrency * 4):  # warm every connection and the gateway
            await one()
        stop = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                await one()
                latencies.append(time.perf_counter() - t)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "errors": errors,
        "rps": n / elapsed,
        "p50_ms": latencies[n // 2] * 1e3 if n else None,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1e3 if n else None,
    }


def measure(
    url: str, model: str, concurrency: int, seconds: float, key: str = "sk-none"
) -> dict[str, Any]:
    """Run the load generator in a child process and read its JSON."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gateway",
            "--load",
            url,
            "--model",
            model,
            "--concurrency",
            str(concurrency),
            "--seconds",
            str(seconds),
            "--key",
            key,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=seconds * 4 + 120,
    )
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)  # type: ignore[no-any-return]


# -- the servers ----------------------------------------------------------------------------------


def _wait_ready(url: str, proc: subprocess.Popen[Any], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode})")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"{url}: not ready after {timeout}s")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_genfan(config: Path, *args: str) -> tuple[subprocess.Popen[Any], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "genfan.cli",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, "GF_BENCH_KEY": "sk-local"},
    )
    url = f"http://127.0.0.1:{port}"
    _wait_ready(f"{url}/health", proc)
    return proc, url


_HYPERCORN = """
import sys, uvloop
from hypercorn.asyncio import serve
from hypercorn.config import Config
from genfan.serve import create_app
config = Config()
config.bind = [f"127.0.0.1:{sys.argv[2]}"]
config.accesslog = None
config.errorlog = None
uvloop.run(serve(create_app(sys.argv[1]), config))
"""


def start_hypercorn(config: Path) -> tuple[subprocess.Popen[Any], str]:
    """The same app under hypercorn (1 worker, uvloop): measured to choose the server."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _HYPERCORN, str(config), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, "GF_BENCH_KEY": "sk-local"},
    )
    url = f"http://127.0.0.1:{port}"
    _wait_ready(f"{url}/health", proc)
    return proc, url


def litellm_python() -> Path | None:
    """The LiteLLM venv's python, installing ``litellm[proxy]`` into it if absent."""
    python = LITELLM_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    check = subprocess.run(
        [str(python), "-c", "import litellm.proxy.proxy_server"], capture_output=True
    )
    if check.returncode != 0:
        print(f"installing {LITELLM} into {LITELLM_VENV} (once)...", file=sys.stderr)
        pip = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", LITELLM], capture_output=True, text=True
        )
        if pip.returncode != 0:
            print(f"cannot install LiteLLM: {pip.stderr[-500:]}", file=sys.stderr)
            return None
    return python


def start_litellm(python: Path, backend_url: str, tmp: Path) -> tuple[subprocess.Popen[Any], str]:
    config = tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: a\n"
        "    litellm_params:\n"
        "      model: openai/m-a\n"
        f"      api_base: {backend_url}\n"
        "      api_key: sk-local\n",
        encoding="utf-8",
    )
    port = _free_port()
    litellm = python.parent / "litellm"
    proc = subprocess.Popen(
        [str(litellm), "--config", str(config), "--port", str(port), "--num_workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp,
        env={**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_MASTER_KEY": LITELLM_KEY},
    )
    url = f"http://127.0.0.1:{port}"
    _wait_ready(f"{url}/health/liveliness", proc, timeout=180)
    return proc, url


def _stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--targets", help="only these targets (comma-separated; direct always)")
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="a", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--key", default="sk-none", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.load:
        result = asyncio.run(_load(ns.load, ns.key, ns.model, ns.concurrency, ns.seconds))
        print(json.dumps(result))
        return

    rows: list[dict[str, Any]] = []
    with ServerProcess(latency=0.0) as fake, tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        plain = tmp / "genfan.toml"
        plain.write_text(
            f'[backends.a]\ntype = "openai"\nmodel = "m-a"\nbase_url = "{fake.url}"\n'
            'api_key_env = "GF_BENCH_KEY"\nprice = [0.15, 0.6]\n',
            encoding="utf-8",
        )
        keyed = tmp / "keyed.toml"
        keyed.write_text(
            plain.read_text() + f'\n[serve]\nkeys = "sqlite:///{tmp / "keys.db"}"\n',
            encoding="utf-8",
        )
        made = subprocess.run(
            [
                sys.executable,
                "-m",
                "genfan.cli",
                "keys",
                "create",
                "bench",
                "--config",
                str(keyed),
                "--budget",
                "1000000",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        key = made.stdout.strip()

        targets: list[tuple[str, Any]] = [
            ("direct", None),
            ("genfan", (plain, ())),
            ("genfan+key", (keyed, ())),
            ("genfan granian", (plain, ("--server", "granian"))),
            ("genfan hypercorn", "hypercorn"),
            ("genfan 2 workers", (plain, ("--workers", "2"))),
        ]
        if not ns.no_litellm:
            targets.append(("litellm", "litellm"))
        if ns.targets:
            wanted = {"direct", *ns.targets.split(",")}
            targets = [t for t in targets if t[0] in wanted]
        for name, spec in targets:
            proc = None
            try:
                if spec is None:
                    url, model = fake.url.removesuffix("/v1"), "m-a"
                elif spec == "hypercorn":
                    proc, url = start_hypercorn(plain)
                    model = "a"
                elif spec == "litellm":
                    python = litellm_python()
                    if python is None:
                        rows.append({"target": name, "error": "LiteLLM could not be installed"})
                        continue
                    proc, url = start_litellm(python, fake.url, tmp)
                    model = "a"
                else:
                    proc, url = start_genfan(spec[0], *spec[1])
                    model = "a"
                chat = f"{url}/v1/chat/completions"
                auth = LITELLM_KEY if spec == "litellm" else key
                one = measure(chat, model, 1, ns.seconds, auth)
                many = measure(chat, model, 64, ns.seconds, auth)
                rows.append({"target": name, "c1": one, "c64": many})
                print(
                    f"{name}: {one['p50_ms']:.2f} ms p50 at 1; {many['rps']:.0f} req/s at 64",
                    file=sys.stderr,
                )
            except Exception as exc:  # report what ran; say what did not
                rows.append({"target": name, "error": f"{type(exc).__name__}: {exc}"})
            finally:
                if proc is not None:
                    _stop(proc)

    direct = next((r for r in rows if r["target"] == "direct" and "c1" in r), None)
    print()
    print(
        f"{'target':<18} {'c=1 p50':>9} {'p99':>8} {'added p50':>10} {'added p99':>10} "
        f"{'c=64 req/s':>11} {'p50':>8} {'p99':>8} {'added p50':>10} {'errors':>7}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['target']:<18} error: {r['error']}")
            continue
        c1, c64 = r["c1"], r["c64"]
        if direct is not None:
            r["added_c1_p50_ms"] = c1["p50_ms"] - direct["c1"]["p50_ms"]
            r["added_c1_p99_ms"] = c1["p99_ms"] - direct["c1"]["p99_ms"]
            r["added_c64_p50_ms"] = c64["p50_ms"] - direct["c64"]["p50_ms"]
            r["added_c64_p99_ms"] = c64["p99_ms"] - direct["c64"]["p99_ms"]
        print(
            f"{r['target']:<18} {c1['p50_ms']:>8.2f}m {c1['p99_ms']:>7.2f}m "
            f"{r.get('added_c1_p50_ms', 0):>9.2f}m {r.get('added_c1_p99_ms', 0):>9.2f}m "
            f"{c64['rps']:>11.0f} {c64['p50_ms']:>7.1f}m {c64['p99_ms']:>7.1f}m "
            f"{r.get('added_c64_p50_ms', 0):>9.1f}m {c1['errors'] + c64['errors']:>7}"
        )
    lite = next((r for r in rows if r["target"] == "litellm" and "c64" in r), None)
    gen = next((r for r in rows if r["target"] == "genfan" and "c64" in r), None)
    summary: dict[str, Any] = {}
    if lite and gen:
        summary["rps_ratio_genfan_over_litellm"] = gen["c64"]["rps"] / lite["c64"]["rps"]
        print(
            f"\ngenfan / LiteLLM requests/s at 64 clients: "
            f"{summary['rps_ratio_genfan_over_litellm']:.1f}x"
        )
    RESULTS.mkdir(exist_ok=True)
    out = {
        "seconds": ns.seconds,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "rows": rows,
        **summary,
    }
    (RESULTS / "gateway.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
