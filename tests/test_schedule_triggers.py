"""Triggers: exact fire times, DST rules, validation, and the stored form."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from genfan import ConfigurationError
from genfan.schedule import CronTrigger, DateTrigger, IntervalTrigger, parse_duration
from genfan.schedule._triggers import from_us, to_us, trigger_from_dict

NY = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


def fires(
    trigger: CronTrigger | IntervalTrigger, after: datetime, until: datetime
) -> list[datetime]:
    out = []
    t = trigger.next_after(after)
    while t is not None and t <= until:
        out.append(t)
        t = trigger.next_after(t)
    return out


def test_daily_cron_over_a_year_in_new_york_keeps_local_time_through_dst() -> None:
    trig = CronTrigger(expr="0 7 * * *", timezone="America/New_York")
    got = fires(trig, datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert len(got) == 365
    assert all(t.astimezone(NY).hour == 7 and t.astimezone(NY).minute == 0 for t in got)
    # 12:00 UTC in winter (EST, -5), 11:00 UTC in summer (EDT, -4).
    by_day = {t.astimezone(NY).date(): t for t in got}
    assert by_day[datetime(2026, 3, 7).date()] == datetime(2026, 3, 7, 12, tzinfo=UTC)
    assert by_day[datetime(2026, 3, 8).date()] == datetime(2026, 3, 8, 11, tzinfo=UTC)
    assert by_day[datetime(2026, 10, 31).date()] == datetime(2026, 10, 31, 11, tzinfo=UTC)
    assert by_day[datetime(2026, 11, 1).date()] == datetime(2026, 11, 1, 12, tzinfo=UTC)


def test_fixed_time_in_the_spring_gap_runs_once_shifted_forward() -> None:
    # 2026-03-08 02:30 does not exist in New York: it runs at 03:30 EDT, once.
    trig = CronTrigger(expr="30 2 * * *", timezone="America/New_York")
    got = fires(trig, datetime(2026, 3, 6, tzinfo=UTC), datetime(2026, 3, 10, tzinfo=UTC))
    local = [t.astimezone(NY).strftime("%m-%d %H:%M %Z") for t in got]
    assert local == ["03-06 02:30 EST", "03-07 02:30 EST", "03-08 03:30 EDT", "03-09 02:30 EDT"]


def test_fixed_time_in_the_repeated_autumn_hour_runs_once_at_first_occurrence() -> None:
    trig = CronTrigger(expr="30 2 * * *", timezone="Europe/Berlin")
    got = fires(trig, datetime(2026, 10, 24, tzinfo=UTC), datetime(2026, 10, 27, tzinfo=UTC))
    assert got == [
        datetime(2026, 10, 24, 0, 30, tzinfo=UTC),  # CEST
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC),  # the first 02:30 (CEST); not again at CET
        datetime(2026, 10, 26, 1, 30, tzinfo=UTC),  # CET
    ]


def test_hourly_cron_follows_real_time_across_both_changes() -> None:
    trig = CronTrigger(expr="0 * * * *", timezone="Europe/Berlin")
    spring = fires(
        trig, datetime(2026, 3, 28, 23, tzinfo=UTC), datetime(2026, 3, 29, 22, 0, tzinfo=UTC)
    )
    # The local day 2026-03-29 has 23 hours: 02:00 does not exist and is not run.
    assert len(spring) == 23
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(spring))
    assert "02:00" not in [t.astimezone(BERLIN).strftime("%H:%M") for t in spring]
    autumn = fires(
        trig, datetime(2026, 10, 24, 22, tzinfo=UTC), datetime(2026, 10, 25, 23, tzinfo=UTC)
    )
    # 2026-10-25 has 25 hours: 02:00 runs twice (CEST, then CET), an hour apart.
    assert len(autumn) == 25
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(autumn))
    twos = [t for t in autumn if t.astimezone(BERLIN).hour == 2]
    assert [t.astimezone(BERLIN).tzname() for t in twos] == ["CEST", "CET"]


def test_every_15_minutes_in_new_york_is_evenly_spaced_through_both_changes() -> None:
    trig = CronTrigger(expr="*/15 * * * *", timezone="America/New_York")
    for day in (datetime(2026, 3, 8, 4, tzinfo=UTC), datetime(2026, 11, 1, 3, tzinfo=UTC)):
        got = fires(trig, day, day + timedelta(hours=6))
        assert len(got) == 24
        assert all(b - a == timedelta(minutes=15) for a, b in itertools.pairwise(got))


def test_cron_with_seconds_field_start_and_end() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    trig = CronTrigger(expr="* * * * * */20", start=start, end=start + timedelta(minutes=1))
    assert trig.first_fire(start - timedelta(days=1)) == start
    got = fires(trig, start - timedelta(days=1), start + timedelta(days=1))
    assert [(t - start).total_seconds() for t in got] == [0, 20, 40, 60]


def test_interval_is_anchored_to_start_and_exact_in_microseconds() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    trig = IntervalTrigger(seconds=0.1, start=start)
    t = start
    for _ in range(10_000):
        nxt = trig.next_after(t)
        assert nxt is not None
        t = nxt
    assert t == start + timedelta(seconds=1000)
    # next_after from an arbitrary instant lands on the grid.
    assert trig.next_after(start + timedelta(seconds=5.05)) == start + timedelta(seconds=5.1)
    assert IntervalTrigger(minutes=1, hours=1).interval == 3660


def test_interval_binds_its_start_when_added_and_stops_at_end() -> None:
    now = datetime(2026, 5, 1, 12, tzinfo=UTC)
    trig = IntervalTrigger(minutes=10, end=now + timedelta(minutes=25))
    bound = trig.bind(now)
    assert bound.start == now and bound.first_fire(now) == now
    assert fires(bound, now, now + timedelta(hours=1)) == [
        now + timedelta(minutes=10),
        now + timedelta(minutes=20),
    ]


def test_date_trigger_at_and_delay() -> None:
    now = datetime(2026, 5, 1, 12, tzinfo=UTC)
    at = DateTrigger(at=now + timedelta(hours=1))
    assert at.next_after(now) == now + timedelta(hours=1)
    assert at.next_after(now + timedelta(hours=1)) is None
    delay = DateTrigger(delay="in 10 minutes").bind(now)
    assert delay.first_fire(now) == now + timedelta(minutes=10)
    # The bound form remembers its delay, so a re-added schedule can keep its fire time.
    assert delay.at == now + timedelta(minutes=10) and delay.bound_delay == 600.0
    assert at.bound_delay is None and delay != DateTrigger(at=now + timedelta(minutes=10))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (90, 90.0),
        ("90", 90.0),
        ("10m", 600.0),
        ("in 10 minutes", 600.0),
        ("2h", 7200.0),
        ("1.5 d", 129600.0),
        ("250ms", 0.25),
        ("1 week", 604800.0),
    ],
)
def test_parse_duration(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["soon", "-5m", 0, "0s", float("nan"), True])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="duration"):
        parse_duration(bad)  # type: ignore[arg-type]


def test_triggers_validate_their_fields() -> None:
    with pytest.raises(ConfigurationError, match="not a valid cron expression"):
        CronTrigger(expr="61 * * * *")
    with pytest.raises(ConfigurationError, match="IANA"):
        CronTrigger(expr="0 * * * *", timezone="Mars/Olympus")
    with pytest.raises(ConfigurationError, match="interval must be > 0"):
        IntervalTrigger()
    with pytest.raises(ConfigurationError, match="timezone-aware"):
        IntervalTrigger(seconds=1, start=datetime(2026, 1, 1))
    with pytest.raises(ConfigurationError, match="exactly one"):
        DateTrigger()


def test_stored_form_round_trips() -> None:
    start = datetime(2026, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    for trig in (
        CronTrigger(expr="0 7 * * mon-fri", timezone="Europe/Berlin", start=start),
        IntervalTrigger(seconds=2.5, start=start, end=start + timedelta(days=1)),
        DateTrigger(at=start),
        DateTrigger(delay="10m").bind(start),
    ):
        assert trigger_from_dict(trig.to_dict()) == trig
    # The stored form of an ``at`` trigger is what it always was (stored rows compare equal).
    assert DateTrigger(at=start).to_dict() == {
        "kind": "date",
        "at": "2026-01-01T00:00:00.123456+00:00",
        "delay": None,
    }
    assert from_us(to_us(start)) == start
