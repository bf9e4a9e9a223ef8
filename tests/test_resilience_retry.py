"""Retries: exact delays, Retry-After and rate-limit resets, what is never retried, the budget and
the deadline."""

from __future__ import annotations

import itertools
import random

import anyio
import pytest
from trio.testing import MockClock

from genfan import (
    BackendConnectionError,
    BackendError,
    BackendTimeoutError,
    ChatRequest,
    ConfigurationError,
    HTTPStatusError,
    MalformedResponseError,
    RateLimitError,
    RateLimitInfo,
)
from genfan.resilience import Retry, RetryBudget, RetryBudgetPolicy, RetryPolicy, guard
from genfan.testing import Fail, FakeBackend, Reply, capture_events, set_testing

REQ = ChatRequest.from_prompt("hi")


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


class Script:
    """Fails with the given errors in turn, then answers; records when each call started."""

    def __init__(self, *errors: BackendError | type[BackendError]) -> None:
        self.errors = list(errors)
        self.times: list[float] = []

    def __call__(self, request: ChatRequest) -> Reply | Fail:
        self.times.append(anyio.current_time())
        if self.errors:
            return Fail(error=self.errors.pop(0))
        return Reply(text="ok")

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


NO_JITTER = RetryPolicy(
    attempts=4, initial=1.0, multiplier=2.0, max_delay=3.0, jitter="none", budget=None
)


@pytest.mark.anyio
async def test_exact_exponential_delays_capped() -> None:
    script = Script(
        BackendConnectionError, BackendTimeoutError, HTTPStatusError("x", status_code=503)
    )
    retry = Retry(FakeBackend("b", script), NO_JITTER)
    assert (await retry.complete(REQ)).text == "ok"
    assert script.gaps() == pytest.approx([1.0, 2.0, 3.0])
    assert retry.statistics().retries == 3


@pytest.mark.anyio
async def test_full_jitter_stays_within_the_exponential_bound() -> None:
    script = Script(*[BackendConnectionError] * 5)
    policy = RetryPolicy(attempts=6, initial=1.0, max_delay=100.0, jitter="full", budget=None)
    await Retry(FakeBackend("b", script), policy, rng=random.Random(7)).complete(REQ)
    for n, gap in enumerate(script.gaps(), start=1):
        assert 0.0 <= gap <= 2.0 ** (n - 1)


@pytest.mark.anyio
async def test_decorrelated_jitter_bounds() -> None:
    script = Script(*[BackendConnectionError] * 5)
    policy = RetryPolicy(attempts=6, initial=0.5, max_delay=4.0, jitter="decorrelated", budget=None)
    await Retry(FakeBackend("b", script), policy, rng=random.Random(3)).complete(REQ)
    gaps = script.gaps()
    assert all(0.5 <= g <= 4.0 for g in gaps)
    for prev, gap in itertools.pairwise(gaps):
        assert gap <= max(0.5, prev * 3) + 1e-9


@pytest.mark.anyio
async def test_retry_after_is_honoured_exactly() -> None:
    script = Script(RateLimitError("slow down", retry_after=7.5))
    retry = Retry(FakeBackend("b", script), NO_JITTER)
    await retry.complete(REQ)
    assert script.gaps() == pytest.approx([7.5])


@pytest.mark.anyio
async def test_retry_after_longer_than_allowed_fails_fast() -> None:
    script = Script(RateLimitError("come back tomorrow", retry_after=86400.0))
    retry = Retry(FakeBackend("b", script), NO_JITTER)
    with pytest.raises(RateLimitError):
        await retry.complete(REQ)
    assert len(script.times) == 1


