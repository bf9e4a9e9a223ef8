"""Triggers: when a schedule fires.

A trigger is a frozen value object. ``next_after(t)`` returns the first fire time strictly after
``t`` (an aware UTC datetime), or ``None`` when the trigger is done. Triggers are pure: they never
read a clock, so the same trigger gives the same fire times on every replica and in every test.

Triggers that depend on "now" (an interval without a start, a delay) are *bound* when the schedule
is added: `Trigger.bind` fixes them to the scheduler's clock, and the bound form is what the
store keeps. Re-adding the same schedule (a restarted process loading its config) keeps the stored
binding, so its fire times do not move.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Protocol, runtime_checkable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .._errors import ConfigurationError

__all__ = [
    "CronTrigger",
    "DateTrigger",
    "IntervalTrigger",
    "Trigger",
    "parse_duration",
    "trigger_from_dict",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A local wall-clock time is never more than this far from the UTC instant's naive order
# (DST shifts are at most 2 hours anywhere); used to bound the cron search.
_MAX_SHIFT = timedelta(hours=3)


@runtime_checkable
class Trigger(Protocol):
    """When a schedule fires."""

    kind: ClassVar[str]

    def next_after(self, after: datetime) -> datetime | None:
        """The first fire time strictly after ``after`` (aware, UTC), or ``None`` when done."""
        ...

    def first_fire(self, now: datetime) -> datetime | None:
        """The first fire time of a schedule added at ``now`` (after `bind`)."""
        ...

    def bind(self, now: datetime) -> Trigger:
        """This trigger with anything relative to "now" fixed (called when it is added)."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form for the store (see `trigger_from_dict`)."""
        ...


def _utc(value: datetime, field: str) -> datetime:
    if value.tzinfo is None:
        raise ConfigurationError(
            f"{field} must be a timezone-aware datetime (e.g. datetime(..., tzinfo=UTC)), "
            f"got naive {value!r}"
        )
    return value.astimezone(UTC)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _check_window(kind: str, start: datetime | None, end: datetime | None) -> None:
    if start is not None and end is not None and start > end:
        raise ConfigurationError(
            f"{kind}.start {start.isoformat()} is after its end {end.isoformat()}: the "
            "schedule would never fire; set start before end (or leave one out)"
        )


def _from_iso(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).astimezone(UTC)


