"""The scheduler's clock: wall-clock datetimes on top of anyio's monotonic clock.

The scheduler never reads the wall clock while it waits. [`AnyioClock`][genfan.schedule.AnyioClock] reads it once (or
takes ``start=``) and from then on maps ``anyio.current_time()`` onto wall time, so every wait
is an ``anyio.sleep_until``: under trio's ``MockClock(autojump_threshold=0)`` months of cron
schedule run in milliseconds, with exact fire times.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

import anyio

from .._errors import ConfigurationError

__all__ = ["AnyioClock", "Clock"]


@runtime_checkable
class Clock(Protocol):
    """Wall time for a scheduler, and a way to wait for it."""

    def now(self) -> datetime:
        """The current time (aware, UTC)."""
        ...

    async def sleep_until(self, when: datetime) -> None:
        """Return once `now` has reached ``when``."""
        ...


class AnyioClock:
    """Wall time = an anchor + the anyio time elapsed since the clock was first used.

    Args:
        start: the wall time at the first use (default: the real time then). Tests pass a fixed
            date and run under trio's ``MockClock``.
    """

    def __init__(self, start: datetime | None = None) -> None:
        if start is not None and start.tzinfo is None:
            raise ConfigurationError(f"AnyioClock.start must be timezone-aware, got {start!r}")
        self._start = None if start is None else start.astimezone(UTC)
        self._anchor: tuple[datetime, float] | None = None

    def _anchored(self) -> tuple[datetime, float]:
        if self._anchor is None:
            wall = self._start if self._start is not None else datetime.now(UTC)
            self._anchor = (wall, anyio.current_time())
        return self._anchor

    def now(self) -> datetime:
        wall0, mono0 = self._anchored()
        return wall0 + timedelta(seconds=anyio.current_time() - mono0)

    def monotonic_at(self, when: datetime) -> float:
        """The ``anyio.current_time()`` value at which `now` reaches ``when``."""
        wall0, mono0 = self._anchored()
        return mono0 + (when - wall0).total_seconds()

    async def sleep_until(self, when: datetime) -> None:
        # The float round trip may land a hair early: loop until now() agrees.
        while self.now() < when:
            await anyio.sleep_until(self.monotonic_at(when))
            if self.now() < when:
                await anyio.sleep(1e-6)

    def __repr__(self) -> str:
        return f"AnyioClock(start={self._start!r})"