def limited(retry_after: float | None = None, **info: float) -> RateLimitError:
    """A 429 with the given Retry-After and rate-limit headers (RateLimitInfo fields)."""
    return RateLimitError(
        "rate limited", retry_after=retry_after, rate_limit=RateLimitInfo.model_validate(info)
    )


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("info", "wait"),
    [
        ({"remaining_requests": 0, "reset_requests": 7.0, "reset_tokens": 2.0}, 7.0),
        ({"remaining_tokens": 0, "reset_tokens": 12.5, "reset_requests": 0.5}, 12.5),
        # both quotas spent: the later reset, when both have refilled
        ({"remaining_requests": 0, "remaining_tokens": 0, "reset_requests": 4.0,
          "reset_tokens": 9.0}, 9.0),
        # the quota that is not spent does not hold the retry back
        ({"remaining_requests": 0, "remaining_tokens": 10, "reset_requests": 4.0,
          "reset_tokens": 30.0}, 4.0),
    ],
)  # fmt: skip
async def test_429_without_retry_after_waits_for_the_exhausted_quota_to_reset(
    info: dict[str, float], wait: float
) -> None:
    script = Script(limited(**info))
    retry = Retry(FakeBackend("b", script), NO_JITTER)  # its own guess would be 1 s
    with capture_events() as events:
        assert (await retry.complete(REQ)).text == "ok"
    assert script.gaps() == pytest.approx([wait])
    scheduled = [e for e in events if e["event"] == "retry_scheduled"]
    assert scheduled[0]["delay"] == pytest.approx(wait)


@pytest.mark.anyio
async def test_retry_after_wins_over_the_rate_limit_reset() -> None:
    script = Script(limited(retry_after=2.0, remaining_requests=0, reset_requests=20.0))
    await Retry(FakeBackend("b", script), NO_JITTER).complete(REQ)
    assert script.gaps() == pytest.approx([2.0])


@pytest.mark.anyio
@pytest.mark.parametrize(
    "info",
    [
        {},  # no rate-limit headers
        {"remaining_requests": 3, "remaining_tokens": 100, "reset_requests": 20.0},  # not spent
        {"remaining_requests": 0},  # spent, but no reset reported
    ],
)
async def test_429_without_a_known_reset_backs_off_as_usual(info: dict[str, float]) -> None:
    script = Script(limited(**info), limited(**info))
    await Retry(FakeBackend("b", script), NO_JITTER).complete(REQ)
    assert script.gaps() == pytest.approx([1.0, 2.0])


@pytest.mark.anyio
async def test_rate_limit_reset_of_other_errors_is_not_a_wait() -> None:
    # a 503 carrying quota headers is not a rate limit: the backoff applies
    info = RateLimitInfo(remaining_requests=0, reset_requests=30.0)
    script = Script(HTTPStatusError("busy", status_code=503, rate_limit=info))
    await Retry(FakeBackend("b", script), NO_JITTER).complete(REQ)
    assert script.gaps() == pytest.approx([1.0])


@pytest.mark.anyio
async def test_rate_limit_reset_is_ignored_when_retry_after_is_not_respected() -> None:
    policy = RetryPolicy(
        attempts=2, initial=1.0, jitter="none", respect_retry_after=False, budget=None
    )
    script = Script(limited(remaining_requests=0, reset_requests=30.0))
    await Retry(FakeBackend("b", script), policy).complete(REQ)
    assert script.gaps() == pytest.approx([1.0])


@pytest.mark.anyio
async def test_rate_limit_reset_longer_than_allowed_fails_fast() -> None:
    script = Script(limited(remaining_tokens=0, reset_tokens=3600.0))
    retry = Retry(FakeBackend("b", script), NO_JITTER)  # max_retry_after=60
    start = anyio.current_time()
    with capture_events() as events:
        with pytest.raises(RateLimitError):
            await retry.complete(REQ)
    assert len(script.times) == 1 and anyio.current_time() == start
    assert events[-1]["event"] == "retry_gave_up"
    assert events[-1]["reason"] == "rate_limit_reset too long"
    assert events[-1]["rate_limit_reset"] == 3600.0


@pytest.mark.anyio
async def test_rate_limit_reset_that_does_not_fit_the_deadline_fails_fast() -> None:
    script = Script(limited(remaining_requests=0, reset_requests=5.0))
    retry = Retry(FakeBackend("b", script), NO_JITTER)
    start = anyio.current_time()
    with capture_events() as events:
        with anyio.move_on_after(4.0):
            with pytest.raises(RateLimitError):
                await retry.complete(REQ)
    # the 1 s backoff would fit, but the quota is back only in 5 s: not worth a 429 more
    assert len(script.times) == 1 and anyio.current_time() == start
    assert retry.statistics().deadline_stops == 1
    assert events[-1]["reason"] == "deadline" and events[-1]["backoff"] == 5.0


