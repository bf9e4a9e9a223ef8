"""Adaptive concurrency limits: small, pure objects that turn the outcome of each call into the
number of calls a backend should be given at once.

Each algorithm is fed one sample per call, ``update(rtt, in_flight, dropped)``, and returns the
new limit; it keeps no clock, starts no task and does no I/O, so it is tested (and reasoned
about) sample by sample. The bulkhead feeds one when a backend's cap is adaptive
(``BulkheadPolicy(adaptive="aimd" | "gradient" | "vegas")``); see docs/resilience.md.

* `AIMD`: additive increase, multiplicative decrease, driven by drops alone (429s,
  503/529 overloads, timeouts). TCP Reno's rule; Netflix concurrency-limits' ``AIMDLimit``.
* `Gradient2`: driven by latency: the limit follows the ratio of the long-term average
  round-trip time to the latest one, plus a small queue allowance; Netflix concurrency-limits'
  ``Gradient2Limit``, with drops cutting the limit as in AIMD.
* `Vegas`: driven by latency against the lowest latency seen, which estimates the queue
  at the backend; TCP Vegas, as concurrency-limits' ``VegasLimit``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

from .._errors import ConfigurationError

__all__ = ["AIMD", "AdaptiveLimit", "Gradient2", "Vegas"]


def _int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigurationError(f"{name} must be an integer >= {low}, got {value!r}")


def _ratio(name: str, value: float, *, low: float, high: float, high_open: bool = True) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and not math.isnan(value)
    if ok:
        ok = low < value and (value < high if high_open else value <= high)
    if not ok:
        hi = f"< {high:g}" if high_open else f"<= {high:g}"
        raise ConfigurationError(f"{name} must be a number > {low:g} and {hi}, got {value!r}")


class AdaptiveLimit(ABC):
    """An adaptive concurrency limit, kept between ``min_limit`` and ``max_limit``.

    Feed it one sample per finished call with `update`; read the limit in force from
    `limit`. Not thread-safe (one event loop feeds it).

    Args:
        initial: the limit before any sample.
        min_limit: the lowest limit (at least 1, so a backend is always probed).
        max_limit: the highest limit.
    """

    __slots__ = ("_estimate", "max_limit", "min_limit")

    def __init__(self, *, initial: int, min_limit: int = 1, max_limit: int = 64) -> None:
        name = type(self).__name__
        _int(f"{name}.min_limit", min_limit, 1)
        _int(f"{name}.max_limit", max_limit, min_limit)
        _int(f"{name}.initial", initial, min_limit)
        if initial > max_limit:
            raise ConfigurationError(
                f"{name}.initial must be <= max_limit ({max_limit}), got {initial}"
            )
        self.min_limit = min_limit
        self.max_limit = max_limit
        self._estimate = float(initial)

    @property
    def limit(self) -> int:
        """The limit in force: at least ``min_limit``, at most ``max_limit``."""
        return min(self.max_limit, max(self.min_limit, math.floor(self._estimate)))

    def _clamp(self, value: float) -> float:
        return min(float(self.max_limit), max(float(self.min_limit), value))

    def _drop(self, backoff_ratio: float) -> None:
        """Cut the limit to ``backoff_ratio`` of itself, by one slot at least."""
        self._estimate = self._clamp(min(self._estimate * backoff_ratio, self.limit - 1))

    @abstractmethod
    def update(self, rtt: float, in_flight: int, dropped: bool) -> int:
        """Take one call's outcome; return the new limit.

        Args:
            rtt: the call's duration in seconds (only read for calls that were not dropped).
            in_flight: calls running when it started, itself included.
            dropped: the backend refused or lost it for overload (429, 503/529, a timeout).
        """

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(limit={self.limit}, min_limit={self.min_limit},"
            f" max_limit={self.max_limit})"
        )


class AIMD(AdaptiveLimit):
    """Additive increase, multiplicative decrease: TCP's rule, driven by drops alone.

    Until the first drop the limit grows by one slot per successful call (it doubles every
    round trip: TCP's slow start); after, by ``increase`` slots per round trip (``increase /
    limit`` per successful call), and only while at least half the limit is in use (a backend
    that is not loaded tells nothing about more load). A drop cuts the limit to
    ``backoff_ratio`` of itself, by one slot at least.

    A drop is an unambiguous signal (the backend said it is overloaded, or did not answer), so
    AIMD needs no model of latency: it suits backends whose answers vary in length, such as LLM
    calls. It finds the concurrency at which the backend starts refusing and stays just below
    it: a server that queues before it refuses is kept queueing (TCP Reno's "bufferbloat"),
    which the latency-driven `Gradient2` and `Vegas` avoid.

    Netflix concurrency-limits' ``AIMDLimit`` adds a slot per successful call throughout; with
    that, a saturated limit climbs back faster than drops cut it, and the backend refuses a
    steady share of calls (about a fifth of the answers in a first run of this project's
    benchmark, ``benchmarks/resilience_adaptive.py``).

    Args:
        initial: the limit before any sample.
        min_limit: the lowest limit.
        max_limit: the highest limit.
        backoff_ratio: the limit is multiplied by this on a drop (by one slot at least).
        increase: slots added per round trip after the first drop.
    """

    __slots__ = ("_slow_start", "backoff_ratio", "increase")

    def __init__(
        self,
        *,
        initial: int = 16,
        min_limit: int = 1,
        max_limit: int = 64,
        backoff_ratio: float = 0.9,
        increase: float = 1.0,
    ) -> None:
        super().__init__(initial=initial, min_limit=min_limit, max_limit=max_limit)
        _ratio("AIMD.backoff_ratio", backoff_ratio, low=0, high=1)
        _ratio("AIMD.increase", increase, low=0, high=math.inf)
        self.backoff_ratio = backoff_ratio
        self.increase = increase
        self._slow_start = True

    def update(self, rtt: float, in_flight: int, dropped: bool) -> int:
        if dropped:
            self._slow_start = False
            self._drop(self.backoff_ratio)
        elif in_flight * 2 >= self.limit:
            step = 1.0 if self._slow_start else self.increase / self._estimate
            self._estimate = self._clamp(self._estimate + step)
        return self.limit


class Gradient2(AdaptiveLimit):
    """Netflix concurrency-limits' gradient2: follow the gradient of latency.

    The long-term RTT is an exponential average over ``long_window`` samples (a plain average
    for the first 10); the short-term RTT is the latest sample. While the latest call is no
    slower than ``tolerance`` times the long-term RTT the gradient is 1 and the limit grows by
    ``queue_size`` (smoothed); beyond, it shrinks in proportion, by half at most per sample::

        gradient = clamp(tolerance * long_rtt / rtt, 0.5, 1.0)
        limit = (1 - smoothing) * limit + smoothing * (gradient * limit + queue_size)

    When latency falls back after a long overload (the long RTT more than twice the latest),
    the long RTT decays by 5% a sample so that the limit recovers without waiting for the
    average. A drop (429, 503/529, a timeout) cuts the limit to ``backoff_ratio`` of itself, as
    `AIMD` does (gradient2 itself ignores drops). The limit does not grow while fewer
    than half of it are in use.

    Latency is its signal, read against its own long-term average rather than a minimum, so
    answers of varied lengths disturb it less than `Vegas`; but the average follows a
    queue that lasts, so a server whose queue adds less than the tolerance (1.5x) to a latency
    that has already risen is filled up to its refusals, as `AIMD` fills it, and a
    backend whose latency grows with load for other reasons (an inference server batching more
    sequences per step) reads as congested to it.

    Args:
        initial: the limit before any sample.
        min_limit: the lowest limit.
        max_limit: the highest limit.
        smoothing: how much of each new estimate is taken (0 < s <= 1).
        tolerance: how much slower than the long-term RTT a call may be before the limit
            shrinks (>= 1).
        long_window: samples in the long-term RTT's exponential average.
        queue_size: slots added per sample while latency is flat (the queue allowed).
        backoff_ratio: the limit is multiplied by this on a drop (by one slot at least).
    """

    __slots__ = (
        "_long_rtt",
        "_samples",
        "backoff_ratio",
        "long_window",
        "queue_size",
        "smoothing",
        "tolerance",
    )

    _WARMUP = 10

    def __init__(
        self,
        *,
        initial: int = 16,
        min_limit: int = 1,
        max_limit: int = 64,
        smoothing: float = 0.2,
        tolerance: float = 1.5,
        long_window: int = 600,
        queue_size: float = 4.0,
        backoff_ratio: float = 0.9,
    ) -> None:
        super().__init__(initial=initial, min_limit=min_limit, max_limit=max_limit)
        _ratio("Gradient2.smoothing", smoothing, low=0, high=1, high_open=False)
        if (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, int | float)
            or not (1 <= tolerance < math.inf)
        ):
            raise ConfigurationError(
                f"Gradient2.tolerance must be a number >= 1, got {tolerance!r}"
            )
        _int("Gradient2.long_window", long_window, 1)
        if (
            isinstance(queue_size, bool)
            or not isinstance(queue_size, int | float)
            or not 0 <= queue_size < math.inf
        ):
            raise ConfigurationError(
                f"Gradient2.queue_size must be a number >= 0, got {queue_size!r}"
            )
        _ratio("Gradient2.backoff_ratio", backoff_ratio, low=0, high=1)
        self.smoothing = smoothing
        self.tolerance = tolerance
        self.long_window = long_window
        self.queue_size = queue_size
        self.backoff_ratio = backoff_ratio
        self._long_rtt = 0.0
        self._samples = 0

    @property
    def long_rtt(self) -> float:
        """The long-term RTT in seconds (0 before the first sample)."""
        return self._long_rtt

    def _average(self, rtt: float) -> float:
        self._samples += 1
        if self._samples <= self._WARMUP:
            self._long_rtt += (rtt - self._long_rtt) / self._samples
        else:
            self._long_rtt += (rtt - self._long_rtt) * 2.0 / (self.long_window + 1)
        return self._long_rtt

    def update(self, rtt: float, in_flight: int, dropped: bool) -> int:
        if dropped:
            self._drop(self.backoff_ratio)
            return self.limit
        if not rtt > 0:  # a zero (or bad) clock reading says nothing about latency
            return self.limit
        long_rtt = self._average(rtt)
        if long_rtt / rtt > 2:  # load is gone: forget the overload faster than the average
            self._long_rtt *= 0.95
        if in_flight < self._estimate / 2:  # not using the limit: nothing learned about more
            return self.limit
        gradient = max(0.5, min(1.0, self.tolerance * long_rtt / rtt))
        target = self._estimate * gradient + self.queue_size
        self._estimate = self._clamp(
            self._estimate * (1 - self.smoothing) + target * self.smoothing
        )
        return self.limit


def _log10(limit: float) -> int:
    """Netflix's ``Log10RootIntFunction``: log10 of the limit, rounded down, at least 1."""
    return max(1, int(math.log10(max(1.0, limit))))


class Vegas(AdaptiveLimit):
    """TCP Vegas, as Netflix concurrency-limits' ``VegasLimit``: estimate the queue at the
    backend from the lowest round-trip time seen (the time of a call that did not wait) and
    keep it between ``alpha`` and ``beta`` calls.

    With ``rtt_noload`` the lowest RTT, a call of ``rtt`` says ``limit * (1 - rtt_noload /
    rtt)`` calls are queued. No queue: the limit grows fast (by ``beta``); a queue below
    ``alpha``: by ``log10(limit)``; above ``beta``: it shrinks by ``log10(limit)``; between,
    it holds. ``alpha`` and ``beta`` are 3 and 6 times ``log10(limit)`` (at least 1), so the
    queue allowed grows slowly with the limit. Every ``probe_every`` x limit samples the
    lowest RTT is forgotten and taken afresh, so that a backend whose own speed changed is
    relearned. A drop (429, 503/529, a timeout) cuts the limit to ``backoff_ratio`` of itself
    (concurrency-limits takes one slot off). The limit does not grow while fewer than half of
    it are in use.

    The most precise of the three when calls are alike (it holds a server just past the
    concurrency where queueing starts), and the most easily fooled when they are not: a
    short answer sets a low ``rtt_noload`` against which every long answer looks queued.

    Args:
        initial: the limit before any sample.
        min_limit: the lowest limit.
        max_limit: the highest limit.
        probe_every: samples between two resets of the lowest RTT, per slot of the limit.
        backoff_ratio: the limit is multiplied by this on a drop (by one slot at least).
    """

    __slots__ = ("_count", "_noload", "backoff_ratio", "probe_every")

    def __init__(
        self,
        *,
        initial: int = 16,
        min_limit: int = 1,
        max_limit: int = 64,
        probe_every: int = 30,
        backoff_ratio: float = 0.9,
    ) -> None:
        super().__init__(initial=initial, min_limit=min_limit, max_limit=max_limit)
        _int("Vegas.probe_every", probe_every, 1)
        _ratio("Vegas.backoff_ratio", backoff_ratio, low=0, high=1)
        self.probe_every = probe_every
        self.backoff_ratio = backoff_ratio
        self._noload = 0.0
        self._count = 0

    @property
    def rtt_noload(self) -> float:
        """The lowest RTT since the last probe, in seconds (0 before the first sample)."""
        return self._noload

    def update(self, rtt: float, in_flight: int, dropped: bool) -> int:
        if dropped:
            self._drop(self.backoff_ratio)
            return self.limit
        if not rtt > 0:  # a zero (or bad) clock reading says nothing about latency
            return self.limit
        self._count += 1
        if self._count >= self.probe_every * self._estimate:  # relearn the lowest RTT
            self._count = 0
            self._noload = rtt
            return self.limit
        if self._noload == 0 or rtt < self._noload:
            self._noload = rtt
            return self.limit
        if in_flight * 2 < self._estimate:  # not using the limit: nothing learned about more
            return self.limit
        step = _log10(self._estimate)
        queue = math.ceil(self._estimate * (1 - self._noload / rtt))
        if queue <= step:
            new = self._estimate + 6 * step
        elif queue < 3 * step:
            new = self._estimate + step
        elif queue > 6 * step:
            new = self._estimate - step
        else:
            return self.limit
        self._estimate = self._clamp(new)
        return self.limit
