"""The guard stack of one backend, and the one place where the order of the guards is fixed."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Final

from .._backend import Backend
from .._errors import ConfigurationError
from .._types import ChatRequest, Completion, StreamEvent
from ..cost import Budget, BudgetedBackend
from ._base import Guard
from ._breaker import BreakerStatistics, CircuitBreaker
from ._bulkhead import AttemptSampler, Bulkhead, BulkheadStatistics
from ._hedge import Hedge, HedgeStatistics
from ._policies import (
    BreakerPolicy,
    BulkheadPolicy,
    HedgePolicy,
    RateLimitPolicy,
    RetryPolicy,
    TimeoutPolicy,
)
from ._ratelimit import RateLimiter, RateLimiterStatistics
from ._retry import Retry, RetryBudget, RetryStatistics
from ._shared import RedisQuota
from ._timeout import Timeout

__all__ = ["GUARD_ORDER", "GuardStatistics", "GuardedBackend", "guard"]

_BULKHEAD: Final = BulkheadPolicy()
_BREAKER: Final = BreakerPolicy()
_RETRY: Final = RetryPolicy()
_TIMEOUT: Final = TimeoutPolicy()

#: The order of the guards, outermost first. This tuple is the single source of truth;
#: `guard` builds stacks in this order and docs/resilience.md explains why.
GUARD_ORDER: Final = ("hedge", "bulkhead", "retry", "rate_limit", "breaker", "timeout")


@dataclass(frozen=True, kw_only=True, slots=True)
class GuardStatistics:
    """A snapshot of every guard of a backend (``None`` for a guard that is off)."""

    bulkhead: BulkheadStatistics | None
    breaker: BreakerStatistics | None
    retry: RetryStatistics | None
    rate_limit: RateLimiterStatistics | None
    hedge: HedgeStatistics | None


class GuardedBackend(Guard):
    """A backend inside its guard stack; built by `guard`.

    Attributes:
        provider: the unguarded backend.
        hedge, bulkhead, retry, rate_limiter, breaker, timeout: each guard, or ``None`` if off.
    """

    def __init__(
        self,
        provider: Backend,
        *,
        hedge: Hedge | None,
        bulkhead: Bulkhead | None,
        retry: Retry | None,
        rate_limiter: RateLimiter | None,
        breaker: CircuitBreaker | None,
        timeout: Timeout | None,
        outer: Backend,
        budget: BudgetedBackend | None = None,
    ) -> None:
        super().__init__(outer)
        self.provider = provider
        self.hedge = hedge
        self.bulkhead = bulkhead
        self.retry = retry
        self.rate_limiter = rate_limiter
        self.breaker = breaker
        self.timeout = timeout
        self.budget = budget

    @property
    def name(self) -> str:
        return self.provider.name

    async def complete(self, request: ChatRequest) -> Completion:
        return await self.inner.complete(request)

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        return self.inner.stream(request)

    def statistics(self) -> GuardStatistics:
        return GuardStatistics(
            bulkhead=self.bulkhead.statistics() if self.bulkhead else None,
            breaker=self.breaker.statistics() if self.breaker else None,
            retry=self.retry.statistics() if self.retry else None,
            rate_limit=self.rate_limiter.statistics() if self.rate_limiter else None,
            hedge=self.hedge.statistics() if self.hedge else None,
        )

    def __repr__(self) -> str:
        on = [n for n in GUARD_ORDER if getattr(self, "rate_limiter" if n == "rate_limit" else n)]
        return f"GuardedBackend({self.provider!r}, guards={on})"


def guard(
    backend: Backend,
    *,
    bulkhead: BulkheadPolicy | None = _BULKHEAD,
    breaker: BreakerPolicy | None = _BREAKER,
    retry: RetryPolicy | None = _RETRY,
    timeout: TimeoutPolicy | float | None = _TIMEOUT,
    hedge: HedgePolicy | None = None,
    rate_limit: RateLimitPolicy | None = None,
    hedge_alternates: Sequence[Backend] = (),
    retry_budget: RetryBudget | None = None,
    rate_limit_store: RedisQuota | None = None,
    rng: random.Random | None = None,
    budget: Budget | None = None,
    budget_scope: str = "default",
) -> GuardedBackend:
    """Wrap ``backend`` in its guard stack, in the fixed order `GUARD_ORDER`.

    Outermost first: **hedge → bulkhead → retry → rate limit → breaker → timeout** → provider.
    Bulkhead, breaker, retry (with its budget) and timeout are on by default; hedging and rate
    limits are off until given a policy (they cost extra requests or need the provider's quota).
    Pass ``None`` to turn a guard off.

    The bulkhead is the backend's one concurrency cap (1,000 running by default; the others
    queue, however many, until their deadline): providers do not cap concurrency themselves
    unless told to. ``BulkheadPolicy(max_queued=N)`` sheds what does not fit in the queue;
    ``BulkheadPolicy(adaptive="aimd")`` (or ``"gradient"``, ``"vegas"``) lets the cap adapt to
    what each attempt meets (429s, 503/529 overloads, timeouts; and latency for the latter two).

    Policies hold values only. What stacks share is passed here, once, as an object: a retry
    budget (``retry_budget``) and a shared quota store (``rate_limit_store``); give the same
    object to every stack that shares it.

    Args:
        backend: the provider backend.
        bulkhead: max concurrent calls (the backend's concurrency cap), and when to shed.
        breaker: circuit-breaker policy.
        retry: retry policy (its ``budget`` gives the values of this stack's retry budget).
        timeout: per-attempt timeout (a policy, or seconds).
        hedge: hedging policy.
        rate_limit: requests/tokens per minute.
        hedge_alternates: backends hedges go to (default: this backend again).
        retry_budget: a `RetryBudget` to spend instead of one of this stack's own;
            pass the same object to several stacks to share it.
        rate_limit_store: a shared quota store (`RedisQuota`) holding this backend's
            buckets, so that every stack, process and host with the store (and the backend's
            name) draws from one quota; pass the same object to several stacks to share one
            connection pool. Whoever made the store closes it.
        rng: the random source for retry jitter.
        budget: a spend [`Budget`][genfan.cost.Budget] charged for every call, outside the
            whole stack (a call reserves once, however many attempts and hedges it makes);
            a call that does not fit raises [`BudgetExceededError`][genfan.BudgetExceededError]
            unsent.
        budget_scope: the budget's scope this backend's calls are charged to.

    Returns:
        The guarded backend; its guards are reachable as attributes.

    Raises:
        ConfigurationError: ``retry_budget`` without a retry policy (or with
            ``RetryPolicy(budget=None)``), ``rate_limit_store`` without a rate-limit policy,
            or either of the wrong type.
    """
    if retry_budget is not None:
        if not isinstance(retry_budget, RetryBudget):
            raise ConfigurationError(
                "guard(retry_budget=...) takes a RetryBudget, made once and given to every stack"
                f" that shares it: RetryBudget(RetryBudgetPolicy(...)), not a"
                f" {type(retry_budget).__name__}"
            )
        if retry is None or retry.budget is None:
            raise ConfigurationError(
                "guard(retry_budget=...) needs a retry policy with a budget (RetryPolicy's"
                " budget is not None)"
            )
    if rate_limit_store is not None:
        if not isinstance(rate_limit_store, RedisQuota):
            raise ConfigurationError(
                "guard(rate_limit_store=...) takes a store, made once: RedisQuota(url) or"
                f" RedisQuota.from_env(var), not a {type(rate_limit_store).__name__}"
            )
        if rate_limit is None:
            raise ConfigurationError(
                "guard(rate_limit_store=...) needs a rate_limit policy (the quota to share)"
            )
    if isinstance(timeout, bool):
        timeout = _TIMEOUT if timeout else None
    elif isinstance(timeout, int | float):
        timeout = TimeoutPolicy(timeout=float(timeout))
    node: Backend = backend
    t = Timeout(node, timeout) if timeout is not None else None
    node = t or node
    # An adaptive bulkhead learns from each attempt, as the provider answered it (a 429 the
    # retry hides is still a 429; backoff and quota waits are not latency): its sampler sits
    # just outside the timeout.
    sampler = AttemptSampler(node) if bulkhead is not None and bulkhead.adaptive else None
    node = sampler or node
    b = CircuitBreaker(node, breaker) if breaker is not None else None
    node = b or node
    rl = RateLimiter(node, rate_limit) if rate_limit is not None else None
    if rl is not None and rate_limit_store is not None:
        rl._use_store(rate_limit_store)
    node = rl or node
    r = Retry(node, retry, rng=rng) if retry is not None else None
    if r is not None and retry_budget is not None:
        r._share_budget(retry_budget)
    node = r or node
    bh = Bulkhead(node, bulkhead) if bulkhead is not None else None
    if bh is not None and sampler is not None:
        sampler.feed(bh)
    node = bh or node
    h = Hedge(node, hedge, alternates=hedge_alternates) if hedge is not None else None
    node = h or node
    spend: BudgetedBackend | None = None
    if budget is not None:
        if not isinstance(budget, Budget):
            raise ConfigurationError(
                "guard(budget=...) takes a genfan.cost.Budget(limit, period=..., store=...),"
                f" not a {type(budget).__name__}"
            )
        node = spend = BudgetedBackend(node, budget, scope=budget_scope)
    return GuardedBackend(
        backend,
        hedge=h,
        bulkhead=bh,
        retry=r,
        rate_limiter=rl,
        breaker=b,
        timeout=t,
        outer=node,
        budget=spend,
    )
