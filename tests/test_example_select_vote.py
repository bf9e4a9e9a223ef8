"""examples/select_vote.py runs offline and prints the picks it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "select_vote.py"


def test_select_vote_example_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    lines = out.splitlines()
    assert lines[0] == "vote: '17 * 3 = 51' confidence=0.75"
    assert lines[1].startswith("why: sample0 scored 0.75: vote 0.75 (3 of 4 answers say '51')")
    assert "1 rejected by filters" in lines[1]
    assert lines[2] == ("early exit: '17 * 3 = 51' after 3 answers [ok ok ok cancelled cancelled]")
    assert lines[3] == "cascade: '51' tiers=['small'] cost=54 saved=360 (87%)"
