"""Batch jobs over data sets: every row of a JSONL file fanned out, results written row by row.

A row is ``{"id": ..., "prompt": "..."}``, or ``{"id": ..., "template": "...", "vars": {...}}``,
or just variables for the job's template (``{"id": 7, "city": "Oslo"}`` with
``template="Describe {city}."``). A row without ``id`` gets its line number (1-based).

The job is resumable: see :mod:`genfan.batching._output` for the file format and why a kill at
any moment neither loses nor duplicates a row.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from .. import telemetry
from .._errors import AllBackendsFailedError, BackendError, ConfigurationError
from .._fanout import FanOut, FanOutResult
from .._types import ChatRequest
from ._output import OutputFile, Record, row_key

__all__ = [
    "BatchJob",
    "Executor",
    "FanOutFactory",
    "JobSummary",
    "Rerun",
    "run_batch_job",
]

#: Builds the job's fan-out (called once per process: the driver, or each Ray worker).
FanOutFactory = Callable[[], FanOut | Awaitable[FanOut]]
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

    async def run(self, *, progress: bool = False) -> JobSummary:
        """Run the job (see :func:`run_batch_job`)."""
        return await run_batch_job(self, progress=progress)


@dataclass(frozen=True, kw_only=True)
class JobSummary:
    """What a run did.

    Attributes:
        rows: rows in the input.
        skipped: rows not run (already done, or not selected by ``rerun``).
        ran: rows run now; ``ok`` and ``failed`` split them.
        failures_by_type: failed rows of this run by error type.
        input_tokens, output_tokens: over every candidate of this run.
        cost: USD, when the backends know their prices (else ``None``).
        wall: seconds for the run; ``throughput``: rows run per second.
        done_ok, done_failed, missing: the whole output after the run, per input row.
        repaired: bytes of a torn last line cut off at start (a killed earlier run).
    """

    rows: int
    skipped: int
    ran: int
    ok: int
    failed: int
    failures_by_type: Mapping[str, int] = field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float | None = None
    wall: float = 0.0
    throughput: float = 0.0
    done_ok: int = 0
    done_failed: int = 0
    missing: int = 0
    repaired: int = 0
    output: Path | None = None

    def lines(self) -> list[str]:
        """The summary as short lines of text."""
        out = [
            f"rows: {self.rows} in input, {self.ran} run, {self.skipped} skipped",
            f"result: {self.ok} ok, {self.failed} failed"
            + (
                " ("
                + ", ".join(f"{k}: {v}" for k, v in sorted(self.failures_by_type.items()))
                + ")"
                if self.failures_by_type
                else ""
            ),
            f"tokens: {self.input_tokens} in, {self.output_tokens} out"
            + (f"; cost ${self.cost:.4f}" if self.cost is not None else ""),
            f"wall: {self.wall:.2f} s; throughput {self.throughput:.1f} rows/s",
            f"output: {self.done_ok} ok, {self.done_failed} failed, {self.missing} missing"
            + (f" -> {self.output}" if self.output else ""),
        ]
        if self.done_failed:
            out.append("re-run the failures with --only-failed (rerun='failed')")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "skipped": self.skipped,
            "ran": self.ran,
            "ok": self.ok,
            "failed": self.failed,
            "failures_by_type": dict(self.failures_by_type),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost": self.cost,
            "wall": self.wall,
            "throughput": self.throughput,
            "done_ok": self.done_ok,
            "done_failed": self.done_failed,
            "missing": self.missing,
            "repaired": self.repaired,
            "output": str(self.output) if self.output else None,
        }


# -- rows -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobRow:
    """One input row: its id, its key, its line number and its fields."""

    id: str | int
    key: str
    line: int
    data: Mapping[str, Any]


def _iter_rows(path: Path) -> Iterator[JobRow]:
    try:
        fh = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(f"input file {path} not found") from None
    with fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except ValueError as exc:
                raise ConfigurationError(f"{path} line {n}: not valid JSON ({exc})") from None
            if not isinstance(data, dict):
                raise ConfigurationError(f"{path} line {n}: a row must be a JSON object")
            row_id = data.get("id", n)
            if isinstance(row_id, bool) or not isinstance(row_id, str | int):
                raise ConfigurationError(
                    f"{path} line {n}: id must be a string or an integer, got {row_id!r}"
                )
            yield JobRow(row_id, row_key(row_id), n, data)


def scan_input(path: Path) -> list[str]:
    """Every row's id key in input order; duplicates are an error (fail before any work)."""
    keys: list[str] = []
    first: dict[str, int] = {}
    for row in _iter_rows(path):
        if row.key in first:
            raise ConfigurationError(
                f"{path} line {row.line}: id {row.id!r} already used on line {first[row.key]}; "
                "ids must be unique"
            )
        first[row.key] = row.line
        keys.append(row.key)
    return keys


