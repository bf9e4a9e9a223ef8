"""``genfan serve``: the OpenAI-compatible gateway for a ``genfan.toml``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .._errors import GenfanError


def serve(
    config: Annotated[
        Path,
        typer.Option(
            "--config", "-c", help="TOML config file (backends, fan-outs, and the serve table)."
        ),
    ] = Path("genfan.toml"),
    host: Annotated[
        str | None, typer.Option("--host", help="Address to listen on (default 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="Port (default 8000; 0: any free port).")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", help="Processes sharing the port (default 1)."),
    ] = None,
    server: Annotated[
        str, typer.Option("--server", help="uvicorn (default, drains on SIGTERM) or granian.")
    ] = "uvicorn",
) -> None:
    """Serve every backend, fan-out and cascade of the config as OpenAI-compatible models."""
    from ..serve import serve as run

    if port is not None and not 0 <= port <= 65535:
        typer.echo(f"error: --port {port}: use 0..65535", err=True)
        raise typer.Exit(2)
    if workers is not None and not 1 <= workers <= 64:
        typer.echo(f"error: --workers {workers}: use 1..64", err=True)
        raise typer.Exit(2)

    def ready(url: str) -> None:
        typer.echo(f"genfan serve: listening on {url}", err=True)

    try:
        run(config, host=host, port=port, workers=workers, server=server, on_ready=ready)
    except GenfanError as exc:
        typer.echo(f"error: {str(exc).replace(chr(10), '; ')}", err=True)
        raise typer.Exit(2) from None
