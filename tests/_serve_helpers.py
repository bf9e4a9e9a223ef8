"""``genfan serve`` as a child process for the gateway's client and replica tests."""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, env: dict[str, str] | None = None) -> CliResult:
    """``genfan ARGS``, in this process (typer's runner: what a shell would see)."""
    from typer.testing import CliRunner

    from genfan.cli import app

    r = CliRunner().invoke(app, list(args), env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return CliResult(r.exit_code, r.stdout, r.stderr)


def write_config(path: Path, backend_url: str, serve: str = "", extra: str = "") -> Path:
    """A genfan.toml with backends ``a`` (priced) and ``b`` on the fake server."""
    path.write_text(
        f"""
[backends.a]
type = "openai"
model = "m-a"
base_url = "{backend_url}"
api_key_env = "GF_TEST_KEY"
price = [1.0, 2.0]

[backends.b]
type = "openai"
model = "m-b"
base_url = "{backend_url}"
api_key_env = "GF_TEST_KEY"

[fanout]
select = "vote"
{extra}
[serve]
{serve}
""",
        encoding="utf-8",
    )
    return path


class GatewayProcess:
    """``genfan serve --config FILE --port 0 ARGS`` until `stop`."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.cmd = [
            sys.executable,
            "-m",
            "genfan.cli",
            "serve",
            "--config",
            str(config),
            "--port",
            "0",
            *args,
        ]
        self.env = {**os.environ, "GF_TEST_KEY": "sk-local", **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.stderr: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            self._lines.put(line)

    def start(self, ready_timeout: float = 30.0) -> GatewayProcess:
        self.proc = subprocess.Popen(
            self.cmd,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=self.env,
            cwd=ROOT,
        )
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + ready_timeout
        while not self.url:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"genfan serve did not start: {''.join(self.stderr)}") from None
            if "listening on " in line:
                self.url = line.rsplit("listening on ", 1)[1].strip()
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"genfan serve never got ready: {''.join(self.stderr)}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
