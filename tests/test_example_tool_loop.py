"""examples/tool_loop.py runs offline: four tool calls in one turn, one failing readably."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "tool_loop.py"


def test_tool_loop_runs() -> None:
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # all four calls start before any finishes: they run concurrently
    assert [line.split()[0] for line in lines[:4]] == ["started"] * 4
    assert sum(line.startswith("finished") for line in lines) == 3
    assert any(line.startswith("failed") and "unknown city 'Atlantis'" in line for line in lines)
    assert lines[-2].startswith("turn 1: 4 tool calls in ")
    assert lines[-1] == (
        "answer: Oslo 4°; Lima 19°; Cairo 31°; (one lookup failed: tool 'get_weather' raised "
        "LookupError: unknown city 'Atlantis')"
    )
