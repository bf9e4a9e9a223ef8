"""examples/local.toml (the `make demo` config) builds five targets over one shared engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from genfan import load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "local.toml"


def _fake_prepared_model(cache: Path) -> None:
    from genfan_providers.vllm import _prepare

    folder = _prepare.default_model_dir(cache)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    gguf = cache / "x.gguf"
    gguf.write_bytes(b"gguf")
    _prepare._write_manifest(folder, gguf)


def test_the_demo_config_builds_five_targets_sharing_one_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GENFAN_CACHE_DIR", str(tmp_path))
    _fake_prepared_model(tmp_path)
    cfg = load_config(EXAMPLE)
    fan = cfg.build_fanout()
    assert fan.names == ["greedy", "warm", "hot", "brief", "teacher"]
    # Guarded by default (timeout, retry, breaker, bulkhead); the provider is inside.
    backends = [getattr(t.backend, "provider", t.backend) for t in fan.targets]
    assert {type(b).__name__ for b in backends} == {"VLLMBackend"}
    # Equal engine options: one engine in the process for all five.
    assert len({b._key for b in backends}) == 1  # type: ignore[attr-defined]
    temps = [t.temperature for t in fan.targets]
    assert temps == [0.0, 0.7, 1.0, 0.3, 0.5]
    assert fan.targets[3].system is not None
    assert fan.targets[0].backend.timeout.policy.timeout == 600  # type: ignore[attr-defined]


@pytest.mark.engine
def test_genfan_ask_with_the_demo_config_shows_candidates_and_the_answer() -> None:
    """What `make demo` runs, end to end (starts its own engine: ~20-60 s)."""
    from genfan_providers.vllm import prepare_default_model

    prepare_default_model(progress=False)
    genfan = Path(sys.executable).parent / "genfan"
    out = subprocess.run(
        [str(genfan), "ask", "--config", str(EXAMPLE), "--json", "What is the capital of France?"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert [c["status"] for c in result["candidates"]] == ["ok"] * 5
    assert "Paris" in result["candidates"][0]["text"]  # the greedy one
    assert result["chosen"] in {c["backend"] for c in result["candidates"]}
    assert "starting the local vLLM engine" in out.stderr
    # torch's and vLLM's own warnings stay hidden without --verbose
    assert "Triton" not in out.stderr and "WARNING" not in out.stderr, out.stderr