def build_request(row: JobRow, *, template: str | None, system: str | None) -> ChatRequest:
    """The chat request of one row.

    Raises:
        ConfigurationError: the row has no prompt and no template, or lacks a template variable.
    """
    data = row.data
    prompt = data.get("prompt")
    if prompt is None:
        tmpl = data.get("template", template)
        if tmpl is None:
            raise ConfigurationError(
                f"row {row.id!r} has no 'prompt' and there is no template "
                "(give the row a 'template', or the job template=)"
            )
        variables = data.get("vars")
        if variables is None:
            variables = {k: v for k, v in data.items() if k not in ("id", "template", "system")}
        if not isinstance(variables, Mapping):
            raise ConfigurationError(f"row {row.id!r}: 'vars' must be an object")
        try:
            prompt = str(tmpl).format_map(variables)
        except KeyError as exc:
            raise ConfigurationError(
                f"row {row.id!r}: template variable {exc.args[0]!r} is missing from the row"
            ) from None
        except (ValueError, IndexError) as exc:
            raise ConfigurationError(f"row {row.id!r}: bad template: {exc}") from None
    if not isinstance(prompt, str):
        raise ConfigurationError(f"row {row.id!r}: 'prompt' must be a string")
    sys_prompt = data.get("system", system)
    return ChatRequest.from_prompt(
        prompt,
        system=sys_prompt if isinstance(sys_prompt, str) else None,
        metadata={"batch_row_id": str(row.id)},
    )


def _error_dict(exc: BaseException) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, BackendError):
        out["backend"] = exc.backend
        out["message"] = exc.message
    if isinstance(exc, AllBackendsFailedError):
        out["message"] = exc.message
        out["backend_errors"] = [_error_dict(e) for e in exc.exceptions]
    return out


def result_record(row: JobRow, result: FanOutResult) -> Record:
    """The output record of a row whose fan-out produced a result."""
    chosen = result.chosen
    usage = result.usage
    record: Record = {
        "id": row.id,
        "status": "ok",
        "text": chosen.text if chosen is not None else None,
        "backend": chosen.backend if chosen is not None else None,
        "candidates": [
            {
                "backend": c.backend,
                "status": c.status,
                "text": c.text if c.ok else None,
                "latency": round(c.latency, 6),
                **({"error": _error_dict(c.error)} if c.error is not None else {}),
            }
            for c in result.candidates
        ],
        "usage": {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cost": usage.cost,
        },
        "elapsed": round(result.elapsed, 6),
    }
    if chosen is None:
        record["status"] = "failed"
        record["error"] = {
            "type": "NoSelectionError",
            "message": result.selection.explanation or "the selector chose no candidate",
        }
    return record


def failure_record(row: JobRow, exc: BaseException, elapsed: float) -> Record:
    """The output record of a row that failed with ``exc``."""
    return {
        "id": row.id,
        "status": "failed",
        "error": _error_dict(exc),
        "elapsed": round(elapsed, 6),
    }


async def process_row(
    fan: FanOut, row: JobRow, *, template: str | None, system: str | None
) -> Record:
    """Fan one row out; its record (a failure is a record too, never an exception)."""
    start = time.perf_counter()
    try:
        request = build_request(row, template=template, system=system)
        result = await fan.run(request)
    except Exception as exc:  # every row ends as one record, never an exception
        return failure_record(row, exc, time.perf_counter() - start)
    return result_record(row, result)


