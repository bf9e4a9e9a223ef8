"""``genfan schedule``: run the scheduler, and look at or steer its schedules.

* ``genfan schedule run --config genfan.toml``: add the config's ``[schedules.*]`` and run them
  until Ctrl-C / SIGTERM (start several, on one store, for replicas);
* ``list``, ``history [ID]``, ``pause ID``, ``resume ID``, ``trigger ID``, ``backfill ID``:
  against the same store.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
import typer

from .._errors import GenfanError

T = TypeVar("T")

schedule_app = typer.Typer(
    name="schedule",
    help="Run scheduled jobs and manage their schedules and history.",
    no_args_is_help=True,
    add_completion=False,
)

DEFAULT_CONFIG = Path("genfan.toml")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (default ./genfan.toml if present)."),
]
StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="Store URL: sqlite:///file.db or postgresql://host/db (default: the config's).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _config_path(config: Path | None) -> Path | None:
    return config if config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)


def _load(config: Path | None) -> tuple[Any, Any]:
    """(GenfanConfig or None, SchedulesConfig); an error names the file."""
    from ..schedule import parse_schedules

    path = _config_path(config)
    if path is None:
        return None, parse_schedules({})
    from .._config import load_config

    cfg = load_config(path)
    try:
        return cfg, parse_schedules(cfg.schedules, base_dir=path.resolve().parent)
    except GenfanError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def _store_hint(store: str | None, config: Path | None, sqlite: bool) -> str:
    """Where the store URL came from, and what to check."""
    path = _config_path(config)
    where = (
        "--store"
        if store
        else f"`store` in [schedules] of {path}"
        if path is not None
        else "the default store (set `store` in [schedules] of genfan.toml, or --store)"
    )
    if sqlite:
        return f"check {where}, and that the file's folder exists or can be created and written"
    return f"check {where}, and that the database is running and reachable"


def _message(exc: BaseException, store: str | None, config: Path | None) -> str:
    from ..schedule import StoreUnavailableError

    text = " ".join(str(exc).split())  # one line
    if isinstance(exc, StoreUnavailableError):
        text = f"{text}; {_store_hint(store, config, 'SQLite' in text)}"
    return text


def _store_url(store: str | None, sched: Any) -> str:
    return store or str(sched.settings.store)


def _admin(config: Path | None, store: str | None) -> Any:
    from ..schedule import Scheduler

    _, sched = _load(config)
    return Scheduler(_store_url(store, sched), process_runs=False)


def _with_admin(config: Path | None, store: str | None, op: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``op`` on an admin scheduler (one that processes no runs); a genfan error exits 2."""

    async def main() -> T:
        async with _admin(config, store) as s:
            return await op(s)

    return _run_main(main, store, config)


def _run_main(main: Callable[[], Awaitable[T]], store: str | None, config: Path | None) -> T:
    """``anyio.run(main)``; a genfan error (alone, or wrapped by the scheduler's task group:
    an unknown id, a bad window, an unreachable store) is one line on stderr and exit 2."""
    try:
        return anyio.run(main)
    except GenfanError as exc:
        raise _fail(_message(exc, store, config)) from None
    except ExceptionGroup as group:
        errors, rest = group.split(GenfanError)
        if errors is None or rest is not None:
            raise
        raise _fail("; ".join(_message(e, store, config) for e in _leaves(errors))) from None


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _ts(value: datetime | None) -> str:
    """A time in UTC, whole and short enough for an 80-column table: 2026-12-06 07:20:10."""
    if value is None:
        return "-"
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s" if value < 100 else f"{value:.0f}s"


