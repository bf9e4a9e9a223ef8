"""Retries with tenacity: exponential backoff with jitter, Retry-After and rate-limit resets,
a budget, the deadline."""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import anyio
from tenacity import AsyncRetrying, RetryCallState

from .._backend import Backend
from .._errors import RateLimitError
from .._types import ChatRequest, Completion, StreamEvent
from ..testing import is_testing
from ._base import Guard, decision, set_span_attribute, time_left
from ._policies import RetryBudgetPolicy, RetryPolicy, as_predicate, default_retryable

__all__ = ["Retry", "RetryBudget", "RetryStatistics"]


class RetryBudget:
    """A Finagle-style retry budget, shared by every caller of one backend.

    Each call deposits ``ratio`` of a retry; each retry withdraws one. Over the last ``ttl``
    seconds, retries may reach ``min_per_second * ttl + ratio * calls``, so an outage adds at
    most ``ratio`` extra load (plus the small floor) instead of multiplying it by the attempts.
    """

    _BUCKETS = 10

    def __init__(self, policy: RetryBudgetPolicy | None = None) -> None:
        self.policy = policy or RetryBudgetPolicy()
        self._width = self.policy.ttl / self._BUCKETS
        # (bucket index, calls, retries), oldest first
        self._buckets: deque[list[int]] = deque()
        self._calls = 0
        self._retries = 0

    def _roll(self) -> list[int]:
        index = math.floor(anyio.current_time() / self._width)
        buckets = self._buckets
        while buckets and buckets[0][0] <= index - self._BUCKETS:
            _, calls, retries = buckets.popleft()
            self._calls -= calls
            self._retries -= retries
        if not buckets or buckets[-1][0] != index:
            buckets.append([index, 0, 0])
        return buckets[-1]

    def deposit(self) -> None:
        """Record one call."""
        self._roll()[1] += 1
        self._calls += 1

    def balance(self) -> float:
        """Retries allowed now."""
        self._roll()
        p = self.policy
        return p.min_per_second * p.ttl + p.ratio * self._calls - self._retries

    def try_withdraw(self) -> bool:
        """Spend one retry if the budget allows it."""
        bucket = self._roll()
        if self.balance() < 1.0:
            return False
        bucket[2] += 1
        self._retries += 1
        return True


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryStatistics:
    """How often a retry guard retried and why it stopped.

    Attributes:
        calls: calls made through the guard.
        retries: retries scheduled.
        budget_exhausted: retries refused by the retry budget.
        deadline_stops: retries not started because the backoff did not fit the deadline.
    """

    calls: int
    retries: int
    budget_exhausted: int
    deadline_stops: int


def server_wait(exc: BaseException | None) -> tuple[float, str] | None:
    """How long a rate-limited backend said to wait before the next call, and how it said it.

    A :class:`~genfan.RateLimitError`'s ``retry_after`` (its ``Retry-After``) comes
    first: ``(seconds, "retry_after")``. Without it, its ``rate_limit``
    (:class:`~genfan.RateLimitInfo`) tells when an exhausted quota refills: with
    ``remaining_requests == 0`` the wait is ``reset_requests``, with ``remaining_tokens == 0``
    it is ``reset_tokens``, and with both spent the later of the two:
    ``(seconds, "rate_limit_reset")``. ``None`` when the backend said neither (any other error,
    a quota not at zero, or no reset reported): the policy's backoff applies then.
    """
    if not isinstance(exc, RateLimitError):
        return None
    if exc.retry_after is not None:
        return max(0.0, exc.retry_after), "retry_after"
    info = exc.rate_limit
    if info is None:
        return None
    resets = [
        reset
        for remaining, reset in (
            (info.remaining_requests, info.reset_requests),
            (info.remaining_tokens, info.reset_tokens),
        )
        if remaining == 0 and reset is not None
    ]
    if not resets:
        return None
    return max(0.0, *resets), "rate_limit_reset"


def retry_delay(
    policy: RetryPolicy, state: RetryCallState, rng: random.Random, *, testing: bool
) -> float:
    """Seconds to sleep after ``state``'s attempt (a tenacity ``wait``): when ``policy``
    respects it, what the server said (its ``retry_after``, else the reset of the exhausted
    quota in its rate-limit headers; see :func:`server_wait`), else the policy's backoff with
    its jitter; always 0 while ``testing``. Shared by :class:`Retry` and the agents' tool and
    step retries.
    """
    exc = state.outcome.exception() if state.outcome is not None else None
    told = server_wait(exc) if policy.respect_retry_after else None
    if told is not None:
        return 0.0 if testing else told[0]
    if testing:
        return 0.0
    n = state.attempt_number  # retry number n follows attempt n
    base = policy.base_delay(n)
    if policy.jitter == "full":
        return rng.uniform(0.0, base)
    if policy.jitter == "decorrelated":
        previous = state.upcoming_sleep if n > 1 and state.upcoming_sleep else policy.initial
        return min(policy.max_delay, rng.uniform(policy.initial, max(policy.initial, previous * 3)))
    return base