# -- building the fan-out ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResolvedJob:
    """The job's settings after merging the config's ``[batch]`` table."""

    template: str | None
    system: str | None
    max_in_flight: int


def resolve(job: BatchJob) -> ResolvedJob:
    """Merge the job's fields over the config file's ``[batch]`` table."""
    table: Mapping[str, Any] = {}
    if job.config is not None:
        from .._config import load_config

        table = load_config(job.config).batch
        unknown = set(table) - {"template", "system", "max_in_flight"}
        if unknown:
            raise ConfigurationError(
                f"{job.config}: unknown key(s) in [batch]: {sorted(unknown)}; "
                "allowed: template, system, max_in_flight"
            )
    max_in_flight = job.max_in_flight or table.get("max_in_flight", 16)
    if not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ConfigurationError(
            f"batch.max_in_flight must be an integer >= 1, got {max_in_flight!r}"
        )
    return ResolvedJob(
        template=job.template if job.template is not None else table.get("template"),
        system=job.system if job.system is not None else table.get("system"),
        max_in_flight=max_in_flight,
    )


def import_factory(path: str) -> FanOutFactory:
    """Import ``"package.module:function"``."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"cannot import {module_name!r} for fanout {path!r}: {exc}"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigurationError(f"{path!r}: {module_name} has no callable {attr!r}")
    return factory  # type: ignore[no-any-return]


async def make_fanout(job: BatchJob) -> FanOut:
    """Build the job's fan-out (its backends and guards are this process's own)."""
    if job.config is not None:
        from .._config import load_config

        return load_config(job.config).build_fanout()
    factory = import_factory(job.fanout) if isinstance(job.fanout, str) else job.fanout
    assert factory is not None
    fan = factory()
    if inspect.isawaitable(fan):
        fan = await fan
    if not isinstance(fan, FanOut):
        raise ConfigurationError(f"the fanout factory returned {type(fan).__name__}, not a FanOut")
    return fan


# -- progress ---------------------------------------------------------------------------------


class Progress(Protocol):
    def start(self, total: int) -> None: ...
    def advance(self, record: Record) -> None: ...
    def close(self) -> None: ...


class _Tally:
    """Counts for the progress display and the summary."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.failures: Counter[str] = Counter()
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost: float | None = None

    def add(self, record: Record) -> None:
        if record["status"] == "ok":
            self.ok += 1
        else:
            self.failed += 1
            self.failures[str(record.get("error", {}).get("type", "Error"))] += 1
        usage = record.get("usage") or {}
        self.input_tokens += int(usage.get("input_tokens") or 0)
        self.output_tokens += int(usage.get("output_tokens") or 0)
        if usage.get("cost") is not None:
            self.cost = (self.cost or 0.0) + float(usage["cost"])

    @property
    def done(self) -> int:
        return self.ok + self.failed


class _NoProgress:
    def start(self, total: int) -> None:
        pass

    def advance(self, record: Record) -> None:
        pass

    def close(self) -> None:
        pass


