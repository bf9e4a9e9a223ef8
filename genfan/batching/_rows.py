"""One row of a batch job, as every executor runs it: read, made a request, fanned out, recorded.

The local executor (`genfan.batching._job`) and the Ray executor
(`genfan.batching._ray`) share this module and nothing else: `ResolvedJob` is all an
executor needs to know about a job (it is picklable, so Ray actors get it as it is), and
`process_row` turns one row into one output record, a failure included.
"""

from __future__ import annotations

import importlib
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import AllBackendsFailedError, BackendError, ConfigurationError
from .._fanout import FanOut, FanOutResult
from .._types import ChatRequest
from ._output import Record, row_key

__all__ = [
    "Emit",
    "FanOutFactory",
    "JobRow",
    "ResolvedJob",
    "RowRunner",
    "build_request",
    "failure_record",
    "iter_rows",
    "make_fanout",
    "process_row",
    "result_record",
    "scan_input",
]

#: Builds the job's fan-out (called once per process: the driver, or each Ray worker).
FanOutFactory = Callable[[], FanOut | Awaitable[FanOut]]


@dataclass(frozen=True, slots=True)
class ResolvedJob:
    """What an executor needs of a job: where its fan-out comes from, and its row settings.

    ``template``, ``system`` and ``max_in_flight`` are the job's fields merged over the config
    file's ``[batch]`` table; exactly one of ``config`` (an absolute path) and ``fanout`` is set.
    """

    config: Path | None
    fanout: FanOutFactory | str | None
    template: str | None
    system: str | None
    max_in_flight: int


# -- rows -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobRow:
    """One input row: its id, its key, its line number and its fields."""

    id: str | int
    key: str
    line: int
    data: Mapping[str, Any]


def _input_error(path: Path, exc: OSError) -> ConfigurationError:
    if isinstance(exc, FileNotFoundError):
        return ConfigurationError(f"input file {path} not found; check the path")
    if isinstance(exc, IsADirectoryError):
        return ConfigurationError(f"input {path} is a folder; pass a JSONL file")
    return ConfigurationError(f"cannot read the input {path}: {exc.strerror or exc}")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line: UTF-8, a BOM at the start allowed."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise _input_error(path, exc) from None
    with fh:
        n = 0
        while True:
            try:
                raw = fh.readline()
            except OSError as exc:
                raise _input_error(path, exc) from None
            if not raw:
                return
            n += 1
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                column = len(raw[: exc.start].decode("utf-8", "replace")) + 1
                raise ConfigurationError(
                    f"{path} line {n}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                    f"{column}); save the file as UTF-8"
                ) from None
            yield n, text


def iter_rows(path: Path) -> Iterator[JobRow]:
    """Every non-blank line of the input as a row (its id, or its line number).

    Raises:
        ConfigurationError: the file is missing or unreadable, or a line is not UTF-8, not
            valid JSON, not an object, or has a bad id; naming the file and the line.
    """
    for n, line in _lines(path):
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
    for row in iter_rows(path):
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


#: Hands a finished record to the writer.
Emit = Callable[[Record], Awaitable[None]]

#: Runs the selected rows and hands each record to ``emit``.
RowRunner = Callable[[Iterator[JobRow], Emit], Awaitable[None]]


# -- building the fan-out ---------------------------------------------------------------------


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


async def make_fanout(settings: ResolvedJob) -> FanOut:
    """Build the job's fan-out (its backends and guards are this process's own)."""
    if settings.config is not None:
        from .._config import load_config

        return load_config(settings.config).build_fanout()
    factory = (
        import_factory(settings.fanout) if isinstance(settings.fanout, str) else settings.fanout
    )
    assert factory is not None
    fan = factory()
    if inspect.isawaitable(fan):
        fan = await fan
    if not isinstance(fan, FanOut):
        raise ConfigurationError(f"the fanout factory returned {type(fan).__name__}, not a FanOut")
    return fan
