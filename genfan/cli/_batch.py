"""``genfan batch run``: fan every row of a JSONL file out, resumably."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import anyio
import typer

from .._errors import GenfanError

batch_app = typer.Typer(
    name="batch",
    help="Batch jobs over JSONL data sets: resumable, with progress, failures re-runnable.",
    no_args_is_help=True,
)

DEFAULT_CONFIG = Path("genfan.toml")


@batch_app.command("run")
def run(
    input: Annotated[Path, typer.Argument(help="JSONL input: one row per line.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="JSONL output (appended to, resumed from).")
    ],
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML config file (default ./genfan.toml)."),
    ] = None,
    fanout: Annotated[
        str | None,
        typer.Option(help="Build the fan-out with this factory instead: 'module:function'."),
    ] = None,
    template: Annotated[
        str | None, typer.Option(help="Prompt template, e.g. 'Summarise: {text}'.")
    ] = None,
    system: Annotated[str | None, typer.Option(help="System prompt for every row.")] = None,
    max_in_flight: Annotated[
        int | None, typer.Option(help="Rows fanned out at once (per Ray worker).", min=1)
    ] = None,
    only_failed: Annotated[
        bool, typer.Option("--only-failed", help="Re-run only the rows whose record failed.")
    ] = False,
    retry_failed: Annotated[
        bool,
        typer.Option("--retry-failed", help="Run the missing rows and re-run the failed ones."),
    ] = False,
    executor: Annotated[str, typer.Option(help="local | ray")] = "local",
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: start a local one).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Ray workers (actors).", min=1)] = None,
    progress: Annotated[
        bool,
        typer.Option(
            "--progress/--no-progress",
            help="A progress bar on a terminal, plain log lines elsewhere.",
        ),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Fan every row of INPUT out and write one record per row to OUTPUT.

    A job that is stopped (even killed) and run again skips the rows already in OUTPUT.

    Exit status: 0 every row ok, 1 some rows failed (see --only-failed), 2 a usage error.
    """
    from ..batching import BatchJob, run_batch_job

    if only_failed and retry_failed:
        typer.echo("error: use --only-failed or --retry-failed, not both", err=True)
        raise typer.Exit(2)
    rerun = "failed" if only_failed else "missing+failed" if retry_failed else "missing"
    if fanout is None and config is None:
        config = DEFAULT_CONFIG
    try:
        job = BatchJob(
            input=input,
            output=output,
            config=config if fanout is None else None,
            fanout=fanout,
            template=template,
            system=system,
            max_in_flight=max_in_flight,
            rerun=rerun,  # type: ignore[arg-type]
            executor=executor,  # type: ignore[arg-type]
            address=address,
            workers=workers,
        )
        summary = anyio.run(lambda: run_batch_job(job, progress=progress))
    except GenfanError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        for line in summary.lines():
            typer.echo(line, err=True)
    if summary.done_failed or summary.missing:
        raise typer.Exit(1)


__all__ = ["batch_app"]
