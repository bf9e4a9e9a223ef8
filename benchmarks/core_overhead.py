"""Issue 2's figures: client overhead per call, 5,000 requests at once, and ``import genfan``.

Run: ``.venv/bin/python -m benchmarks.core_overhead [--quick]``. The fake server runs as separate
processes (``python -m genfan.testserver``), so its CPU never counts against the client; each
measured client runs in a fresh child process, so its peak RSS is its own.

(a) sequential calls at 0 ms server latency: client CPU (``time.process_time``) per call for a
    raw ``httpx.AsyncClient`` POST loop and a raw ``aiohttp.ClientSession`` POST loop (the two
    floors), the ``openai`` SDK, ``OpenAIBackend.complete`` and ``FanOut([backend]).run`` over
    httpx (the default) and over aiohttp (``transport="aiohttp"``); all interleaved, rotated each
    round; ratios to both floors.
(b) 5,000 requests started at once over 3 backends (3 server processes) with 500 ms latency:
    every request answered, CPU per call, peak RSS and wall for raw aiohttp (one session, no
    connection limit: the floor), genfan with ``transport="aiohttp"`` in its default guard stack
    (``create_backend``: 64 in flight per backend, the rest queued) and with the bulkhead raised
    to 5,000, the same two over httpx, bare httpx backends capped at 64 and 2,000 in flight, and
    raw httpx with its default pool (capped at 1,500 requests: it degrades badly). The aiohttp
    runs and the guarded httpx runs alternate for ``--burst-rounds`` rounds.
(c) ``import genfan``, the README's ``from genfan import FanOut, Target, create_backend``, and
    ``import httpx``, each in a fresh interpreter, interleaved: medians of 7, and which heavy
    modules genfan loaded.

Prints a table and writes JSON to ``benchmarks/results/core_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HEAVY = ("vllm", "torch", "ray", "openai", "anthropic", "litellm", "transformers", "numpy")
BODY = {
    "model": "bench-model",
    "messages": [{"role": "user", "content": "Say hello to the bench."}],
}
RESULTS = Path(__file__).parent / "results"


# -- child-process workloads -------------------------------------------------------------------


async def _sequential(kind: str, url: str, n: int, warmup: int) -> dict[str, Any]:
    """Run ``n`` sequential calls of one client kind; return CPU and wall per call."""
    import httpx
    from genfan_providers.openai import OpenAIBackend

    from genfan import ChatRequest, FanOut

    request = ChatRequest.from_prompt("Say hello to the bench.", model="bench-model")
    transport = "aiohttp" if kind.endswith("_aiohttp") else "httpx"
    if kind == "raw_aiohttp":
        import aiohttp

        session = aiohttp.ClientSession()
        endpoint = url + "/chat/completions"

        async def call() -> None:
            async with session.post(endpoint, json=BODY) as r:
                r.raise_for_status()
                (await r.json())["choices"][0]["message"]["content"]

        close = session.close
    elif kind == "raw_httpx":
        client = httpx.AsyncClient()
        endpoint = url + "/chat/completions"

        async def call() -> None:
            r = await client.post(endpoint, json=BODY)
            r.raise_for_status()
            r.json()["choices"][0]["message"]["content"]

        close = client.aclose
    elif kind == "openai_sdk":
        import openai

        sdk = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0)

        async def call() -> None:
            r = await sdk.chat.completions.create(
                model="bench-model",
                messages=[{"role": "user", "content": "Say hello to the bench."}],
            )
            _ = r.choices[0].message.content

        close = sdk.close
    elif kind in ("genfan_backend", "genfan_backend_aiohttp"):
        backend = OpenAIBackend("bench-model", base_url=url, api_key_env=None, transport=transport)

        async def call() -> None:
            c = await backend.complete(request)
            _ = c.text

        close = backend.aclose
    elif kind in ("genfan_fanout", "genfan_fanout_aiohttp"):
        backend = OpenAIBackend("bench-model", base_url=url, api_key_env=None, transport=transport)
        fan = FanOut([backend])

        async def call() -> None:
            r = await fan.run(request)
            _ = r.text

        close = fan.aclose
    else:
        raise ValueError(kind)
    for _ in range(warmup):
        await call()
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        await call()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    await close()
    return {
        "kind": kind,
        "n": n,
        "cpu_per_call_us": cpu / n * 1e6,
        "wall_per_call_us": wall / n * 1e6,
    }


async def _burst(
    kind: str, urls: list[str], n: int, max_concurrency: int, transport: str = "httpx"
) -> dict[str, Any]:
    """Start ``n`` requests at once over the backends at ``urls``; count answers.

    ``kind``: ``genfan`` (bare backends, ``max_concurrency`` each), ``guarded`` (backends from
    ``create_backend``, the default guard stack; ``max_concurrency`` > 0 raises its bulkhead to
    it), ``raw_httpx`` or ``raw_aiohttp``."""
    import anyio
    import httpx
    from genfan_providers.openai import OpenAIBackend

    from genfan import ChatRequest, create_backend

    answered = 0
    failed: dict[str, int] = {}
    request = ChatRequest.from_prompt("Say hello to the bench.", model="bench-model")
    if kind == "genfan":
        backends = [
            OpenAIBackend(
                "bench-model",
                name=f"b{i}",
                base_url=u,
                api_key_env=None,
                max_concurrency=max_concurrency,
                timeout=120,
            )
            for i, u in enumerate(urls)
        ]

        async def one(i: int) -> None:
            nonlocal answered
            try:
                c = await backends[i % len(backends)].complete(request)
                if c.text:
                    answered += 1
            except Exception as exc:
                failed[type(exc).__name__] = failed.get(type(exc).__name__, 0) + 1

        async def close() -> None:
            for b in backends:
                await b.aclose()
    elif kind == "guarded":
        guards: Any = (
            True if not max_concurrency else {"bulkhead": {"max_concurrent": max_concurrency}}
        )
        guarded = [
            create_backend(
                "openai:bench-model",
                name=f"b{i}",
                base_url=u,
                api_key_env=None,
                timeout=120,
                transport=transport,
                guards=guards,
            )
            for i, u in enumerate(urls)
        ]

        async def one(i: int) -> None:
            nonlocal answered
            try:
                c = await guarded[i % len(guarded)].complete(request)
                if c.text:
                    answered += 1
            except Exception as exc:
                failed[type(exc).__name__] = failed.get(type(exc).__name__, 0) + 1

        async def close() -> None:
            for b in guarded:
                await b.aclose()
    elif kind == "raw_aiohttp":
        import aiohttp

        # No connection limit (aiohttp's default is 100): every request in flight at once.
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
        )
        aio_endpoints = [u + "/chat/completions" for u in urls]

        async def one(i: int) -> None:
            nonlocal answered
            try:
                async with session.post(aio_endpoints[i % len(aio_endpoints)], json=BODY) as r:
                    r.raise_for_status()
                    if (await r.json())["choices"][0]["message"]["content"]:
                        answered += 1
            except Exception as exc:
                failed[type(exc).__name__] = failed.get(type(exc).__name__, 0) + 1

        close = session.close
    else:
        client = httpx.AsyncClient(timeout=120)  # httpx's default pool: 100 connections
        endpoints = [u + "/chat/completions" for u in urls]

        async def one(i: int) -> None:
            nonlocal answered
            try:
                r = await client.post(endpoints[i % len(endpoints)], json=BODY)
                r.raise_for_status()
                if r.json()["choices"][0]["message"]["content"]:
                    answered += 1
            except Exception as exc:
                failed[type(exc).__name__] = failed.get(type(exc).__name__, 0) + 1

        close = client.aclose
    c0, w0 = time.process_time(), time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    await close()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "kind": kind,
        "transport": transport if kind in ("genfan", "guarded") else None,
        "n": n,
        "max_concurrency": max_concurrency if kind in ("genfan", "guarded") else None,
        "answered": answered,
        "failed": failed,
        "cpu_per_call_ms": cpu / n * 1e3,
        "cpu_total_s": cpu,
        "wall_s": wall,
        "peak_rss_mb": rss_mb,
    }


def _child(argv: list[str]) -> None:
    import anyio

    mode = argv[0]
    if mode == "seq":
        kind, url, n, warmup = argv[1], argv[2], int(argv[3]), int(argv[4])
        out = anyio.run(_sequential, kind, url, n, warmup)
    elif mode == "burst":
        kind, urls, n, mc = argv[1], argv[2].split(","), int(argv[3]), int(argv[4])
        transport = argv[5] if len(argv) > 5 else "httpx"
        out = anyio.run(_burst, kind, urls, n, mc, transport)
    else:
        raise SystemExit(f"unknown child mode {mode}")
    print(json.dumps(out))


def _run_child(*args: str, timeout: float = 600) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.core_overhead", "--child", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


# -- the three parts ---------------------------------------------------------------------------


def part_a(n: int, rounds: int) -> dict[str, Any]:
    from genfan.testserver import ServerProcess

    kinds = [
        "raw_httpx",
        "raw_aiohttp",
        "openai_sdk",
        "genfan_backend",
        "genfan_fanout",
        "genfan_backend_aiohttp",
        "genfan_fanout_aiohttp",
    ]
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    with ServerProcess(latency=0.0) as srv:
        for r in range(rounds):
            order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]  # rotate to spread noise
            for kind in order:
                res = _run_child("seq", kind, srv.url, str(n), str(max(n // 10, 50)))
                samples[kind].append(res["cpu_per_call_us"])
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "calls_per_round": n,
        "rounds": rounds,
        "cpu_per_call_us": med,
        "samples_us": samples,
        "ratio_to_raw_httpx": {k: v / med["raw_httpx"] for k, v in med.items()},
        "ratio_to_raw_aiohttp": {k: v / med["raw_aiohttp"] for k, v in med.items()},
    }


def part_b(n: int, raw_n: int, latency: float, rounds: int = 2) -> dict[str, Any]:
    from genfan.testserver import ServerProcess

    servers = [ServerProcess(latency=latency).start() for _ in range(3)]
    try:
        urls = ",".join(s.url for s in servers)
        # The floor and genfan's guarded backends (default bulkhead, then raised), alternating.
        alternating = [
            ("raw_aiohttp", "0", "httpx"),
            ("guarded", "0", "aiohttp"),
            ("guarded", str(n), "aiohttp"),
            ("guarded", "0", "httpx"),
            ("guarded", str(n), "httpx"),
        ]
        runs = []
        for r in range(rounds):
            order = alternating if r % 2 == 0 else alternating[::-1]
            for kind, mc, transport in order:
                runs.append(_run_child("burst", kind, urls, str(n), mc, transport))
        runs += [
            _run_child("burst", "genfan", urls, str(n), "64"),
            _run_child("burst", "genfan", urls, str(n), "2000"),
            _run_child("burst", "raw_httpx", urls, str(raw_n), "0"),
        ]
    finally:
        for s in servers:
            s.stop()
    return {"latency_s": latency, "runs": runs}


#: What part (c) imports, each in a fresh interpreter: the facade alone, the names the README
#: uses (which load the core: pydantic models, FanOut, selection), and httpx for reference.
IMPORTS = {
    "import genfan": "import genfan",
    "from genfan import FanOut, Target, create_backend": (
        "from genfan import FanOut, Target, create_backend"
    ),
    "import httpx": "import httpx",
}


def part_c(times: int = 7) -> dict[str, Any]:
    """Import times, interleaved (one of each per round, so load drifts hit all alike)."""
    durations: dict[str, list[float]] = {k: [] for k in IMPORTS}
    heavy: list[str] = []
    httpx_loaded = False
    for _ in range(times):
        for label, stmt in IMPORTS.items():
            code = (
                f"import time, sys; t = time.perf_counter(); {stmt}; "
                "d = time.perf_counter() - t; "
                f"print(d, [m for m in {HEAVY!r} if m in sys.modules], "
                "'httpx' in sys.modules)"
            )
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            ).stdout.split(" ", 1)
            durations[label].append(float(out[0]) * 1000)
            if label != "import httpx":
                rest = out[1].rsplit(" ", 1)
                heavy = sorted(set(heavy) | set(eval(rest[0])))  # a list literal from the child
                httpx_loaded = httpx_loaded or rest[1].strip() == "True"
    genfan_ms = durations["import genfan"]
    return {
        "import_ms_median": statistics.median(genfan_ms),
        "import_ms_min": min(genfan_ms),
        "import_ms": genfan_ms,
        "medians_ms": {k: statistics.median(v) for k, v in durations.items()},
        "all_ms": durations,
        "heavy_modules_loaded": heavy,
        "httpx_loaded": httpx_loaded,
    }


def _burst_label(r: dict[str, Any]) -> str:
    kind, mc = r["kind"], r["max_concurrency"]
    if kind == "guarded":
        from genfan.resilience import BulkheadPolicy

        default = BulkheadPolicy().max_concurrent
        cap = f"default guards (bulkhead {default})" if not mc else f"bulkhead {mc}"
        return f"genfan {r['transport']}, {cap}"
    if kind == "genfan":
        return f"genfan httpx bare, max_conc={mc}"
    if kind == "raw_aiohttp":
        return "raw aiohttp, no connection limit"
    return "raw httpx, default pool"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer calls (a smoke run)")
    parser.add_argument("--only", choices=["a", "b", "c"], default=None)
    parser.add_argument(
        "--burst-rounds", type=int, default=2, help="alternating rounds of part (b)'s main runs"
    )
    ns = parser.parse_args()
    n_seq, rounds = (300, 3) if ns.quick else (2000, 5)
    n_burst, raw_n = (1500, 600) if ns.quick else (5000, 1500)
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()}-core {os.uname().machine}, shared",
        "python": sys.version.split()[0],
        "load_average_at_start": os.getloadavg(),
    }
    if ns.only in (None, "c"):
        out["import"] = c = part_c()
        for label, ms in c["medians_ms"].items():
            print(f"(c) {label}: median {ms:.1f} ms of {[round(x) for x in c['all_ms'][label]]}")
        print(
            f"(c) heavy modules loaded by genfan: {c['heavy_modules_loaded'] or 'none'}; "
            f"httpx loaded: {c['httpx_loaded']}"
        )
    if ns.only in (None, "a"):
        out["sequential"] = a = part_a(n_seq, rounds)
        print(f"(a) sequential, 0 ms latency, {rounds} rounds x {n_seq} calls (median):")
        print(f"    {'client':<24}{'CPU/call µs':>12}{'x raw httpx':>13}{'x raw aiohttp':>15}")
        for k, v in a["cpu_per_call_us"].items():
            print(
                f"    {k:<24}{v:>12.0f}{a['ratio_to_raw_httpx'][k]:>13.2f}"
                f"{a['ratio_to_raw_aiohttp'][k]:>15.2f}"
            )
    if ns.only in (None, "b"):
        out["burst"] = b = part_b(n_burst, raw_n, 0.5, ns.burst_rounds)
        print("(b) requests started at once over 3 backends, 500 ms latency:")
        print(
            f"    {'client':<40}{'n':>6}{'answered':>10}{'failed':>8}{'CPU/call ms':>13}"
            f"{'wall s':>8}{'peak RSS MB':>13}"
        )
        for r in b["runs"]:
            print(
                f"    {_burst_label(r):<40}{r['n']:>6}{r['answered']:>10}"
                f"{sum(r['failed'].values()):>8}{r['cpu_per_call_ms']:>13.3f}"
                f"{r['wall_s']:>8.1f}{r['peak_rss_mb']:>13.0f}"
            )
    out["load_average_at_end"] = os.getloadavg()
    print(
        f"load average (1, 5, 15 min): start {out['load_average_at_start']}, end "
        f"{out['load_average_at_end']}"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "core_overhead.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'core_overhead.json'}")


if __name__ == "__main__":
    main()
