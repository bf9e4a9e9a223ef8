"""examples/scheduled_digest.py runs offline: one digest per batch of new inbox files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "scheduled_digest.py"


def test_scheduled_digest_runs() -> None:
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("morning schedule: cron '0 7 * * mon-fri' (Europe/Berlin), next at")
    assert lines[0].endswith(("05:00 UTC", "06:00 UTC"))  # 07:00 Berlin, summer or winter
    runs = int(lines[1].split(" ran ")[1].split()[0])
    assert runs >= 3
    # Files are read once: the first run saw one note, a later run the two that came after.
    assert lines[2:] == [
        "  - Digest of 1 note(s): standup.md.",
        "  - Digest of 2 note(s): incident.md, release.md.",
    ]
