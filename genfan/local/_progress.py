"""Progress for long local steps: a rich spinner on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

__all__ = ["ProgressLike", "Steps"]

#: ``True``: show progress (spinner on a terminal, plain lines otherwise); ``False``/``None``:
#: silent; a callable: receives one line of text per step start and end.
ProgressLike = bool | Callable[[str], None] | None


class Steps:
    """Reports named steps with their duration.

    Args:
        progress: see :data:`ProgressLike`.
        stream: where plain lines and the spinner go (standard error by default).
    """

    def __init__(self, progress: ProgressLike = True, *, stream: TextIO | None = None) -> None:
        self._progress = progress
        self._stream = stream

    def _out(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def note(self, message: str) -> None:
        """Report a one-off line."""
        if callable(self._progress):
            self._progress(message)
        elif self._progress:
            print(f"genfan: {message}", file=self._out(), flush=True)

    @contextmanager
    def step(self, description: str) -> Iterator[None]:
        """Run a step: announce it, show a spinner on a terminal, then report how long it took."""
        start = time.perf_counter()
        if not self._progress:
            yield
            return
        if callable(self._progress):
            self._progress(f"{description} ...")
            yield
            self._progress(f"{description}: done in {time.perf_counter() - start:.1f}s")
            return
        out = self._out()
        if out.isatty():
            from rich.console import Console

            console = Console(file=out)
            with console.status(f"{description} ..."):
                yield
            console.print(
                f"[green]✓[/green] {description} ({time.perf_counter() - start:.1f}s)",
                highlight=False,
            )
            return
        print(f"genfan: {description} ...", file=out, flush=True)
        yield
        print(
            f"genfan: {description}: done in {time.perf_counter() - start:.1f}s",
            file=out,
            flush=True,
        )