class Retry(Guard):
    """Retry retryable failures with exponential backoff, within a budget and the deadline.

    Uses tenacity's ``AsyncRetrying`` sleeping with ``anyio.sleep`` (so it works on trio and
    under a mock clock). After a 429 it waits what the backend said: its ``Retry-After``, or,
    without one, until the exhausted quota its rate-limit headers report resets
    (:func:`server_wait`). A retry is not started when the retry budget is spent, when
    the backend asked (either way) for more than ``max_retry_after``, or when its wait would not
    fit in what is left of the deadline: the last error is raised at once instead. Under
    :func:`genfan.testing.set_testing` backoff is zero (and attempts capped).

    Args:
        inner: the backend to retry.
        policy: the retry policy.
        budget: a shared :class:`RetryBudget` (default: one from ``policy.budget``).
        rng: the random source for jitter (tests pass a seeded one).
    """

    def __init__(
        self,
        inner: Backend,
        policy: RetryPolicy | None = None,
        *,
        budget: RetryBudget | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(inner)
        self.policy = policy or RetryPolicy()
        if budget is None and self.policy.budget is not None:
            budget = RetryBudget(self.policy.budget)
        self.budget = budget
        self._retry_on = as_predicate(self.policy.retry_on, default_retryable)
        self._rng = rng or random.Random()
        self._calls = 0
        self._retries = 0
        self._budget_exhausted = 0
        self._deadline_stops = 0

    def statistics(self) -> RetryStatistics:
        return RetryStatistics(
            calls=self._calls,
            retries=self._retries,
            budget_exhausted=self._budget_exhausted,
            deadline_stops=self._deadline_stops,
        )

    # tenacity hooks -------------------------------------------------------------------------

    def _wait(self, state: RetryCallState) -> float:
        return retry_delay(self.policy, state, self._rng, testing=is_testing()[0])

    def _stop(self, state: RetryCallState) -> bool:
        p = self.policy
        exc = state.outcome.exception() if state.outcome is not None else None
        testing, cap = is_testing()
        attempts = p.attempts if not (testing and cap) else min(p.attempts, cap)
        if state.attempt_number >= attempts:
            return True
        told = server_wait(exc) if p.respect_retry_after else None
        if told is not None and told[0] > p.max_retry_after:
            wait, how = told
            fields: dict[str, float] = {how: wait}  # retry_after= or rate_limit_reset=
            decision(
                "retry_gave_up",
                backend=self.name,
                level="debug",
                reason=f"{how} too long",
                **fields,
            )
            return True
        sleep = state.upcoming_sleep
        left = time_left()
        if sleep >= left:
            self._deadline_stops += 1
            decision(
                "retry_gave_up", backend=self.name, reason="deadline", backoff=sleep, time_left=left
            )
            return True
        if self.budget is not None and not self.budget.try_withdraw():
            self._budget_exhausted += 1
            decision(
                "retry_budget_exhausted",
                backend=self.name,
                level="info",
                attempt=state.attempt_number,
            )
            return True
        return False

    def _before_sleep(self, state: RetryCallState) -> None:
        self._retries += 1
        exc = state.outcome.exception() if state.outcome is not None else None
        set_span_attribute("genfan.retry.attempts", state.attempt_number + 1)
        decision(
            "retry_scheduled",
            backend=self.name,
            level="info",
            attempt=state.attempt_number + 1,
            delay=state.upcoming_sleep,
            error=type(exc).__name__,
        )

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            sleep=anyio.sleep,
            stop=self._stop,
            wait=self._wait,
            retry=self._should_retry,
            before_sleep=self._before_sleep,
            reraise=True,
        )

    def _should_retry(self, state: RetryCallState) -> bool:
        outcome = state.outcome
        if outcome is None or not outcome.failed:
            return False
        exc = outcome.exception()
        if isinstance(exc, anyio.get_cancelled_exc_class()) or not isinstance(exc, Exception):
            return False
        return bool(self._retry_on(exc))

    # the backend ----------------------------------------------------------------------------

    async def complete(self, request: ChatRequest) -> Completion:
        self._calls += 1
        if self.budget is not None:
            self.budget.deposit()
        # Fast path: the first attempt runs outside tenacity (whose machinery costs more CPU
        # than the rest of the stack); only a retryable failure hands over to it.
        try:
            return await self.inner.complete(request)
        except Exception as exc:
            if not self._retry_on(exc):
                raise
            first: Exception | None = exc

        async def attempt() -> Completion:
            nonlocal first
            if first is not None:  # tenacity's attempt 1 is the one that already failed
                error, first = first, None
                raise error
            return await self.inner.complete(request)

        result: Completion = await self._retrying()(attempt)
        return result

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """Retries only until the first event: once text has been yielded it is not taken back."""
        self._calls += 1
        if self.budget is not None:
            self.budget.deposit()

        async def first_event() -> tuple[AsyncIterator[StreamEvent], StreamEvent]:
            events = self.inner.stream(request)
            try:
                return events, await events.__anext__()
            except BaseException:
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    await aclose()
                raise

        pair: tuple[AsyncIterator[StreamEvent], StreamEvent] = await self._retrying()(first_event)
        events, first = pair
        async with aclosing(events):  # type: ignore[type-var,unused-ignore]
            yield first
            async for event in events:
                yield event
