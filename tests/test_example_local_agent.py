"""examples/local_agent.py runs offline on the real local engine: a forced tool call, then text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

EXAMPLE = Path(__file__).parent.parent / "examples" / "local_agent.py"


def test_local_agent_calls_the_tool_then_answers() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=600, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    call = lines[0]
    assert call.startswith("step 0: get_weather(")
    output = json.loads(call.split(" -> ", 1)[1])
    assert output["temp"] == 21 and output["sky"] == "sunny"
    assert lines[-1].startswith("answer (2 model calls): ")
    assert len(lines[-1]) > len("answer (2 model calls): ")
