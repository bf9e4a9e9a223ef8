"""Local rate limits: token buckets for requests and tokens per minute, learning vendor quota."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import anyio
import anyio.lowlevel

from ..backend import Backend
from ..errors import HTTPStatusError, RateLimitError, RateLimitExceededError
from ..types import ChatRequest, Completion, RateLimitInfo, StreamEnd, StreamEvent
from ._base import NOT_SENT, Guard, decision, metrics, set_span_attribute, time_left
from ._policies import RateLimitPolicy

__all__ = ["RateLimiter", "RateLimiterStatistics", "TokenBucket"]


class TokenBucket:
    """A token bucket that may go into debt: reservations are served in order (FIFO), each
    waiting until the bucket would have refilled past it.

    Args:
        capacity: the most tokens it holds (the burst).
        per_second: refill rate.
    """

    __slots__ = ("capacity", "level", "per_second", "updated")

    def __init__(self, capacity: float, per_second: float) -> None:
        self.capacity = capacity
        self.per_second = per_second
        self.level = capacity
        self.updated = -math.inf

    def _refill(self, now: float) -> None:
        if self.updated == -math.inf:
            self.updated = now
            return
        self.level = min(self.capacity, self.level + (now - self.updated) * self.per_second)
        self.updated = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` could be taken (without taking it)."""
        self._refill(now)
        amount = min(amount, self.capacity)  # a request bigger than the bucket waits for a full one
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / self.per_second

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= min(amount, self.capacity)

    def give(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)

    def cap(self, remaining: float, now: float) -> None:
        """Adopt a lower level the provider reported."""
        self._refill(now)
        self.level = min(self.level, remaining)


@dataclass(frozen=True, kw_only=True, slots=True)
class RateLimiterStatistics:
    """Rate-limit decisions so far.

    Attributes:
        admitted: calls let through.
        waited: calls that waited for quota.
        rejected: calls refused (reject mode, or the wait would pass ``max_wait``/the deadline).
        wait_time: total seconds spent waiting.
        blocked_until: the time until which the provider asked us to stop (``None``: not blocked).
    """

    admitted: int
    waited: int
    rejected: int
    wait_time: float
    blocked_until: float | None


def estimate_tokens(request: ChatRequest, default_output: int) -> int:
    """A cheap upper-ish estimate of a request's tokens: ~4 characters a token, plus output."""
    chars = sum(len(m.content or "") for m in request.messages)
    return chars // 4 + 1 + (request.max_tokens or default_output)


