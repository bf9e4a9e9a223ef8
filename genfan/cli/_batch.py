"""``genfan batch run``: fan every row of a JSONL file out, resumably."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import anyio
import typer

from .. import ConfigurationError, GenfanError

if TYPE_CHECKING:
    from ..batching import BatchJob, JobProgress, JobSummary

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
    via: Annotated[
        str | None,
        typer.Option(
            help="realtime (a call per row) | batch-api (the provider's batch endpoint, half "
            "price) | offline (every row at once: the local engine). Default: the config's batch table (via = ...), else realtime."
        ),
    ] = None,
    deadline: Annotated[
        str | None,
        typer.Option(
            help="With --via batch-api: rows not done by then run real-time ('2h', '06:00', "
            "'2026-12-07T06:00', seconds)."
        ),
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="With --via batch-api/offline: the config's backend to use.")
    ] = None,
    max_requests: Annotated[
        int | None,
        typer.Option(
            help="With --via batch-api: rows per batch (default: the provider's limit).", min=1
        ),
    ] = None,
    poll_interval: Annotated[
        float | None,
        typer.Option(help="With --via batch-api: seconds before the first poll (it grows).", min=0),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait",
            help="With --via batch-api: wait for the batches (--no-wait: submit, collect what "
            "has ended, and return; run again to collect the rest).",
        ),
    ] = True,
) -> None:
    """Fan every row of INPUT out and write one record per row to OUTPUT.

    A job that is stopped (even killed) and run again skips the rows already in OUTPUT; with --via batch-api it resumes polling the batches already submitted, never submitting twice.

    Exit status: 0 every row ok (or still in a batch, with --no-wait), 1 some rows failed (see --only-failed), 2 a usage error.
    """
    from ..batching import BatchAPISettings, BatchJob, run_batch_job

    if only_failed and retry_failed:
        typer.echo("error: use --only-failed or --retry-failed, not both", err=True)
        raise typer.Exit(2)
    rerun = "failed" if only_failed else "missing+failed" if retry_failed else "missing"
    if fanout is None and config is None:
        config = DEFAULT_CONFIG
    try:
        api_options: dict[str, object] = {}
        if backend is not None:
            api_options["backend"] = backend
        if max_requests is not None:
            api_options["max_requests"] = max_requests
        if poll_interval is not None:
            api_options["poll_initial"] = poll_interval
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
            via=via,  # type: ignore[arg-type]
            deadline=deadline,
            batch_api=BatchAPISettings(**api_options) if api_options else None,  # type: ignore[arg-type]
        )
        if not wait:
            summary = anyio.run(lambda: _no_wait(job))
            _report(summary, as_json)
            return
        bar = _make_progress(progress)
        try:
            # A bar on a terminal; elsewhere the library's plain log lines.
            summary = anyio.run(
                lambda: run_batch_job(job, progress=progress and bar is None, on_progress=bar)
            )
        finally:
            if bar is not None:
                bar.close()
    except GenfanError as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:  # an input or output problem the library did not name itself
        where = f" ({exc.filename})" if exc.filename else ""
        typer.echo(f"error: {exc.strerror or exc}{where}", err=True)
        raise typer.Exit(2) from None
    _report(summary, as_json)


def _report(summary: JobSummary, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        for line in summary.lines():
            typer.echo(line, err=True)
    # Rows still in a provider's batch (--no-wait) are not a failure: a later run collects them.
    pending = getattr(summary, "batches_pending", 0)
    if summary.done_failed or (summary.missing and not pending):
        raise typer.Exit(1)


async def _no_wait(job: BatchJob) -> JobSummary:
    from ..batching import run_via_batch_api

    if job.via not in (None, "batch-api"):
        raise ConfigurationError(
            "--no-wait is for --via batch-api: drop it, or add --via batch-api"
        )
    await run_via_batch_api(job, mode="submit")
    return await run_via_batch_api(job, mode="collect")


@batch_app.command("cancel")
def cancel(
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="The job's JSONL output (its batches are listed next to it)."
        ),
    ],
    input: Annotated[Path, typer.Option("--input", "-i", help="The job's JSONL input.")],
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML config file (default ./genfan.toml)."),
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="The config's backend the batches went to.")
    ] = None,
) -> None:
    """Cancel the provider batches of the --via batch-api job writing OUTPUT.

    Run the job again to collect what the batches finished; the rest is recorded as failed
    (--only-failed sends them again).
    """
    from ..batching import BatchAPISettings, BatchJob, cancel_batch_job

    try:
        job = BatchJob(
            input=input,
            output=output,
            config=config or DEFAULT_CONFIG,
            via="batch-api",
            batch_api=BatchAPISettings(backend=backend),
        )
        n = anyio.run(lambda: cancel_batch_job(job))
    except GenfanError as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(2) from None
    typer.echo(
        f"cancelled {n} batch(es); run the job again to collect what they finished", err=True
    )


class RichProgress:
    """A rich progress bar on stderr, drawn from the job's progress reports.

    Rows done, rate, ETA, failures, tokens and cost; it appears with the first report (when the
    rows start) and stops with the last one.
    """

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} rows/s"),
            TimeRemainingColumn(),
            TextColumn(
                "[red]{task.fields[failed]} failed[/] {task.fields[tokens]} tok {task.fields[cost]}"
            ),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._progress.add_task(
            "batch", total=0, rate="0.0", failed=0, tokens=0, cost=""
        )
        self._started = False

    def __call__(self, p: JobProgress) -> None:
        if not self._started:
            self._started = True
            self._progress.update(self._task, total=p.total)
            self._progress.start()
        self._progress.update(
            self._task,
            completed=p.done,
            rate=f"{p.rate:.1f}",
            failed=p.failed,
            tokens=p.tokens,
            cost=f"${p.cost:.4f}" if p.cost is not None else "",
        )
        if p.finished:
            self.close()

    def close(self) -> None:
        if self._started:
            self._progress.stop()


def _make_progress(progress: bool) -> RichProgress | None:
    """A bar when progress is wanted on a terminal; ``None`` otherwise."""
    return RichProgress() if progress and sys.stderr.isatty() else None


__all__ = ["batch_app"]