@schedule_app.command("run")
def run(
    config: ConfigOpt = None,
    store: StoreOpt = None,
    identity: Annotated[
        str | None, typer.Option(help="This replica's name in leases and history.")
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option(help="Stop after this many seconds (default: run until stopped)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
    log_json: Annotated[bool, typer.Option("--log-json", help="Log JSON lines.")] = False,
) -> None:
    """Add the config's schedules to the store and run them until Ctrl-C or SIGTERM."""
    from .. import telemetry
    from ..schedule import Scheduler

    # Jobs are import paths of the application: import them from where it is started.
    for p in (str(Path.cwd()), str(config.resolve().parent) if config else None):
        if p and p not in sys.path:
            sys.path.insert(0, p)
    try:
        cfg, sched = _load(config)
        sched.check_jobs()  # a func that does not import: one line now, not a failed run later
    except GenfanError as exc:
        path = _config_path(config)
        text = str(exc)
        if path is not None and not text.startswith(str(path)):
            text = f"{path}: {text}"
        raise _fail(text) from None
    if not sched.entries:
        typer.echo(
            "note: the config has no [schedules.ID] tables; running what the store has", err=True
        )
    telemetry.configure_logging(log_level, json=log_json)
    s = sched.settings

    def fanout_factory(job: Any) -> Any:
        if cfg is None:
            raise GenfanError("a content job needs backends: pass --config with [backends.*]")
        return cfg.build_fanout(
            backends=list(job.backends) if job.backends else None,
            select=job.select,
            mode=job.mode,
            deadline=job.deadline,
        )

    async def main() -> None:
        scheduler = Scheduler(
            _store_url(store, sched),
            identity=identity or s.identity,
            max_concurrent_runs=s.max_concurrent_runs,
            lease_time=s.lease_time,
            poll_interval=s.poll_interval,
            fanout_factory=fanout_factory,
        )
        async with scheduler:
            for sid, entry in sched.entries.items():
                await scheduler.add_schedule(
                    entry.job(sched.base_dir),
                    entry.trigger(),
                    id=sid,
                    args=entry.args,
                    kwargs=entry.call_kwargs,
                    policy=entry.policy(),
                    paused=entry.paused,
                )
            typer.echo(
                f"scheduler {scheduler.identity} running {len(sched.entries)} configured "
                f"schedule(s) on {scheduler.store!r}",
                err=True,
            )
            with anyio.move_on_after(duration):
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        break

    try:
        _run_main(main, store, config)
    except KeyboardInterrupt:  # pragma: no cover - Ctrl-C before the receiver is installed
        pass


@schedule_app.command("list")
def list_(config: ConfigOpt = None, store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List the schedules in the store."""
    items: list[Any] = _with_admin(config, store, lambda s: s.list_schedules())
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "id": i.id,
                        "trigger": i.trigger.to_dict(),
                        "job": i.job,
                        "paused": i.paused,
                        "next_fire": None if i.next_fire is None else i.next_fire.isoformat(),
                        "last_fire": None if i.last_fire is None else i.last_fire.isoformat(),
                    }
                    for i in items
                ],
                indent=2,
            )
        )
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # Times never wrap (they are what one reads the table for); the other columns wrap. Under
    # 100 columns the last fire is left out (`genfan schedule history` shows it).
    console = Console()
    wide = console.width >= 100
    table = Table(box=box.SIMPLE_HEAD, caption="times in UTC")
    table.add_column("id")
    table.add_column("trigger")
    table.add_column("job")
    table.add_column("state", no_wrap=True)
    table.add_column("next fire", no_wrap=True)
    if wide:
        table.add_column("last fire", no_wrap=True)
    for i in items:
        job = i.job.get("func") or ("content job" if i.job.get("kind") == "content" else "local")
        state = "paused" if i.paused else ("done" if i.next_fire is None else "active")
        row = [i.id, str(i.trigger), str(job), state, _ts(i.next_fire)]
        table.add_row(*row, *([_ts(i.last_fire)] if wide else []))
    console.print(table)


@schedule_app.command("history")
def history(
    schedule_id: Annotated[str | None, typer.Argument(help="Only this schedule.")] = None,
    limit: Annotated[int, typer.Option(help="Most recent runs to show.")] = 20,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show recent runs: fire time, start, end, outcome, attempts, error."""
    runs: list[Any] = _with_admin(config, store, lambda s: s.history(schedule_id, limit=limit))
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "schedule": r.schedule_id,
                        "fire_time": r.fire_time.isoformat(),
                        "started": None if r.started is None else r.started.isoformat(),
                        "ended": None if r.ended is None else r.ended.isoformat(),
                        "status": r.status,
                        "attempts": r.attempts,
                        "owner": r.owner,
                        "drift": r.drift,
                        "error": r.error,
                        "manual": r.manual,
                        "backfill": r.backfill,
                    }
                    for r in runs
                ],
                indent=2,
            )
        )
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # Fit 80 columns: the fire time whole, the start as its delay after the fire time, the run's
    # length, and each error in full on its own line under the table.
    table = Table(
        box=box.SIMPLE_HEAD, caption="fire times in UTC; start: delay after the fire time"
    )
    table.add_column("schedule", overflow="fold")
    table.add_column("fire time", no_wrap=True)
    table.add_column("start", justify="right", no_wrap=True)
    table.add_column("took", justify="right", no_wrap=True)
    table.add_column("outcome", no_wrap=True)
    table.add_column("tries", justify="right", no_wrap=True)
    errors: list[str] = []
    for r in runs:
        delay = None if r.started is None else (r.started - r.fire_time).total_seconds()
        took = (
            None if r.started is None or r.ended is None else (r.ended - r.started).total_seconds()
        )
        table.add_row(
            r.schedule_id + (" (manual)" if r.manual else " (backfill)" if r.backfill else ""),
            _ts(r.fire_time),
            "-" if delay is None else f"+{_seconds(max(0.0, delay))}",
            _seconds(took),
            r.status,
            str(r.attempts),
        )
        if r.error:
            errors.append(f"{r.schedule_id} {_ts(r.fire_time)}: {r.error}")
    console = Console()
    console.print(table)
    for line in errors:
        console.print(line, markup=False, highlight=False)


