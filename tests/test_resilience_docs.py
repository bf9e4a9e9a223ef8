"""docs/resilience.md and docs/config.md show what runs: every complete Python program in them
(a block that calls ``anyio.run``) runs as it is, every other Python block compiles, and every
TOML block parses, with each guards table in it valid and each shared quota store valid and
named rightly.

The shared rate-limit example needs Redis on 127.0.0.1:6379 (skipped without it, failed when
GENFAN_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from genfan import parse_config
from genfan.resilience import GuardsConfig
from tests._services import port_open, require_service

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "resilience.md", ROOT / "docs" / "config.md"]


def blocks(doc: Path, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", doc.read_text(encoding="utf-8"), flags=re.S | re.M)


PROGRAMS = [
    pytest.param(code, id=f"{doc.name}-{i}")
    for doc in DOCS
    for i, code in enumerate(blocks(doc, "python"))
    if "anyio.run(" in code
]


def test_the_sharing_sections_have_programs() -> None:
    ran = "".join(p.values[0] for p in PROGRAMS)  # type: ignore[misc]
    assert "retry_budget=budget" in ran and "rate_limit_store=store" in ran


@pytest.mark.parametrize("code", PROGRAMS)
def test_python_programs_run(code: str, tmp_path: Path) -> None:
    if "RedisQuota(" in code:
        require_service("Redis", port_open("127.0.0.1", 6379), "nothing listens on port 6379")
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), "an example says what it shows"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_python_snippets_compile(doc: Path) -> None:
    for code in blocks(doc, "python"):
        compile(code, str(doc), "exec", flags=0x2000)  # PyCF_ALLOW_TOP_LEVEL_AWAIT


def _guards_tables(data: dict[str, Any]) -> list[Any]:
    found = [data.get("defaults", {}).get("guards")]
    found += [b.get("guards") for b in data.get("backends", {}).values()]
    return [g for g in found if g is not None]


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_toml_blocks_are_valid(doc: Path) -> None:
    tomls = blocks(doc, "toml")
    assert tomls
    for text in tomls:
        data = tomllib.loads(text)
        for table in _guards_tables(data):
            GuardsConfig.model_validate(table)
        if "rate_limit_stores" in data:  # the stores, and the guards that name them
            backends = {name: {"type": "fake", **b} for name, b in data.get("backends", {}).items()}
            parse_config({**data, "backends": backends})
