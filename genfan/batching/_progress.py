"""How far a batch job has got, reported to a plain callback; the library draws nothing.

[`run_batch_job`][genfan.batching.run_batch_job] calls ``on_progress(JobProgress)`` once when the rows
start, after every row written, and once more with ``finished=True`` when the run ends (even by
an error). What to show is the caller's choice: the ``genfan batch run`` command draws a rich
progress bar from it; ``progress=True`` prints the plain lines of `LogProgress`.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ._output import Record

__all__ = ["JobProgress", "LogProgress", "OnProgress", "Tally"]


@dataclass(frozen=True, kw_only=True, slots=True)
class JobProgress:
    """A snapshot of a running batch job, handed to ``on_progress``.

    Attributes:
        total: rows this run does (the rows not skipped).
        done: rows finished and written so far; ``failed`` of them failed (``ok`` the rest).
        input_tokens, output_tokens: over every candidate of the rows done.
        cost: USD so far, when the backends know their prices (else ``None``).
        elapsed: seconds since the rows started (anyio's clock).
        finished: the last report of the run (it also comes when the run stops on an error).
    """

    total: int
    done: int
    failed: int
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float | None = None
    elapsed: float = 0.0
    finished: bool = False

    @property
    def ok(self) -> int:
        """Rows done without failing."""
        return self.done - self.failed

    @property
    def tokens(self) -> int:
        """Input and output tokens together."""
        return self.input_tokens + self.output_tokens

    @property
    def rate(self) -> float:
        """Rows done per second."""
        return self.done / max(self.elapsed, 1e-9)

    @property
    def eta(self) -> float:
        """Seconds left at the current rate (``math.inf`` before the first row is done)."""
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else math.inf


#: What ``on_progress`` is: called on the event loop, so it should be quick.
OnProgress = Callable[[JobProgress], None]


class Tally:
    """Counts of the rows written, for the progress reports and the summary."""

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

    def snapshot(self, total: int, elapsed: float, *, finished: bool = False) -> JobProgress:
        return JobProgress(
            total=total,
            done=self.done,
            failed=self.failed,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cost=self.cost,
            elapsed=elapsed,
            finished=finished,
        )


class LogProgress:
    """An ``on_progress`` that prints plain lines on stderr, one every ``interval`` seconds at most.

    A line when the rows start, then at most one every ``interval`` seconds, and a last one when
    the run ends: for logs and CI, where a progress bar would be noise.
    """

    def __init__(self, *, interval: float = 10.0) -> None:
        self._interval = interval
        self._last: float | None = None

    def __call__(self, progress: JobProgress) -> None:
        if progress.finished:
            self._line(progress)
        elif self._last is None:
            self._last = progress.elapsed
            self._print(f"batch: {progress.total} rows to run")
        elif progress.elapsed - self._last >= self._interval:
            self._last = progress.elapsed
            self._line(progress)

    def _line(self, p: JobProgress) -> None:
        cost = f", ${p.cost:.4f}" if p.cost is not None else ""
        self._print(
            f"batch: {p.done}/{p.total} rows, {p.rate:.1f} rows/s, ETA {_fmt_eta(p.eta)}, "
            f"{p.failed} failed, {p.tokens} tokens{cost}"
        )

    @staticmethod
    def _print(line: str) -> None:
        print(line, file=sys.stderr, flush=True)


def _fmt_eta(seconds: float) -> str:
    """``h:mm:ss``, or ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
