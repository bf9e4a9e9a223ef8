"""The Ray executor on a local cluster: same job, same records as the in-process executor."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from genfan import BackendTimeoutError, ChatRequest, FanOut, MissingExtraError
from genfan.batching import BatchJob, read_results, run_batch_job
from genfan.select import Candidate
from genfan.testing import Fail, FakeBackend, Reply
from tests._services import require_service

ROOT = Path(__file__).resolve().parent.parent


def _reply(name: str):  # type: ignore[no-untyped-def]
    def reply(request: ChatRequest) -> Reply | Fail:
        n = int(request.prompt[1:])
        if (name == "c" and n % 3 == 0) or n % 11 == 0:
            return Fail(error=BackendTimeoutError("scripted timeout", backend=name))
        return Reply(text=f"{name}:{request.prompt}")

    return reply


def lowest_index(request: ChatRequest, candidates: Sequence[Candidate]) -> int | None:
    ok = [c.index for c in candidates if c.ok]
    return min(ok) if ok else None


def deterministic_fanout() -> FanOut:
    """Three echo backends (some rows fail), the first target's answer chosen: deterministic."""
    return FanOut([FakeBackend(n, _reply(n)) for n in ("a", "b", "c")], select=lowest_index)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    try:
        import ray
    except ImportError:
        require_service("ray", False, "the 'ray' extra is not installed")
        raise
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
    except Exception as exc:  # pragma: no cover - depends on the machine
        require_service("ray", False, f"ray.init failed: {exc}")
    yield ray
    ray.shutdown()


def write_rows(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": i, "prompt": f"q{i}"}) + "\n" for i in range(n)))
    return path


def without_timings(path: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        r.pop("elapsed", None)
        for c in r.get("candidates", ()):
            c.pop("latency", None)
    return records


@pytest.mark.ray
@pytest.mark.anyio
async def test_ray_results_are_identical_to_the_local_executor(
    ray_cluster: Any, tmp_path: Path
) -> None:
    inp = write_rows(tmp_path / "in.jsonl", 120)
    common = {"input": inp, "fanout": "tests.test_batching_ray:deterministic_fanout"}
    local = await run_batch_job(BatchJob(output=tmp_path / "local.jsonl", **common))
    on_ray = await run_batch_job(
        BatchJob(output=tmp_path / "ray.jsonl", executor="ray", workers=2, chunk_size=16, **common)
    )
    assert without_timings(tmp_path / "ray.jsonl") == without_timings(tmp_path / "local.jsonl")
    assert (on_ray.ok, on_ray.failed) == (local.ok, local.failed) == (109, 11)
    assert on_ray.failures_by_type == {"AllBackendsFailedError": 11}
    assert on_ray.input_tokens == local.input_tokens


@pytest.mark.ray
@pytest.mark.anyio
async def test_ray_job_resumes_from_the_same_output(ray_cluster: Any, tmp_path: Path) -> None:
    inp = write_rows(tmp_path / "in.jsonl", 50)
    out = tmp_path / "out.jsonl"
    job = BatchJob(
        input=inp,
        output=out,
        fanout="tests.test_batching_ray:deterministic_fanout",
        executor="ray",
        chunk_size=8,
    )
    await run_batch_job(job)
    kept = out.read_text().splitlines(keepends=True)[:20]
    out.write_text("".join(kept) + kept[0][:10])  # a killed driver: 20 rows and a torn line
    summary = await run_batch_job(job)
    assert (summary.skipped, summary.ran, summary.missing) == (20, 30, 0)
    assert sorted(read_results(out)) == list(range(50))


@pytest.mark.anyio
async def test_ray_executor_without_ray_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    job = BatchJob(
        input=write_rows(tmp_path / "in.jsonl", 2),
        output=tmp_path / "out.jsonl",
        fanout=deterministic_fanout,
        executor="ray",
    )
    with pytest.raises(MissingExtraError, match=r"genfan\[ray\]"):
        await run_batch_job(job)
