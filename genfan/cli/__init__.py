"""The ``genfan`` command line: a thin user of the public API.

``genfan ask`` fans a prompt out and shows the candidates; sub-apps add ``local``, ``batch`` and
``schedule`` commands. ``--log-level`` and ``--verbose`` work before the command and after it
(``genfan ask "..." -v``): every command and group gets them.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from ._ask import ask
from ._progress import VERBOSE_KEY

#: What ``--log-level`` takes.
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: Where the choices are kept: ``ctx.meta`` is shared by every command of one command line.
LOG_LEVEL_KEY = "genfan.log_level"

_LOG_LEVEL_HELP = (
    "debug, info, warning (default), error or critical: events from it up go to stderr."
)
_VERBOSE_HELP = "Info events, and the engines' own warnings (hidden otherwise)."
_METAVAR = "LEVEL"


def _configure_logging(ctx: typer.Context) -> None:
    from .. import telemetry

    # The command line owns logging: events go to stderr, never into --json output.
    level = ctx.meta.get(LOG_LEVEL_KEY) or ("info" if ctx.meta.get(VERBOSE_KEY) else "warning")
    telemetry.configure_logging(level)


def _checked_level(value: str) -> str:
    """``value`` as a log level, or one line saying what to write instead (exit code 2)."""
    if value.lower() not in LOG_LEVELS:
        typer.echo(f"error: --log-level {value!r}: use one of {', '.join(LOG_LEVELS)}", err=True)
        raise typer.Exit(2)
    return value.lower()


def _log_level_given(ctx: typer.Context, value: str | None) -> None:
    if value is not None:
        ctx.meta[LOG_LEVEL_KEY] = _checked_level(value)
        _configure_logging(ctx)


def _verbose_given(ctx: typer.Context, value: bool) -> None:
    if value:
        ctx.meta[VERBOSE_KEY] = True
        _configure_logging(ctx)


# The two options every command takes after its name too (``genfan ask "..." -v``), made once
# by typer from this template and added to each command by the root group.
_template = typer.Typer(add_completion=False)


@_template.command()
def _shared(
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level",
            metavar=_METAVAR,
            expose_value=False,
            callback=_log_level_given,
            help=_LOG_LEVEL_HELP,
        ),
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", expose_value=False, callback=_verbose_given, help=_VERBOSE_HELP
        ),
    ] = False,
) -> None:
    """Never run: its options are what the root group adds to every command."""


def _shared_options(command: Any) -> None:
    """Give ``command`` (and every command under it) ``--log-level`` and ``--verbose``, unless
    it has options of those names itself."""
    taken = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    for param in typer.main.get_command(_template).params:
        if not taken & {*param.opts, *param.secondary_opts}:
            command.params.append(param)
    for sub in getattr(command, "commands", {}).values():
        _shared_options(sub)


class _Root(TyperGroup):
    """The root group: every command under it also takes ``--log-level`` and ``--verbose``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for command in self.commands.values():
            _shared_options(command)


app = typer.Typer(
    name="genfan",
    cls=_Root,
    help="Fan a prompt out to several LLMs, pick the best answer, stay up under failure.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(ask)


@app.callback()
def _root(
    ctx: typer.Context,
    log_level: Annotated[
        str | None, typer.Option("--log-level", metavar=_METAVAR, help=_LOG_LEVEL_HELP)
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=_VERBOSE_HELP)] = False,
) -> None:
    """genfan: fan a prompt out to several LLMs, pick the best answer, stay up under failure."""
    if log_level is not None:
        ctx.meta[LOG_LEVEL_KEY] = _checked_level(log_level)
    if verbose:
        ctx.meta[VERBOSE_KEY] = True
    _configure_logging(ctx)


# Sub-apps (each module owns its commands).
from ._batch import batch_app  # noqa: E402

app.add_typer(batch_app, name="batch")

from ._local import local_app  # noqa: E402

app.add_typer(local_app, name="local")

from ._schedule import schedule_app  # noqa: E402

app.add_typer(schedule_app, name="schedule")

from ._serve import serve  # noqa: E402

app.command()(serve)

from ._keys import keys_app  # noqa: E402

app.add_typer(keys_app, name="keys")


def main() -> None:
    """Entry point of the ``genfan`` script."""
    app()


__all__ = ["app", "main"]
