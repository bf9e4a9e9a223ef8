"""How the local engine reports its long steps (preparing the model, starting an engine).

The library draws nothing: it hands one line per step start and end to a callable. ``True`` is
the plain sink (a line on standard error, what a config file can ask for); the command line
passes a callable that draws a spinner on a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, Self

__all__ = ["ProgressEvent", "ProgressLike", "Steps"]

ProgressPhase = Literal["start", "done", "note"]


class ProgressEvent(str):
    """One line of progress: the text to show, and what it is about.

    A ``str`` (``"converting ... ..."``, ``"converting ...: done in 20.3s"``, ``"model ready:
    /path"``), so ``print`` or ``list.append`` take it as it is; a renderer reads its attributes.

    Attributes:
        step: the step's description, or a note's text.
        phase: ``"start"`` and ``"done"`` frame a step; ``"note"`` is a one-off line.
        seconds: how long the step took (``"done"`` only).
    """

    step: str
    phase: ProgressPhase
    seconds: float | None

    def __new__(
        cls, step: str, phase: ProgressPhase = "note", seconds: float | None = None
    ) -> Self:
        if phase == "start":
            text = f"{step} ..."
        elif phase == "done":
            text = f"{step}: done in {seconds or 0.0:.1f}s"
        else:
            text = step
        event = super().__new__(cls, text)
        event.step, event.phase, event.seconds = step, phase, seconds
        return event

    def __getnewargs__(self) -> tuple[str, ProgressPhase, float | None]:  # type: ignore[override]
        return self.step, self.phase, self.seconds


#: ``True``: a line on standard error per step start and end; ``False``/``None``: silent; a
#: callable: receives each line (``print`` and ``list.append`` do).
ProgressLike = bool | Callable[[ProgressEvent], None] | None


def _to_stderr(line: str) -> None:
    print(f"genfan: {line}", file=sys.stderr, flush=True)


class Steps:
    """Reports named steps, with their duration, to a `ProgressLike`."""

    def __init__(self, progress: ProgressLike) -> None:
        self._report: Callable[[ProgressEvent], None] | None = (
            _to_stderr if progress is True else progress or None
        )

    def note(self, message: str) -> None:
        """Report a one-off line."""
        if self._report is not None:
            self._report(ProgressEvent(message))

    @contextmanager
    def step(self, description: str) -> Iterator[None]:
        """Report a step's start, run it, then report how long it took."""
        report = self._report
        if report is None:
            yield
            return
        report(ProgressEvent(description, "start"))
        start = time.perf_counter()
        yield
        report(ProgressEvent(description, "done", time.perf_counter() - start))
