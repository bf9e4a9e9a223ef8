"""Running the gateway: uvicorn (uvloop and httptools), one process or several on one socket,
and a drain on SIGTERM.

Why uvicorn: measured on this 2-core machine (docs/benchmarks.md, "Gateway"), uvicorn with
httptools and granian answer this app at about the same rate (the app's own Python work, not
the HTTP server, is the bottleneck), and uvicorn lets the gateway own the drain: on SIGTERM
new requests get 503 with ``Retry-After`` while requests in flight, streams included, run to
their end (at most ``drain_seconds``), then the process exits. ``--server granian`` runs the
same app under granian (its own shutdown, no 503 drain).

Several workers share one listening socket, bound by the parent; each worker is a process
with its own event loop and gateway, and shares keys, budgets and (through Redis) rate limits
with the others through the key store and the quota store.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._errors import MissingExtraError
from ._app import Gateway, create_app
from ._settings import load_gateway_config

__all__ = ["serve"]

_CONFIG_ENV = "GENFAN_SERVE_CONFIG"
_current: Gateway | None = None


def _app_factory() -> Gateway:
    """The app of one worker (uvicorn and granian call it in the worker process)."""
    global _current
    _current = create_app(os.environ[_CONFIG_ENV])
    return _current


def _uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingExtraError("uvicorn", "serve", reason="genfan serve") from exc
    return uvicorn


def _server_class() -> Any:
    uvicorn = _uvicorn()

    class DrainingServer(uvicorn.Server):  # type: ignore[misc,name-defined]
        """uvicorn's server, with the gateway's drain on the first SIGTERM or SIGINT."""

        drain_until: float | None = None
        #: called once the server serves (the lifespan started, the signals are ours)
        announce: Callable[[], None] | None = None

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.announce is not None and not self.should_exit:
                self.announce()

        def handle_exit(self, sig: int, frame: Any) -> None:
            gateway = _current
            if gateway is None or self.drain_until is not None:
                super().handle_exit(sig, frame)  # a second signal: stop now
                return
            gateway.begin_drain()
            self.drain_until = time.monotonic() + gateway.settings.drain_seconds

        async def on_tick(self, counter: int) -> bool:
            gateway = _current
            if self.drain_until is not None and gateway is not None:
                if gateway.in_flight == 0 or time.monotonic() >= self.drain_until:
                    self.should_exit = True
            return bool(await super().on_tick(counter))

    return DrainingServer


def _uvicorn_config(workers_drain: float) -> Any:
    uvicorn = _uvicorn()
    options: dict[str, Any] = {
        "factory": True,
        "lifespan": "on",
        "access_log": False,
        "log_level": "warning",
        "proxy_headers": False,
        "server_header": False,
        "timeout_graceful_shutdown": int(workers_drain) + 5,
        "http": "httptools" if _has("httptools") else "h11",
        "loop": "uvloop" if _has("uvloop") else "asyncio",
    }
    return uvicorn.Config("genfan.serve._server:_app_factory", **options)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _run_worker(
    sock: socket.socket, drain: float, announce: Callable[[], None] | None = None
) -> None:
    """One worker process: uvicorn on the shared socket."""
    server = _server_class()(_uvicorn_config(drain))
    server.announce = announce
    server.run(sockets=[sock])


def _announce_when_ready(url: str, on_ready: Callable[[str], None]) -> None:
    """Call ``on_ready(url)`` once a worker answers ``/ready`` (a thread of the parent)."""
    import urllib.error
    import urllib.request

    def poll() -> None:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ready", timeout=1.0) as r:
                    if r.status == 200:
                        on_ready(url)
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)

    import threading

    threading.Thread(target=poll, daemon=True, name="genfan-serve-ready").start()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        from .._errors import ConfigurationError

        raise ConfigurationError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(
    config: str | Path,
    *,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
    server: str = "uvicorn",
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the gateway for ``config`` (a ``genfan.toml``) until SIGTERM or SIGINT.

    Args:
        config: the configuration file.
        host, port, workers: override the ``[serve]`` table (``port=0``: any free port).
        server: ``"uvicorn"`` (with the drain) or ``"granian"``.
        on_ready: called with the URL once the gateway serves (with several workers: once
            one of them answers ``/ready``).

    Raises:
        ConfigurationError: the file is invalid, or the address cannot be used.
        MissingExtraError: the ``serve`` extra is not installed.
    """
    path = Path(config).resolve()
    gen_config, settings = load_gateway_config(path)
    # Build once here, so that a configuration that cannot be built fails before listening.
    from ._models import build_models

    built: dict[str, Any] = {}
    try:
        build_models(gen_config, settings, built)
    finally:
        _close_quietly(built)
    host = host or settings.host
    port = settings.port if port is None else port
    workers = workers or settings.workers
    os.environ[_CONFIG_ENV] = str(path)
    if server == "granian":
        _serve_granian(host, port, workers, on_ready)
        return
    if server != "uvicorn":
        from .._errors import ConfigurationError

        raise ConfigurationError(f"--server must be uvicorn or granian, got {server!r}")
    sock = _bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}"
    if workers == 1:
        announce = (lambda: on_ready(url)) if on_ready is not None else None
        _run_worker(sock, settings.drain_seconds, announce)
        return
    if on_ready is not None:
        _announce_when_ready(url, on_ready)
    _supervise(sock, workers, settings.drain_seconds)


def _close_quietly(models: dict[str, Any]) -> None:
    import anyio

    async def close() -> None:
        for m in models.values():
            await m.backend.aclose()
            for b in m.owned:
                await b.aclose()

    anyio.run(close)


def _supervise(sock: socket.socket, workers: int, drain: float) -> None:
    """Run ``workers`` processes on ``sock``; SIGTERM/SIGINT is passed on to each (each drains);
    a worker that dies is replaced."""
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def start() -> Any:
        p = ctx.Process(target=_run_worker, args=(sock, drain), daemon=False)
        p.start()
        return p

    procs = [start() for _ in range(workers)]

    def stop(sig: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        for i, p in enumerate(procs):
            p.join(timeout=0.2)
            if not p.is_alive() and not stopping:
                print(
                    f"genfan serve: worker {p.pid} exited ({p.exitcode}); restarting",
                    file=sys.stderr,
                    flush=True,
                )
                procs[i] = start()
        if stopping and not any(p.is_alive() for p in procs):
            break
    sock.close()


def _serve_granian(
    host: str, port: int, workers: int, on_ready: Callable[[str], None] | None
) -> None:
    try:
        from granian import Granian
        from granian.constants import Interfaces
    except ImportError as exc:
        raise MissingExtraError("granian", "serve", reason="genfan serve --server granian") from exc
    if port == 0:
        probe = _bind(host, 0)
        port = probe.getsockname()[1]
        probe.close()
    if on_ready is not None:
        on_ready(f"http://{host}:{port}")
    Granian(
        "genfan.serve._server:_app_factory",
        factory=True,
        address=host,
        port=port,
        workers=workers,
        interface=Interfaces.ASGI,
        log_enabled=False,
    ).serve()