class LogProgress:
    """Plain log lines on stderr, at most one every ``interval`` seconds (not a terminal)."""

    def __init__(self, tally: _Tally, *, interval: float = 10.0) -> None:
        self._tally = tally
        self._interval = interval
        self._total = 0
        self._t0 = time.monotonic()
        self._last = self._t0

    def start(self, total: int) -> None:
        self._total = total
        self._t0 = self._last = time.monotonic()
        print(f"batch: {total} rows to run", file=sys.stderr, flush=True)

    def advance(self, record: Record) -> None:
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        t = self._tally
        rate = t.done / max(now - self._t0, 1e-9)
        eta = (self._total - t.done) / rate if rate > 0 else math.inf
        cost = f", ${t.cost:.4f}" if t.cost is not None else ""
        print(
            f"batch: {t.done}/{self._total} rows, {rate:.1f} rows/s, ETA {_fmt_eta(eta)}, "
            f"{t.failed} failed, {t.input_tokens + t.output_tokens} tokens{cost}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        self._line(time.monotonic())


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


class RichProgress:
    """A rich progress bar on stderr: rows done, rate, ETA, failures, tokens and cost."""

    def __init__(self, tally: _Tally) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._tally = tally
        self._t0 = time.monotonic()
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

    def start(self, total: int) -> None:
        self._t0 = time.monotonic()
        self._progress.update(self._task, total=total)
        self._progress.start()

    def advance(self, record: Record) -> None:
        t = self._tally
        rate = t.done / max(time.monotonic() - self._t0, 1e-9)
        self._progress.update(
            self._task,
            advance=1,
            rate=f"{rate:.1f}",
            failed=t.failed,
            tokens=t.input_tokens + t.output_tokens,
            cost=f"${t.cost:.4f}" if t.cost is not None else "",
        )

    def close(self) -> None:
        self._progress.stop()


def _make_progress(tally: _Tally, progress: bool) -> Progress:
    if not progress:
        return _NoProgress()
    return RichProgress(tally) if sys.stderr.isatty() else LogProgress(tally)


# -- running ----------------------------------------------------------------------------------

#: Hands a finished record to the writer.
Emit = Callable[[Record], Awaitable[None]]


#: Runs the selected rows and hands each record to ``emit``.
RowRunner = Callable[[Iterator[JobRow], Emit], Awaitable[None]]


async def prepare_local(job: BatchJob, settings: ResolvedJob) -> RowRunner:
    """The in-process executor: rows fanned out here, at most ``max_in_flight`` at once."""
    fan = await make_fanout(job)

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


def _raise_single(group: BaseExceptionGroup[BaseException]) -> None:
    # A task group wraps even one error; hand a lone typed error to the caller as itself.
    if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
        raise group.exceptions[0] from None
    raise group


def _select(keys: list[str], output: OutputFile, rerun: Rerun) -> set[str]:
    wanted = {"missing": (None,), "failed": ("failed",), "missing+failed": (None, "failed")}[rerun]
    return {k for k in keys if output.status(k) in wanted}


async def run_batch_job(job: BatchJob, *, progress: bool = False) -> JobSummary:
    """Run a batch job to the end and return its summary.

    Rows already in the output are skipped (``rerun`` decides which run again); each finished
    row is appended durably as soon as it is done; the output is compacted at the end.

    Args:
        job: what to run.
        progress: show progress on stderr: a bar (rows done, rate, ETA, failures, tokens, cost)
            on a terminal, plain log lines elsewhere. Off by default: a library stays quiet.

    Raises:
        ConfigurationError: bad input (invalid JSON, duplicate ids), config or factory.
        MissingExtraError: ``executor="ray"`` without Ray installed.
    """
    settings = resolve(job)
    keys = scan_input(job.input)
    output = OutputFile(job.output)
    output.open()
    tally = _Tally()
    try:
        todo = _select(keys, output, job.rerun)
        reporter = _make_progress(tally, progress)
        telemetry.event(
            "batch_job_started",
            level="info",
            rows=len(keys),
            todo=len(todo),
            executor=job.executor,
            repaired_bytes=output.repaired,
        )
        rows = (row for row in _iter_rows(job.input) if row.key in todo)
        send, receive = anyio.create_memory_object_stream[Record](
            max_buffer_size=max(64, settings.max_in_flight * 2)
        )

        def written(record: Record) -> None:
            tally.add(record)
            reporter.advance(record)

        t0 = time.perf_counter()
        if todo:
            # Build the fan-out (or join Ray) first, so misuse surfaces as one typed error.
            if job.executor == "ray":
                from ._ray import prepare_ray

                run = await prepare_ray(job, settings)
            else:
                run = await prepare_local(job, settings)
            reporter.start(len(todo))
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_writer, receive, output, written)
                    async with send:
                        await run(rows, send.send)
            except BaseExceptionGroup as group:
                _raise_single(group)
            finally:
                reporter.close()
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
