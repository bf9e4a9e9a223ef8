"""Issue 6's micro-batching figure: 10,000 single embed calls, batched vs unbatched.

Run: ``.venv/bin/python -m benchmarks.batching_embed [--n 10000] [--quick]``.

The server (a separate process, so its CPU never counts against the client) speaks the
OpenAI-compatible ``POST /v1/embeddings`` and models an accelerator: requests are served one at a
time, each costing a fixed overhead plus a small cost per item (default 1 ms + 20 µs per text).
The client is genfan's ``OpenAIBackend.embed``:

* unbatched: every text is its own request (``backend.embed([text])``), 8 in flight (the
  server serves one at a time; more in flight only adds client-side pool overhead);
* batched: every text is one ``BatchingEmbedder.embed_one(text)`` call, 10,000 calls at once, the
  micro-batcher grouping them into requests of up to ``max_size`` texts.

Prints a table and writes JSON to ``benchmarks/results/batching_embed.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


# -- the server (its own process) --------------------------------------------------------------


async def _serve(overhead: float, per_item: float) -> None:
    device = asyncio.Lock()  # one accelerator: requests are served one at a time

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = json.loads(await reader.readexactly(length)) if length else {}
                texts = body.get("input") or []
                texts = [texts] if isinstance(texts, str) else texts
                async with device:
                    await asyncio.sleep(overhead + per_item * len(texts))
                data = [
                    {
                        "object": "embedding",
                        "index": i,
                        "embedding": [b / 255 for b in hashlib.md5(t.encode()).digest()[:8]],
                    }
                    for i, t in enumerate(texts)
                ]
                payload = json.dumps({"object": "list", "data": data, "model": "bench"}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=1 << 22)
    port = server.sockets[0].getsockname()[1]
    print(f"http://127.0.0.1:{port}/v1", flush=True)
    async with server:
        await server.serve_forever()


# -- the client --------------------------------------------------------------------------------


async def _unbatched(url: str, texts: list[str], in_flight: int) -> dict[str, Any]:
    import anyio
    from genfan_providers.openai import OpenAIBackend

    backend = OpenAIBackend("bench", base_url=url, api_key_env=None, max_concurrency=in_flight)
    async with backend:
        await backend.embed(["warm up"])
        slots = anyio.Semaphore(in_flight)
        c0, t0 = time.process_time(), time.perf_counter()

        async def one(text: str) -> None:
            async with slots:
                await backend.embed([text])

        async with anyio.create_task_group() as tg:
            for text in texts:
                tg.start_soon(one, text)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall": wall, "cpu": cpu, "requests": len(texts)}


async def _batched(url: str, texts: list[str], max_size: int, max_wait: float) -> dict[str, Any]:
    import anyio
    from genfan_providers.openai import OpenAIBackend

    from genfan.batching import BatchingEmbedder

    backend = OpenAIBackend("bench", base_url=url, api_key_env=None)
    async with backend:
        await backend.embed(["warm up"])
        async with BatchingEmbedder(
            backend, max_size=max_size, max_wait=max_wait, max_concurrent_batches=2
        ) as embedder:
            c0, t0 = time.process_time(), time.perf_counter()
            async with anyio.create_task_group() as tg:
                for text in texts:
                    tg.start_soon(embedder.embed_one, text)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            stats = embedder.statistics()
    return {
        "wall": wall,
        "cpu": cpu,
        "requests": stats.batches,
        "fill_rate": stats.fill_rate,
        "mean_batch_size": stats.mean_batch_size,
        "mean_wait_ms": stats.mean_wait * 1000,
        "mean_batch_latency_ms": stats.mean_batch_latency * 1000,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="embed calls")
    parser.add_argument("--overhead", type=float, default=0.001, help="server s per request")
    parser.add_argument("--per-item", type=float, default=0.00002, help="server s per text")
    parser.add_argument("--max-size", type=int, default=64)
    parser.add_argument("--in-flight", type=int, default=8, help="unbatched requests at once")
    parser.add_argument("--max-wait", type=float, default=0.005)
    parser.add_argument("--quick", action="store_true", help="1,000 calls")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.overhead, args.per_item))
        return {}
    n = 1_000 if args.quick else args.n

    import anyio

    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.batching_embed",
            "--serve",
            "--overhead",
            str(args.overhead),
            "--per-item",
            str(args.per_item),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        texts = [f"document number {i} about batching" for i in range(n)]
        unbatched = anyio.run(_unbatched, url, texts, args.in_flight)
        batched = anyio.run(_batched, url, texts, args.max_size, args.max_wait)
    finally:
        server.terminate()
        server.wait(timeout=10)

    speedup = unbatched["wall"] / batched["wall"]
    result = {
        "benchmark": "batching_embed",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} (shared)".strip(),
        "calls": n,
        "server": {"overhead_s": args.overhead, "per_item_s": args.per_item, "serial": True},
        "max_size": args.max_size,
        "max_wait_s": args.max_wait,
        "unbatched": {**unbatched, "throughput": n / unbatched["wall"]},
        "batched": {**batched, "throughput": n / batched["wall"]},
        "speedup": speedup,
        "client_cpu_ratio": unbatched["cpu"] / batched["cpu"],
        "target_speedup": 5.0,
        "met": speedup >= 5.0,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batching_embed.json").write_text(json.dumps(result, indent=2))

    print(
        f"micro-batching {n:,} embed calls (server: {args.overhead * 1e3:g} ms/request "
        f"+ {args.per_item * 1e6:g} µs/text, one at a time)"
    )
    print(f"{'client':<12}{'requests':>10}{'wall s':>9}{'calls/s':>10}{'CPU ms/call':>13}")
    for name in ("unbatched", "batched"):
        r = result[name]
        print(
            f"{name:<12}{r['requests']:>10,}{r['wall']:>9.2f}{r['throughput']:>10,.0f}"
            f"{r['cpu'] / n * 1e3:>13.3f}"
        )
    b = result["batched"]
    print(
        f"speedup {speedup:.1f}x (target >= 5x: {'met' if result['met'] else 'NOT met'}); "
        f"fill rate {b['fill_rate']:.0%} (mean batch {b['mean_batch_size']:.1f} of "
        f"{args.max_size}); mean wait {b['mean_wait_ms']:.1f} ms"
    )
    return result


if __name__ == "__main__":
    main()
