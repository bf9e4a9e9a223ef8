"""What the stores hold and hand back: schedules, runs, claims, and the results of a store step.

Plain frozen records, no I/O: the SQL dialects build them from rows, the planning functions
decide on them, the scheduler reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from ._policy import SchedulePolicy
from ._triggers import Trigger, to_us

__all__ = [
    "FINAL",
    "NOT_SUCCEEDED",
    "BackfillResult",
    "Claim",
    "ClaimResult",
    "Conflict",
    "DueResult",
    "Heartbeat",
    "Outcome",
    "Renewal",
    "RunKey",
    "RunRecord",
    "RunStatus",
    "ScheduleInfo",
]

#: ``pending`` and ``running`` are live; the rest are final outcomes.
RunStatus = Literal[
    "pending", "running", "succeeded", "failed", "timeout", "cancelled", "skipped", "missed"
]
FINAL = ("succeeded", "failed", "timeout", "cancelled", "skipped", "missed")
#: The outcomes ``SchedulePolicy.keep_failed`` limits: every final one but ``succeeded``.
NOT_SUCCEEDED = FINAL[1:]
#: (schedule id, fire time in epoch microseconds)
RunKey = tuple[str, int]
#: What adding a schedule whose id exists does: ``replace`` it, ``keep`` the stored one, or
#: raise an ``error``.
Conflict = Literal["replace", "keep", "error"]


@dataclass(frozen=True, kw_only=True)
class ScheduleInfo:
    """A schedule as stored."""

    id: str
    trigger: Trigger
    job: dict[str, Any]
    policy: SchedulePolicy
    paused: bool
    next_fire: datetime | None
    last_fire: datetime | None
    created: datetime

    @property
    def finished(self) -> bool:
        """The trigger has no more fire times."""
        return self.next_fire is None


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """One (schedule, fire time): its state and, once over, its outcome.

    ``manual``: queued by `Scheduler.trigger`; ``backfill``: queued by
    `Scheduler.backfill` for a past fire time (its ``run_at`` is when it was queued).
    ``started``: when the job of its first attempt really started, on the replica that ran it
    (until that replica writes it, at its next lease renewal or with the outcome: when the run
    was claimed). ``lease_until``: on the store's clock. ``fencing_token``: the token of the
    newest claim (see [`RunContext`][genfan.schedule.RunContext]); a claim that takes the run over gets a larger one.
    """

    schedule_id: str
    fire_time: datetime
    run_at: datetime
    status: RunStatus
    attempts: int = 0
    owner: str | None = None
    lease_until: datetime | None = None
    started: datetime | None = None
    ended: datetime | None = None
    error: str | None = None
    manual: bool = False
    backfill: bool = False
    fencing_token: int | None = None

    @property
    def key(self) -> RunKey:
        return (self.schedule_id, to_us(self.fire_time))

    @property
    def drift(self) -> float | None:
        """Seconds from the planned start (fire time + jitter) to the real start of the job's
        first attempt."""
        if self.started is None:
            return None
        return (self.started - self.run_at).total_seconds()


@dataclass(frozen=True, kw_only=True)
class BackfillResult:
    """What `Scheduler.backfill` did.

    Attributes:
        schedule_id: the schedule.
        fire_times: every fire time of its trigger in the window, oldest first.
        queued: those queued now as runs (any running scheduler picks them up).
        existing: those already in the history (run, running, pending, skipped or missed
            before): not run again.
    """

    schedule_id: str
    fire_times: tuple[datetime, ...]
    queued: tuple[datetime, ...]
    existing: tuple[datetime, ...]


@dataclass(frozen=True, kw_only=True)
class Claim:
    """A run this replica has claimed, with what it needs to execute it."""

    run: RunRecord
    job: dict[str, Any]
    policy: SchedulePolicy
    takeover: bool = False
    #: the run had no start time before this claim: its real start is the first one.
    first_start: bool = False


@dataclass(frozen=True, kw_only=True)
class ClaimResult:
    claimed: list[Claim] = field(default_factory=list)
    #: runs of the claiming replica whose lease had expired while it still ran them: renewed.
    renewed: list[RunKey] = field(default_factory=list)
    #: running runs asked to cancel (overlap ``cancel_old``); their owners see it.
    cancel: list[RunKey] = field(default_factory=list)
    #: runs that ended without running in this round (missed, skipped, lost), for telemetry.
    ended: list[RunRecord] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class DueResult:
    created: int = 0
    #: the batch was full: more schedules may be due.
    more: bool = False
    #: schedule id -> number of fire times dropped (misfire grace or coalescing).
    dropped: dict[str, int] = field(default_factory=dict)
    missed: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Heartbeat:
    #: runs this owner still holds.
    held: set[RunKey]
    #: held runs that another replica asked to cancel (overlap ``cancel_old``).
    cancel: set[RunKey]


@dataclass(frozen=True, kw_only=True, slots=True)
class Renewal:
    """One held run whose lease a replica renews: its key, the fencing token of its claim, and
    the real start of its first attempt when that is not written yet."""

    key: RunKey
    token: int
    started: datetime | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """A run's result, as its replica records it (`Store.finish_many`).

    ``token``: the fencing token of the claim it ran under (``None``: not checked); the store
    refuses the result when the run was claimed again since. ``started``: the real start of the
    first attempt, when the replica has not written it yet.
    """

    key: RunKey
    status: RunStatus
    ended: datetime
    error: str | None
    attempts: int
    token: int | None = None
    started: datetime | None = None
