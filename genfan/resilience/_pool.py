"""Load-balanced pools: replicas presented as one backend."""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Literal, TypeAlias

import anyio

from .._backend import AsyncCloseable, Backend, aclose_all
from .._errors import CircuitOpenError, ConfigurationError
from .._types import ChatRequest, Completion, StreamEnd, StreamEvent
from ._base import NOT_SENT, decision, tried_replicas
from ._breaker import CircuitBreaker

__all__ = ["Pool", "PoolStrategy", "ReplicaStatistics", "find_breaker"]

PoolStrategy: TypeAlias = Literal["round_robin", "weighted", "least_outstanding", "p2c_peak_ewma"]
_STRATEGIES = ("round_robin", "weighted", "least_outstanding", "p2c_peak_ewma")
_PENALTY = 1e9  # the cost of a replica with no history that already has a request pending


def find_breaker(backend: Backend) -> CircuitBreaker | None:
    """The circuit breaker guarding ``backend`` (looking through guard wrappers), if any."""
    seen = 0
    node: object = backend
    while node is not None and seen < 32:
        if isinstance(node, CircuitBreaker):
            return node
        breaker = getattr(node, "breaker", None)
        if isinstance(breaker, CircuitBreaker):
            return breaker
        node = getattr(node, "inner", None)
        seen += 1
    return None


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplicaStatistics:
    """One replica of a pool.

    Attributes:
        name: the replica's name.
        calls: calls routed to it.
        outstanding: calls in flight now.
        ewma: its peak-EWMA latency in seconds (``None``: no history yet).
        skipped: times it was passed over because its breaker was open.
    """

    name: str
    calls: int
    outstanding: int
    ewma: float | None
    skipped: int


class _Replica:
    __slots__ = (
        "backend",
        "breaker",
        "calls",
        "current",
        "ewma",
        "outstanding",
        "skipped",
        "stamp",
        "weight",
    )

    def __init__(self, backend: Backend, weight: float) -> None:
        self.backend = backend
        self.breaker = find_breaker(backend)
        self.weight = weight
        self.current = 0.0  # smooth weighted round robin
        self.outstanding = 0
        self.calls = 0
        self.skipped = 0
        self.ewma: float | None = None
        self.stamp = 0.0

    def healthy(self) -> bool:
        return self.breaker is None or self.breaker.available()

    def cost(self) -> float:
        if self.ewma is None:
            # Finagle: a replica with no history is probed (cost 0), not flooded (penalty).
            return _PENALTY if self.outstanding else 0.0
        return self.ewma * (self.outstanding + 1)

    def observe(self, rtt: float, now: float, decay: float) -> None:
        if self.ewma is None or rtt > self.ewma:
            self.ewma = rtt  # peak: jump up at once
        else:
            w = math.exp(-(now - self.stamp) / decay)
            self.ewma = self.ewma * w + rtt * (1.0 - w)
        self.stamp = now


