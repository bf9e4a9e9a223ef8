"""Retries with tenacity: exponential backoff with jitter, Retry-After and rate-limit resets,
a budget, the deadline."""

from __future__ import annotations

import inspect
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from tenacity import AsyncRetrying, RetryCallState

from .. import telemetry
from .._backend import Backend
from .._errors import RateLimitError
from .._settings import is_testing
from .._types import ChatRequest, Completion, StreamEvent
from ._base import Guard, decision, set_span_attribute, time_left
from ._policies import RetryBudgetPolicy, RetryPolicy, as_predicate, default_retryable

T = TypeVar("T")

__all__ = ["Retrier", "Retry", "RetryBudget", "RetryStatistics"]


class RetryBudget:
    """A Finagle-style retry budget, shared by every caller of one backend.

    Each call deposits ``ratio`` of a retry; each retry withdraws one. Over the last ``ttl``
    seconds, retries may reach ``min_per_second * ttl + ratio * calls``, so an outage adds at
    most ``ratio`` extra load (plus the small floor) instead of multiplying it by the attempts.

    `guard` makes one per stack from ``RetryPolicy.budget``. To share
    one between stacks (backends behind one provider key, say), make it once and give the same
    object to each: ``guard(backend, retry_budget=budget)``.

    Args:
        policy: its values (default: ``RetryBudgetPolicy()``).
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

    A [`RateLimitError`][genfan.RateLimitError]'s ``retry_after`` (its ``Retry-After``) comes
    first: ``(seconds, "retry_after")``. Without it, its ``rate_limit``
    ([`RateLimitInfo`][genfan.RateLimitInfo]) tells when an exhausted quota refills: with
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
    quota in its rate-limit headers; see `server_wait`), else the policy's backoff with
    its jitter; always 0 while ``testing``. Shared by `Retry` and the agents' tool and
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


class Retrier:
    """The one retry engine: tenacity underneath, used by the retry guard, tool calls, chain
    steps and scheduled runs alike.

    It follows a `RetryPolicy`: attempts (capped under test mode), backoff with jitter,
    a wait the server asked for (``Retry-After`` or the reset of an exhausted quota, see
    `server_wait`), a retry budget, and what is left of the fan-out's deadline. Waits go
    through ``anyio.sleep`` (trio and mock clocks work). Cancellation and ``BaseException`` s
    are never retried.

    Args:
        policy: the retry policy.
        name: who retries (a backend, tool, step or schedule), for events.
        kind: what ``name`` names: ``"backend"``, ``"tool"``, ``"step"``, ``"schedule"``...
        retry_on: which errors to retry (default: ``policy.retry_on``, else
            ``BackendError.retryable``).
        budget: a shared `RetryBudget` (default: none; the guard passes one built from
            ``policy.budget``).
        rng: the random source for jitter (tests pass a seeded one).
        first_attempt: the number of the first attempt this engine makes, for work that resumes
            after attempts made elsewhere (a scheduled run whose replica died): it counts
            against ``policy.attempts`` and numbers the backoff.
        on_retry: called (may be async) before each wait with tenacity's state.
        on_give_up: called with a reason (``"retry_after too long"``, ``"deadline"``,
            ``"budget"``) and event fields when a retry is refused although attempts remain.

    Example:
        ```python
        retrier = Retrier(RetryPolicy(attempts=3, initial=0.1), name="fetch", kind="tool")
        result = await retrier(fetch_page, url)
        ```
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        name: str,
        kind: str = "backend",
        retry_on: Callable[[BaseException], bool] | None = None,
        budget: RetryBudget | None = None,
        rng: random.Random | None = None,
        first_attempt: int = 1,
        on_retry: Callable[[RetryCallState], Awaitable[None] | None] | None = None,
        on_give_up: Callable[..., None] | None = None,
    ) -> None:
        self.policy = policy
        self.name = name
        self.kind = kind
        self.budget = budget
        self._retry_on = retry_on or as_predicate(policy.retry_on, default_retryable)
        self._rng = rng or random.Random()
        self._offset = first_attempt - 1
        self._on_retry = on_retry
        self._on_give_up = on_give_up or self._give_up_event
        self.retries = 0
        self.budget_exhausted = 0
        self.deadline_stops = 0

    def should_retry(self, exc: BaseException) -> bool:
        """Whether ``exc`` is an error this engine retries (budget and attempts aside)."""
        if isinstance(exc, anyio.get_cancelled_exc_class()) or not isinstance(exc, Exception):
            return False
        return bool(self._retry_on(exc))

    def _give_up_event(self, reason: str, /, **fields: Any) -> None:
        telemetry.event(
            "retry_gave_up", level="debug", **{self.kind: self.name}, reason=reason, **fields
        )

    # tenacity hooks -------------------------------------------------------------------------

    def _wait(self, state: RetryCallState) -> float:
        if self._offset:
            state = _Shifted(state, self._offset)  # type: ignore[assignment]
        return retry_delay(self.policy, state, self._rng, testing=is_testing()[0])

    def _stop(self, state: RetryCallState) -> bool:
        p = self.policy
        exc = state.outcome.exception() if state.outcome is not None else None
        testing, cap = is_testing()
        attempts = p.attempts if not (testing and cap) else min(p.attempts, cap)
        if state.attempt_number + self._offset >= attempts:
            return True
        told = server_wait(exc) if p.respect_retry_after else None
        if told is not None and told[0] > p.max_retry_after:
            wait, how = told
            self._on_give_up(f"{how} too long", **{how: wait})
            return True
        sleep = state.upcoming_sleep
        left = time_left()
        if sleep >= left:
            self.deadline_stops += 1
            self._on_give_up("deadline", backoff=sleep, time_left=left)
            return True
        if self.budget is not None and not self.budget.try_withdraw():
            self.budget_exhausted += 1
            self._on_give_up("budget", attempt=state.attempt_number)
            return True
        return False

    async def _before_sleep(self, state: RetryCallState) -> None:
        self.retries += 1
        if self._on_retry is not None:
            result = self._on_retry(state)
            if inspect.isawaitable(result):
                await result

    def _retry(self, state: RetryCallState) -> bool:
        outcome = state.outcome
        if outcome is None or not outcome.failed:
            return False
        exc = outcome.exception()
        return exc is not None and self.should_retry(exc)

    def retrying(self) -> AsyncRetrying:
        """A tenacity ``AsyncRetrying`` that follows this engine (call it with a coroutine
        function, or iterate it)."""
        return AsyncRetrying(
            sleep=anyio.sleep,
            stop=self._stop,
            wait=self._wait,
            retry=self._retry,
            before_sleep=self._before_sleep,
            reraise=True,
        )

    async def __call__(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """Run ``await fn(*args, **kwargs)``, retrying as the policy says; the last error is
        raised when it gives up."""
        result: T = await self.retrying()(fn, *args, **kwargs)
        return result


class _Shifted:
    """A tenacity state seen ``offset`` attempts later (for backoff numbering)."""

    def __init__(self, state: RetryCallState, offset: int) -> None:
        self._state = state
        self.attempt_number = state.attempt_number + offset

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


class Retry(Guard):
    """Retry retryable failures with exponential backoff, within a budget and the deadline.

    A guard around the `Retrier` engine. After a 429 it waits what the backend said: its
    ``Retry-After``, or, without one, until the exhausted quota its rate-limit headers report
    resets (`server_wait`). A retry is not started when the retry budget is spent, when
    the backend asked (either way) for more than ``max_retry_after``, or when its wait would not
    fit in what is left of the deadline: the last error is raised at once instead. Under
    [`set_testing`][genfan.testing.set_testing] backoff is zero (and attempts capped).

    The guard has a `RetryBudget` of its own, made from ``policy.budget``; stacks share
    one when `guard` is given it (``retry_budget=``).

    Args:
        inner: the backend to retry.
        policy: the retry policy.
        rng: the random source for jitter (tests pass a seeded one).
    """

    def __init__(
        self,
        inner: Backend,
        policy: RetryPolicy | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(inner)
        self.policy = policy or RetryPolicy()
        budget = RetryBudget(self.policy.budget) if self.policy.budget is not None else None
        #: The retry budget this guard spends (``None``: unlimited retries).
        self.budget = budget
        self._engine = Retrier(
            self.policy,
            name=self.name,
            budget=budget,
            rng=rng,
            on_retry=self._before_sleep,
            on_give_up=self._gave_up,
        )
        self._calls = 0

    def _share_budget(self, budget: RetryBudget) -> None:
        """Spend ``budget`` instead of this guard's own (set by
        `guard` only)."""
        self.budget = self._engine.budget = budget

    def statistics(self) -> RetryStatistics:
        e = self._engine
        return RetryStatistics(
            calls=self._calls,
            retries=e.retries,
            budget_exhausted=e.budget_exhausted,
            deadline_stops=e.deadline_stops,
        )

    def _gave_up(self, reason: str, /, **fields: Any) -> None:
        if reason == "budget":
            decision("retry_budget_exhausted", backend=self.name, level="info", **fields)
        elif reason == "deadline":
            decision("retry_gave_up", backend=self.name, reason=reason, **fields)
        else:
            decision("retry_gave_up", backend=self.name, level="debug", reason=reason, **fields)

    def _before_sleep(self, state: RetryCallState) -> None:
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
        return self._engine.retrying()

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
            if not self._engine.should_retry(exc):
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
