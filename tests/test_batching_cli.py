"""`genfan batch run` as a real process: SIGKILL mid-run and resume, failures, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from genfan import FanOut
from genfan.testing import FakeBackend

ROOT = Path(__file__).resolve().parent.parent
GENFAN = [sys.executable, "-m", "genfan.cli"]


def slow_echo_fanout() -> FanOut:
    """Three backends that echo the prompt after 10 ms ('tests.test_batching_cli:...')."""
    return FanOut(
        [
            FakeBackend(name, lambda r, n=name: f"{n}:{r.prompt}", latency=0.01)
            for name in ("a", "b", "c")
        ]
    )


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}


def write_rows(path: Path, n: int) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": f"q{i}"}) + "\n" for i in range(n))
    )
    return path


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def start(inp: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *GENFAN,
            "batch",
            "run",
            str(inp),
            "-o",
            str(out),
            "--fanout",
            "tests.test_batching_cli:slow_echo_fanout",
            "--max-in-flight",
            "4",
            *extra,
        ],
        env=env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def kill_after(proc: subprocess.Popen[bytes], out: Path, lines: int) -> None:
    deadline = time.monotonic() + 60
    while count_lines(out) < lines and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_sigkilled_job_resumes_with_every_id_exactly_once(tmp_path: Path) -> None:
    n = 1000
    inp = write_rows(tmp_path / "in.jsonl", n)
    out = tmp_path / "out.jsonl"

    first = start(inp, out)
    kill_after(first, out, 60)
    assert first.returncode == -signal.SIGKILL
    after_first = count_lines(out)
    assert 60 <= after_first < n

    second = start(inp, out)
    kill_after(second, out, after_first + 150)
    assert second.returncode == -signal.SIGKILL

    third = start(inp, out, "--json")
    stdout, stderr = third.communicate(timeout=120)
    assert third.returncode == 0, stderr.decode()
    summary = json.loads(stdout)
    assert summary["skipped"] >= after_first + 150
    assert summary["skipped"] + summary["ran"] == n
    assert (summary["done_ok"], summary["missing"]) == (n, 0)

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [f"r{i}" for i in range(n)]  # once each, input order
    for r in records:
        assert r["status"] == "ok"
        assert r["text"] == f"{r['backend']}:q{r['id'][1:]}"
        assert [c["backend"] for c in r["candidates"]] == ["a", "b", "c"]


def test_failures_exit_1_and_only_failed_reruns_them(tmp_path: Path) -> None:
    cfg = tmp_path / "genfan.toml"
    cfg.write_text('[backends.solo]\ntype = "fake"\noptions = {replies = ["fine"]}\n')
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "x"}\n{"id": 2, "template": "{missing}"}\n')
    out = tmp_path / "out.jsonl"
    cmd = [*GENFAN, "batch", "run", str(inp), "-o", str(out), "--config", str(cfg)]

    done = subprocess.run(cmd, env=env(), cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1
    assert "1 ok, 1 failed (ConfigurationError: 1)" in done.stderr
    assert "--only-failed" in done.stderr

    inp.write_text('{"id": 1, "prompt": "x"}\n{"id": 2, "template": "{v}", "vars": {"v": "y"}}\n')
    again = subprocess.run(
        [*cmd, "--only-failed"], env=env(), cwd=tmp_path, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert "1 run, 1 skipped" in again.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["status"]) for r in records] == [(1, "ok"), (2, "ok")]


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "x"}\n{"id": 1, "prompt": "y"}\n')
    cmd = [*GENFAN, "batch", "run", str(inp), "-o", str(tmp_path / "o.jsonl"), "--fanout"]
    done = subprocess.run(
        [*cmd, "tests.test_batching_cli:slow_echo_fanout"],
        env=env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "id 'r" not in done.stderr and "already used on line 1" in done.stderr
    bad = subprocess.run([*cmd, "nomodule"], env=env(), cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "module:function" in bad.stderr


def test_a_terminal_gets_a_progress_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    from genfan.batching._progress import Tally
    from genfan.cli import _batch

    monkeypatch.setattr(_batch.sys.stderr, "isatty", lambda: True)
    tally = Tally()
    bar = _batch._make_progress(True)
    assert isinstance(bar, _batch.RichProgress)
    bar(tally.snapshot(2, 0.0))
    for record in (
        {"status": "ok", "usage": {"input_tokens": 3, "cost": 0.5}},
        {"status": "failed"},
    ):
        tally.add(record)
        bar(tally.snapshot(2, 0.1))
    bar(tally.snapshot(2, 0.2, finished=True))
    bar.close()
    assert (tally.ok, tally.failed, tally.input_tokens, tally.cost) == (1, 1, 3, 0.5)
    assert _batch._make_progress(False) is None


def _run_batch(inp: Path, out: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *GENFAN,
            "batch",
            "run",
            str(inp),
            "-o",
            str(out),
            "--fanout",
            "tests.test_batching_cli:slow_echo_fanout",
        ],
        env=env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_input_and_output_problems_are_one_line_and_exit_2(tmp_path: Path) -> None:
    good = write_rows(tmp_path / "in.jsonl", 3)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "caf\xe9"}\n')
    (tmp_path / "outdir").mkdir()
    (tmp_path / "plain").write_text("x")
    device = tmp_path / "device.jsonl"
    device.symlink_to("/dev/full")  # (a full disk is tested in test_batching_job.py)
    cases = [
        (bad, tmp_path / "o1.jsonl", f"{bad} line 2: not UTF-8 (byte 0xe9"),
        (good, tmp_path / "outdir", "is a folder: name a file"),
        (good, tmp_path / "plain" / "o.jsonl", "is a file, not a folder"),
        (good, Path("/proc/genfan-nowhere/o.jsonl"), "cannot open the output /proc/genfan"),
        (good, device, "it is not a regular file"),
    ]
    for inp, out, expected in cases:
        done = _run_batch(inp, out, ROOT)
        assert done.returncode == 2, (out, done.stderr)
        (line,) = done.stderr.strip().splitlines()  # no traceback
        assert line.startswith("error: ") and expected in line, (out, line)
