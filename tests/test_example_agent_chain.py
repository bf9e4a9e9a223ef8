"""examples/agent_chain.py runs offline: search, summary and extraction in parallel, then a merge."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "agent_chain.py"


def test_agent_chain_runs() -> None:
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    rows = {line.split()[0]: line.split()[1] for line in lines[1:6]}
    assert rows == {
        "search": "ok",
        "summarise": "ok",
        "extract": "ok",
        "digest": "ok",
        "merge": "ok",
    }
    assert lines[-1] == (
        "merged: Plan a DAG of calls; run independent ones at once; 3.7x faster than ReAct. "
        "(people: Kim, Moon; 3 sources digested)"
    )