_DURATION = re.compile(
    r"^\s*(?:in\s+)?(\d+(?:\.\d+)?)\s*"
    r"(ms|s|sec|secs|seconds?|m|min|mins|minutes?|h|hr|hrs|hours?|d|days?|w|weeks?)?\s*$",
    re.IGNORECASE,
)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(value: float | int | str, *, field: str = "duration") -> float:
    """Seconds from a number or a string like ``"90"``, ``"10m"``, ``"in 10 minutes"``, ``"2h"``.

    Raises:
        ConfigurationError: the value is not a positive duration.
    """
    if isinstance(value, bool):
        raise ConfigurationError(f"{field} must be a duration, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION.match(value)
        if m is None:
            raise ConfigurationError(
                f"{field} must be a duration like 30, '30s', '10m', 'in 10 minutes', '2h' or "
                f"'1d', got {value!r}"
            )
        unit = (m.group(2) or "s").lower()
        key = "ms" if unit == "ms" else unit[0]
        seconds = float(m.group(1)) * _UNITS[key]
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigurationError(f"{field} must be a positive number of seconds, got {value!r}")
    return seconds


@dataclass(frozen=True, kw_only=True)
class IntervalTrigger:
    """Fire every ``interval`` seconds: at ``start``, ``start + interval``, ... up to ``end``.

    Args:
        seconds: seconds of the interval (the five units are summed; the sum must be
            positive).
        minutes: minutes of the interval.
        hours: hours of the interval.
        days: days of the interval.
        weeks: weeks of the interval.
        start: the first fire time. ``None``: when the schedule is added (it fires at once).
        end: no fire after this time.

    The fire times are anchored to ``start``, so a late run never shifts the ones after it.
    """

    kind: ClassVar[str] = "interval"

    seconds: float = 0.0
    minutes: float = 0.0
    hours: float = 0.0
    days: float = 0.0
    weeks: float = 0.0
    start: datetime | None = None
    end: datetime | None = None

    def __post_init__(self) -> None:
        total = self.interval
        if not (total > 0 and math.isfinite(total)):
            raise ConfigurationError(
                f"IntervalTrigger interval must be > 0 seconds (seconds/minutes/hours/days/weeks), "
                f"got {total!r}"
            )
        if total < 1e-3:
            raise ConfigurationError(
                f"IntervalTrigger interval must be at least 0.001 seconds, got {total!r}"
            )
        if self.start is not None:
            object.__setattr__(self, "start", _utc(self.start, "IntervalTrigger.start"))
        if self.end is not None:
            object.__setattr__(self, "end", _utc(self.end, "IntervalTrigger.end"))
        _check_window("IntervalTrigger", self.start, self.end)

    @property
    def interval(self) -> float:
        """The interval in seconds."""
        return (
            self.seconds
            + 60.0 * self.minutes
            + 3600.0 * self.hours
            + 86400.0 * self.days
            + 604800.0 * self.weeks
        )

    @property
    def _step_us(self) -> int:
        return round(self.interval * 1_000_000)

    def bind(self, now: datetime) -> IntervalTrigger:
        return self if self.start is not None else replace(self, start=_utc(now, "now"))

    def first_fire(self, now: datetime) -> datetime | None:
        start = self.bind(now).start
        assert start is not None
        return start if self.end is None or start <= self.end else None

    def next_after(self, after: datetime) -> datetime | None:
        if self.start is None:
            raise ConfigurationError("IntervalTrigger.next_after() needs a start; call bind()")
        if after < self.start:
            nxt = self.start
        else:
            # Integer microseconds: exact, so fire times never drift by float rounding.
            elapsed = (after - self.start) // timedelta(microseconds=1)
            k = elapsed // self._step_us + 1
            nxt = self.start + timedelta(microseconds=k * self._step_us)
        if self.end is not None and nxt > self.end:
            return None
        return nxt

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seconds": self.seconds,
            "minutes": self.minutes,
            "hours": self.hours,
            "days": self.days,
            "weeks": self.weeks,
            "start": _iso(self.start),
            "end": _iso(self.end),
        }

    def __str__(self) -> str:
        return f"every {_human(self.interval)}"


@dataclass(frozen=True, kw_only=True)
class DateTrigger:
    """Fire once: at ``at``, or ``delay`` seconds after the schedule is added ("in 10 minutes").

    Args:
        at: an aware datetime.
        delay: seconds (or a string like ``"10m"``, ``"in 10 minutes"``); exactly one of ``at``
            and ``delay``.

    Attributes:
        bound_delay: on the bound form of a ``delay`` trigger (``at`` fixed by `bind`),
            the delay it was bound from; ``None`` otherwise. The store uses it to recognise a
            re-added delay trigger and keep its fire time across restarts.
    """

    kind: ClassVar[str] = "date"

    at: datetime | None = None
    delay: float | str | None = None
    bound_delay: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if (self.at is None) == (self.delay is None):
            raise ConfigurationError("DateTrigger needs exactly one of at= and delay=")
        if self.at is not None:
            object.__setattr__(self, "at", _utc(self.at, "DateTrigger.at"))
        if self.delay is not None:
            object.__setattr__(self, "delay", parse_duration(self.delay, field="DateTrigger.delay"))

    def bind(self, now: datetime) -> DateTrigger:
        if self.at is not None:
            return self
        assert isinstance(self.delay, float)
        return DateTrigger._bound(_utc(now, "now") + timedelta(seconds=self.delay), self.delay)

    @staticmethod
    def _bound(at: datetime, delay: float | None) -> DateTrigger:
        trigger = DateTrigger(at=at)
        object.__setattr__(trigger, "bound_delay", delay)
        return trigger

    def first_fire(self, now: datetime) -> datetime | None:
        return self.bind(now).at

    def next_after(self, after: datetime) -> datetime | None:
        if self.at is None:
            raise ConfigurationError("DateTrigger.next_after() needs a bound trigger; call bind()")
        return self.at if after < self.at else None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "at": _iso(self.at), "delay": self.delay}
        if self.bound_delay is not None:  # absent otherwise: stored forms of ``at`` unchanged
            data["bound_delay"] = self.bound_delay
        return data

    def __str__(self) -> str:
        return f"once at {_iso(self.at)}" if self.at else f"once in {self.delay}s"


