"""Hedged requests (The Tail at Scale): a second request when the first is slow."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import anyio
import anyio.abc

from ..backend import Backend
from ..errors import BackendError
from ..types import ChatRequest, Completion, StreamEvent
from ._base import Guard, decision, metrics, set_span_attribute, time_left
from ._policies import HedgePolicy, RetryBudgetPolicy
from ._retry import RetryBudget

__all__ = ["Hedge", "HedgeStatistics", "LatencyTracker"]


class LatencyTracker:
    """Recent latencies of one backend and a cached percentile of them."""

    __slots__ = ("_cache", "_dirty", "_samples")

    def __init__(self, window: int) -> None:
        self._samples: deque[float] = deque(maxlen=window)
        self._cache: dict[float, float] = {}
        self._dirty = 0

    def add(self, latency: float) -> None:
        self._samples.append(latency)
        self._dirty += 1
        # Re-sorting on every call would cost O(n log n) per call; refresh every 16 samples.
        if self._dirty >= 16 or len(self._samples) < 64:
            self._cache.clear()
            self._dirty = 0

    def __len__(self) -> int:
        return len(self._samples)

    def percentile(self, q: float) -> float:
        """The ``q`` quantile (nearest rank) of the recent latencies; ``nan`` when empty."""
        if not self._samples:
            return math.nan
        cached = self._cache.get(q)
        if cached is None:
            ordered = sorted(self._samples)
            rank = max(0, math.ceil(q * len(ordered)) - 1)
            cached = self._cache[q] = ordered[rank]
        return cached


@dataclass(frozen=True, kw_only=True, slots=True)
class HedgeStatistics:
    """What hedging cost and what it won.

    Attributes:
        calls: calls made through the guard (one primary request each).
        hedges_sent: extra requests sent.
        hedge_wins: calls answered by a hedge.
        primary_wins: calls answered by the primary request.
        budget_refused: hedges not sent because the extra-load budget was spent.
        delay: the hedge delay in force now (``None`` while still learning).
    """

    calls: int
    hedges_sent: int
    hedge_wins: int
    primary_wins: int
    budget_refused: int
    delay: float | None

    @property
    def extra_ratio(self) -> float:
        """Extra requests per call (0.05: 5% more requests than without hedging)."""
        return self.hedges_sent / self.calls if self.calls else 0.0


class Hedge(Guard):
    """Send the request again (to an alternate, or the same backend) when it is slow.

    After ``delay`` (fixed, or the learned ``percentile`` of recent latencies) without an answer,
    a hedge is sent; up to ``max_hedges`` of them, one ``delay`` apart. The first good answer
    wins and the others are cancelled. A failed attempt starts the next hedge at once (if any
    remain). Hedges are spent from a budget of ``max_extra_ratio`` of calls, and none is started
    when the deadline leaves less than the backend's median latency. Streams are not hedged.

    Args:
        inner: the primary backend.
        policy: the hedge policy.
        alternates: backends for hedges, used in turn (default: the primary itself).
    """

    def __init__(
        self,
        inner: Backend,
        policy: HedgePolicy | None = None,
        *,
        alternates: Sequence[Backend] = (),
    ) -> None:
        super().__init__(inner)
        self.policy = policy or HedgePolicy()
        self.alternates = tuple(alternates)
        self.latencies = LatencyTracker(self.policy.window)
        self.budget = RetryBudget(
            RetryBudgetPolicy(
                ratio=self.policy.max_extra_ratio, min_per_second=0.0, ttl=self.policy.budget_ttl
            )
        )
        self._calls = 0
        self._hedges = 0
        self._hedge_wins = 0
        self._primary_wins = 0
        self._refused = 0

    def current_delay(self) -> float | None:
        """The delay before a hedge now (``None``: not hedging yet, still learning)."""
        if self.policy.delay is not None:
            return self.policy.delay
        if len(self.latencies) < self.policy.min_samples:
            return None
        return self.latencies.percentile(self.policy.percentile)

    def statistics(self) -> HedgeStatistics:
        return HedgeStatistics(
            calls=self._calls,
            hedges_sent=self._hedges,
            hedge_wins=self._hedge_wins,
            primary_wins=self._primary_wins,
            budget_refused=self._refused,
            delay=self.current_delay(),
        )

    def _target(self, attempt: int) -> Backend:
        if attempt == 0 or not self.alternates:
            return self.inner
        return self.alternates[(attempt - 1) % len(self.alternates)]

    def _may_hedge(self, attempt: int) -> bool:
        left = time_left()
        if left != math.inf and len(self.latencies) and left <= self.latencies.percentile(0.5):
            decision("hedge_skipped", backend=self.name, reason="deadline", time_left=left)
            return False
        if not self.budget.try_withdraw():
            self._refused += 1
            decision("hedge_skipped", backend=self.name, reason="budget", attempt=attempt)
            return False
        return True

    async def complete(self, request: ChatRequest) -> Completion:
        self._calls += 1
        self.budget.deposit()
        delay = self.current_delay()
        if delay is None:
            start = anyio.current_time()
            completion = await self.inner.complete(request)
            self.latencies.add(anyio.current_time() - start)
            self._primary_wins += 1
            return completion
        return await self._race(request, delay)

    async def _race(self, request: ChatRequest, delay: float) -> Completion:
        max_attempts = 1 + self.policy.max_hedges
        outcomes: deque[tuple[int, float, Completion | BaseException]] = deque()
        arrived = [anyio.Event()]
        starts: list[float] = []
        errors: list[BaseException] = []
        finished: set[int] = set()
        winner: tuple[int, Completion] | None = None

        async def attempt(i: int, backend: Backend) -> None:
            start = anyio.current_time()
            try:
                outcome: Completion | BaseException = await backend.complete(request)
            except Exception as exc:
                outcome = exc
            outcomes.append((i, anyio.current_time() - start, outcome))
            arrived[0].set()

        def launch(tg: anyio.abc.TaskGroup) -> None:
            i = len(starts)
            starts.append(anyio.current_time())
            backend = self._target(i)
            if i:
                self._hedges += 1
                set_span_attribute("genfan.hedge.sent", i)
                metrics().hedges.add(1, self._attrs)
                decision("hedge_sent", backend=self.name, attempt=i, to=backend.name, delay=delay)
            tg.start_soon(attempt, i, backend)

        async with anyio.create_task_group() as tg:
            launch(tg)
            pending = 1
            hedging = True
            while pending and winner is None:
                if not outcomes:
                    if hedging and len(starts) < max_attempts:
                        with anyio.move_on_after(starts[-1] + delay - anyio.current_time()):
                            await arrived[0].wait()
                    else:
                        await arrived[0].wait()
                if not outcomes:
                    # The delay passed without an answer: hedge, if allowed.
                    if self._may_hedge(len(starts)):
                        launch(tg)
                        pending += 1
                    else:
                        hedging = False
                    continue
                arrived[0] = anyio.Event()
                while outcomes:
                    i, latency, outcome = outcomes.popleft()
                    pending -= 1
                    finished.add(i)
                    self.latencies.add(latency)
                    if isinstance(outcome, Completion):
                        winner = (i, outcome)
                        break
                    errors.append(outcome)
                    retryable = isinstance(outcome, BackendError) and outcome.retryable
                    if (
                        hedging
                        and retryable
                        and len(starts) < max_attempts
                        and self._may_hedge(len(starts))
                    ):
                        launch(tg)
                        pending += 1
            if pending:
                now = anyio.current_time()
                for j, started in enumerate(starts):
                    if j not in finished:
                        # A loser is cancelled: its elapsed time is a lower bound of its latency.
                        self.latencies.add(now - started)
                tg.cancel_scope.cancel()
        if winner is not None:
            i, completion = winner
            if i:
                self._hedge_wins += 1
                set_span_attribute("genfan.hedge.winner", i)
                decision("hedge_won", backend=self.name, attempt=i)
            else:
                self._primary_wins += 1
            return completion
        raise errors[-1]

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        return self.inner.stream(request)
