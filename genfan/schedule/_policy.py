"""Run policies of a schedule: frozen, keyword-only, validated value objects (float seconds)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .._errors import ConfigurationError

__all__ = ["Coalesce", "Overlap", "SchedulePolicy", "ScheduleRetry"]

#: Which of several missed fire times run: ``earliest`` or ``latest`` one, or ``all`` of them.
Coalesce = Literal["earliest", "latest", "all"]
#: What a run does when an earlier run of the same schedule is still going:
#: ``skip`` it; ``buffer_one`` (wait, at most one waiting; later ones are skipped);
#: ``buffer_all`` (wait, in order); ``allow`` (run at the same time); ``cancel_old`` (cancel the
#: running one, then start).
Overlap = Literal["skip", "buffer_one", "buffer_all", "allow", "cancel_old"]

_COALESCE = ("earliest", "latest", "all")
_OVERLAP = ("skip", "buffer_one", "buffer_all", "allow", "cancel_old")


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


@dataclass(frozen=True, kw_only=True)
class ScheduleRetry:
    """Retries of a failed run, with exponential backoff (through tenacity).

    Attempt ``n`` (from 1) that fails waits ``min(initial * multiplier ** (n - 1), max_delay)``
    seconds before attempt ``n + 1``. A run whose replica died counts the lost attempt.

    Args:
        attempts: attempts in all, 1 (no retry) to 100.
        initial: the first wait, seconds (0 to 86400).
        multiplier: growth of the wait per attempt (1 to 10).
        max_delay: the longest wait, seconds.
    """

    attempts: int = 1
    initial: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 300.0

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or isinstance(self.attempts, bool):
            raise ConfigurationError(
                f"ScheduleRetry.attempts must be an int >= 1 and <= 100, got {self.attempts!r}"
            )
        _check("ScheduleRetry.attempts", self.attempts, low=1, high=100)
        _check("ScheduleRetry.initial", self.initial, low=0, high=86400)
        _check("ScheduleRetry.multiplier", self.multiplier, low=1, high=10)
        _check("ScheduleRetry.max_delay", self.max_delay, low=0, high=86400)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (from 1)."""
        return float(min(self.initial * self.multiplier ** (attempt - 1), self.max_delay))


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
        retry: retries of failed attempts (default: none).
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
    """

    misfire_grace_time: float | None = None
    coalesce: Coalesce = "latest"
    overlap: Overlap = "skip"
    timeout: float | None = None
    retry: ScheduleRetry = field(default_factory=ScheduleRetry)
    jitter: float = 0.0
    keep_succeeded: int | None = None
    keep_failed: int | None = None

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
        if isinstance(self.retry, dict):
            object.__setattr__(self, "retry", ScheduleRetry(**self.retry))
        if not isinstance(self.retry, ScheduleRetry):
            raise ConfigurationError(
                f"SchedulePolicy.retry must be a ScheduleRetry, got {self.retry!r}"
            )

    @property
    def prunes_history(self) -> bool:
        """Whether the history of the schedule's runs is limited."""
        return self.keep_succeeded is not None or self.keep_failed is not None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # Unset history limits are left out, so stored policies stay readable by replicas
        # running an older genfan during a rolling upgrade.
        for key in ("keep_succeeded", "keep_failed"):
            if data[key] is None:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SchedulePolicy:
        data = dict(data)
        retry = data.pop("retry", None) or {}
        try:
            return cls(retry=ScheduleRetry(**retry), **data)
        except TypeError as exc:
            raise ConfigurationError(f"invalid schedule policy: {exc}") from None
