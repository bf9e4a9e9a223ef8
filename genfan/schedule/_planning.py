"""The scheduling decisions, as pure functions: no I/O, no clock, the same on every replica.

Which fire times of a schedule are due and which of them run (misfire grace time, coalescing,
jitter); what a due run does when claimed (start, end as missed or skipped, wait, cancel the
running one: the overlap policy); what a run whose lease expired becomes (suspected, then taken
over or failed, or renewed by its own replica); which fire times a backfill window
holds; how a re-added trigger keeps its place in time; which runs the history limits keep.
The SQL dialects run these inside their transactions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from .._errors import ConfigurationError
from ._policy import _OVERLAP, SchedulePolicy
from ._records import NOT_SUCCEEDED, RunRecord
from ._triggers import DateTrigger, IntervalTrigger, Trigger, to_us

__all__ = [
    "BACKLOG_CAP",
    "BUFFER_ONE_FULL",
    "ONE_US",
    "SKIPPED",
    "ClaimAction",
    "ClaimDecision",
    "DuePlan",
    "backfill_fires",
    "buffer_one",
    "check_backfill",
    "coalesce",
    "confirm_us",
    "due_fires",
    "history_limits",
    "jitter_us",
    "plan_claim",
    "plan_due",
    "plan_expired",
    "rebind",
    "resume_fire",
]

ONE_US = timedelta(microseconds=1)
BACKLOG_CAP = 1000  # fire times one processing round creates for coalesce="all"


# -- due fire times -------------------------------------------------------------------------------


def jitter_us(schedule_id: str, fire_us: int, jitter: float) -> int:
    """A deterministic offset in ``[0, jitter]`` seconds: every replica computes the same one."""
    if jitter <= 0:
        return 0
    digest = hashlib.blake2b(f"{schedule_id}@{fire_us}".encode(), digest_size=8).digest()
    frac = int.from_bytes(digest, "big") / 2**64
    return int(frac * jitter * 1_000_000)


def due_fires(
    trigger: Trigger, policy: SchedulePolicy, first: datetime, now: datetime
) -> tuple[list[datetime], datetime | None, int]:
    """The fire times due at ``now`` from ``first`` on, the next one after them, and how many
    fell out of the misfire grace time (at least 1 when any did).

    A huge backlog (a long downtime on a frequent trigger) is not walked: ``coalesce="all"``
    takes it in slices of ``BACKLOG_CAP``, ``earliest`` and ``latest`` jump to their fire time.
    """
    fires: list[datetime] = []
    missed = 0
    f: datetime | None = first
    grace = policy.misfire_grace_time
    if grace is not None and f is not None:
        oldest = now - timedelta(seconds=grace)
        if f < oldest:
            missed = 1
            f = trigger.next_after(oldest - ONE_US)
    cap = BACKLOG_CAP if policy.coalesce == "all" else 100
    while f is not None and f <= now and len(fires) < cap:
        fires.append(f)
        f = trigger.next_after(f)
    if f is not None and f <= now and policy.coalesce != "all":
        last = _latest_at_or_before(trigger, now, f)
        fires.append(last)  # (the fire times in between are dropped by coalescing)
        f = trigger.next_after(last)
    return fires, f, missed


def _latest_at_or_before(trigger: Trigger, now: datetime, known: datetime) -> datetime:
    """The last fire time <= ``now``, given one (``known``) that is."""
    for seconds in (1, 60, 3600, 86400, 31 * 86400, 366 * 86400):
        probe = max(known, now - timedelta(seconds=seconds))
        g = trigger.next_after(probe - ONE_US)
        if g is not None and g <= now:
            known = g
            break
    while (h := trigger.next_after(known)) is not None and h <= now:
        known = h
    return known


def coalesce(fires: list[datetime], policy: SchedulePolicy) -> list[datetime]:
    """Which of several due fire times run: the ``earliest``, the ``latest`` or ``all``."""
    if len(fires) <= 1 or policy.coalesce == "all":
        return fires
    return [fires[0]] if policy.coalesce == "earliest" else [fires[-1]]


@dataclass(frozen=True, kw_only=True, slots=True)
class DuePlan:
    """What processing one due schedule writes (times in epoch microseconds)."""

    #: the runs to create: (fire time, planned start = fire time + jitter)
    runs: list[tuple[int, int]]
    #: the schedule's next fire time after these (``None``: the trigger is done)
    next_fire: int | None
    #: the newest fire time processed (``None``: none was)
    last_fire: int | None
    #: fire times dropped by coalescing or the misfire grace time
    dropped: int
    #: fire times past the misfire grace time (at least 1 when any were)
    missed: int


def plan_due(
    schedule_id: str, trigger: Trigger, policy: SchedulePolicy, next_fire: datetime, now: datetime
) -> DuePlan:
    """The runs a schedule whose next fire time is ``next_fire`` creates at ``now``."""
    fires, nxt, missed = due_fires(trigger, policy, next_fire, now)
    chosen = coalesce(fires, policy)
    runs = []
    for f in chosen:
        fus = to_us(f)
        runs.append((fus, fus + jitter_us(schedule_id, fus, policy.jitter)))
    return DuePlan(
        runs=runs,
        next_fire=None if nxt is None else to_us(nxt),
        last_fire=to_us(fires[-1]) if fires else None,
        dropped=len(fires) - len(chosen),
        missed=missed,
    )


def resume_fire(trigger: Trigger, next_fire: datetime | None, now: datetime) -> datetime | None:
    """The next fire time of a schedule resumed at ``now``: fire times that fell while it was
    paused are not made up; a one-off date that passed while paused still runs (subject to the
    misfire grace time)."""
    if next_fire is not None and next_fire < now:
        return trigger.next_after(now - ONE_US) or next_fire
    return next_fire


# -- claiming a due run ---------------------------------------------------------------------------

ClaimAction = Literal[
    "start",
    "takeover",
    "failed",
    "missed",
    "skipped",
    "wait",
    "cancel_old",
    "buffer_one",
    "suspect",
    "renew",
]


@dataclass(frozen=True, slots=True)
class ClaimDecision:
    """What a claim does with one due run.

    ``start``: run it; ``takeover``: run it again, its replica was lost (lease expired and
    confirmed, see `plan_expired`); ``failed`` (lost without attempts left), ``missed``,
    ``skipped``: end it with that outcome and ``error``, without running it; ``wait``: leave it
    pending until the running one ends; ``cancel_old``: ask the running runs to cancel, and
    wait; ``buffer_one``: wait, unless an earlier run already waits (see `buffer_one`);
    ``suspect``: its lease expired, but its replica may only have been cut off from the store:
    mark when that was first seen, and leave it; ``renew``: the claiming replica holds it
    itself and is still running it: renew its lease.
    """

    action: ClaimAction
    error: str | None = None


SKIPPED = "skipped: the previous run was still going (overlap=skip)"
BUFFER_ONE_FULL = ClaimDecision(
    "skipped", "skipped: a run was already waiting (overlap=buffer_one)"
)


def plan_claim(
    run: RunRecord,
    policy: SchedulePolicy,
    overlap: str,
    now_us: int,
    others: set[int],
) -> ClaimDecision:
    """What to do with ``run``, due at ``now_us``: a pending run whose planned start has come,
    or a running one whose lease expired.

    Args:
        run: the run (pending: a running run whose lease expired goes to `plan_expired`).
        policy: its schedule's policy.
        overlap: the overlap policy that applies (a backfill may override the schedule's).
        now_us: now, in epoch microseconds.
        others: the fire times of the schedule's other runs that are running.
    """
    grace = policy.misfire_grace_time
    late = (now_us - to_us(run.run_at)) / 1e6
    if grace is not None and not (run.manual or run.backfill) and late > grace:
        return ClaimDecision(
            "missed", f"started {late:.3f}s late, past the misfire grace time of {grace}s"
        )
    if not others or overlap == "allow":
        return ClaimDecision("start")
    if overlap == "skip":
        return ClaimDecision("skipped", SKIPPED)
    if overlap == "buffer_one":
        return ClaimDecision("buffer_one")
    if overlap == "cancel_old":
        return ClaimDecision("cancel_old")
    return ClaimDecision("wait")  # buffer_all


def confirm_us(lease: float) -> int:
    """How long a lease must have been seen expired before its run is taken over: half the
    lease time, in microseconds (see `plan_expired`)."""
    return int(lease * 500_000)


def plan_expired(
    run: RunRecord,
    policy: SchedulePolicy,
    *,
    mine: bool,
    expired_seen: int | None,
    lease_now: int,
    confirm: int,
) -> ClaimDecision:
    """What a claim does with a running run whose lease expired (all times on the store's
    clock, in epoch microseconds).

    A lease that expired while the store could not be reached (a stall, a lock held for long,
    a network cut) does not mean its replica is gone: that replica's renewal is queued behind
    the stall. So an expired lease is first only *suspected* (``expired_seen`` is set to when a
    claim first saw it); the run is taken over only once it has stayed expired for ``confirm``
    more on the store's clock, by which time a live replica's renewal has landed (and cleared
    the mark). A replica claiming a run it holds itself and still runs (``mine``: a renewal of
    its own was late) renews it instead.

    Args:
        run: the running run whose ``lease_until`` has passed.
        policy: its schedule's policy (``retry.attempts`` decides takeover or failure).
        mine: the claiming replica owns the run under the same fencing token and runs it.
        expired_seen: when a claim first saw the lease expired (``None``: not yet).
        lease_now: the store's clock now.
        confirm: how long the expiry must have been seen (`confirm_us`).
    """
    if mine:
        return ClaimDecision("renew")
    if expired_seen is None or lease_now < expired_seen + confirm:
        return ClaimDecision("suspect")
    attempts = policy.retry.attempts
    if run.attempts >= attempts:
        return ClaimDecision(
            "failed",
            f"lease expired: the replica running it ({run.owner}) was lost after "
            f"attempt {run.attempts} of {attempts}",
        )
    return ClaimDecision("takeover")


def buffer_one(one_waits: bool) -> ClaimDecision:
    """A ``buffer_one`` run: skipped when an earlier run of the schedule already waits (runs
    started in the same claim do not count), else it waits."""
    return BUFFER_ONE_FULL if one_waits else ClaimDecision("wait")


# -- backfill -------------------------------------------------------------------------------------


def check_backfill(
    start: datetime, end: datetime, now: datetime, overlap: str | None, max_fires: int
) -> None:
    """Refuse a bad backfill request (see `Scheduler.backfill`)."""
    for name, value in (("start", start), ("end", end)):
        if not isinstance(value, datetime):
            raise ConfigurationError(f"backfill {name} must be a datetime, got {value!r}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ConfigurationError(
                f"backfill {name} {value.isoformat()} has no timezone: pass a timezone-aware "
                "datetime, e.g. datetime(2026, 1, 1, tzinfo=UTC) or '2026-01-01T00:00:00+00:00'"
            )
    if start >= end:
        raise ConfigurationError(
            f"backfill window is empty: start {start.isoformat()} must be before end "
            f"{end.isoformat()} (the window is [start, end))"
        )
    if end > now:
        raise ConfigurationError(
            f"backfill end {end.isoformat()} is in the future (now is {now.isoformat()}): a "
            "backfill runs past fire times; the trigger fires the later ones itself"
        )
    if overlap is not None and overlap not in _OVERLAP:
        raise ConfigurationError(
            f"backfill overlap must be one of {', '.join(_OVERLAP)} (or None: the schedule's), "
            f"got {overlap!r}"
        )
    if not isinstance(max_fires, int) or isinstance(max_fires, bool) or not max_fires >= 1:
        raise ConfigurationError(f"backfill max_fires must be an int >= 1, got {max_fires!r}")


def backfill_fires(
    schedule_id: str, trigger: Trigger, start: datetime, end: datetime, max_fires: int
) -> list[datetime]:
    """The trigger's fire times in ``[start, end)``, oldest first; more than ``max_fires`` is
    refused."""
    fires: list[datetime] = []
    f = trigger.next_after(start - ONE_US)
    while f is not None and f < end:
        if len(fires) == max_fires:
            raise ConfigurationError(
                f"schedule {schedule_id!r} ({trigger}) fires more than {max_fires} times in "
                f"[{start.isoformat()}, {end.isoformat()}); narrow the window (backfill it "
                "in parts) or raise max_fires"
            )
        fires.append(f)
        f = trigger.next_after(f)
    return fires


# -- schedules and history ------------------------------------------------------------------------


def rebind(new: Trigger, old: Trigger, created: datetime) -> Trigger:
    """Keep the stored binding of a trigger relative to "now" when it is re-added, so a
    restarted process re-adding its schedules does not move them.

    An interval without a start keeps the stored start. A ``delay`` keeps the stored fire time
    when it was bound from the same delay, so it neither fires again after it has fired nor is
    postponed (rows written before ``bound_delay`` existed are recognised by
    ``at == created + delay``). A different delay, or a switch from ``at=``, binds anew.
    """
    if (
        isinstance(new, IntervalTrigger)
        and isinstance(old, IntervalTrigger)
        and new.start is None
        and old.start is not None
    ):
        return replace(new, start=old.start)
    if (
        isinstance(new, DateTrigger)
        and isinstance(old, DateTrigger)
        and isinstance(new.delay, float)
        and old.at is not None
        and (
            old.bound_delay == new.delay
            or (old.bound_delay is None and old.at == created + timedelta(seconds=new.delay))
        )
    ):
        return old
    return new


def history_limits(policy: SchedulePolicy) -> list[tuple[tuple[str, ...], int]]:
    """(outcomes, how many runs with them to keep) for each history limit the policy sets."""
    limits = ((("succeeded",), policy.keep_succeeded), (NOT_SUCCEEDED, policy.keep_failed))
    return [(statuses, keep) for statuses, keep in limits if keep is not None]
