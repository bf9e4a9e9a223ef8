"""Run policies of a schedule: frozen, keyword-only, validated value objects (float seconds)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from .._errors import ConfigurationError
from ..resilience import RetryPolicy

__all__ = [
    "RETRY_DEFAULTS",
    "Coalesce",
    "Isolation",
    "Overlap",
    "SchedulePolicy",
    "schedule_retry",
]

#: Which of several missed fire times run: ``earliest`` or ``latest`` one, or ``all`` of them.
Coalesce = Literal["earliest", "latest", "all"]
#: What a run does when an earlier run of the same schedule is still going:
#: ``skip`` it; ``buffer_one`` (wait, at most one waiting; later ones are skipped);
#: ``buffer_all`` (wait, in order); ``allow`` (run at the same time); ``cancel_old`` (cancel the
#: running one, then start).
Overlap = Literal["skip", "buffer_one", "buffer_all", "allow", "cancel_old"]
#: Where a job runs: ``thread`` (a sync job in a worker thread, which a timeout abandons but
#: cannot stop; an async job in the event loop) or ``process`` (a child process, killed when an
#: attempt times out or is cancelled).
Isolation = Literal["thread", "process"]

_COALESCE = ("earliest", "latest", "all")
_OVERLAP = ("skip", "buffer_one", "buffer_all", "allow", "cancel_old")
_JITTER = ("none", "full", "decorrelated")
_ISOLATION = ("thread", "process")


def _check(
    name: str,
    value: float | None,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    allow_none: bool = False,
) -> None:
    if value is None and allow_none:
        return
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and value <= high
    )
    if not ok:
        lo = f"> {low:g}" if low_open else f">= {low:g}"
        hi = "" if high == math.inf else f" and <= {high:g}"
        none = " (or None)" if allow_none else ""
        raise ConfigurationError(f"{name} must be {lo}{hi}{none}, got {value!r}")


def _check_keep(name: str, value: int | None, *, low: int) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 1_000_000:
        why = " (the newest success is the next run's previous_success)" if low else ""
        raise ConfigurationError(
            f"{name} must be an int >= {low} and <= 1000000{why}, or None to keep all; "
            f"got {value!r}"
        )


#: The retry fields a schedule keeps in its store, and their defaults: one attempt (no retry);
#: when retried, attempt ``n`` that fails waits ``initial * multiplier ** (n - 1)`` seconds,
#: capped at ``max_delay``, without jitter.
RETRY_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"attempts": 1, "initial": 1.0, "multiplier": 2.0, "max_delay": 300.0, "jitter": "none"}
)


def schedule_retry(**fields: Any) -> RetryPolicy:
    """A schedule's `RetryPolicy` from the stored fields (see
    `RETRY_DEFAULTS`; unknown keys raise ``TypeError``).

    What a schedule does not store is the same for every schedule: every ``Exception`` is
    retried (cancellation never is), with no retry budget and no ``Retry-After``. An ``initial``
    wait above ``max_delay`` becomes ``max_delay``, which waits the same.
    """
    unknown = sorted(set(fields) - set(RETRY_DEFAULTS))
    if unknown:
        raise TypeError(f"unexpected retry field(s) {unknown}; use {', '.join(RETRY_DEFAULTS)}")
    values = {**RETRY_DEFAULTS, **fields}
    _check_retry(values)
    values["initial"] = min(values["initial"], values["max_delay"])
    return RetryPolicy(
        **values,
        retry_on=(Exception,),
        budget=None,
        respect_retry_after=False,
    )


def _check_retry(values: dict[str, Any]) -> None:
    """The limits of a schedule's retries (beyond `RetryPolicy`'s own)."""
    attempts = values["attempts"]
    if not isinstance(attempts, int) or isinstance(attempts, bool) or not 1 <= attempts <= 100:
        raise ConfigurationError(
            f"SchedulePolicy.retry.attempts must be an int >= 1 and <= 100, got {attempts!r}"
        )
    _check("SchedulePolicy.retry.initial", values["initial"], low=0, high=86400)
    _check("SchedulePolicy.retry.multiplier", values["multiplier"], low=1, high=10)
    _check("SchedulePolicy.retry.max_delay", values["max_delay"], low=0, high=86400)
    if values["jitter"] not in _JITTER:
        raise ConfigurationError(
            f"SchedulePolicy.retry.jitter must be one of {', '.join(_JITTER)}, "
            f"got {values['jitter']!r}"
        )


@dataclass(frozen=True, kw_only=True)
class SchedulePolicy:
    """How a schedule's runs behave when late, overlapping, slow or failing.

    Args:
        misfire_grace_time: seconds a run may start after its fire time; later, it is recorded
            as ``missed`` and not run. ``None``: no limit (APScheduler's default; Kubernetes'
            ``startingDeadlineSeconds``, Temporal's catch-up window).
        coalesce: of several fire times missed while nothing was running (downtime), run the
            ``earliest``, the ``latest`` (default), or ``all``.
        overlap: what a run does if an earlier run of the schedule is still going (Temporal's
            overlap policies; Kubernetes' Forbid = ``skip``, Allow = ``allow``, Replace =
            ``cancel_old``). Default ``skip``.
        timeout: seconds one attempt may take (``None``: no limit); a timeout is a failure.
        retry: retries of a failed attempt, a `RetryPolicy`
            (default: one attempt, no retry). Attempt ``n`` that fails waits
            ``initial * multiplier ** (n - 1)`` seconds, capped at ``max_delay`` and jittered
            as ``jitter`` says; attempts a replica that died had made count. The schedule
            keeps ``attempts`` (1 to 100), ``initial`` (0 to 86400 s), ``multiplier`` (1 to
            10), ``max_delay`` (0 to 86400 s) and ``jitter``; a scheduled run retries every
            ``Exception`` (leave ``retry_on`` unset), without a retry budget or
            ``Retry-After``. A dict of those fields is taken too, the unset ones at their
            schedule defaults (1 attempt, ``initial=1``, ``multiplier=2``, ``max_delay=300``,
            ``jitter="none"``).
        jitter: a run starts up to this many seconds after its fire time, spread evenly and
            the same on every replica, so that schedules on the same second do not all start
            at once (0 to 86400).
        keep_succeeded: how many ``succeeded`` runs of the schedule the history keeps (the
            newest by planned start); older ones are deleted after each recorded run
            (Kubernetes' ``successfulJobsHistoryLimit``). At least 1: the newest success is
            the next run's ``previous_success`` (a content job collects files since it).
            ``None`` (default): keep all, as before.
        keep_failed: the same for every other outcome (``failed``, ``timeout``,
            ``cancelled``, ``skipped``, ``missed``); 0 keeps none (Kubernetes'
            ``failedJobsHistoryLimit``). ``None`` (default): keep all. Pending and running runs
            are never deleted.
        isolation: ``"thread"`` (default): a sync job runs in a worker thread. A thread cannot
            be stopped: when ``timeout`` expires the run is recorded ``timeout`` and the next
            attempt may start, but the function runs on until it returns. ``"process"``: the
            job (an import path, sync or async) runs in a child process of its own, killed
            (SIGKILL, with anything it started) when the attempt times out or is cancelled;
            each attempt pays for starting an interpreter and importing the job's module.
    """

    misfire_grace_time: float | None = None
    coalesce: Coalesce = "latest"
    overlap: Overlap = "skip"
    timeout: float | None = None
    retry: RetryPolicy = field(default_factory=schedule_retry)
    jitter: float = 0.0
    keep_succeeded: int | None = None
    keep_failed: int | None = None
    isolation: Isolation = "thread"

    def __post_init__(self) -> None:
        _check(
            "SchedulePolicy.misfire_grace_time",
            self.misfire_grace_time,
            low=0,
            allow_none=True,
        )
        if self.coalesce not in _COALESCE:
            raise ConfigurationError(
                f"SchedulePolicy.coalesce must be one of {', '.join(_COALESCE)}, "
                f"got {self.coalesce!r}"
            )
        if self.overlap not in _OVERLAP:
            raise ConfigurationError(
                f"SchedulePolicy.overlap must be one of {', '.join(_OVERLAP)}, got {self.overlap!r}"
            )
        _check("SchedulePolicy.timeout", self.timeout, low=0, low_open=True, allow_none=True)
        _check("SchedulePolicy.jitter", self.jitter, low=0, high=86400)
        _check_keep("SchedulePolicy.keep_succeeded", self.keep_succeeded, low=1)
        _check_keep("SchedulePolicy.keep_failed", self.keep_failed, low=0)
        if self.isolation not in _ISOLATION:
            raise ConfigurationError(
                f"SchedulePolicy.isolation must be one of {', '.join(_ISOLATION)}, "
                f"got {self.isolation!r}"
            )
        object.__setattr__(self, "retry", _as_schedule_retry(self.retry))

    @property
    def prunes_history(self) -> bool:
        """Whether the history of the schedule's runs is limited."""
        return self.keep_succeeded is not None or self.keep_failed is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form the stores keep (see `from_dict`)."""
        retry = {key: getattr(self.retry, key) for key in RETRY_DEFAULTS}
        data: dict[str, Any] = {
            "misfire_grace_time": self.misfire_grace_time,
            "coalesce": self.coalesce,
            "overlap": self.overlap,
            "timeout": self.timeout,
            "retry": retry,
            "jitter": self.jitter,
            "keep_succeeded": self.keep_succeeded,
            "keep_failed": self.keep_failed,
            "isolation": self.isolation,
        }
        # Unset history limits, the default isolation and the default retry jitter are left
        # out, so stored policies stay readable by replicas running an older genfan during a
        # rolling upgrade.
        for key in ("keep_succeeded", "keep_failed"):
            if data[key] is None:
                del data[key]
        if self.isolation == "thread":
            del data["isolation"]
        if retry["jitter"] == RETRY_DEFAULTS["jitter"]:
            del retry["jitter"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SchedulePolicy:
        data = dict(data)
        retry = data.pop("retry", None) or {}
        try:
            return cls(retry=schedule_retry(**retry), **data)
        except TypeError as exc:
            raise ConfigurationError(f"invalid schedule policy: {exc}") from None


def _as_schedule_retry(retry: object) -> RetryPolicy:
    """``SchedulePolicy.retry`` as the schedule keeps it (see `schedule_retry`)."""
    if isinstance(retry, dict):
        try:
            return schedule_retry(**retry)
        except TypeError as exc:
            raise ConfigurationError(f"SchedulePolicy.retry: {exc}") from None
    if not isinstance(retry, RetryPolicy):
        raise ConfigurationError(
            f"SchedulePolicy.retry must be a genfan.resilience.RetryPolicy, got {retry!r}"
        )
    if retry.retry_on not in (None, (Exception,)):
        raise ConfigurationError(
            "SchedulePolicy.retry.retry_on must be None: a scheduled run retries every "
            f"Exception (the policy is stored as data), got {retry.retry_on!r}"
        )
    return schedule_retry(**{key: getattr(retry, key) for key in RETRY_DEFAULTS})
