"""Batch jobs over data sets: every row of a JSONL file fanned out, results written row by row.

A row is ``{"id": ..., "prompt": "..."}``, or ``{"id": ..., "template": "...", "vars": {...}}``,
or just variables for the job's template (``{"id": 7, "city": "Oslo"}`` with
``template="Describe {city}."``). A row without ``id`` gets its line number (1-based).

The job is resumable: see `genfan.batching._output` for the file format and why a kill at
any moment neither loses nor duplicates a row.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from .. import telemetry
from .._errors import ConfigurationError
from ._batch_settings import BatchAPISettings, Via, parse_deadline
from ._output import OutputFile, Record
from ._progress import LogProgress, OnProgress, Tally
from ._ray import prepare_ray
from ._rows import (
    Emit,
    FanOutFactory,
    JobRow,
    ResolvedJob,
    RowRunner,
    iter_rows,
    make_fanout,
    process_row,
    scan_input,
)
from ._summary import BatchAPISummary, JobSummary

__all__ = [
    "BatchJob",
    "Executor",
    "JobSummary",
    "Rerun",
    "run_batch_job",
]

Executor = Literal["local", "ray"]
#: Which rows a run does: ``missing`` (not in the output yet: a fresh run or a resume),
#: ``failed`` (only rows whose last record failed), ``missing+failed`` (both).
Rerun = Literal["missing", "failed", "missing+failed"]


@dataclass(frozen=True, kw_only=True)
class BatchJob:
    """What a batch job does; picklable, so the same definition runs locally or on Ray.

    Exactly one of ``config`` and ``fanout`` says how to build the fan-out.

    Args:
        input: JSONL file of rows.
        output: JSONL file of results (appended to; resumed from).
        config: a genfan TOML config file; its ``[backends]``/``[fanout]`` build the fan-out and
            its ``[batch]`` table may set ``template``, ``system`` and ``max_in_flight``.
        fanout: a factory ``() -> FanOut`` or its import path ``"package.module:function"``.
        template: the job's prompt template (``str.format`` fields filled from the row).
        system: a system prompt for every row (a row's ``"system"`` overrides it).
        max_in_flight: rows being fanned out at once (per Ray worker with ``executor="ray"``).
        rerun: which rows to run (``missing``, ``failed`` or ``missing+failed``).
        executor: ``local`` (this process) or ``ray``.
        address: the Ray cluster to join (``None``: the running one, or a new local one).
        workers: Ray workers (actors); default: the cluster's CPUs.
        chunk_size: rows per Ray task.
        compact: rewrite the output to one record per id, in input order, when a run finishes.
        via: (default: the config's ``[batch] via``, else ``realtime``) ``realtime`` (a call
            per row), ``batch-api`` (the provider's batch endpoint, half
            price: see docs/batch-api.md) or ``offline`` (every row at once to the unguarded
            backend: the local engine's full batching).
        deadline: with ``batch-api``, rows not done by then run in real time: seconds, a
            duration (``"2h"``), a time of day (``"06:00"``) or a date and time.
        batch_api: how ``batch-api`` splits, polls and waits (a ``BatchAPISettings``).
    """

    input: Path
    output: Path
    config: Path | None = None
    fanout: FanOutFactory | str | None = None
    template: str | None = None
    system: str | None = None
    max_in_flight: int | None = None
    rerun: Rerun = "missing"
    executor: Executor = "local"
    address: str | None = None
    workers: int | None = None
    chunk_size: int = 32
    compact: bool = True
    via: Via | None = None
    deadline: float | str | datetime | None = None
    batch_api: BatchAPISettings | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "input", Path(self.input))
        object.__setattr__(self, "output", Path(self.output))
        if self.config is not None:
            # absolute, so that Ray workers (another working directory) find the same file
            object.__setattr__(self, "config", Path(self.config).absolute())
        if (self.config is None) == (self.fanout is None):
            raise ConfigurationError(
                "a BatchJob needs exactly one of config= (a TOML file) or fanout= "
                "(a factory or 'module:function')"
            )
        if isinstance(self.fanout, str) and ":" not in self.fanout:
            raise ConfigurationError(
                f"fanout must be 'package.module:function', got {self.fanout!r}"
            )
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ConfigurationError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.rerun not in ("missing", "failed", "missing+failed"):
            raise ConfigurationError(
                f"rerun must be 'missing', 'failed' or 'missing+failed', got {self.rerun!r}"
            )
        if self.executor not in ("local", "ray"):
            raise ConfigurationError(f"executor must be 'local' or 'ray', got {self.executor!r}")
        if self.workers is not None and self.workers < 1:
            raise ConfigurationError(f"workers must be >= 1, got {self.workers}")
        if self.chunk_size < 1:
            raise ConfigurationError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.input.resolve() == self.output.resolve():
            raise ConfigurationError("input and output must be different files")
        if self.via not in (None, "realtime", "batch-api", "offline"):
            raise ConfigurationError(
                f"via must be 'realtime', 'batch-api' or 'offline', got {self.via!r}"
            )
        if self.via not in (None, "realtime") and self.executor != "local":
            raise ConfigurationError(f"via={self.via!r} runs with executor='local' only")
        if self.deadline is not None:
            if self.via not in (None, "batch-api"):
                raise ConfigurationError(
                    "deadline= is for via='batch-api' (the rows not done by then go real-time)"
                )
            parse_deadline(self.deadline)  # a bad value fails here, not after the upload

    async def run(
        self, *, progress: bool = False, on_progress: OnProgress | None = None
    ) -> JobSummary:
        """Run the job (see [`run_batch_job`][genfan.batching.run_batch_job])."""
        return await run_batch_job(self, progress=progress, on_progress=on_progress)


# -- settings ---------------------------------------------------------------------------------


def resolve(job: BatchJob) -> ResolvedJob:
    """Merge the job's fields over the config file's ``[batch]`` table."""
    table: Mapping[str, Any] = {}
    if job.config is not None:
        from .._config import load_config

        table = load_config(job.config).batch
        unknown = set(table) - {"template", "system", "max_in_flight", *_BATCH_API_KEYS}
        if unknown:
            raise ConfigurationError(
                f"{job.config}: unknown key(s) in [batch]: {sorted(unknown)}; "
                "allowed: template, system, max_in_flight, via, deadline, batch_api"
            )
    max_in_flight = job.max_in_flight or table.get("max_in_flight", 16)
    if not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ConfigurationError(
            f"batch.max_in_flight must be an integer >= 1, got {max_in_flight!r}"
        )
    return ResolvedJob(
        config=job.config,
        fanout=job.fanout,
        template=job.template if job.template is not None else table.get("template"),
        system=job.system if job.system is not None else table.get("system"),
        max_in_flight=max_in_flight,
    )


_BATCH_API_KEYS = ("via", "deadline", "batch_api")


def resolve_via(job: BatchJob) -> BatchJob:
    """The job with ``via``, ``deadline`` and ``batch_api`` filled from the config's ``[batch]``
    table where the job leaves them unset (``via``: ``realtime`` when neither sets it)."""
    table: Mapping[str, Any] = {}
    if job.config is not None and (
        job.via is None or job.deadline is None or job.batch_api is None
    ):
        from .._config import load_config

        table = load_config(job.config).batch
    api = job.batch_api
    if api is None and "batch_api" in table:
        raw = table["batch_api"]
        if not isinstance(raw, Mapping):
            raise ConfigurationError(f"{job.config}: [batch.batch_api] must be a table")
        try:
            api = BatchAPISettings(**raw)
        except TypeError as exc:
            raise ConfigurationError(f"{job.config}: [batch.batch_api]: {exc}") from None
    try:
        return replace(
            job,
            via=job.via or table.get("via") or "realtime",
            deadline=job.deadline if job.deadline is not None else table.get("deadline"),
            batch_api=api,
        )
    except ConfigurationError as exc:
        raise ConfigurationError(f"{job.config}: [batch]: {exc}") from None


async def run_via(
    job: BatchJob, *, mode: Literal["all", "submit", "collect"], progress: bool = False
) -> BatchAPISummary:
    """Run ``job`` through its provider's batch API, or ``offline`` (``genfan.batching._batch_api``);
    its real-time parts (rows past the deadline, the offline path) through `run_batch_job`."""
    from ._batch_api import run_batch_api

    job = resolve_via(job)
    settings = resolve(job)

    async def realtime(fanout: FanOutFactory, max_in_flight: int | None) -> JobSummary:
        late = replace(
            job,
            via="realtime",
            config=None,
            fanout=fanout,
            rerun="missing",
            deadline=None,
            max_in_flight=max_in_flight or settings.max_in_flight,
        )
        return await run_batch_job(late, progress=progress)

    return await run_batch_api(
        job, mode=mode, template=settings.template, system=settings.system, realtime=realtime
    )


# -- running ----------------------------------------------------------------------------------


async def prepare_local(settings: ResolvedJob) -> RowRunner:
    """The in-process executor: rows fanned out here, at most ``max_in_flight`` at once."""
    fan = await make_fanout(settings)

    async def run(rows: Iterator[JobRow], emit: Emit) -> None:
        async with fan:
            slots = anyio.Semaphore(settings.max_in_flight)

            async def one(row: JobRow) -> None:
                try:
                    record = await process_row(
                        fan, row, template=settings.template, system=settings.system
                    )
                finally:
                    slots.release()
                await emit(record)

            async with anyio.create_task_group() as tg:
                for row in rows:
                    await slots.acquire()
                    tg.start_soon(one, row)

    return run


async def _writer(
    receive: MemoryObjectReceiveStream[Record],
    output: OutputFile,
    on_written: Callable[[Record], None],
) -> None:
    # Group commit: every record that is ready shares one write + fsync.
    async with receive:
        async for first in receive:
            group = [first]
            while True:
                try:
                    group.append(receive.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            await anyio.to_thread.run_sync(output.append, group)
            for record in group:
                on_written(record)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _raise_single(group: BaseExceptionGroup[BaseException]) -> None:
    # A task group wraps even one error; hand a lone typed error to the caller as itself. A row
    # that found the writer gone (it failed: a full disk, a progress callback that raised) is a
    # consequence of that error, not a second one.
    causes = [
        e
        for e in _leaves(group)
        if not isinstance(e, anyio.BrokenResourceError | anyio.ClosedResourceError)
    ]
    if len(causes) == 1 and isinstance(causes[0], Exception):
        raise causes[0] from None
    raise group


def _select(keys: list[str], output: OutputFile, rerun: Rerun) -> set[str]:
    wanted = {"missing": (None,), "failed": ("failed",), "missing+failed": (None, "failed")}[rerun]
    return {k for k in keys if output.status(k) in wanted}


def _reporters(progress: bool, on_progress: OnProgress | None) -> list[OnProgress]:
    reporters: list[OnProgress] = [LogProgress()] if progress else []
    if on_progress is not None:
        reporters.append(on_progress)
    return reporters


async def run_batch_job(
    job: BatchJob, *, progress: bool = False, on_progress: OnProgress | None = None
) -> JobSummary:
    """Run a batch job to the end and return its summary.

    Rows already in the output are skipped (``rerun`` decides which run again); each finished
    row is appended durably as soon as it is done; the output is compacted at the end.

    Args:
        job: what to run.
        progress: print plain progress lines on stderr (rows done, rate, ETA, failures, tokens,
            cost), one every 10 seconds at most. Off by default: a library stays quiet.
        on_progress: called with a [`JobProgress`][genfan.batching.JobProgress] when the rows start, after each row
            written, and with ``finished=True`` when the run ends (even on an error); it runs
            on the event loop, so keep it quick. Draw any display you like from it (the
            ``genfan batch run`` command draws a progress bar). Not called when no row is to run.

    Raises:
        ConfigurationError: bad input (missing, not UTF-8, invalid JSON, duplicate ids: the
            file and line are named), config or factory.
        OutputError: (a ``GenfanError`` and an ``OSError``) the output cannot be written: it is
            a folder, its location is missing, forbidden or read-only, the disk is full (during
            the run or the compaction). The rows already written stay, no temporary file is
            left, and running the job again resumes.
        MissingExtraError: ``executor="ray"`` without Ray installed.
    """
    job = resolve_via(job)
    if job.via != "realtime":
        return await run_via(job, mode="all", progress=progress)
    settings = resolve(job)
    keys = scan_input(job.input)
    output = OutputFile(job.output)
    output.open()
    tally = Tally()
    reporters = _reporters(progress, on_progress)
    try:
        todo = _select(keys, output, job.rerun)
        telemetry.event(
            "batch_job_started",
            level="info",
            rows=len(keys),
            todo=len(todo),
            executor=job.executor,
            repaired_bytes=output.repaired,
        )
        rows = (row for row in iter_rows(job.input) if row.key in todo)
        send, receive = anyio.create_memory_object_stream[Record](
            max_buffer_size=max(64, settings.max_in_flight * 2)
        )

        started = 0.0  # when the rows start (anyio's clock)

        def report(*, finished: bool = False) -> None:
            snapshot = tally.snapshot(len(todo), anyio.current_time() - started, finished=finished)
            for reporter in reporters:
                reporter(snapshot)

        def written(record: Record) -> None:
            tally.add(record)
            report()

        t0 = time.perf_counter()
        if todo:
            # Build the fan-out (or join Ray) first, so misuse surfaces as one typed error.
            if job.executor == "ray":
                run = await prepare_ray(
                    settings, address=job.address, workers=job.workers, chunk_size=job.chunk_size
                )
            else:
                run = await prepare_local(settings)
            started = anyio.current_time()
            report()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_writer, receive, output, written)
                    async with send:
                        await run(rows, send.send)
            except BaseExceptionGroup as group:
                _raise_single(group)
            finally:
                report(finished=True)
        wall = time.perf_counter() - t0
        if job.compact:
            await anyio.to_thread.run_sync(output.compact, keys)
        statuses = Counter(output.status(k) for k in keys)
        summary = JobSummary(
            rows=len(keys),
            skipped=len(keys) - len(todo),
            ran=tally.done,
            ok=tally.ok,
            failed=tally.failed,
            failures_by_type=dict(tally.failures),
            input_tokens=tally.input_tokens,
            output_tokens=tally.output_tokens,
            cost=tally.cost,
            wall=wall,
            throughput=tally.done / wall if wall > 0 else 0.0,
            done_ok=statuses["ok"],
            done_failed=statuses["failed"],
            missing=statuses[None],
            repaired=output.repaired,
            output=job.output,
        )
        telemetry.event("batch_job_finished", level="info", **summary.to_dict())
        return summary
    finally:
        output.close()
