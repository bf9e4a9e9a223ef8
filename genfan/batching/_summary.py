"""What a batch job's run did: [`JobSummary`][genfan.batching.JobSummary], and
[`BatchAPISummary`][genfan.batching.BatchAPISummary] for a run through a provider's batch API."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BatchAPISummary", "JobSummary"]


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


@dataclass(frozen=True, kw_only=True)
class BatchAPISummary(JobSummary):
    """A [`JobSummary`][genfan.batching.JobSummary] with what each path did and cost.

    Attributes:
        via: ``batch-api`` or ``offline``.
        batches_created, batches_adopted: batches this run created, and found already created
            (by an earlier, killed run) and adopted instead of creating again.
        batches_pending: batches still running at the provider when the run returned (a
            ``submit`` or a ``collect`` that did not wait): run again to collect them.
        batch_rows, batch_cost: rows answered through the batch API by this run, and their
            price (half the real-time price unless the provider reports a cost).
        realtime_rows, realtime_cost: rows this run sent in real time (past the deadline).
    """

    via: str = "batch-api"
    batches_created: int = 0
    batches_adopted: int = 0
    batches_pending: int = 0
    batch_rows: int = 0
    batch_cost: float | None = None
    realtime_rows: int = 0
    realtime_cost: float | None = None

    def lines(self) -> list[str]:
        out = super().lines()
        if self.via == "offline":
            return out
        cost = f" ${self.batch_cost:.4f}" if self.batch_cost is not None else ""
        rt = f" ${self.realtime_cost:.4f}" if self.realtime_cost is not None else ""
        out.insert(
            3,
            f"via batch api: {self.batch_rows} rows{cost} ({self.batches_created} batches created, "
            f"{self.batches_adopted} adopted, {self.batches_pending} pending); "
            f"real time: {self.realtime_rows} rows{rt}",
        )
        if self.batches_pending:
            out.append("batches still running: run the same command again to collect them")
        return out

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(
            via=self.via,
            batches_created=self.batches_created,
            batches_adopted=self.batches_adopted,
            batches_pending=self.batches_pending,
            batch_rows=self.batch_rows,
            batch_cost=self.batch_cost,
            realtime_rows=self.realtime_rows,
            realtime_cost=self.realtime_cost,
        )
        return out
