"""What a schedule runs: a Python callable (by import path) or a declarative content job.

Jobs are stored as plain JSON, so every replica can run every schedule:

* ``{"kind": "call", "func": "pkg.mod:func", "args": [...], "kwargs": {...}}``
* ``{"kind": "content", ...}``: a [`ContentJob`][genfan.schedule.ContentJob] (prompt template, files collected since the
  last successful run, a fan-out and a sink).

A callable that cannot be imported by path (a closure, a lambda) can still be scheduled in the
process that adds it: it is kept in that scheduler's local registry under the schedule id, and
other replicas cannot run it.

A sync job runs in a worker thread, and a thread cannot be stopped: a timeout or a cancellation
only abandons it. A schedule with ``isolation="process"`` runs its job (by import path) in a
child process instead, which is killed when the attempt times out or is cancelled
(``_process``).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio

from .._errors import ConfigurationError

if TYPE_CHECKING:
    from .._fanout import FanOut

__all__ = ["ContentJob", "FanOutFactory", "RunContext", "callable_ref", "resolve_callable"]


@dataclass(frozen=True, kw_only=True)
class RunContext:
    """Handed to a job that takes a parameter named ``context``.

    Attributes:
        schedule_id: the schedule.
        fire_time: the planned fire time (the run's identity).
        scheduled_at: fire time plus jitter: when the run was meant to start.
        attempt: 1 for the first attempt, 2 for the first retry, ...
        previous_success: the fire time of the schedule's last successful run before this
            run's fire time, if any.
        manual: the run was triggered by hand (``trigger``), not by the trigger.
        backfill: the run was queued by ``backfill`` for a past fire time; ``fire_time`` is
            that nominal time, ``scheduled_at`` when the backfill queued it.
        fencing_token: the fencing token of the claim this attempt runs under: a number from
            one counter of the store, larger for every claim, so strictly increasing per
            schedule; a replica that takes the run over (its first replica's lease lost) runs
            it with a larger one. Guard side effects with it (write only if no larger token
            wrote before), and use ``(schedule_id, fire_time)`` as an idempotency key; see
            docs/schedule.md. ``None`` only for a context built by hand.
    """

    schedule_id: str
    fire_time: datetime
    scheduled_at: datetime
    attempt: int
    previous_success: datetime | None = None
    manual: bool = False
    backfill: bool = False
    fencing_token: int | None = None

    @property
    def idempotency_key(self) -> str:
        """``"<schedule id>@<fire time, ISO 8601>"``: the same for every attempt and replica of
        this run, different for every other run; send it where an outbound call takes an
        idempotency key."""
        return f"{self.schedule_id}@{self.fire_time.isoformat()}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (a job run in a child process gets its context this way)."""
        data = asdict(self)
        for key in ("fire_time", "scheduled_at", "previous_success"):
            value = data[key]
            data[key] = None if value is None else value.isoformat()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunContext:
        fields = dict(data)
        for key in ("fire_time", "scheduled_at", "previous_success"):
            if fields.get(key) is not None:
                fields[key] = datetime.fromisoformat(fields[key])
        return cls(**fields)


#: Builds the fan-out of a content job (from the job's backends/select/mode settings).
FanOutFactory = Callable[["ContentJob"], "FanOut | Awaitable[FanOut]"]

_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def callable_ref(fn: Callable[..., Any]) -> str | None:
    """``"module:qualname"`` if ``fn`` can be imported back by that path, else ``None``."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    ref = f"{module}:{qualname}"
    try:
        if resolve_callable(ref) is fn:
            return ref
    except ConfigurationError:
        return None
    return None


def resolve_callable(ref: str) -> Callable[..., Any]:
    """Import ``"pkg.mod:func"`` (or ``"pkg.mod:Class.method"``).

    Raises:
        ConfigurationError: the path is malformed, or does not import, or is not callable.
    """
    if not _REF.match(ref):
        raise ConfigurationError(
            f"job {ref!r} must be an import path like 'package.module:function'"
        )
    module_name, _, qualname = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"job {ref!r}: cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # the module raised while it was imported
        where = ""
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.endswith(".py"):
                where = f" ({tb.tb_frame.f_code.co_filename}, line {tb.tb_lineno})"
            tb = tb.tb_next
        if isinstance(exc, SyntaxError):
            where = ""  # its message names the file and line
        raise ConfigurationError(
            f"job {ref!r}: importing {module_name!r} failed with {type(exc).__name__}: {exc}{where}"
        ) from None
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(f"job {ref!r}: {module_name} has no {qualname!r}") from None
    if not callable(obj):
        raise ConfigurationError(f"job {ref!r} is not callable")
    return obj  # type: ignore[no-any-return]


def takes_context(fn: Callable[..., Any]) -> bool:
    try:
        return "context" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


async def call_job(
    fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any], ctx: RunContext
) -> Any:
    """Call a sync or async job; a sync one runs in a worker thread, which a timeout or a
    cancellation abandons but cannot stop (use ``isolation="process"`` for that)."""
    kw = dict(kwargs)
    if takes_context(fn):
        kw["context"] = ctx
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    ):
        return await fn(*args, **kw)
    out = await anyio.to_thread.run_sync(partial(fn, *args, **kw), abandon_on_cancel=True)
    if inspect.isawaitable(out):
        return await out
    return out


class _Strict(dict[str, str]):
    def __missing__(self, key: str) -> str:
        raise ConfigurationError(
            f"the prompt template uses {{{key}}}, which is neither a variable of the job nor one "
            f"of files, file_list, since, fire_time, date; known: {', '.join(sorted(self))}"
        )


@dataclass(frozen=True, kw_only=True)
class ContentJob:
    """A declarative content job: fill a prompt, fan it out, pick one answer, write it out.

    Args:
        prompt: a ``str.format`` template. Besides ``variables`` it can use ``{files}`` (the
            collected files, each under a ``### path`` header), ``{file_list}``, ``{since}``,
            ``{fire_time}`` and ``{date}`` (ISO forms of the window and the run's fire time).
        output: where the answer goes: a folder (ends with ``/`` or exists as a folder) gets one
            file per run, ``<schedule>-<fire time>.md``; a file gets one ``## <fire time>``
            section appended per run. A retried run rewrites its own output, never twice.
        variables: fixed template values.
        collect: glob patterns (relative to ``base_dir``) of input files; those modified after
            the last successful run's fire time and up to this run's fire time are collected,
            so nothing is read twice or lost between runs.
        skip_if_empty: with ``collect``, do nothing when no new file arrived.
        system: a system prompt for every backend.
        backends: backend names of the config to fan out to (default: the config's fan-out).
        select: the selector, overriding the config's fan-out setting.
        mode: the fan-out mode, overriding the config's.
        deadline: the fan-out deadline in seconds, overriding the config's.
        max_chars: at most this many characters of collected text go into the prompt.
        base_dir: where relative ``collect`` and ``output`` paths start (default: the config
            file's folder, or the working directory).
    """

    prompt: str
    output: str
    variables: Mapping[str, str] = field(default_factory=dict)
    collect: tuple[str, ...] = ()
    skip_if_empty: bool = True
    system: str | None = None
    backends: tuple[str, ...] | None = None
    select: str | None = None
    mode: Literal["all", "first", "quorum"] | None = None
    deadline: float | None = None
    max_chars: int = 200_000
    base_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ConfigurationError("ContentJob.prompt must not be empty")
        if not self.output.strip():
            raise ConfigurationError("ContentJob.output must name a file or a folder")
        if isinstance(self.collect, str):
            object.__setattr__(self, "collect", (self.collect,))
        else:
            object.__setattr__(self, "collect", tuple(self.collect))
        if self.backends is not None:
            object.__setattr__(self, "backends", tuple(self.backends))
        if self.mode is not None and self.mode not in ("all", "first", "quorum"):
            raise ConfigurationError(
                f"ContentJob.mode must be all, first or quorum, got {self.mode!r}"
            )
        if self.deadline is not None and not self.deadline > 0:
            raise ConfigurationError(f"ContentJob.deadline must be > 0, got {self.deadline!r}")
        if self.max_chars < 1:
            raise ConfigurationError(f"ContentJob.max_chars must be >= 1, got {self.max_chars}")
        object.__setattr__(self, "variables", dict(self.variables))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["collect"] = list(self.collect)
        data["backends"] = None if self.backends is None else list(self.backends)
        return {"kind": "content", **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ContentJob:
        fields = {k: v for k, v in data.items() if k != "kind"}
        try:
            return cls(**fields)
        except TypeError as exc:
            raise ConfigurationError(f"invalid content job: {exc}") from None

    def _path(self, value: str) -> Path:
        p = Path(value).expanduser()
        if not p.is_absolute() and self.base_dir:
            p = Path(self.base_dir) / p
        return p

    def collect_files(self, since: datetime | None, until: datetime) -> list[Path]:
        """Files matching ``collect`` modified in ``(since, until]`` (by mtime), sorted."""
        found: set[Path] = set()
        lo = None if since is None else since.timestamp()
        hi = until.timestamp()
        for pattern in self.collect:
            base = Path(self.base_dir or ".")
            pat = Path(pattern).expanduser()
            matches = (
                Path(pat.anchor).glob(str(pat.relative_to(pat.anchor)))
                if pat.is_absolute()
                else base.glob(pattern)
            )
            for path in matches:
                if not path.is_file():
                    continue
                mtime = path.stat().st_mtime
                if (lo is None or mtime > lo) and mtime <= hi:
                    found.add(path)
        return sorted(found)

    def render(self, ctx: RunContext, files: Sequence[Path]) -> str:
        """The prompt for this run."""
        parts: list[str] = []
        budget = self.max_chars
        for p in files:
            if budget <= 0:
                break
            text = p.read_text(encoding="utf-8", errors="replace")[:budget]
            budget -= len(text)
            parts.append(f"### {p.name}\n{text.rstrip()}\n")
        values = _Strict(
            {
                "files": "\n".join(parts),
                "file_list": "\n".join(f"- {p.name}" for p in files),
                "since": ctx.previous_success.isoformat() if ctx.previous_success else "",
                "fire_time": ctx.fire_time.isoformat(),
                "date": ctx.fire_time.date().isoformat(),
                **{k: str(v) for k, v in self.variables.items()},
            }
        )
        return self.prompt.format_map(values)

    def output_path(self, schedule_id: str) -> tuple[Path, bool]:
        """The sink and whether it is a folder."""
        p = self._path(self.output)
        return p, self.output.endswith(("/", os.sep)) or p.is_dir()

    def write(self, schedule_id: str, ctx: RunContext, text: str) -> Path:
        """Write one run's answer (idempotent per fire time)."""
        sink, is_dir = self.output_path(schedule_id)
        stamp = ctx.fire_time.strftime("%Y%m%dT%H%M%S")
        if ctx.fire_time.microsecond:
            stamp += f".{ctx.fire_time.microsecond:06d}"
        stamp += "Z"
        if is_dir:
            sink.mkdir(parents=True, exist_ok=True)
            target = sink / f"{schedule_id}-{stamp}.md"
            tmp = target.with_suffix(".md.tmp")
            tmp.write_text(text.rstrip() + "\n", encoding="utf-8")
            tmp.replace(target)
            return target
        sink.parent.mkdir(parents=True, exist_ok=True)
        header = f"## {ctx.fire_time.isoformat()}"
        existing = sink.read_text(encoding="utf-8") if sink.exists() else ""
        if header in existing.splitlines():
            return sink  # a retry of a run whose output was already written
        with sink.open("a", encoding="utf-8") as fh:
            fh.write(f"{header}\n\n{text.rstrip()}\n\n")
        return sink

    async def run(self, schedule_id: str, ctx: RunContext, factory: FanOutFactory) -> Path | None:
        """Collect, render, fan out, write. Returns the output path (``None``: nothing new)."""
        files = await anyio.to_thread.run_sync(
            self.collect_files, ctx.previous_success, ctx.fire_time
        )
        if self.collect and not files and self.skip_if_empty:
            return None
        prompt = self.render(ctx, files)
        fan = factory(self)
        if inspect.isawaitable(fan):
            fan = await fan
        from .._types import ChatRequest

        request = ChatRequest.from_prompt(prompt, system=self.system)
        async with fan:
            result = await fan.run(request, deadline=self.deadline)
        return await anyio.to_thread.run_sync(self.write, schedule_id, ctx, result.text)


def job_spec(
    func: Callable[..., Any] | str | ContentJob,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> tuple[dict[str, Any], Callable[..., Any] | None]:
    """The stored form of a job, and the callable to keep locally when it has no import path."""
    if isinstance(func, ContentJob):
        if args or kwargs:
            raise ConfigurationError("a ContentJob takes no args/kwargs; use its variables")
        return func.to_dict(), None
    if isinstance(func, str):
        resolve_callable(func)  # fail early on a typo
        return {"kind": "call", "func": func, "args": list(args), "kwargs": dict(kwargs)}, None
    if not callable(func):
        raise ConfigurationError(
            f"a job must be a callable, an import path or a ContentJob, got {func!r}"
        )
    ref = callable_ref(func)
    if ref is not None:
        return {"kind": "call", "func": ref, "args": list(args), "kwargs": dict(kwargs)}, None
    return {"kind": "call", "func": None, "args": list(args), "kwargs": dict(kwargs)}, func
