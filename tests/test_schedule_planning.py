"""The scheduling decisions as pure functions: no store, no clock, no event loop."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from genfan import ConfigurationError
from genfan.resilience import RetryPolicy
from genfan.schedule import CronTrigger, DateTrigger, IntervalTrigger, RunRecord, SchedulePolicy
from genfan.schedule._planning import (
    BUFFER_ONE_FULL,
    ClaimDecision,
    backfill_fires,
    buffer_one,
    coalesce,
    confirm_us,
    history_limits,
    jitter_us,
    plan_claim,
    plan_due,
    plan_expired,
    rebind,
    resume_fire,
)
from genfan.schedule._triggers import to_us

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MINUTE = IntervalTrigger(minutes=1, start=T0)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _run(**kw: object) -> RunRecord:
    fields: dict[str, object] = {"schedule_id": "s", "fire_time": T0, "run_at": T0}
    fields.update(status="pending")
    fields.update(kw)
    return RunRecord(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("how", "runs", "dropped"),
    [("all", [0, 60, 120, 180], 0), ("earliest", [0], 3), ("latest", [180], 3)],
)
def test_plan_due_coalesces_a_backlog(how: str, runs: list[int], dropped: int) -> None:
    policy = SchedulePolicy(coalesce=how)  # type: ignore[arg-type]
    plan = plan_due("s", MINUTE, policy, T0, _at(185))
    assert [fire for fire, _ in plan.runs] == [to_us(_at(s)) for s in runs]
    assert all(run_at == fire for fire, run_at in plan.runs)  # no jitter
    assert (plan.next_fire, plan.last_fire) == (to_us(_at(240)), to_us(_at(180)))
    assert (plan.dropped, plan.missed) == (dropped, 0)


def test_plan_due_drops_fire_times_past_the_grace_time_and_jitters_the_rest() -> None:
    policy = SchedulePolicy(misfire_grace_time=90, coalesce="all", jitter=30)
    plan = plan_due("s", MINUTE, policy, T0, _at(185))
    assert [fire for fire, _ in plan.runs] == [to_us(_at(120)), to_us(_at(180))]
    assert plan.missed == 1
    for fire, run_at in plan.runs:
        assert run_at - fire == jitter_us("s", fire, 30)
        assert 0 <= run_at - fire <= 30_000_000


def test_coalesce_and_jitter_are_deterministic() -> None:
    fires = [_at(0), _at(60), _at(120)]
    assert coalesce(fires, SchedulePolicy(coalesce="earliest")) == [_at(0)]
    assert coalesce(fires, SchedulePolicy(coalesce="latest")) == [_at(120)]
    assert coalesce(fires[:1], SchedulePolicy(coalesce="latest")) == [_at(0)]
    assert jitter_us("s", 1, 10) == jitter_us("s", 1, 10) != jitter_us("t", 1, 10)
    assert jitter_us("s", 1, 0) == 0


def test_plan_claim_overlap_policies() -> None:
    run = _run()
    now = to_us(T0)
    for overlap in ("skip", "buffer_one", "buffer_all", "allow", "cancel_old"):
        policy = SchedulePolicy(overlap=overlap)
        assert plan_claim(run, policy, overlap, now, set()).action == "start"
    policy = SchedulePolicy()
    others = {to_us(_at(-60))}
    assert plan_claim(run, policy, "allow", now, others) == ClaimDecision("start")
    skipped = plan_claim(run, policy, "skip", now, others)
    assert skipped.action == "skipped" and "overlap=skip" in (skipped.error or "")
    assert plan_claim(run, policy, "buffer_all", now, others) == ClaimDecision("wait")
    assert plan_claim(run, policy, "cancel_old", now, others) == ClaimDecision("cancel_old")
    assert plan_claim(run, policy, "buffer_one", now, others) == ClaimDecision("buffer_one")
    assert buffer_one(False) == ClaimDecision("wait")
    assert buffer_one(True) == BUFFER_ONE_FULL


def test_plan_claim_misfire_grace_time_spares_manual_and_backfill_runs() -> None:
    policy = SchedulePolicy(misfire_grace_time=10)
    late = to_us(_at(10.5))
    missed = plan_claim(_run(), policy, "skip", late, set())
    assert missed.action == "missed"
    assert missed.error == "started 10.500s late, past the misfire grace time of 10s"
    assert plan_claim(_run(), policy, "skip", to_us(_at(10)), set()).action == "start"
    assert plan_claim(_run(manual=True), policy, "skip", late, set()).action == "start"
    assert plan_claim(_run(backfill=True), policy, "skip", late, set()).action == "start"


def test_an_expired_lease_is_suspected_then_taken_over_while_attempts_are_left() -> None:
    policy = SchedulePolicy(retry=RetryPolicy(attempts=2))
    lost = _run(status="running", attempts=1, owner="ghost")
    now = to_us(_at(30))
    confirm = confirm_us(30)
    assert confirm == 15_000_000  # half the lease time

    def plan(run: RunRecord, seen: int | None, at: int, mine: bool = False) -> ClaimDecision:
        return plan_expired(
            run, policy, mine=mine, expired_seen=seen, lease_now=at, confirm=confirm
        )

    # First seen expired: only suspected (its replica may just be cut off from the store).
    assert plan(lost, None, now) == ClaimDecision("suspect")
    assert plan(lost, now, now + confirm - 1) == ClaimDecision("suspect")
    # Still expired half a lease later: taken over, or failed without attempts left.
    assert plan(lost, now, now + confirm) == ClaimDecision("takeover")
    spent = plan(_run(status="running", attempts=2, owner="ghost"), now, now + confirm)
    assert spent == ClaimDecision(
        "failed", "lease expired: the replica running it (ghost) was lost after attempt 2 of 2"
    )
    # The claiming replica runs it itself (a renewal of its own came late): renewed.
    assert plan(lost, now, now + confirm, mine=True) == ClaimDecision("renew")


def test_backfill_fires_and_their_limit() -> None:
    hourly = CronTrigger(expr="0 * * * *")
    assert backfill_fires("s", hourly, T0, _at(3 * 3600), 10) == [
        T0,
        _at(3600),
        _at(7200),
    ]
    with pytest.raises(ConfigurationError, match="fires more than 2 times"):
        backfill_fires("s", hourly, T0, _at(3 * 3600), 2)


def test_resume_skips_what_fell_while_paused_but_not_a_passed_date() -> None:
    assert resume_fire(MINUTE, T0, _at(90)) == _at(120)
    assert resume_fire(MINUTE, _at(120), _at(90)) == _at(120)
    once = DateTrigger(at=T0)
    assert resume_fire(once, T0, _at(90)) == T0


def test_rebind_keeps_a_bound_start_and_history_limits() -> None:
    bound = IntervalTrigger(minutes=1, start=T0)
    assert rebind(IntervalTrigger(minutes=1), bound, T0) == bound
    assert rebind(IntervalTrigger(minutes=2), bound, T0) == IntervalTrigger(minutes=2, start=T0)
    assert history_limits(SchedulePolicy()) == []
    limits = history_limits(SchedulePolicy(keep_succeeded=3, keep_failed=0))
    assert limits[0] == (("succeeded",), 3)
    assert limits[1][1] == 0 and "succeeded" not in limits[1][0] and "missed" in limits[1][0]