@dataclass(frozen=True, kw_only=True)
class CronTrigger:
    """Fire on a cron expression in a time zone (croniter syntax; an optional 6th field is
    seconds).

    Daylight-saving changes follow Vixie cron (and cronie, and Kubernetes' robfig/cron in spirit):

    * a job at a fixed local time (no ``*`` in its minute and hour fields) runs **once** on the
      change days: a time skipped by the spring-forward gap runs shifted forward by the gap
      (02:30 in New York on the spring day runs at 03:30 EDT); a time that occurs twice in the
      autumn runs at its first occurrence only;
    * a job with ``*`` in its minute or hour field (hourly, every 15 minutes...) follows real
      time: it does not run for local times that do not exist, and runs again in the repeated
      hour.

    Args:
        expr: the cron expression, e.g. ``"0 7 * * mon-fri"``.
        timezone: an IANA zone name (``"Europe/Berlin"``); default UTC.
        start: no fire before this time. A start in the past counts the fire times since then
            as missed (coalescing and the misfire grace time decide what runs); without it
            the first fire is the next one from when the schedule is added.
        end: no fire after this time.
    """

    kind: ClassVar[str] = "cron"

    expr: str
    timezone: str = "UTC"
    start: datetime | None = None
    end: datetime | None = None

    def __post_init__(self) -> None:
        from croniter import CroniterBadDateError, croniter

        expr = " ".join(self.expr.split())
        object.__setattr__(self, "expr", expr)
        fields = expr.split(" ")
        if not 5 <= len(fields) <= 6 or not croniter.is_valid(expr):
            raise ConfigurationError(
                f"CronTrigger.expr {self.expr!r} is not a valid cron expression "
                "(5 fields: minute hour day-of-month month day-of-week, optional 6th: seconds)"
            )
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigurationError(
                f"CronTrigger.timezone {self.timezone!r} is not a known IANA time zone "
                "(e.g. 'UTC', 'Europe/Berlin', 'America/New_York')"
            ) from None
        if self.start is not None:
            object.__setattr__(self, "start", _utc(self.start, "CronTrigger.start"))
        if self.end is not None:
            object.__setattr__(self, "end", _utc(self.end, "CronTrigger.end"))
        _check_window("CronTrigger", self.start, self.end)
        try:
            croniter(expr, datetime(2000, 1, 1)).get_next(datetime)
        except CroniterBadDateError:
            raise ConfigurationError(
                f"CronTrigger.expr {self.expr!r} never fires: no date matches it (such as "
                "February 30 or 31, or April 31); fix its day-of-month and month fields"
            ) from None

    @property
    def _tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def _real_time(self) -> bool:
        minute, hour = self.expr.split(" ")[:2]
        return minute.startswith("*") or hour.startswith("*")

    def bind(self, now: datetime) -> CronTrigger:
        return self

    def first_fire(self, now: datetime) -> datetime | None:
        base = self.start if self.start is not None else now
        return self.next_after(base - timedelta(microseconds=1))

    def _instants(self, naive: datetime) -> list[datetime]:
        """The UTC instants at which the local wall time ``naive`` fires."""
        tz = self._tz
        early = naive.replace(tzinfo=tz, fold=0)
        late = naive.replace(tzinfo=tz, fold=1)
        if early.utcoffset() == late.utcoffset():
            return [early.astimezone(UTC)]
        exists = early.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == naive
        if exists:  # ambiguous: the autumn hour that happens twice
            if self._real_time:
                return [early.astimezone(UTC), late.astimezone(UTC)]
            return [early.astimezone(UTC)]
        # nonexistent: inside the spring-forward gap. fold=0 maps it forward by the gap.
        if self._real_time:
            return []
        return [early.astimezone(UTC)]

    def _offsets(self, at: datetime) -> tuple[timedelta, timedelta]:
        """The smallest and largest UTC offsets in force within 3 hours of ``at``."""
        tz = self._tz
        offs = [
            (at + d).astimezone(tz).utcoffset() or timedelta(0)
            for d in (-_MAX_SHIFT, timedelta(0), _MAX_SHIFT)
        ]
        return min(offs), max(offs)

    def next_after(self, after: datetime) -> datetime | None:
        from croniter import CroniterBadDateError, croniter

        after = _utc(after, "after")
        if self.start is not None and after < self.start:
            after = self.start - timedelta(microseconds=1)
        # A wall time n fires at n - offset(n), and wall times are not monotonic in UTC around
        # a DST change: scan from the earliest wall time that can map past ``after``, and stop
        # once no later wall time can map before the best instant found.
        lo, _ = self._offsets(after)
        begin = (after + lo).replace(tzinfo=None) - timedelta(microseconds=1)
        it = croniter(self.expr, begin)
        best: datetime | None = None
        stop: datetime | None = None
        end_local = None if self.end is None else (self.end + _MAX_SHIFT).replace(tzinfo=None)
        for _ in range(100_000):
            try:
                naive: datetime = it.get_next(datetime)
            except CroniterBadDateError:  # no later date matches (checked when created)
                break
            if stop is not None and naive >= stop:
                break
            if end_local is not None and naive > end_local + self._offsets(self.end)[1]:  # type: ignore[arg-type]
                break
            for inst in self._instants(naive):
                if inst > after and (best is None or inst < best):
                    best = inst
                    stop = (inst + self._offsets(inst)[1]).replace(tzinfo=None)
        if best is not None and self.end is not None and best > self.end:
            return None
        return best

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "expr": self.expr,
            "timezone": self.timezone,
            "start": _iso(self.start),
            "end": _iso(self.end),
        }

    def __str__(self) -> str:
        return f"cron {self.expr!r} ({self.timezone})"


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def trigger_from_dict(data: dict[str, Any]) -> Trigger:
    """Rebuild a trigger from `Trigger.to_dict` output."""
    kind = data.get("kind")
    if kind == "interval":
        return IntervalTrigger(
            seconds=float(data.get("seconds", 0.0)),
            minutes=float(data.get("minutes", 0.0)),
            hours=float(data.get("hours", 0.0)),
            days=float(data.get("days", 0.0)),
            weeks=float(data.get("weeks", 0.0)),
            start=_from_iso(data.get("start")),
            end=_from_iso(data.get("end")),
        )
    if kind == "date":
        at = _from_iso(data.get("at"))
        if at is None:
            return DateTrigger(delay=data["delay"])
        bound = data.get("bound_delay")
        return DateTrigger._bound(at, None if bound is None else float(bound))
    if kind == "cron":
        return CronTrigger(
            expr=data["expr"],
            timezone=data.get("timezone", "UTC"),
            start=_from_iso(data.get("start")),
            end=_from_iso(data.get("end")),
        )
    raise ConfigurationError(f"unknown trigger kind {kind!r}; expected interval, date or cron")


def to_us(value: datetime) -> int:
    """Microseconds since the Unix epoch (exact; how the stores keep times)."""
    return (value - _EPOCH) // timedelta(microseconds=1)


def from_us(value: int) -> datetime:
    """The aware UTC datetime for `to_us` output."""
    return _EPOCH + timedelta(microseconds=value)