class RateLimiter(Guard):
    """Requests- and tokens-per-minute limits for one backend (token buckets).

    In ``wait`` mode a call waits its turn (FIFO) for quota, unless the wait would pass
    ``max_wait`` or the deadline, in which case it fails at once with
    :class:`~genfan.errors.RateLimitExceededError` (``retry_after`` says when quota is back);
    ``reject`` mode fails at once whenever quota is short.

    With ``learn`` on, the limiter adopts the quota the provider reports: ``remaining_*`` in the
    :class:`~genfan.types.RateLimitInfo` of a completion or of an error
    (:class:`~genfan.errors.HTTPStatusError`'s ``rate_limit``, a 429's included) lowers the
    buckets (and a zero stops calls until the matching ``reset_*``), and a
    :class:`~genfan.errors.RateLimitError` with ``retry_after`` stops every call to the backend
    for that long (the longer of the two wins). Token use is estimated before the call and
    corrected from the completion's usage afterwards. Quota taken by a call that a guard inside
    refused (it never reached the backend) is given back.
    """

    def __init__(self, inner: Backend, policy: RateLimitPolicy | None = None) -> None:
        super().__init__(inner)
        self.policy = p = policy or RateLimitPolicy()
        self.requests = (
            TokenBucket(p.burst_requests or p.requests_per_minute, p.requests_per_minute / 60.0)
            if p.requests_per_minute
            else None
        )
        self.tokens = (
            TokenBucket(p.burst_tokens or p.tokens_per_minute, p.tokens_per_minute / 60.0)
            if p.tokens_per_minute
            else None
        )
        self._blocked_until = -math.inf
        self._admitted = 0
        self._waited = 0
        self._rejected = 0
        self._wait_time = 0.0

    def statistics(self) -> RateLimiterStatistics:
        now = anyio.current_time()
        return RateLimiterStatistics(
            admitted=self._admitted,
            waited=self._waited,
            rejected=self._rejected,
            wait_time=self._wait_time,
            blocked_until=self._blocked_until if self._blocked_until > now else None,
        )

    def block_for(self, seconds: float) -> None:
        """Stop every call for ``seconds`` (the provider said so)."""
        self._blocked_until = max(self._blocked_until, anyio.current_time() + seconds)

    async def acquire(self, tokens: int) -> None:
        """Take one request and ``tokens`` tokens, waiting (FIFO) if the policy allows.

        Raises:
            RateLimitExceededError: not enough quota, and no time (or leave) to wait for it.
        """
        now = anyio.current_time()
        wait = max(0.0, self._blocked_until - now)
        if self.requests is not None:
            wait = max(wait, self.requests.wait_for(1, now))
        if self.tokens is not None:
            wait = max(wait, self.tokens.wait_for(tokens, now))
        if wait > 0:
            p = self.policy
            limit = min(math.inf if p.max_wait is None else p.max_wait, time_left())
            if p.mode == "reject" or wait > limit:
                await anyio.lowlevel.checkpoint_if_cancelled()  # cancelled: say so
                self._rejected += 1
                reason = "reject mode" if p.mode == "reject" else "wait longer than allowed"
                decision(
                    "rate_limit_rejected",
                    backend=self.name,
                    level="info",
                    reason=reason,
                    retry_after=wait,
                )
                raise RateLimitExceededError(
                    f"local rate limit: quota back in {wait:.3f}s ({reason})",
                    backend=self.name,
                    retry_after=wait,
                )
        # Reserve now (the bucket may go into debt) so that waiters are served in order.
        if self.requests is not None:
            self.requests.take(1, now)
        if self.tokens is not None:
            self.tokens.take(tokens, now)
        if wait > 0:
            self._waited += 1
            set_span_attribute("genfan.rate_limit.wait", wait)
            decision("rate_limit_wait", backend=self.name, wait=wait)
            metrics().rate_limit_wait.record(wait, {"genfan.backend": self.name})
            try:
                await anyio.sleep(wait)
            except BaseException:
                self._give_back(tokens)
                raise
            self._wait_time += wait
        self._admitted += 1

    def _give_back(self, tokens: int) -> None:
        if self.requests is not None:
            self.requests.give(1)
        if self.tokens is not None:
            self.tokens.give(tokens)

    def learn(self, info: RateLimitInfo | None, *, estimated: int, used: int | None) -> None:
        """Adopt what the provider reported after a call."""
        now = anyio.current_time()
        if self.tokens is not None and used is not None:
            # Correct the estimate with the real usage (a refund when we over-estimated).
            self.tokens.level -= used - estimated
        if info is None or not self.policy.learn:
            return
        for bucket, remaining, reset in (
            (self.requests, info.remaining_requests, info.reset_requests),
            (self.tokens, info.remaining_tokens, info.reset_tokens),
        ):
            if remaining is None:
                continue
            if bucket is not None:
                bucket.cap(remaining, now)
            if remaining <= 0 and reset:
                self.block_for(reset)
                decision(
                    "rate_limit_learned",
                    backend=self.name,
                    level="info",
                    remaining=remaining,
                    blocked_for=reset,
                )

    def _failed(self, exc: BaseException, tokens: int) -> None:
        if isinstance(exc, NOT_SENT):
            self._give_back(tokens)
            return
        if isinstance(exc, HTTPStatusError) and exc.rate_limit is not None:
            # The error response's headers report quota just as a completion's do.
            self.learn(exc.rate_limit, estimated=tokens, used=None)
        if isinstance(exc, RateLimitError) and exc.retry_after is not None and self.policy.learn:
            self.block_for(exc.retry_after)
            decision(
                "rate_limit_learned", backend=self.name, level="info", blocked_for=exc.retry_after
            )

    async def complete(self, request: ChatRequest) -> Completion:
        tokens = estimate_tokens(request, self.policy.default_output_tokens)
        await self.acquire(tokens)
        try:
            completion = await self.inner.complete(request)
        except Exception as exc:
            self._failed(exc, tokens)
            raise
        self.learn(
            completion.rate_limit, estimated=tokens, used=completion.usage.total_tokens or None
        )
        return completion

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        tokens = estimate_tokens(request, self.policy.default_output_tokens)
        await self.acquire(tokens)
        try:
            async with aclosing(self.inner.stream(request)) as events:  # type: ignore[type-var]
                async for event in events:
                    if isinstance(event, StreamEnd):
                        c = event.completion
                        self.learn(
                            c.rate_limit, estimated=tokens, used=c.usage.total_tokens or None
                        )
                    yield event
        except Exception as exc:
            self._failed(exc, tokens)
            raise
