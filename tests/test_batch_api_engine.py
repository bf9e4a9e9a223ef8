"""`via="offline"` on the real local engine: every row at once to one engine (slow: ``-m engine``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from genfan.batching import BatchJob, read_results, run_batch_job

pytestmark = [pytest.mark.engine, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # vLLM is asyncio-only


async def test_offline_rows_run_at_once_on_the_local_engine(tmp_path: Path) -> None:
    from genfan_providers.vllm import prepare_default_model, shutdown_engines

    prepare_default_model(progress=False)
    config = tmp_path / "genfan.toml"
    config.write_text('[backends.local]\ntype = "vllm"\nmax_tokens = 8\ntemperature = 0.0\n')
    rows = tmp_path / "in.jsonl"
    rows.write_text(
        "".join(json.dumps({"id": i, "prompt": f"Count to {i + 2}."}) + "\n" for i in range(24))
    )
    job = BatchJob(input=rows, output=tmp_path / "out.jsonl", config=config, via="batch-api")
    try:
        summary = await run_batch_job(job)  # a vllm backend: batch-api means offline
    finally:
        shutdown_engines()
    assert summary.done_ok == 24 and summary.failed == 0
    assert getattr(summary, "via", None) == "offline"
    results = read_results(job.output)
    assert all(r["text"] and r["usage"]["output_tokens"] <= 8 for r in results.values())
