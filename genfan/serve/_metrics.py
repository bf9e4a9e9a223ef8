"""Prometheus metrics of one gateway process (``GET /metrics``).

Counters and histograms are kept per process; with several workers, scrape each (or sum in
Prometheus). Breaker states and queue depths are read from the guards at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .._errors import MissingExtraError

__all__ = ["GatewayMetrics"]

_BREAKER_STATES = ("closed", "open", "half_open", "isolated", "disabled")


class GatewayMetrics:
    """The gateway's instruments, in a registry of its own.

    Args:
        probe: called at scrape time; yields ``(backend, breaker state or None, running,
            queued)`` for every guarded backend, and ``("embed:<model>", None, in flight
            batches, queued texts)`` for every embedding batcher.
        in_flight: called at scrape time; the requests in flight now.
    """

    def __init__(
        self,
        probe: Callable[[], Iterable[tuple[str, str | None, int, int]]],
        in_flight: Callable[[], int],
    ) -> None:
        try:
            import prometheus_client as prom
            from prometheus_client.core import GaugeMetricFamily
        except ImportError as exc:
            raise MissingExtraError("prometheus-client", "serve", reason="genfan serve") from exc
        self._prom = prom
        self._children: dict[tuple[str, str, int], tuple[Any, ...]] = {}
        self.registry = reg = prom.CollectorRegistry(auto_describe=False)
        self.requests = prom.Counter(
            "genfan_gateway_requests",
            "Requests answered, by route, model and HTTP status",
            ["route", "model", "status"],
            registry=reg,
        )
        self.latency = prom.Histogram(
            "genfan_gateway_request_seconds",
            "Seconds from request to the end of the answer, by route and model",
            ["route", "model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=reg,
        )
        self.tokens = prom.Counter(
            "genfan_gateway_tokens",
            "Tokens over every candidate, by model and kind (input, output)",
            ["model", "kind"],
            registry=reg,
        )
        self.cost = prom.Counter(
            "genfan_gateway_cost_usd",
            "USD spent over every candidate, by model",
            ["model"],
            registry=reg,
        )
        self.rejected = prom.Counter(
            "genfan_gateway_rejected",
            "Requests refused before any backend was called, by reason",
            ["reason"],
            registry=reg,
        )

        class _Live:
            def collect(self) -> Iterator[Any]:
                states = GaugeMetricFamily(
                    "genfan_gateway_breaker_state",
                    "1 for each backend's circuit breaker state now",
                    labels=["backend", "state"],
                )
                running = GaugeMetricFamily(
                    "genfan_gateway_backend_running",
                    "Calls running in a backend's bulkhead",
                    labels=["backend"],
                )
                queued = GaugeMetricFamily(
                    "genfan_gateway_queue_depth",
                    "Calls (or texts) waiting in a backend's bulkhead or an embedding batcher",
                    labels=["backend"],
                )
                for name, state, run, queue in probe():
                    if state is not None:
                        for s in _BREAKER_STATES:
                            states.add_metric([name, s], 1.0 if s == state else 0.0)
                    running.add_metric([name], run)
                    queued.add_metric([name], queue)
                yield states
                yield running
                yield queued
                yield GaugeMetricFamily(
                    "genfan_gateway_in_flight", "Requests in flight now", value=in_flight()
                )

        reg.register(_Live())

    def observe(
        self,
        route: str,
        model: str,
        status: int,
        seconds: float,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cost: float = 0.0,
    ) -> None:
        children = self._children.get((route, model, status))
        if children is None:  # labels() costs microseconds: look each child up once
            children = self._children[(route, model, status)] = (
                self.requests.labels(route, model, str(status)),
                self.latency.labels(route, model),
                self.tokens.labels(model, "input"),
                self.tokens.labels(model, "output"),
                self.cost.labels(model),
            )
        requests, latency, tokens_in, tokens_out, usd = children
        requests.inc()
        latency.observe(seconds)
        if input_tokens:
            tokens_in.inc(input_tokens)
        if output_tokens:
            tokens_out.inc(output_tokens)
        if cost:
            usd.inc(cost)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST
