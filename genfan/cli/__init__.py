"""The ``genfan`` command line: a thin user of the public API.

``genfan ask`` fans a prompt out and shows the candidates; sub-apps add ``local``, ``batch`` and
``schedule`` commands.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ._ask import ask

app = typer.Typer(
    name="genfan",
    help="Fan a prompt out to several LLMs, pick the best answer, stay up under failure.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(ask)


@app.callback()
def _root(
    log_level: Annotated[
        str, typer.Option("--log-level", help="Events at this level and above go to stderr.")
    ] = "warning",
) -> None:
    """genfan: fan a prompt out to several LLMs, pick the best answer, stay up under failure."""
    from .. import telemetry

    # The command line owns logging: events go to stderr, never into --json output.
    telemetry.configure_logging(log_level)


# Sub-apps (each module owns its commands).
from ._batch import batch_app  # noqa: E402

app.add_typer(batch_app, name="batch")

from ._local import local_app  # noqa: E402

app.add_typer(local_app, name="local")

from ._schedule import schedule_app  # noqa: E402

app.add_typer(schedule_app, name="schedule")


def main() -> None:
    """Entry point of the ``genfan`` script."""
    app()


__all__ = ["app", "main"]
