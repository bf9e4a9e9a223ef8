"""examples/resilient_fanout.py runs offline and stays up while its backends misbehave."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "resilient_fanout.py"


def test_resilient_fanout_example() -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "answered 20/20 fan-outs" in out
    match = re.search(r"down: breaker open, reached (\d+) times, refused (\d+) calls", out)
    assert match, out
    assert int(match.group(1)) == 3  # the breaker's minimum throughput, then no more calls
    assert int(match.group(2)) > 0
    assert "pool shares:" in out
