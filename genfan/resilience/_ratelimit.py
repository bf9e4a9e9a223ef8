"""Rate limits: token buckets for requests and tokens per minute, learning vendor quota; kept in
this process, or shared by processes and hosts through Redis (`RedisQuota`)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import anyio
import anyio.lowlevel

from .._backend import Backend
from .._errors import (
    BackendConnectionError,
    HTTPStatusError,
    RateLimitError,
    RateLimitExceededError,
)
from .._types import ChatRequest, Completion, RateLimitInfo, StreamEnd, StreamEvent
from ._base import NOT_SENT, Guard, decision, metrics, set_span_attribute, time_left
from ._policies import RateLimitPolicy
from ._shared import BucketSpec, Grant, RedisQuota, SharedQuotaError

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
        shared_fallbacks: calls decided with this process's buckets because the shared store
            could not be used (``on_store_error="local"``).
    """

    admitted: int
    waited: int
    rejected: int
    wait_time: float
    blocked_until: float | None
    shared_fallbacks: int = 0


def estimate_tokens(request: ChatRequest, default_output: int) -> int:
    """A cheap upper-ish estimate of a request's tokens: ~4 characters a token, plus output."""
    chars = sum(len(m.content or "") for m in request.messages)
    return chars // 4 + 1 + (request.max_tokens or default_output)


