"""Drawing the local engine's progress: a rich spinner on a terminal, plain lines elsewhere.

The library hands over one line per step start and end (``genfan_providers.vllm.ProgressEvent``:
a ``str`` with ``step``, ``phase`` and ``seconds``); drawing them is the command line's job.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Self, TextIO

if TYPE_CHECKING:
    from rich.console import Console
    from rich.status import Status

__all__ = ["VERBOSE_KEY", "StepsDisplay"]

#: Set in ``ctx.meta`` (shared by every command of one command line) by ``--verbose``.
VERBOSE_KEY = "genfan.verbose"


class StepsDisplay:
    """A ``progress=`` callable: spins while a step runs and ticks it off when it is done.

    Anything that is not a step's start or end (a plain ``str`` too) is a one-off line. Use it as
    a context manager, so a step that fails does not leave its spinner running.

    Args:
        stream: where to draw (standard error by default).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._console: Console | None = None
        self._status: Status | None = None

    def _out(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def __call__(self, line: str) -> None:
        out = self._out()
        if not out.isatty():
            print(f"genfan: {line}", file=out, flush=True)
            return
        from rich.markup import escape

        console = self._rich_console()
        self.close()
        phase = getattr(line, "phase", "note")
        if phase == "start":
            self._status = console.status(escape(str(line)))
            self._status.start()
        elif phase == "done":
            step = escape(str(getattr(line, "step", line)))
            seconds = getattr(line, "seconds", None) or 0.0
            console.print(f"[green]✓[/green] {step} ({seconds:.1f}s)", highlight=False)
        else:
            console.print(f"genfan: {escape(str(line))}", highlight=False)

    def _rich_console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self._out())
        return self._console

    @contextmanager
    def spinning(self, text: str) -> Iterator[None]:
        """A spinner saying ``text`` while the block runs, on a terminal (elsewhere: nothing,
        so logs and tests see only the lines that matter)."""
        if not self._out().isatty():
            yield
            return
        from rich.markup import escape

        self.close()
        self._status = self._rich_console().status(escape(text))
        self._status.start()
        try:
            yield
        finally:
            self.close()

    def close(self) -> None:
        """Stop the spinner, if one is running."""
        status, self._status = self._status, None
        if status is not None:
            status.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
