"""`genfan batch run --via batch-api` and `genfan batch cancel` as real processes against the fake
server's batch APIs: SIGKILL while polling and resume without a second batch, --no-wait, cancel,
and one-line usage errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from genfan.testserver import FakeLLMServer

ROOT = Path(__file__).resolve().parent.parent
GENFAN = [sys.executable, "-m", "genfan.cli"]


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}


def files(tmp_path: Path, srv: FakeLLMServer, n: int = 10, provider: str = "openai") -> list[str]:
    cfg = tmp_path / "genfan.toml"
    cfg.write_text(
        f'[backends.m]\ntype = "{provider}"\nmodel = "m1"\nbase_url = "{srv.url}"\n'
        "price = [0.15, 0.6]\n"
    )
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"q{i}"}) + "\n" for i in range(n)))
    return [str(inp), "-o", str(tmp_path / "out.jsonl"), "-c", str(cfg)]


def genfan(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GENFAN, *args], capture_output=True, text=True, env=env(), timeout=timeout, check=False
    )


FAST = ["--via", "batch-api", "--poll-interval", "0.01", "--no-progress"]


def test_a_run_through_the_batch_api_reports_both_paths(
    tmp_path: Path, server: FakeLLMServer
) -> None:
    done = genfan("batch", "run", *files(tmp_path, server), *FAST, "--max-requests", "4")
    assert done.returncode == 0, done.stderr
    assert "via batch api: 10 rows $" in done.stderr and "3 batches created" in done.stderr
    assert server.batches.creates["openai"] == 3


def test_sigkill_while_polling_resumes_without_a_second_batch(
    tmp_path: Path, server: FakeLLMServer
) -> None:
    server.batches.hold()
    args = files(tmp_path, server, 12)
    state = tmp_path / "out.jsonl.batches.json"
    proc = subprocess.Popen(
        [*GENFAN, "batch", "run", *args, *FAST, "--max-requests", "5"],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def all_submitted() -> bool:
            try:
                chunks = json.loads(state.read_text())["chunks"]
            except (OSError, ValueError):
                return False
            return len(chunks) == 3 and all(c["state"] == "submitted" for c in chunks)

        assert server.wait_until(all_submitted, timeout=30)
        assert server.wait_until(lambda: server.count() > 8, timeout=30)  # polling
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    server.batches.complete_after(0)
    again = genfan("batch", "run", *args, *FAST, "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert (summary["done_ok"], summary["batches_created"]) == (12, 0)
    assert server.batches.creates["openai"] == 3 and server.batches.resubmitted() == 0


def test_no_wait_then_cancel_then_collect(tmp_path: Path, server: FakeLLMServer) -> None:
    server.batches.hold()
    args = files(tmp_path, server, 4, provider="anthropic")
    first = genfan("batch", "run", *args, *FAST, "--no-wait")
    assert first.returncode == 0, first.stderr  # rows still in a batch: not a failure
    assert "run the same command again" in first.stderr
    cancel = genfan("batch", "cancel", "-i", args[0], "-o", args[2], "-c", args[4])
    assert cancel.returncode == 0, cancel.stderr
    assert "cancelled 1 batch" in cancel.stderr
    last = genfan("batch", "run", *args, *FAST, "--json")
    assert last.returncode == 1
    assert json.loads(last.stdout)["failures_by_type"] == {"BatchCancelledError": 4}
    assert server.batches.creates["anthropic"] == 1


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--deadline", "whenever"], "deadline 'whenever'"),
        (["--backend", "nope"], "no backend named 'nope'"),
        (["--via", "telepathy"], "via must be"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    tmp_path: Path, server: FakeLLMServer, extra: list[str], needle: str
) -> None:
    done = genfan("batch", "run", *files(tmp_path, server, 2), *FAST, *extra)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], done.stderr
    assert server.batches.creates["openai"] == 0


def test_cancel_without_batches_is_a_usage_error(tmp_path: Path, server: FakeLLMServer) -> None:
    args = files(tmp_path, server, 2)
    done = genfan("batch", "cancel", "-i", args[0], "-o", args[2], "-c", args[4])
    assert done.returncode == 2 and done.stderr.startswith("error: no batches to cancel")