@pytest.mark.anyio
async def test_testing_mode_does_not_wait_for_the_rate_limit_reset() -> None:
    set_testing(True)
    try:
        script = Script(limited(remaining_requests=0, reset_requests=30.0))
        await Retry(FakeBackend("b", script), NO_JITTER).complete(REQ)
        assert script.gaps() == [0.0]
    finally:
        set_testing(False)


@pytest.mark.anyio
async def test_stream_waits_for_the_rate_limit_reset() -> None:
    script = Script(limited(remaining_requests=0, reset_requests=6.0))
    events = [e async for e in Retry(FakeBackend("b", script), NO_JITTER).stream(REQ)]
    assert events[-1].type == "end" and script.gaps() == pytest.approx([6.0])


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_client_errors_are_never_retried(status: int) -> None:
    script = Script(HTTPStatusError("no", status_code=status))
    with pytest.raises(HTTPStatusError):
        await Retry(FakeBackend("b", script), NO_JITTER).complete(REQ)
    assert len(script.times) == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    "error",
    [
        BackendTimeoutError("t"),
        BackendConnectionError("c"),
        HTTPStatusError("s", status_code=500),
        HTTPStatusError("s", status_code=502),
        RateLimitError("r"),
        MalformedResponseError("m"),
    ],
)
async def test_retryable_errors_are_retried(error: BackendError) -> None:
    script = Script(error)
    assert (await Retry(FakeBackend("b", script), NO_JITTER).complete(REQ)).text == "ok"
    assert len(script.times) == 2


@pytest.mark.anyio
async def test_gives_up_after_attempts_with_the_last_error() -> None:
    script = Script(
        BackendConnectionError("one"), BackendConnectionError("two"), BackendTimeoutError("three")
    )
    retry = Retry(FakeBackend("b", script), RetryPolicy(attempts=3, jitter="none", budget=None))
    with pytest.raises(BackendTimeoutError, match=r"three"):
        await retry.complete(REQ)


@pytest.mark.anyio
async def test_non_backend_errors_are_not_retried() -> None:
    calls = 0

    def boom(request: ChatRequest) -> Reply:
        nonlocal calls
        calls += 1
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        await Retry(FakeBackend("b", boom), NO_JITTER).complete(REQ)
    assert calls == 1


@pytest.mark.anyio
async def test_backoff_that_does_not_fit_the_deadline_fails_fast() -> None:
    script = Script(BackendConnectionError("first"), BackendConnectionError("second"))
    retry = Retry(FakeBackend("b", script), NO_JITTER)  # waits 1 then 2
    start = anyio.current_time()
    with capture_events() as events:
        with anyio.move_on_after(2.5):
            with pytest.raises(BackendConnectionError, match=r"second"):
                await retry.complete(REQ)
    # the first retry fit (1 s of 2.5); the second (2 s of 1.5 left) was not started
    assert len(script.times) == 2
    assert anyio.current_time() - start == pytest.approx(1.0)
    assert retry.statistics().deadline_stops == 1
    assert [e["event"] for e in events] == ["retry_scheduled", "retry_gave_up"]
    assert events[-1]["reason"] == "deadline"


@pytest.mark.anyio
async def test_budget_exhaustion() -> None:
    # The policy says the budget's values; the guard makes its budget from them.
    budget = RetryBudgetPolicy(ratio=0.2, min_per_second=0.0, ttl=10.0)
    fake = FakeBackend("b", [Fail(error=BackendConnectionError)])
    retry = Retry(fake, RetryPolicy(attempts=5, jitter="none", initial=0.0, budget=budget))
    assert retry.budget is not None and retry.budget.policy == budget
    for _ in range(10):
        with pytest.raises(BackendConnectionError):
            await retry.complete(REQ)
    # 10 calls x 20% = 2 retries in the window, and no more
    assert len(fake.calls) == 12
    stats = retry.statistics()
    assert stats.retries == 2 and stats.budget_exhausted == 10


