"""The ``[schedules]`` section of the TOML config.

```toml
[schedules]                      # scheduler settings (all optional)
store = "sqlite:///genfan-schedules.db"   # or postgresql://host/db?schema=genfan
max_concurrent_runs = 20
lease_time = 30
poll_interval = 1.0

[schedules.cleanup]              # one table per schedule; its key is the schedule id
func = "myapp.jobs:cleanup"      # an import path (async or sync), or a content table below
cron = "0 3 * * *"               # exactly one of cron / interval / at / delay
timezone = "Europe/Berlin"
kwargs = { days = 7 }
misfire_grace_time = 600
coalesce = "latest"              # earliest | latest | all
overlap = "skip"                 # skip | buffer_one | buffer_all | allow | cancel_old
timeout = 120
jitter = 30
retry = { attempts = 3, initial = 5, max_delay = 60 }   # also multiplier, jitter
keep_succeeded = 10              # history limits (default: keep every run)
keep_failed = 5
isolation = "process"            # run in a child process, killed at the timeout

[schedules.digest]
interval = "30m"
[schedules.digest.content]       # a content job: prompt, inputs, fan-out, sink
prompt = "Summarize what arrived since {since}:\\n\\n{files}"
collect = ["inbox/*.md"]
output = "digests/"              # a folder: one file per run
backends = ["gpt", "claude"]     # names of [backends.NAME] tables
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .._errors import ConfigurationError
from ._jobs import ContentJob, resolve_callable
from ._policy import SchedulePolicy, schedule_retry
from ._triggers import CronTrigger, DateTrigger, IntervalTrigger, Trigger, parse_duration

__all__ = ["ScheduleEntry", "SchedulerSettings", "SchedulesConfig", "parse_schedules"]

_strict = ConfigDict(extra="forbid", frozen=True)
_SETTINGS = ("store", "max_concurrent_runs", "lease_time", "poll_interval", "identity")


class _Retry(BaseModel):
    """A schedule's ``retry`` table: the keys left out keep the schedule defaults."""

    model_config = _strict
    attempts: Annotated[int, Field(ge=1, le=100)] | None = None
    initial: Annotated[float, Field(ge=0, le=86400)] | None = None
    multiplier: Annotated[float, Field(ge=1, le=10)] | None = None
    max_delay: Annotated[float, Field(ge=0, le=86400)] | None = None
    jitter: Literal["none", "full", "decorrelated"] | None = None


class _Content(BaseModel):
    model_config = _strict
    prompt: Annotated[str, Field(min_length=1)]
    output: Annotated[str, Field(min_length=1)]
    variables: dict[str, str] = Field(default_factory=dict)
    collect: list[str] | str = Field(default_factory=list)
    skip_if_empty: bool = True
    system: str | None = None
    backends: list[str] | None = None
    select: str | None = None
    mode: Literal["all", "first", "quorum"] | None = None
    deadline: Annotated[float, Field(gt=0)] | None = None
    max_chars: Annotated[int, Field(ge=1)] = 200_000


class ScheduleEntry(BaseModel):  # type: ignore[no-redef,unused-ignore]
    """One ``[schedules.ID]`` table."""

    model_config = _strict

    func: str | None = None
    content: _Content | None = None
    args: list[Any] = Field(default_factory=list)
    # ("kwargs" is taken by pydantic's generated __init__ signature, hence the alias)
    call_kwargs: dict[str, Any] = Field(default_factory=dict, validation_alias="kwargs")
    cron: str | None = None
    timezone: str = "UTC"
    interval: float | str | None = None
    at: datetime | None = None
    delay: float | str | None = None
    start: datetime | None = None
    end: datetime | None = None
    misfire_grace_time: Annotated[float, Field(ge=0)] | None = None
    coalesce: Literal["earliest", "latest", "all"] = "latest"
    overlap: Literal["skip", "buffer_one", "buffer_all", "allow", "cancel_old"] = "skip"
    timeout: Annotated[float, Field(gt=0)] | None = None
    jitter: Annotated[float, Field(ge=0, le=86400)] = 0.0
    retry: _Retry = Field(default_factory=_Retry)
    keep_succeeded: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    keep_failed: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    isolation: Literal["thread", "process"] = "thread"
    paused: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> ScheduleEntry:
        if (self.func is None) == (self.content is None):
            raise ValueError("set exactly one of func = 'pkg.mod:function' and a content table")
        when = [k for k in ("cron", "interval", "at", "delay") if getattr(self, k) is not None]
        if len(when) != 1:
            raise ValueError(
                "set exactly one of cron, interval, at and delay"
                + (f" (got {', '.join(when)})" if when else "")
            )
        if self.isolation == "process" and self.content is not None:
            raise ValueError(
                "isolation = 'process' runs a func by its import path; a content job runs "
                "in the scheduler: remove isolation"
            )
        return self

    def trigger(self) -> Trigger:
        """The trigger this table describes."""
        if self.cron is not None:
            return CronTrigger(
                expr=self.cron, timezone=self.timezone, start=self.start, end=self.end
            )
        if self.interval is not None:
            return IntervalTrigger(
                seconds=parse_duration(self.interval, field="interval"),
                start=self.start,
                end=self.end,
            )
        if self.at is not None:
            return DateTrigger(at=self.at)
        assert self.delay is not None
        return DateTrigger(delay=self.delay)

    def policy(self) -> SchedulePolicy:
        return SchedulePolicy(
            misfire_grace_time=self.misfire_grace_time,
            coalesce=self.coalesce,
            overlap=self.overlap,
            timeout=self.timeout,
            jitter=self.jitter,
            retry=schedule_retry(**self.retry.model_dump(exclude_none=True)),
            keep_succeeded=self.keep_succeeded,
            keep_failed=self.keep_failed,
            isolation=self.isolation,
        )

    def job(self, base_dir: Path | None) -> str | ContentJob:
        """An import path, or the [`ContentJob`][genfan.schedule.ContentJob]."""
        if self.func is not None:
            return self.func
        assert self.content is not None
        data = self.content.model_dump()
        data["collect"] = (
            (data["collect"],) if isinstance(data["collect"], str) else tuple(data["collect"])
        )
        if data["backends"] is not None:
            data["backends"] = tuple(data["backends"])
        return ContentJob(**data, base_dir=str(base_dir) if base_dir else None)