def _simple(action: str, schedule_id: str, config: Path | None, store: str | None) -> None:
    out = _with_admin(config, store, lambda s: getattr(s, action)(schedule_id))
    if out is False:
        raise _fail(f"no schedule with id {schedule_id!r}")
    if action == "trigger":
        typer.echo(f"{schedule_id}: run queued for {out.fire_time.isoformat()}")
    else:
        typer.echo(f"{schedule_id}: {action}d")


@schedule_app.command("pause")
def pause(
    schedule_id: Annotated[str, typer.Argument()], config: ConfigOpt = None, store: StoreOpt = None
) -> None:
    """Pause a schedule: no new runs until resumed."""
    _simple("pause", schedule_id, config, store)


@schedule_app.command("resume")
def resume(
    schedule_id: Annotated[str, typer.Argument()], config: ConfigOpt = None, store: StoreOpt = None
) -> None:
    """Resume a schedule from now on (fire times missed while paused are skipped)."""
    _simple("resume", schedule_id, config, store)


@schedule_app.command("trigger")
def trigger(
    schedule_id: Annotated[str, typer.Argument()], config: ConfigOpt = None, store: StoreOpt = None
) -> None:
    """Run a schedule once now (a running scheduler picks it up)."""
    _simple("trigger", schedule_id, config, store)


def _instant(value: str, option: str) -> datetime:
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise _fail(
            f"{option} {value!r} is not an ISO 8601 time; e.g. 2026-01-01T00:00:00+00:00"
        ) from None
    if when.tzinfo is None:
        raise _fail(f"{option} {value!r} has no timezone; add one, e.g. {value}+00:00 or {value}Z")
    return when


@schedule_app.command("backfill")
def backfill(
    schedule_id: Annotated[str, typer.Argument()],
    start: Annotated[
        str, typer.Option("--start", help="Window start, ISO 8601 with a timezone (included).")
    ],
    end: Annotated[
        str, typer.Option("--end", help="Window end, ISO 8601 with a timezone (excluded).")
    ],
    overlap: Annotated[
        str | None,
        typer.Option(
            help="skip | buffer_one | buffer_all | allow | cancel_old (default: the schedule's)."
        ),
    ] = None,
    max_fires: Annotated[int, typer.Option(help="The most fire times the window may hold.")] = 1000,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Queue runs for the fire times a schedule had in [start, end) that are not in its history.

    A running scheduler (genfan schedule run) runs them, each with its nominal fire time.
    """
    lo, hi = _instant(start, "--start"), _instant(end, "--end")
    result: Any = _with_admin(
        config,
        store,
        lambda s: s.backfill(schedule_id, lo, hi, overlap=overlap, max_fires=max_fires),
    )
    if as_json:
        print(
            json.dumps(
                {
                    "schedule": result.schedule_id,
                    "fire_times": [f.isoformat() for f in result.fire_times],
                    "queued": [f.isoformat() for f in result.queued],
                    "existing": [f.isoformat() for f in result.existing],
                },
                indent=2,
            )
        )
        return
    for f in result.fire_times:
        typer.echo(f"  {f.isoformat()}  {'queued' if f in result.queued else 'in history'}")
    typer.echo(
        f"{schedule_id}: {len(result.queued)} run(s) queued, {len(result.existing)} already in "
        f"the history, of {len(result.fire_times)} fire time(s) in [{lo.isoformat()}, "
        f"{hi.isoformat()})"
    )


__all__ = ["schedule_app"]