class RateLimiter(Guard):
    """Requests- and tokens-per-minute limits for one backend (token buckets).

    In ``wait`` mode a call waits its turn (FIFO) for quota, unless the wait would pass
    ``max_wait`` or the deadline, in which case it fails at once with
    [`RateLimitExceededError`][genfan.RateLimitExceededError] (``retry_after`` says when quota is back);
    ``reject`` mode fails at once whenever quota is short.

    With ``learn`` on, the limiter adopts the quota the provider reports: ``remaining_*`` in the
    [`RateLimitInfo`][genfan.RateLimitInfo] of a completion or of an error
    ([`HTTPStatusError`][genfan.HTTPStatusError]'s ``rate_limit``, a 429's included) lowers the
    buckets (and a zero stops calls until the matching ``reset_*``), and a
    [`RateLimitError`][genfan.RateLimitError] with ``retry_after`` stops every call to the backend
    for that long (the longer of the two wins). Token use is estimated before the call and
    corrected from the completion's usage afterwards. Quota taken by a call that a guard inside
    refused (it never reached the backend) is given back.

    With a shared quota store (given to `guard` as
    ``rate_limit_store``, the one way to share a quota) the buckets live in Redis, and every
    limiter with the same store and backend name, in any process or on any host, draws from
    them: reservations, waits, give-backs and what is learned from the provider all hold across
    processes. This limiter's own buckets then mirror the shared ones, and decide alone while
    the store cannot be used (policy ``on_store_error``).

    Args:
        inner: the backend to limit.
        policy: the limits (default: none, only learning).
        max_block: the longest, in seconds, that what a provider reported (``Retry-After``, a
            quota reset) stops calls; a longer wait is cut to it, so a ``Retry-After`` dated
            2099 cannot stop a backend for good.
    """

    def __init__(
        self, inner: Backend, policy: RateLimitPolicy | None = None, *, max_block: float = 3600.0
    ) -> None:
        super().__init__(inner)
        self.max_block = max_block
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
        #: The shared quota store, or ``None`` (this process's buckets only).
        self.store: RedisQuota | None = None
        self._holds_store = False
        self._shared_failing = False
        self._blocked_until = -math.inf
        self._admitted = 0
        self._waited = 0
        self._rejected = 0
        self._wait_time = 0.0
        self._fallbacks = 0

    def _use_store(self, store: RedisQuota, *, hold: bool = False) -> None:
        """Draw from ``store`` (set by `guard` only). With ``hold``,
        this limiter is one of the store's holders, and its `aclose` releases it (the
        last holder closes it); otherwise whoever made the store closes it."""
        self.store = store
        if hold:
            store._hold()
            self._holds_store = True

    def statistics(self) -> RateLimiterStatistics:
        now = anyio.current_time()
        return RateLimiterStatistics(
            admitted=self._admitted,
            waited=self._waited,
            rejected=self._rejected,
            wait_time=self._wait_time,
            blocked_until=self._blocked_until if self._blocked_until > now else None,
            shared_fallbacks=self._fallbacks,
        )

    def block_for(self, seconds: float) -> None:
        """Stop every call through this limiter for ``seconds`` (the provider said so).

        This process only; the limiter itself also shares what it learns with a shared store.
        At most `max_block` seconds.
        """
        if seconds > 0:  # not NaN
            seconds = min(seconds, self.max_block)
            self._blocked_until = max(self._blocked_until, anyio.current_time() + seconds)

    async def acquire(self, tokens: int) -> None:
        """Take one request and ``tokens`` tokens, waiting (FIFO) if the policy allows.

        Raises:
            RateLimitExceededError: not enough quota, and no time (or leave) to wait for it.
            BackendConnectionError: the shared store cannot be used and ``on_store_error`` is
                ``"raise"``.
        """
        p = self.policy
        limit = (
            0.0
            if p.mode == "reject"
            else min(math.inf if p.max_wait is None else p.max_wait, time_left())
        )
        grant = await self._shared_acquire(tokens, limit) if self.store is not None else None
        now = anyio.current_time()
        if grant is None:
            wait = max(0.0, self._blocked_until - now)
            if self.requests is not None:
                wait = max(wait, self.requests.wait_for(1, now))
            if self.tokens is not None:
                wait = max(wait, self.tokens.wait_for(tokens, now))
            refused = wait > 0 and wait > limit
        else:
            wait, refused = grant.wait, not grant.admitted
        if refused:
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
            kind = "local" if grant is None else "shared"
            raise RateLimitExceededError(
                f"{kind} rate limit: quota back in {wait:.3f}s ({reason})",
                backend=self.name,
                retry_after=wait,
            )
        if grant is None:
            # Reserve now (the bucket may go into debt) so that waiters are served in order.
            # (The shared store reserved already.)
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
                if grant is not None:
                    with anyio.CancelScope(shield=True):  # bounded by the store's timeout
                        await self._shared_update(requests=1, tokens=tokens)
                raise
            self._wait_time += wait
        self._admitted += 1

    def _give_back(self, tokens: int) -> None:
        if self.requests is not None:
            self.requests.give(1)
        if self.tokens is not None:
            self.tokens.give(tokens)

    def learn(self, info: RateLimitInfo | None, *, estimated: int, used: int | None) -> None:
        """Adopt what the provider reported after a call (in this process's buckets)."""
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
                    blocked_for=min(reset, self.max_block),
                )

    async def _learned(
        self,
        info: RateLimitInfo | None,
        *,
        estimated: int,
        used: int | None,
        retry_after: float | None = None,
    ) -> None:
        """Adopt what the provider reported, here and in the shared store."""
        self.learn(info, estimated=estimated, used=used)
        learn = self.policy.learn
        if retry_after is not None and learn:
            retry_after = min(retry_after, self.max_block)
            self.block_for(retry_after)
            decision("rate_limit_learned", backend=self.name, level="info", blocked_for=retry_after)
        if self.store is None:
            return
        remaining: tuple[float | None, float | None] = (None, None)
        block = retry_after if retry_after is not None and learn else 0.0
        if info is not None and learn:
            remaining = (info.remaining_requests, info.remaining_tokens)
            for left, reset in (
                (info.remaining_requests, info.reset_requests),
                (info.remaining_tokens, info.reset_tokens),
            ):
                if left is not None and left <= 0 and reset:
                    block = max(block, min(reset, self.max_block))
        await self._shared_update(
            tokens=estimated - used if used is not None else 0,
            remaining=remaining,
            block=block,
        )

    async def _failed(self, exc: BaseException, tokens: int) -> None:
        if isinstance(exc, NOT_SENT):
            self._give_back(tokens)
            if self.store is not None:
                await self._shared_update(requests=1, tokens=tokens)
            return
        # The error response's headers report quota just as a completion's do.
        await self._learned(
            exc.rate_limit if isinstance(exc, HTTPStatusError) else None,
            estimated=tokens,
            used=None,
            retry_after=exc.retry_after if isinstance(exc, RateLimitError) else None,
        )

    # -- the shared store ----------------------------------------------------------------------

    def _specs(
        self,
        requests: float,
        tokens: float,
        remaining: tuple[float | None, float | None] = (None, None),
    ) -> tuple[BucketSpec | None, BucketSpec | None]:
        specs: list[BucketSpec | None] = []
        for bucket, amount, left in (
            (self.requests, requests, remaining[0]),
            (self.tokens, tokens, remaining[1]),
        ):
            specs.append(
                BucketSpec(bucket.capacity, bucket.per_second, amount, left)
                if bucket is not None
                else None
            )
        return specs[0], specs[1]

    async def _shared_acquire(self, tokens: int, limit: float) -> Grant | None:
        """Reserve in the shared store; ``None`` when it failed and the policy says decide
        locally."""
        assert self.store is not None
        requests, token_spec = self._specs(1, tokens)
        own_block = max(0.0, self._blocked_until - anyio.current_time())
        try:
            grant = await self.store._acquire(
                self.name, requests=requests, tokens=token_spec, limit=limit, min_wait=own_block
            )
        except SharedQuotaError as exc:
            self._shared_failed(exc)
            if self.policy.on_store_error == "raise":
                raise BackendConnectionError(
                    f"the shared rate limit cannot be checked: {exc}", backend=self.name
                ) from exc
            self._fallbacks += 1
            return None
        self._mirror(grant)
        return grant

    async def _shared_update(
        self,
        *,
        requests: float = 0,
        tokens: float = 0,
        remaining: tuple[float | None, float | None] = (None, None),
        block: float = 0.0,
    ) -> None:
        """Give back, correct or learn in the shared store; a failure is logged, never raised
        (the call it follows is done)."""
        assert self.store is not None
        r, t = self._specs(requests, tokens, remaining)
        r = r if r is not None and (r.amount or r.remaining is not None) else None
        t = t if t is not None and (t.amount or t.remaining is not None) else None
        if r is None and t is None and not block > 0:
            return
        try:
            grant = await self.store._update(self.name, requests=r, tokens=t, block=block)
        except SharedQuotaError as exc:
            self._shared_failed(exc)
            return
        self._mirror(grant)

    def _mirror(self, grant: Grant) -> None:
        """This process's buckets follow the shared ones (so a fallback starts from them)."""
        now = anyio.current_time()
        if self._shared_failing:
            self._shared_failing = False
            decision("rate_limit_shared_restored", backend=self.name, level="info")
        for bucket, level in ((self.requests, grant.requests), (self.tokens, grant.tokens)):
            if bucket is not None and level is not None:
                bucket.level, bucket.updated = level, now
        if grant.blocked > 0:
            self._blocked_until = max(self._blocked_until, now + grant.blocked)

    def _shared_failed(self, exc: SharedQuotaError) -> None:
        if not self._shared_failing:  # once per outage
            self._shared_failing = True
            decision(
                "rate_limit_shared_unavailable",
                backend=self.name,
                level="warning",
                error=str(exc),
                fallback=self.policy.on_store_error,
            )

    # -- the backend ---------------------------------------------------------------------------

    async def complete(self, request: ChatRequest) -> Completion:
        tokens = estimate_tokens(request, self.policy.default_output_tokens)
        await self.acquire(tokens)
        try:
            completion = await self.inner.complete(request)
        except Exception as exc:
            await self._failed(exc, tokens)
            raise
        await self._learned(
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
                        await self._learned(
                            c.rate_limit, estimated=tokens, used=c.usage.total_tokens or None
                        )
                    yield event
        except Exception as exc:
            await self._failed(exc, tokens)
            raise

    async def aclose(self) -> None:
        try:
            if self._holds_store and self.store is not None:
                self._holds_store = False
                await self.store._release()
        finally:
            await self.inner.aclose()
