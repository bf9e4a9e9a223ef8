"""examples/quickstart.py runs offline and shows every candidate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "quickstart.py"


def test_quickstart_runs() -> None:
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("fast-model") and " ok " in line for line in lines)
    assert any(line.startswith("broken-model") and "HTTPStatusError" in line for line in lines)
    assert lines[-1] == "chosen: fast-model: Paris is the capital of France."
