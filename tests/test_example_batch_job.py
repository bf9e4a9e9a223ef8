"""examples/batch_job.py runs offline: batched embeddings, a job, a resume and a re-run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "batch_job.py"


def test_batch_job_example_runs() -> None:
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "embeddings: 100 calls -> 4 requests, fill rate 100%",
        "first run: 18 ok, 2 failed {'AllBackendsFailedError': 2}",
        "run again: 0 run, 20 skipped (nothing is redone)",
        "--only-failed: 2 run, 2 ok; output has 20 ok rows",
        "doc-7: summary of <Summarise Report 7.>",
    ]
