"""The circuit breaker: closed, open, half-open (and isolated), per backend."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Literal, TypeAlias

import anyio

from .. import telemetry
from .._backend import Backend
from .._errors import CircuitOpenError
from .._types import ChatRequest, Completion, StreamEnd, StreamEvent
from ._base import NOT_SENT, Guard, decision, metrics, set_span_attribute
from ._policies import BreakerPolicy, as_predicate, default_counts_as_failure

__all__ = ["BreakerState", "BreakerStatistics", "CircuitBreaker", "StateListener"]

BreakerState: TypeAlias = Literal["closed", "open", "half_open", "isolated", "disabled"]
#: Called as ``listener(old_state, new_state, breaker)`` on every state change.
StateListener: TypeAlias = Callable[[BreakerState, BreakerState, "CircuitBreaker"], None]

_SUCCESS, _FAILURE, _IGNORED = 0, 1, 2


@dataclass(frozen=True, kw_only=True, slots=True)
class BreakerStatistics:
    """A snapshot of a circuit breaker.

    Attributes:
        state: the state now.
        calls: calls in the current window (closed state).
        failures: failed calls in the window.
        slow_calls: slow calls in the window.
        opened: how many times the circuit has opened.
        rejected: calls refused while open or half-open.
        retry_at: when an open circuit lets a probe through (``None`` unless open).
    """

    state: BreakerState
    calls: int
    failures: int
    slow_calls: int
    opened: int
    rejected: int
    retry_at: float | None


class _Window:
    """Calls recorded over the last N calls or the last T seconds: (time, failed, slow)."""

    __slots__ = ("_calls", "_count", "_duration", "failures", "slow")

    def __init__(self, policy: BreakerPolicy) -> None:
        self._count = policy.window_size if policy.window == "count" else None
        self._duration = policy.sampling_duration if policy.window == "time" else None
        self._calls: deque[tuple[float, bool, bool]] = deque()
        self.failures = 0
        self.slow = 0

    def add(self, now: float, failed: bool, slow: bool) -> None:
        self._calls.append((now, failed, slow))
        self.failures += failed
        self.slow += slow
        if self._count is not None and len(self._calls) > self._count:
            self._drop()

    def _drop(self) -> None:
        _, failed, slow = self._calls.popleft()
        self.failures -= failed
        self.slow -= slow

    def prune(self, now: float) -> None:
        if self._duration is not None:
            horizon = now - self._duration
            while self._calls and self._calls[0][0] <= horizon:
                self._drop()

    def __len__(self) -> int:
        return len(self._calls)

    def clear(self) -> None:
        self._calls.clear()
        self.failures = self.slow = 0


class CircuitBreaker(Guard):
    """Stop calling a backend that keeps failing; probe it again after a break.

    * **closed**: calls go through and are recorded in the rolling window. The circuit opens
      when the window holds ``minimum_throughput`` calls and the failure (or slow-call) ratio
      reaches its threshold, or after ``consecutive_failures`` failures in a row.
    * **open**: calls are refused with [`CircuitOpenError`][genfan.CircuitOpenError] carrying
      ``retry_at`` and ``retry_after`` (exactly the rest of the break); the backend is not called.
    * **half_open**: once the break is over, ``half_open_probes`` calls are let through; if all
      succeed the circuit closes, if one fails it opens again (for a longer break when
      ``break_duration_max`` allows growth). Others are refused meanwhile (``retry_after=0``).
    * **isolated**: opened by hand with `isolate` until `close`.

    Errors that mean the call never reached the backend (a bulkhead or rate limit refused it)
    are not recorded; errors that do not count (4xx client errors by default) count as successes
    (the backend answered). Cancelled calls are not recorded.
    """

    def __init__(self, inner: Backend, policy: BreakerPolicy | None = None) -> None:
        super().__init__(inner)
        self.policy = policy or BreakerPolicy()
        self._counts = as_predicate(self.policy.counts, default_counts_as_failure)
        self._state: BreakerState = "closed"
        self._window = _Window(self.policy)
        self._consecutive = 0
        self._retry_at = math.inf
        self._opens_in_a_row = 0
        self._probes_admitted = 0
        self._probes_ok = 0
        self._opened = 0
        self._rejected = 0
        self._listeners: list[StateListener] = []

    # -- observing ---------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The state now (an open circuit whose break is over reports ``half_open``)."""
        if self._state == "open" and anyio.current_time() >= self._retry_at:
            return "half_open"
        return self._state

    @property
    def retry_at(self) -> float | None:
        """When an open circuit lets a probe through (``anyio.current_time()`` clock)."""
        return self._retry_at if self._state in ("open", "isolated") else None

    def available(self) -> bool:
        """Whether a call made now would be let through (used by pools to skip replicas)."""
        state = self.state
        if state in ("closed", "disabled"):
            return True
        if state == "half_open":
            return self._state == "open" or self._probes_admitted < self.policy.half_open_probes
        return False

    def add_listener(self, listener: StateListener) -> None:
        """Call ``listener(old, new, breaker)`` on every state change."""
        self._listeners.append(listener)

    def statistics(self) -> BreakerStatistics:
        """A snapshot of the state and the window."""
        self._window.prune(anyio.current_time())
        return BreakerStatistics(
            state=self.state,
            calls=len(self._window),
            failures=self._window.failures,
            slow_calls=self._window.slow,
            opened=self._opened,
            rejected=self._rejected,
            retry_at=self.retry_at,
        )

    # -- manual control ----------------------------------------------------------------------

    def isolate(self) -> None:
        """Open the circuit by hand; it stays open until `close`."""
        self._retry_at = math.inf
        self._transition("isolated")

    def disable(self) -> None:
        """Let every call through and record nothing (resilience4j's DISABLED) until
        `close`: for a backend whose failures are handled elsewhere, or while debugging."""
        self._retry_at = math.inf
        self._transition("disabled")

    def close(self) -> None:
        """Close the circuit by hand (also ends an isolation or a disable) and forget the
        window."""
        self._window.clear()
        self._consecutive = 0
        self._opens_in_a_row = 0
        self._retry_at = math.inf
        self._transition("closed")

    # -- the state machine -------------------------------------------------------------------

    def _transition(self, new: BreakerState, **fields: object) -> None:
        old = self._state
        if old == new:
            return
        self._state = new
        attrs = {"genfan.backend": self.name}
        was_open, is_open = old not in ("closed", "disabled"), new not in ("closed", "disabled")
        if is_open and not was_open:
            telemetry.instruments().breaker_state.add(1, attrs)
        elif was_open and not is_open:
            telemetry.instruments().breaker_state.add(-1, attrs)
        metrics().breaker_transitions.add(1, {**attrs, "genfan.breaker.state": new})
        name = {
            "open": "breaker_opened",
            "closed": "breaker_closed",
            "half_open": "breaker_half_open",
            "isolated": "breaker_isolated",
            "disabled": "breaker_disabled",
        }[new]
        level = "warning" if new in ("open", "isolated") else "info"
        decision(name, backend=self.name, level=level, previous=old, **fields)
        for listener in list(self._listeners):
            listener(old, new, self)

    def _open(self, now: float, reason: str) -> None:
        self._opens_in_a_row += 1
        self._opened += 1
        duration = self.policy.break_for(self._opens_in_a_row)
        self._retry_at = now + duration
        calls, failures, slow = len(self._window), self._window.failures, self._window.slow
        self._window.clear()
        self._consecutive = 0
        self._transition(
            "open",
            reason=reason,
            break_duration=duration,
            retry_at=self._retry_at,
            calls=calls,
            failures=failures,
            slow_calls=slow,
        )

    def _refuse(self, now: float, retry_at: float) -> CircuitOpenError:
        self._rejected += 1
        retry_after = max(0.0, retry_at - now)
        set_span_attribute("genfan.breaker.state", self._state)
        decision("breaker_rejected", backend=self.name, state=self._state, retry_after=retry_after)
        return CircuitOpenError(
            f"circuit {self._state.replace('_', '-')}; retry in {retry_after:.3f}s",
            backend=self.name,
            retry_at=retry_at,
            retry_after=retry_after,
        )

    def admit(self) -> bool:
        """Let a call through or raise [`CircuitOpenError`][genfan.CircuitOpenError]; returns whether it is a probe."""
        state = self._state
        if state in ("closed", "disabled"):
            return False
        now = anyio.current_time()
        if state == "open":
            if now < self._retry_at:
                raise self._refuse(now, self._retry_at)
            self._probes_admitted = self._probes_ok = 0
            self._transition("half_open")
            state = "half_open"
        if state == "half_open":
            if self._probes_admitted < self.policy.half_open_probes:
                self._probes_admitted += 1
                return True
            raise self._refuse(now, now)
        raise self._refuse(now, self._retry_at)  # isolated

    def record(self, probe: bool, outcome: int, duration: float) -> None:
        """Record how an admitted call ended: ``_SUCCESS``, ``_FAILURE`` or ``_IGNORED``."""
        if probe:
            if self._state != "half_open":  # closed or isolated by hand meanwhile
                return
            if outcome == _IGNORED:
                self._probes_admitted -= 1
            elif outcome == _FAILURE:
                self._open(anyio.current_time(), "probe failed")
            else:
                self._probes_ok += 1
                if self._probes_ok >= self.policy.half_open_probes:
                    self._window.clear()
                    self._consecutive = 0
                    self._opens_in_a_row = 0
                    self._retry_at = math.inf
                    self._transition("closed")
            return
        if self._state != "closed" or outcome == _IGNORED:
            return
        now = anyio.current_time()
        failed = outcome == _FAILURE
        sd = self.policy.slow_call_duration
        slow = sd is not None and duration >= sd
        window = self._window
        window.prune(now)
        window.add(now, failed, slow)
        self._consecutive = self._consecutive + 1 if failed else 0
        p = self.policy
        if p.consecutive_failures is not None and self._consecutive >= p.consecutive_failures:
            self._open(now, f"{self._consecutive} consecutive failures")
            return
        n = len(window)
        if n < p.minimum_throughput:
            return
        if p.failure_ratio is not None and window.failures >= p.failure_ratio * n:
            self._open(now, f"failure ratio {window.failures}/{n}")
        elif sd is not None and window.slow >= p.slow_call_ratio * n:
            self._open(now, f"slow-call ratio {window.slow}/{n}")

    def classify(self, exc: BaseException) -> int:
        if isinstance(exc, NOT_SENT):
            return _IGNORED
        return _FAILURE if self._counts(exc) else _SUCCESS

    # -- the backend -------------------------------------------------------------------------

    async def complete(self, request: ChatRequest) -> Completion:
        probe = self.admit()
        start = anyio.current_time()
        try:
            completion = await self.inner.complete(request)
        except anyio.get_cancelled_exc_class():
            self.record(probe, _IGNORED, 0.0)
            raise
        except BaseException as exc:
            self.record(probe, self.classify(exc), anyio.current_time() - start)
            raise
        self.record(probe, _SUCCESS, anyio.current_time() - start)
        return completion

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        probe = self.admit()
        start = anyio.current_time()
        outcome = _IGNORED
        try:
            async with aclosing(self.inner.stream(request)) as events:  # type: ignore[type-var]
                async for event in events:
                    if isinstance(event, StreamEnd):
                        outcome = _SUCCESS
                    yield event
        except anyio.get_cancelled_exc_class():
            outcome = _IGNORED
            raise
        except BaseException as exc:
            outcome = self.classify(exc)
            raise
        finally:
            self.record(probe, outcome, anyio.current_time() - start)
