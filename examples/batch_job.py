"""Batching, offline: a micro-batched embedder, then a resumable batch job over a JSONL file.

Run: ``python examples/batch_job.py``. Fake backends stand in for real LLMs; swap the fan-out
factory for ``load_config("genfan.toml").build_fanout`` (or ``config=``) to use real ones.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import anyio

from genfan import BackendTimeoutError, ChatRequest, FanOut
from genfan.batching import BatchingEmbedder, BatchJob, read_results, run_batch_job
from genfan.testing import Fail, FakeBackend, Reply

FLAKY = {"on": True}


class LetterCounter:
    """A stand-in embedding model: one request embeds many texts."""

    def __init__(self) -> None:
        self.requests = 0

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.requests += 1
        await anyio.sleep(0.01)
        return [[float(len(t)), float(t.count("a"))] for t in texts]


def summarise(request: ChatRequest) -> Reply | Fail:
    if FLAKY["on"] and "7" in request.prompt:
        return Fail(error=BackendTimeoutError("took too long", backend="careful"))
    return Reply(text=f"summary of <{request.prompt}>")


def make_fanout() -> FanOut:
    """Two backends; 'careful' times out on rows with a 7 in them while FLAKY is on."""
    return FanOut(
        [
            FakeBackend(
                "quick",
                lambda r: (
                    Fail(error=BackendTimeoutError("down", backend="quick"))
                    if FLAKY["on"] and "7" in r.prompt
                    else "short answer"
                ),
            ),
            FakeBackend("careful", summarise),
        ],
        select=lambda request, candidates: max(
            (c for c in candidates if c.ok), key=lambda c: len(c.text), default=None
        ),
    )


async def embed_demo() -> None:
    model = LetterCounter()
    # Full batches go at once; max_wait only bounds how long a partial batch waits for company.
    async with BatchingEmbedder(model, max_size=25, max_wait=0.5) as embedder:
        vectors: dict[str, list[float]] = {}

        async def one(word: str) -> None:
            vectors[word] = await embedder.embed_one(word)

        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(one, "banana" * (i % 3 + 1) + str(i))
        stats = embedder.statistics()
    print(f"embeddings: 100 calls -> {model.requests} requests, fill rate {stats.fill_rate:.0%}")


async def job_demo(workdir: Path) -> None:
    rows = [{"id": f"doc-{i}", "title": f"Report {i}"} for i in range(20)]
    source = workdir / "docs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = BatchJob(
        input=source,
        output=workdir / "summaries.jsonl",
        fanout=make_fanout,
        template="Summarise {title}.",
        max_in_flight=4,
    )
    first = await run_batch_job(job)
    print(f"first run: {first.ok} ok, {first.failed} failed {dict(first.failures_by_type)}")
    again = await run_batch_job(job)
    print(f"run again: {again.ran} run, {again.skipped} skipped (nothing is redone)")
    FLAKY["on"] = False  # the backends recovered: re-run only the failures
    retry = await run_batch_job(BatchJob(**{**job.__dict__, "rerun": "failed"}))
    print(f"--only-failed: {retry.ran} run, {retry.ok} ok; output has {retry.done_ok} ok rows")
    results = read_results(job.output)
    print(f"doc-7: {results['doc-7']['text']}")


async def main() -> None:
    await embed_demo()
    with tempfile.TemporaryDirectory() as tmp:
        await job_demo(Path(tmp))


if __name__ == "__main__":
    anyio.run(main)