@pytest.mark.anyio
async def test_budget_floor_and_expiry() -> None:
    budget = RetryBudget(RetryBudgetPolicy(ratio=0.0, min_per_second=0.5, ttl=10.0))
    assert budget.balance() == pytest.approx(5.0)
    assert all(budget.try_withdraw() for _ in range(5))
    assert not budget.try_withdraw()
    await anyio.sleep(11.0)  # the withdrawals leave the window
    assert budget.try_withdraw()


@pytest.mark.anyio
async def test_budget_is_shared_between_stacks() -> None:
    # One way to share: the same RetryBudget object, given to each stack's guard().
    budget = RetryBudget(RetryBudgetPolicy(ratio=0.5, min_per_second=0.0))
    policy = RetryPolicy(attempts=3, initial=0.0, jitter="none")
    a, b = (
        guard(
            FakeBackend(name, [Fail(error=BackendConnectionError)]),
            retry=policy,
            retry_budget=budget,
            bulkhead=None,
            breaker=None,
            timeout=None,
        )
        for name in ("a", "b")
    )
    assert a.retry is not None and b.retry is not None
    assert a.retry.budget is budget and b.retry.budget is budget
    for stack in (a, b):
        with pytest.raises(BackendConnectionError):
            await stack.complete(REQ)
    # a's call alone earns half a retry; b's call completes one, and b spends it
    assert a.retry.statistics().retries == 0 and b.retry.statistics().retries == 1
    assert not budget.try_withdraw()
    # without retry_budget, each stack has a budget of its own, made from the policy's values
    c, d = guard(FakeBackend("c"), retry=policy), guard(FakeBackend("d"), retry=policy)
    assert c.retry is not None and d.retry is not None and c.retry.budget is not d.retry.budget


def test_retry_budget_is_shared_in_one_place_only() -> None:
    budget = RetryBudget(RetryBudgetPolicy())
    with pytest.raises(TypeError):
        Retry(FakeBackend("b"), RetryPolicy(), budget=budget)  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError, match=r"needs a retry policy with a budget"):
        guard(FakeBackend("b"), retry=None, retry_budget=budget)
    with pytest.raises(ConfigurationError, match=r"needs a retry policy with a budget"):
        guard(FakeBackend("b"), retry=RetryPolicy(budget=None), retry_budget=budget)
    with pytest.raises(ConfigurationError, match=r"takes a RetryBudget.*not a RetryBudgetPolicy"):
        guard(FakeBackend("b"), retry_budget=RetryBudgetPolicy())  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_testing_mode_turns_off_backoff_and_caps_attempts() -> None:
    set_testing(True, attempts=2)
    try:
        script = Script(BackendConnectionError, BackendConnectionError, BackendConnectionError)
        retry = Retry(FakeBackend("b", script), RetryPolicy(attempts=5, initial=10.0, budget=None))
        with pytest.raises(BackendConnectionError):
            await retry.complete(REQ)
        assert script.gaps() == [0.0]
    finally:
        set_testing(False)


@pytest.mark.anyio
async def test_cancellation_is_not_retried() -> None:
    fake = FakeBackend("b", latency=10.0)
    retry = Retry(fake, NO_JITTER)
    with anyio.move_on_after(1.0):
        await retry.complete(REQ)
    assert len(fake.calls) == 1 and fake.cancelled == 1


@pytest.mark.anyio
async def test_stream_retries_before_the_first_event_only() -> None:
    script = Script(BackendConnectionError)
    retry = Retry(FakeBackend("b", script), NO_JITTER)
    events = [e async for e in retry.stream(REQ)]
    assert events[-1].type == "end" and len(script.times) == 2


def test_policy_validation() -> None:
    with pytest.raises(ConfigurationError, match=r"RetryPolicy.attempts must be an integer >= 1"):
        RetryPolicy(attempts=0)
    with pytest.raises(ConfigurationError, match=r"RetryPolicy.max_delay"):
        RetryPolicy(initial=5.0, max_delay=1.0)
    with pytest.raises(ConfigurationError, match=r"jitter"):
        RetryPolicy(jitter="half")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"RetryBudgetPolicy.ttl"):
        RetryBudgetPolicy(ttl=0)
    assert RetryPolicy(initial=1, multiplier=3, max_delay=5).base_delay(3) == 5.0