class Pool(AsyncCloseable):
    """Replicas of one model presented as one backend, balanced by ``strategy``.

    * ``round_robin``: in turn.
    * ``weighted``: in proportion to ``weights`` (smooth weighted round robin, as nginx).
    * ``least_outstanding``: the replica with the fewest calls in flight (ties: random).
    * ``p2c_peak_ewma`` (Finagle, Linkerd): pick two at random and send to the lower
      ``ewma_rtt x (outstanding + 1)``; the EWMA jumps up to a slow answer at once and decays
      over ``decay`` seconds. A replica with no history is probed once, not flooded. A replica
      twice as slow gets about half the load. Failures count as twice the replica's latency.

    Replicas whose circuit breaker is open are skipped (found through their guard stack).
    If the chosen replica refuses the call without sending it (breaker, bulkhead, rate limit),
    the next best is tried. When every replica is open, [`CircuitOpenError`][genfan.CircuitOpenError]
    is raised with the earliest ``retry_at``.

    Args:
        replicas: the replicas (usually each with its own guard stack).
        strategy: the balancing strategy.
        weights: per-replica weights for ``weighted``.
        name: the pool's name (default ``"pool(a,b,...)"``).
        decay: seconds over which peak-EWMA forgets.
        rng: the random source (tests pass a seeded one).
        owns_backends: closing the pool also closes the replicas (for replicas made for this
            pool alone, as a config's ``type = "pool"`` does). By default it closes none:
            whoever creates a backend owns it.
    """

    def __init__(
        self,
        replicas: Sequence[Backend],
        *,
        strategy: PoolStrategy = "p2c_peak_ewma",
        weights: Sequence[float] | None = None,
        name: str | None = None,
        decay: float = 10.0,
        rng: random.Random | None = None,
        owns_backends: bool = False,
    ) -> None:
        if not replicas:
            raise ConfigurationError("Pool needs at least one replica")
        if strategy not in _STRATEGIES:
            raise ConfigurationError(
                f"Pool.strategy must be one of {_STRATEGIES}, got {strategy!r}"
            )
        if weights is not None:
            if len(weights) != len(replicas) or any(
                not (isinstance(w, int | float) and w > 0 and math.isfinite(w)) for w in weights
            ):
                raise ConfigurationError(
                    f"Pool.weights must be {len(replicas)} positive numbers, got {weights!r}"
                )
        if not (decay > 0 and math.isfinite(decay)):
            raise ConfigurationError(f"Pool.decay must be a number > 0, got {decay!r}")
        self.strategy: PoolStrategy = strategy
        self._replicas = [
            _Replica(b, float(weights[i]) if weights else 1.0) for i, b in enumerate(replicas)
        ]
        self._name = name or "pool(" + ",".join(b.name for b in replicas) + ")"
        self._decay = decay
        self._rng = rng or random.Random()
        self._next = 0
        self.owns_backends = owns_backends

    @property
    def name(self) -> str:
        return self._name

    @property
    def replicas(self) -> tuple[Backend, ...]:
        return tuple(r.backend for r in self._replicas)

    def statistics(self) -> list[ReplicaStatistics]:
        return [
            ReplicaStatistics(
                name=r.backend.name,
                calls=r.calls,
                outstanding=r.outstanding,
                ewma=r.ewma,
                skipped=r.skipped,
            )
            for r in self._replicas
        ]

    # choosing -------------------------------------------------------------------------------

    def _pick(self, candidates: list[_Replica]) -> _Replica:
        s = self.strategy
        if len(candidates) == 1:
            return candidates[0]
        if s == "round_robin":
            n = len(self._replicas)
            for k in range(n):
                r = self._replicas[(self._next + k) % n]
                if r in candidates:
                    self._next = (self._next + k + 1) % n
                    return r
        if s == "weighted":
            total = sum(r.weight for r in candidates)
            for r in candidates:
                r.current += r.weight
            best = max(candidates, key=lambda r: r.current)
            best.current -= total
            return best
        if s == "least_outstanding":
            low = min(r.outstanding for r in candidates)
            return self._rng.choice([r for r in candidates if r.outstanding == low])
        a, b = self._rng.sample(candidates, 2)
        ca, cb = a.cost(), b.cost()
        if ca == cb:
            return a if a.outstanding < b.outstanding else b if b.outstanding < a.outstanding else a
        return a if ca < cb else b

    def _order(self) -> list[_Replica]:
        """Replicas to try, best first: the pick, then the other healthy ones by cost."""
        healthy = []
        for r in self._replicas:
            if r.healthy():
                healthy.append(r)
            else:
                r.skipped += 1
        if not healthy:
            retry_at = min(
                (r.breaker.retry_at or anyio.current_time()) if r.breaker else math.inf
                for r in self._replicas
            )
            now = anyio.current_time()
            decision("pool_all_open", backend=self.name, level="warning")
            raise CircuitOpenError(
                f"every replica's circuit is open; retry in {max(0.0, retry_at - now):.3f}s",
                backend=self.name,
                retry_at=retry_at,
                retry_after=max(0.0, retry_at - now),
            )
        tried = tried_replicas.get()
        fresh = [r for r in healthy if id(r) not in tried] if tried else healthy
        first = self._pick(fresh or healthy)
        if tried is not None:
            tried.add(id(first))
        rest = sorted((r for r in healthy if r is not first), key=lambda r: r.cost())
        return [first, *rest]

    def _done(self, replica: _Replica, start: float, failed: bool) -> None:
        replica.outstanding -= 1
        now = anyio.current_time()
        rtt = now - start
        if failed:
            rtt = 2.0 * max(rtt, replica.ewma or 0.0)
        replica.observe(rtt, now, self._decay)

    # the backend ----------------------------------------------------------------------------

    async def complete(self, request: ChatRequest) -> Completion:
        order = self._order()
        for k, replica in enumerate(order):
            replica.outstanding += 1
            replica.calls += 1
            start = anyio.current_time()
            try:
                completion = await replica.backend.complete(request)
            except NOT_SENT as exc:
                replica.outstanding -= 1
                if k == len(order) - 1:
                    raise
                decision(
                    "pool_next_replica",
                    backend=self.name,
                    replica=replica.backend.name,
                    error=type(exc).__name__,
                )
                continue
            except anyio.get_cancelled_exc_class():
                replica.outstanding -= 1
                raise
            except BaseException:
                self._done(replica, start, failed=True)
                raise
            self._done(replica, start, failed=False)
            return completion
        raise AssertionError("unreachable")  # pragma: no cover

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        replica = self._order()[0]
        replica.outstanding += 1
        replica.calls += 1
        start = anyio.current_time()
        failed = True
        try:
            async with aclosing(replica.backend.stream(request)) as events:  # type: ignore[type-var]
                async for event in events:
                    if isinstance(event, StreamEnd):
                        failed = False
                    yield event
        finally:
            self._done(replica, start, failed=failed)

    async def aclose(self) -> None:
        """Close the replicas if the pool owns them (``owns_backends=True``); else nothing."""
        if self.owns_backends:
            await aclose_all(r.backend for r in self._replicas)

    def __repr__(self) -> str:
        return f"Pool({list(self.replicas)!r}, strategy={self.strategy!r})"
