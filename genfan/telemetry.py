"""Observability built in: structlog events, OpenTelemetry spans and metrics.

genfan depends on the OpenTelemetry *API* only: with no SDK configured, spans and metrics are
no-ops that cost almost nothing. Install and configure ``opentelemetry-sdk`` (or any exporter)
to see them. Span attributes follow the GenAI semantic conventions (``gen_ai.*``).

Log events go through structlog, and only once the application has configured structlog
(``structlog.configure(...)``, or `configure_logging`), so that a library never prints to
an application's stdout uninvited. ``structlog.testing.capture_logs()`` and
`genfan.testing.capture_events` both count as configured.

Secrets: nothing in this module logs headers, API keys or request bodies.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.metrics import Meter
    from opentelemetry.trace import Span, Tracer

__all__ = ["configure_logging", "event", "get_meter", "get_tracer", "span"]

_INSTRUMENTATION = "genfan"


@functools.cache
def _structlog() -> Any:
    # structlog (and the rich it pulls in) costs ~70 ms to import: load it on first event.
    import structlog

    return structlog


def _logging_on() -> bool:
    # Until something imported structlog, nobody can have configured it.
    import sys

    mod = sys.modules.get("structlog")
    return mod is not None and bool(mod.is_configured())


def event(name: str, /, *, level: str = "debug", **fields: Any) -> None:
    """Emit the structlog event ``name`` with ``fields`` (snake_case, bound context first).

    Does nothing until structlog is configured by the application.
    """
    if not _logging_on():
        return
    getattr(_structlog().get_logger(_INSTRUMENTATION), level)(name, **fields)


_NOTHING: AbstractContextManager[None] = nullcontext()


def bound(**fields: Any) -> AbstractContextManager[None]:
    """Bind ``fields`` to every event logged inside (structlog context variables)."""
    if not _logging_on():
        return _NOTHING  # reusable: no generator frame on the hot path
    return _structlog().contextvars.bound_contextvars(**fields)  # type: ignore[no-any-return]


def configure_logging(level: str = "info", *, json: bool = False) -> None:
    """Configure structlog for a command-line or simple application (console or JSON lines).

    Events go to standard error, so they never mix with a command's output on standard output.
    """
    import logging
    import sys

    import structlog

    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # sys.stderr looked up per event: it may be swapped (tests, daemonising) after configure.
        logger_factory=lambda *args: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )


@functools.cache
def _trace_module() -> Any:
    from opentelemetry import trace

    return trace


def get_tracer() -> Tracer:
    """genfan's OpenTelemetry tracer (a no-op until an SDK is configured)."""
    return _trace_module().get_tracer(_INSTRUMENTATION)  # type: ignore[no-any-return]


def get_meter() -> Meter:
    """genfan's OpenTelemetry meter (a no-op until an SDK is configured)."""
    from opentelemetry import metrics

    return metrics.get_meter(_INSTRUMENTATION)


_tracing_seen = False


def _tracing_on() -> bool:
    """Whether a real tracer provider is installed (once one is, it stays: OTel allows one)."""
    global _tracing_seen
    if _tracing_seen:
        return True
    trace = _trace_module()
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return False
    _tracing_seen = True
    return True


@functools.cache
def _no_span() -> AbstractContextManager[Span]:
    return nullcontext(_trace_module().INVALID_SPAN)


def span(name: str, /, **attributes: Any) -> AbstractContextManager[Span]:
    """Start a span as the current span; ``None`` attribute values are left out.

    Exceptions are recorded on the span and re-raised. Until an OpenTelemetry SDK (a tracer
    provider) is installed, this yields a shared non-recording span and does nothing else: the
    hot path of a fan-out should not pay ~15 µs per span for spans nobody records.
    """
    if not _tracing_on():
        return _no_span()
    return _real_span(name, attributes)


@contextmanager
def _real_span(name: str, attributes: dict[str, Any]) -> Iterator[Span]:
    attrs = {k: v for k, v in attributes.items() if v is not None}
    with get_tracer().start_as_current_span(name, attributes=attrs) as s:
        yield s


class _Instruments:
    """Metric instruments, created once on first use."""

    def __init__(self) -> None:
        meter = get_meter()
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="backend call duration"
        )
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="tokens used per call"
        )
        self.guard = meter.create_counter(
            "genfan.guard.decisions", description="guard decisions (retries, rejections, hedges)"
        )
        self.breaker_state = meter.create_up_down_counter(
            "genfan.breaker.open", description="1 while a backend's breaker is open"
        )
        self.bulkhead = meter.create_up_down_counter(
            "genfan.bulkhead.in_use", description="calls running inside a bulkhead"
        )
        self.schedule_drift = meter.create_histogram(
            "genfan.schedule.drift", unit="s", description="actual start minus planned fire time"
        )
        self.schedule_runs = meter.create_counter(
            "genfan.schedule.runs", description="scheduled runs by outcome"
        )


@functools.cache
def instruments() -> _Instruments:
    """The metric instruments (created lazily)."""
    return _Instruments()


def record_call(
    backend: str,
    *,
    seconds: float,
    response_model: str | None = None,
    input_tokens: int = 0,
    output_tokens: int = 0,
    error_type: str | None = None,
) -> None:
    """Record one backend call of a fan-out in the GenAI client metrics (semantic conventions):
    ``gen_ai.client.operation.duration`` (seconds; ``error.type`` on a failure) and, for an
    answer (no ``error_type``), ``gen_ai.client.token.usage`` (tokens per call, by
    ``gen_ai.token.type``: ``input`` / ``output``). Costs about a microsecond until a meter
    provider is installed."""
    inst = instruments()
    attrs: dict[str, str] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": backend.split(":", 1)[0],
        "genfan.backend": backend,
    }
    if response_model:
        attrs["gen_ai.response.model"] = response_model
    if error_type is not None:
        attrs["error.type"] = error_type
    inst.duration.record(seconds, attrs)
    if error_type is None:
        inst.tokens.record(input_tokens, {**attrs, "gen_ai.token.type": "input"})
        inst.tokens.record(output_tokens, {**attrs, "gen_ai.token.type": "output"})
