"""The policies: frozen, keyword-only, validated value objects in float seconds.

A bad value raises [`ConfigurationError`][genfan.ConfigurationError] at construction, naming the field
and the allowed range.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal, TypeAlias

from .._errors import BackendError, ConfigurationError

__all__ = [
    "BreakerPolicy",
    "BulkheadPolicy",
    "FailurePredicate",
    "HedgePolicy",
    "RateLimitPolicy",
    "RetryBudgetPolicy",
    "RetryPolicy",
    "TimeoutPolicy",
]

#: Decides whether an exception counts (as a breaker failure, or as retryable).
FailurePredicate: TypeAlias = Callable[[BaseException], bool]


def _check(
    name: str,
    value: float | None,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    allow_none: bool = False,
) -> None:
    if value is None:
        if allow_none:
            return
        raise ConfigurationError(f"{name} is required")
    bad = isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value)
    if not bad:
        bad = value <= low if low_open else value < low
        bad = bad or value > high
    if bad:
        lo = f"> {low:g}" if low_open else f">= {low:g}"
        hi = "" if high == math.inf else f" and <= {high:g}"
        raise ConfigurationError(f"{name} must be a number {lo}{hi}, got {value!r}")


def _check_int(name: str, value: int | None, *, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigurationError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigurationError(f"{name} must be one of {allowed}, got {value!r}")


def _policy_repr(obj: object) -> str:
    parts = ", ".join(f"{f.name}={getattr(obj, f.name)!r}" for f in fields(obj))  # type: ignore[arg-type]
    return f"{type(obj).__name__}({parts})"


def default_counts_as_failure(exc: BaseException) -> bool:
    """The breaker's default: a [`BackendError`][genfan.BackendError]'s ``counts_as_failure`` (4xx client errors
    do not count), and any other exception (a backend bug) counts."""
    if isinstance(exc, BackendError):
        return exc.counts_as_failure
    return isinstance(exc, Exception)


def default_retryable(exc: BaseException) -> bool:
    """The retry default: only a [`BackendError`][genfan.BackendError] whose ``retryable`` is true (timeouts,
    429, 5xx, 408/409, connection errors, malformed answers); never 400/401/403/404."""
    return isinstance(exc, BackendError) and exc.retryable


def as_predicate(
    value: FailurePredicate | tuple[type[BaseException], ...] | None, default: FailurePredicate
) -> FailurePredicate:
    """A predicate from a callable, a tuple of exception types, or ``None`` (the default)."""
    if value is None:
        return default
    if isinstance(value, tuple):
        types = value
        return lambda exc: isinstance(exc, types)
    return value


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class BulkheadPolicy:
    """Bound how many calls run at once for one backend; the others wait their turn.

    By default a burst queues, in memory and in FIFO order, however large it is: a call waits
    for a slot until its caller's deadline (a fan-out's ``deadline``, a cancel scope), never
    because a queue is full, so every call of a burst that the backend can serve in time is
    served (as the vendors' SDKs do, only without flooding the backend). Set ``max_queued``
    (or ``max_queue_wait``) to shed load instead: calls beyond it fail at once with
    [`BulkheadFullError`][genfan.BulkheadFullError], and the backend is not called.

    Args:
        max_concurrent: calls allowed to run at once: the backend's one concurrency cap (1,000:
            the openai SDK's connection limit; a guard against runaway concurrency, not a
            quota, see docs/resilience.md).
        max_queued: calls allowed to wait for a slot; more are shed at once (0: no queue).
            ``None`` (default): no limit, the queue holds every waiting call.
        max_queue_wait: seconds a call may wait for a slot before it is shed (``None``,
            default: until the deadline).
        adaptive: ``None`` (default): the cap is ``max_concurrent``, fixed. ``"aimd"``,
            ``"gradient"`` or ``"vegas"``: the cap adapts, between ``min_concurrent`` and
            ``max_concurrent``, to what each attempt meets: 429s, 503/529 overloads and
            timeouts (`AIMD`), and latency as well
            (`Gradient2`, `Vegas`).
        min_concurrent: the lowest an adaptive cap goes (only with ``adaptive``).
        initial_concurrent: an adaptive cap's first value (only with ``adaptive``; ``None``:
            16, within ``min_concurrent`` and ``max_concurrent``).
    """

    max_concurrent: int = 1000
    max_queued: int | None = None
    max_queue_wait: float | None = None
    adaptive: Literal["aimd", "gradient", "vegas"] | None = None
    min_concurrent: int = 1
    initial_concurrent: int | None = None

    def __post_init__(self) -> None:
        p = "BulkheadPolicy."
        _check_int(p + "max_concurrent", self.max_concurrent, low=1)
        _check_int(p + "max_queued", self.max_queued, low=0, allow_none=True)
        _check(p + "max_queue_wait", self.max_queue_wait, low=0, allow_none=True)
        if self.adaptive is not None:
            _check_choice(p + "adaptive", self.adaptive, ("aimd", "gradient", "vegas"))
        _check_int(p + "min_concurrent", self.min_concurrent, low=1)
        _check_int(p + "initial_concurrent", self.initial_concurrent, low=1, allow_none=True)
        if self.adaptive is None and (self.min_concurrent != 1 or self.initial_concurrent):
            raise ConfigurationError(
                "BulkheadPolicy.min_concurrent and initial_concurrent need an adaptive cap"
                ' (adaptive="aimd" or "gradient")'
            )
        if self.min_concurrent > self.max_concurrent:
            raise ConfigurationError(
                f"BulkheadPolicy.min_concurrent must be <= max_concurrent"
                f" ({self.max_concurrent}), got {self.min_concurrent}"
            )
        start = self.initial_concurrent
        if start is not None and not self.min_concurrent <= start <= self.max_concurrent:
            raise ConfigurationError(
                f"BulkheadPolicy.initial_concurrent must be between min_concurrent"
                f" ({self.min_concurrent}) and max_concurrent ({self.max_concurrent}), got {start}"
            )

    @property
    def start_concurrent(self) -> int:
        """The cap before any call: ``max_concurrent`` when fixed; when adaptive,
        ``initial_concurrent`` (default 16, within ``min_concurrent`` and ``max_concurrent``)."""
        if self.adaptive is None:
            return self.max_concurrent
        if self.initial_concurrent is not None:
            return self.initial_concurrent
        return min(self.max_concurrent, max(self.min_concurrent, 16))

    __repr__ = _policy_repr


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class BreakerPolicy:
    """When a backend's circuit opens, for how long, and how it recovers.

    The circuit opens when, in the rolling window, at least ``minimum_throughput`` calls were
    recorded and either the failure ratio reached ``failure_ratio`` or the slow-call ratio
    reached ``slow_call_ratio``; or (when set) after ``consecutive_failures`` failures in a row.

    Args:
        window: ``"time"`` (the last ``sampling_duration`` seconds, Polly) or ``"count"`` (the
            last ``window_size`` calls, resilience4j).
        window_size: calls in a count window.
        sampling_duration: seconds in a time window.
        minimum_throughput: calls the window must hold before the ratio is judged.
        failure_ratio: failures / calls that opens the circuit (``None``: ratio mode off).
        consecutive_failures: open after this many failures in a row (``None``: off).
        slow_call_duration: a successful call at least this long counts as slow (``None``: off).
        slow_call_ratio: slow calls / calls that opens the circuit.
        break_duration: seconds the circuit stays open before a probe is let through.
        break_duration_growth: each consecutive re-open multiplies the break by this.
        break_duration_max: the longest break (``None``: ``break_duration``, no growth).
        half_open_probes: calls admitted while half-open; all must succeed to close.
        counts: which exceptions count as failures: a predicate or a tuple of exception types
            (default: ``BackendError.counts_as_failure``, so 4xx client errors do not count).
    """

    window: Literal["count", "time"] = "time"
    window_size: int = 100
    sampling_duration: float = 30.0
    minimum_throughput: int = 10
    failure_ratio: float | None = 0.5
    consecutive_failures: int | None = None
    slow_call_duration: float | None = None
    slow_call_ratio: float = 1.0
    break_duration: float = 5.0
    break_duration_growth: float = 2.0
    break_duration_max: float | None = None
    half_open_probes: int = 1
    counts: FailurePredicate | tuple[type[BaseException], ...] | None = None

    def __post_init__(self) -> None:
        p = "BreakerPolicy."
        _check_choice(p + "window", self.window, ("count", "time"))
        _check_int(p + "window_size", self.window_size, low=1)
        _check(p + "sampling_duration", self.sampling_duration, low=0, low_open=True)
        _check_int(p + "minimum_throughput", self.minimum_throughput, low=1)
        _check(
            p + "failure_ratio", self.failure_ratio, low=0, high=1, low_open=True, allow_none=True
        )
        _check_int(p + "consecutive_failures", self.consecutive_failures, low=1, allow_none=True)
        if self.failure_ratio is None and self.consecutive_failures is None:
            raise ConfigurationError(
                "BreakerPolicy needs failure_ratio (0 < r <= 1) or consecutive_failures (>= 1)"
            )
        _check(
            p + "slow_call_duration", self.slow_call_duration, low=0, low_open=True, allow_none=True
        )
        _check(p + "slow_call_ratio", self.slow_call_ratio, low=0, high=1, low_open=True)
        _check(p + "break_duration", self.break_duration, low=0, low_open=True)
        _check(p + "break_duration_growth", self.break_duration_growth, low=1)
        _check(
            p + "break_duration_max",
            self.break_duration_max,
            low=self.break_duration,
            allow_none=True,
        )
        _check_int(p + "half_open_probes", self.half_open_probes, low=1)
        if self.window == "count" and self.minimum_throughput > self.window_size:
            raise ConfigurationError(
                f"BreakerPolicy.minimum_throughput must be <= window_size ({self.window_size}) "
                f"with a count window, got {self.minimum_throughput}"
            )
        if not (self.counts is None or callable(self.counts) or isinstance(self.counts, tuple)):
            raise ConfigurationError(
                "BreakerPolicy.counts must be a predicate or a tuple of exception types"
            )

    def break_for(self, opens: int) -> float:
        """The break duration of the ``opens``-th consecutive opening (1 for the first)."""
        if self.break_duration_max is None:
            return self.break_duration
        grown = self.break_duration * self.break_duration_growth ** max(0, opens - 1)
        return min(grown, self.break_duration_max)

    __repr__ = _policy_repr


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class RetryBudgetPolicy:
    """Finagle/Envoy retry budget: retries may be at most ``ratio`` of the calls of the last
    ``ttl`` seconds, plus a floor of ``min_per_second`` retries per second.

    Args:
        ratio: retries allowed per call (0.2: 20% extra load at most).
        min_per_second: retries always allowed per second, so a quiet backend can still retry.
        ttl: seconds over which calls and retries are remembered.
    """

    ratio: float = 0.2
    min_per_second: float = 1.0
    ttl: float = 10.0

    def __post_init__(self) -> None:
        _check("RetryBudgetPolicy.ratio", self.ratio, low=0, high=1000)
        _check("RetryBudgetPolicy.min_per_second", self.min_per_second, low=0)
        _check("RetryBudgetPolicy.ttl", self.ttl, low=0, low_open=True, high=3600)

    __repr__ = _policy_repr


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class RetryPolicy:
    """Retry failed calls with exponential backoff.

    The n-th retry waits ``min(max_delay, initial * multiplier ** (n - 1))``, jittered:
    ``"full"`` (AWS full jitter: uniform in [0, that]), ``"decorrelated"`` (AWS decorrelated
    jitter: uniform in [initial, 3 x previous wait], capped) or ``"none"``. A ``Retry-After``
    the backend sent (``RateLimitError.retry_after``) replaces the computed wait.

    Args:
        attempts: tries in all, the first included (1: no retries).
        initial: base wait before the first retry, in seconds.
        max_delay: the longest computed wait.
        multiplier: growth of the wait per retry.
        jitter: ``"full"``, ``"decorrelated"`` or ``"none"``.
        respect_retry_after: wait what the backend asked for in ``Retry-After``.
        max_retry_after: give up at once when the backend asks to wait longer than this.
        retry_on: which errors to retry: a predicate or a tuple of exception types (default:
            ``BackendError.retryable``: timeouts, 429, 5xx, connection errors; never
            400/401/403/404 or validation errors).
        budget: the values of the backend's retry budget (``None``: unlimited retries, not
            recommended); `guard` makes one
            `RetryBudget` from them per stack, unless given one to
            share (``guard(..., retry_budget=budget)``).
    """

    attempts: int = 3
    initial: float = 0.5
    max_delay: float = 10.0
    multiplier: float = 2.0
    jitter: Literal["full", "decorrelated", "none"] = "full"
    respect_retry_after: bool = True
    max_retry_after: float = 60.0
    retry_on: FailurePredicate | tuple[type[BaseException], ...] | None = None
    budget: RetryBudgetPolicy | None = RetryBudgetPolicy()

    def __post_init__(self) -> None:
        p = "RetryPolicy."
        _check_int(p + "attempts", self.attempts, low=1)
        _check(p + "initial", self.initial, low=0)
        _check(p + "max_delay", self.max_delay, low=self.initial)
        _check(p + "multiplier", self.multiplier, low=1)
        _check_choice(p + "jitter", self.jitter, ("full", "decorrelated", "none"))
        _check(p + "max_retry_after", self.max_retry_after, low=0)
        if not (self.budget is None or isinstance(self.budget, RetryBudgetPolicy)):
            raise ConfigurationError("RetryPolicy.budget must be a RetryBudgetPolicy or None")

    def base_delay(self, retry: int) -> float:
        """The un-jittered wait before retry number ``retry`` (1 for the first retry)."""
        return min(self.max_delay, self.initial * self.multiplier ** max(0, retry - 1))

    __repr__ = _policy_repr


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class TimeoutPolicy:
    """Limit each attempt to ``timeout`` seconds (and the request's own ``timeout``, if smaller).

    Args:
        timeout: the whole attempt (a stream: until its last event).
        first_token: a stream's first event must come within this (``None``: only ``timeout``).
            A stalled stream then fails early with a retryable timeout, before anything was
            passed on, so the retry guard can try again.
        idle: the longest wait between two events of a stream (``None``: only ``timeout``). A
            stream that stops mid-answer fails instead of hanging until ``timeout``.
    """

    timeout: float = 60.0
    first_token: float | None = None
    idle: float | None = None

    def __post_init__(self) -> None:
        _check("TimeoutPolicy.timeout", self.timeout, low=0, low_open=True)
        _check("TimeoutPolicy.first_token", self.first_token, low=0, low_open=True, allow_none=True)
        _check("TimeoutPolicy.idle", self.idle, low=0, low_open=True, allow_none=True)

    __repr__ = _policy_repr


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class HedgePolicy:
    """Send the same request again when the first is slow; the first good answer wins.

    Args:
        delay: seconds before a hedge is sent; ``None``: learn it as the ``percentile`` of the
            backend's recent latencies.
        percentile: the latency percentile to hedge at (0.95: p95) when ``delay`` is ``None``.
        window: recent latencies remembered for the percentile.
        min_samples: latencies needed before learned hedging starts.
        max_hedges: extra requests per call, at most.
        max_extra_ratio: hedges may be at most this share of calls (a budget over ``budget_ttl``).
        budget_ttl: seconds over which the extra-load budget is counted.
        trigger: what ``complete()`` hedges on. ``"answer"``: a whole answer later than the
            delay (the backend's ``complete()`` is called). ``"first_token"``: also a first
            token later than the p95 of times to first token; ``complete()`` then reads the
            backend's stream, so a stall before the first token (queueing, prefill, a cold
            replica) is caught after a fraction of the answer's p95, and a slow answer is still
            hedged at the answer's delay. Streams are always hedged on their first token.
    """

    delay: float | None = None
    percentile: float = 0.95
    window: int = 1000
    min_samples: int = 20
    max_hedges: int = 1
    max_extra_ratio: float = 0.05
    budget_ttl: float = 10.0
    trigger: Literal["answer", "first_token"] = "answer"

    def __post_init__(self) -> None:
        p = "HedgePolicy."
        _check_choice(p + "trigger", self.trigger, ("answer", "first_token"))
        _check(p + "delay", self.delay, low=0, allow_none=True)
        _check(p + "percentile", self.percentile, low=0, high=1, low_open=True)
        _check_int(p + "window", self.window, low=1)
        _check_int(p + "min_samples", self.min_samples, low=1)
        if self.min_samples > self.window:
            raise ConfigurationError(
                f"HedgePolicy.min_samples must be <= window ({self.window}), got {self.min_samples}"
            )
        _check_int(p + "max_hedges", self.max_hedges, low=1)
        _check(p + "max_extra_ratio", self.max_extra_ratio, low=0, high=100, low_open=True)
        _check(p + "budget_ttl", self.budget_ttl, low=0, low_open=True)

    __repr__ = _policy_repr


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class RateLimitPolicy:
    """Token buckets for requests and tokens per minute.

    Args:
        requests_per_minute: request quota (``None``: not limited locally).
        tokens_per_minute: token quota, input plus output (``None``: not limited locally).
        burst_requests: request bucket size (``None``: one minute's quota).
        burst_tokens: token bucket size (``None``: one minute's quota).
        mode: ``"wait"`` for quota (within ``max_wait`` and the deadline) or ``"reject"`` at once.
        max_wait: the longest wait for quota, in seconds (``None``: until the deadline).
        default_output_tokens: output tokens assumed when the request has no ``max_tokens``.
        learn: adopt the quota the provider reports (rate-limit headers, ``Retry-After``).
        on_store_error: what to do when the stack's shared quota store
            (``guard(..., rate_limit_store=...)``) cannot be used (down, too slow, an error):
            ``"local"`` decides with this process's buckets and logs a warning once per outage;
            ``"raise"`` refuses the call with [`BackendConnectionError`][genfan.BackendConnectionError]. Without
            a store it has no effect.

    A policy holds values only: where a shared quota lives is the store's business
    (`RedisQuota`), given to `guard`.
    """

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    burst_requests: float | None = None
    burst_tokens: float | None = None
    mode: Literal["wait", "reject"] = "wait"
    max_wait: float | None = 30.0
    default_output_tokens: int = 256
    learn: bool = True
    on_store_error: Literal["local", "raise"] = "local"

    def __post_init__(self) -> None:
        p = "RateLimitPolicy."
        _check(
            p + "requests_per_minute",
            self.requests_per_minute,
            low=0,
            low_open=True,
            allow_none=True,
        )
        _check(
            p + "tokens_per_minute", self.tokens_per_minute, low=0, low_open=True, allow_none=True
        )
        _check(p + "burst_requests", self.burst_requests, low=1, allow_none=True)
        _check(p + "burst_tokens", self.burst_tokens, low=1, allow_none=True)
        _check_choice(p + "mode", self.mode, ("wait", "reject"))
        _check(p + "max_wait", self.max_wait, low=0, allow_none=True)
        _check_int(p + "default_output_tokens", self.default_output_tokens, low=0)
        _check_choice(p + "on_store_error", self.on_store_error, ("local", "raise"))

    __repr__ = _policy_repr