class SchedulerSettings(BaseModel):
    """The scalar keys of ``[schedules]``."""

    model_config = _strict

    store: str = "sqlite:///genfan-schedules.db"
    max_concurrent_runs: Annotated[int, Field(ge=1)] = 100
    lease_time: Annotated[float, Field(ge=0.01, le=86400)] = 30.0
    poll_interval: Annotated[float, Field(ge=0.001, le=3600)] | None = 1.0
    identity: str | None = None


@dataclass(frozen=True)
class SchedulesConfig:
    """``[schedules]``: settings and the schedules by id."""

    settings: SchedulerSettings
    entries: dict[str, ScheduleEntry]
    base_dir: Path | None = None

    def check_jobs(self) -> None:
        """Import every ``func`` (what ``genfan schedule run`` does before it starts), so a typo
        or a module that fails to import is reported at once, by key.

        Raises:
            ConfigurationError: naming ``schedules.ID.func``, the import path and why.
        """
        for sid, entry in self.entries.items():
            if entry.func is None:
                continue
            try:
                resolve_callable(entry.func)
            except ConfigurationError as exc:
                raise ConfigurationError(
                    f"schedules.{sid}.func: {exc}; fix the import path, or start genfan from "
                    "the folder that holds the package (or add it to PYTHONPATH)"
                ) from None


def _describe(err: ValidationError, prefix: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = (
            "unknown key: remove it or check its spelling"
            if e["type"] == "extra_forbidden"
            else e["msg"]
        )
        lines.append(f"  {prefix}{('.' + loc) if loc else ''}: {msg}")
    return "invalid [schedules] configuration:\n" + "\n".join(lines)


# The names of the trigger fields as a [schedules.ID] table spells them.
_KEYS = {
    "CronTrigger.expr": "cron",
    "CronTrigger.timezone": "timezone",
    "CronTrigger.start": "start",
    "CronTrigger.end": "end",
    "IntervalTrigger.start": "start",
    "IntervalTrigger.end": "end",
    "DateTrigger.at": "at",
    "DateTrigger.delay": "delay",
}


def _keys(message: str) -> str:
    for name, key in _KEYS.items():
        message = message.replace(name, key)
    return message


def parse_schedules(data: Mapping[str, Any], *, base_dir: Path | None = None) -> SchedulesConfig:
    """Validate the ``[schedules]`` mapping (``GenfanConfig.schedules``).

    Raises:
        ConfigurationError: naming the key and what is wrong with it.
    """
    settings_data = {k: v for k, v in data.items() if not isinstance(v, Mapping)}
    unknown = [k for k in settings_data if k not in _SETTINGS]
    if unknown:
        raise ConfigurationError(
            f"invalid [schedules] configuration: unknown key(s) {unknown}; settings are "
            f"{', '.join(_SETTINGS)}, and each schedule is a [schedules.ID] table"
        )
    try:
        settings = SchedulerSettings.model_validate(settings_data)
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc, "schedules")) from None
    entries: dict[str, ScheduleEntry] = {}
    for sid, table in data.items():
        if not isinstance(table, Mapping):
            continue
        try:
            entry = ScheduleEntry.model_validate(table)
            entry.trigger()
            entry.policy()
            entry.job(base_dir)
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc, f"schedules.{sid}")) from None
        except ConfigurationError as exc:
            raise ConfigurationError(f"schedules.{sid}: {_keys(str(exc))}") from None
        entries[sid] = entry
    return SchedulesConfig(settings=settings, entries=entries, base_dir=base_dir)
