"""What every guard shares: the wrapper base class, the deadline, and decision telemetry."""

from __future__ import annotations

import functools
import math
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import anyio

from .. import telemetry
from .._backend import AsyncCloseable, Backend
from .._errors import (
    BackendError,
    BulkheadFullError,
    CallCancelledError,
    CircuitOpenError,
    RateLimitExceededError,
)
from .._types import ChatRequest, Completion, StreamEvent

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter, Histogram, UpDownCounter

#: Errors that mean the request never reached the backend (a guard refused it).
NOT_SENT: tuple[type[BackendError], ...] = (
    BulkheadFullError,
    CircuitOpenError,
    RateLimitExceededError,
    CallCancelledError,
)


#: The replicas the current call has been sent to: a hedge sets a fresh set for its attempts,
#: and a `Pool` sends each attempt to a replica not in it while a healthy one is left
#: (Envoy's ``previous_hosts``), so that a hedge reaches another replica than the slow one.
tried_replicas: ContextVar[set[int] | None] = ContextVar("genfan_tried_replicas", default=None)


def time_left() -> float:
    """Seconds left before the innermost deadline (the fan-out's); ``inf`` when there is none."""
    deadline = anyio.current_effective_deadline()
    if deadline == math.inf:
        return math.inf
    return deadline - anyio.current_time()


class _Metrics:
    """The resilience instruments (beside ``telemetry.instruments()``), created on first use."""

    def __init__(self) -> None:
        meter = telemetry.get_meter()
        self.bulkhead_queued: UpDownCounter = meter.create_up_down_counter(
            "genfan.bulkhead.queued", description="calls waiting for a bulkhead slot"
        )
        self.rate_limit_wait: Histogram = meter.create_histogram(
            "genfan.rate_limit.wait", unit="s", description="time spent waiting for quota"
        )
        self.hedges: Counter = meter.create_counter(
            "genfan.hedge.requests", description="hedged requests sent, by outcome"
        )
        self.breaker_transitions: Counter = meter.create_counter(
            "genfan.breaker.transitions", description="circuit breaker state changes"
        )


@functools.cache
def metrics() -> _Metrics:
    return _Metrics()


@functools.cache
def _otel_trace() -> Any:
    from opentelemetry import trace

    return trace


def decision(name: str, /, *, backend: str, level: str = "debug", **fields: Any) -> None:
    """Make one guard decision visible: a structlog event, a span event on the current span,
    and a ``genfan.guard.decisions`` count."""
    telemetry.event(name, level=level, backend=backend, **fields)
    span = _otel_trace().get_current_span()
    if span.is_recording():
        attrs: dict[str, str | bool | int | float] = {"genfan.backend": backend}
        for k, v in fields.items():
            if isinstance(v, str | bool | int | float):
                attrs[f"genfan.{k}"] = v
        span.add_event(f"genfan.{name}", attributes=attrs)
    telemetry.instruments().guard.add(1, {"genfan.backend": backend, "genfan.guard.decision": name})


def set_span_attribute(key: str, value: str | bool | int | float) -> None:
    """Set an attribute on the current span, if one is recording."""
    span = _otel_trace().get_current_span()
    if span.is_recording():
        span.set_attribute(key, value)


class Guard(AsyncCloseable):
    """A backend that wraps a backend: ``name`` is the inner backend's, ``aclose`` closes it.

    Subclasses override `complete` and `stream`.
    """

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self._name = inner.name  # a backend's name does not change; read once
        self._attrs = {"genfan.backend": self._name}

    @property
    def name(self) -> str:
        return self._name

    async def complete(self, request: ChatRequest) -> Completion:
        return await self.inner.complete(request)

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        return self.inner.stream(request)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"
