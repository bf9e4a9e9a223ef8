"""The settings of ``via="batch-api"`` (kept apart so that ``_job`` can name them)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from .._errors import ConfigurationError

__all__ = ["BatchAPISettings", "Via", "parse_deadline"]

#: How a job's rows are sent: ``realtime`` (one call per row, through the guards),
#: ``batch-api`` (the provider's batch endpoint, half price), ``offline`` (every row at once
#: to the unguarded backend: the local engine's full batching).
Via = Literal["realtime", "batch-api", "offline"]


@dataclass(frozen=True, kw_only=True)
class BatchAPISettings:
    """How ``via="batch-api"`` splits, polls and waits.

    Args:
        backend: the config's backend to send the rows to (default: the one the config selects;
            a batch goes to one provider).
        max_requests: the most requests per batch (default: the provider's limit, 50,000 for
            OpenAI, 100,000 for Anthropic).
        max_bytes: the most JSONL bytes per batch (default: the provider's limit, 200 MB for
            OpenAI, 256 MB for Anthropic).
        poll_initial: seconds before the first poll.
        poll_max: the longest wait between two polls.
        poll_multiplier: how much each wait grows over the one before, up to ``poll_max``.
        cancel_wait: at the deadline, seconds to wait for cancelled batches to hand back what
            they finished before the missing rows go real-time.
        attempts: tries of one batch-API call that fails in a retryable way (a 5xx, a 429, a
            broken connection), with backoff.
    """

    backend: str | None = None
    max_requests: int | None = None
    max_bytes: int | None = None
    poll_initial: float = 5.0
    poll_max: float = 60.0
    poll_multiplier: float = 1.5
    cancel_wait: float = 300.0
    attempts: int = 5

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("poll_initial", "poll_max", "cancel_wait"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ConfigurationError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if self.poll_multiplier < 1:
            raise ConfigurationError(f"poll_multiplier must be >= 1, got {self.poll_multiplier}")
        if self.attempts < 1:
            raise ConfigurationError(f"attempts must be >= 1, got {self.attempts}")


# -- the deadline ------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*([smhd]?)\s*)+$")
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_deadline(
    value: float | str | datetime | None, *, now: datetime | None = None
) -> float | None:
    """Seconds from ``now`` until ``value``: a number of seconds, a duration (``"90s"``,
    ``"30m"``, ``"2h30m"``), a time of day (``"06:00"``: the next one, local time), or an
    ISO 8601 date and time (naive: local time); ``None``: no deadline.

    Raises:
        ConfigurationError: anything else, naming the forms that work.
    """
    if value is None:
        return None
    now = now or datetime.now().astimezone()
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ConfigurationError(f"deadline must be >= 0 seconds, got {value}")
        return float(value)
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.astimezone()
        return max(0.0, (moment - now).total_seconds())
    text = str(value).strip()
    if _DURATION.match(text):
        return float(sum(float(n) * _UNIT[u] for n, u in _PART.findall(text)))
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", text)
    if m and int(m.group(1)) < 24 and int(m.group(2)) < 60:
        at = now.replace(hour=int(m.group(1)), minute=int(m.group(2)), second=0, microsecond=0)
        if at <= now:
            at += timedelta(days=1)
        return (at - now).total_seconds()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigurationError(
            f"deadline {value!r}: give seconds (3600), a duration ('90m', '2h30m'), a time of day "
            "('06:00') or a date and time ('2026-12-07T06:00')"
        ) from None
    return parse_deadline(moment, now=now)
