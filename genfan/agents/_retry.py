"""How tools and chain steps retry, through genfan's one retry engine.

* `as_retry`: a `RetryPolicy` from a ``retry=`` option (a
  policy, or an attempt count);
* `transient`: which failures may pass on a retry by default;
* `retrying_for`: a retrier from `Retrier` that never retries
  invalid arguments, and logs and counts each retry.
"""

from __future__ import annotations

import sys
from typing import Any

from .. import telemetry
from .._errors import BackendError, ConfigurationError
from ..resilience import Retrier, RetryPolicy
from ._errors import ToolArgumentsError

__all__ = ["as_retry", "retrying_for", "transient"]


def as_retry(retry: RetryPolicy | int | None, *, what: str) -> RetryPolicy | None:
    """A retry policy from ``retry`` (an attempt count is ``RetryPolicy(attempts=n)``)."""
    if retry is None or isinstance(retry, RetryPolicy):
        return retry
    if isinstance(retry, bool) or not isinstance(retry, int) or retry < 1:
        raise ConfigurationError(
            f"{what}: retry must be an attempt count >= 1 or a RetryPolicy, got {retry!r}"
        )
    return RetryPolicy(attempts=retry, budget=None)


def transient(exc: BaseException) -> bool:
    """Whether a tool's failure may pass on a retry: timeouts, connection errors (httpx's
    transport errors too) and [`BackendError`][genfan.BackendError] s marked ``retryable``."""
    if isinstance(exc, BackendError):
        return exc.retryable
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    httpx = sys.modules.get("httpx")
    return httpx is not None and isinstance(exc, httpx.TransportError)


def retrying_for(
    policy: RetryPolicy, name: str, *, event: str = "tool_call_retry", kind: str = "tool"
) -> Any:
    """A tenacity retrier from genfan's one retry engine
    ([`Retrier`][genfan.resilience.Retrier]), following ``policy``.

    With ``retry_on=None`` only transient failures are retried (see `transient`); pass
    ``retry_on=(Exception,)`` to retry everything. Invalid arguments are never retried. The
    policy's retry budget is a backend's concern and does not apply here.
    """
    retry_on = policy.retry_on

    def should_retry(exc: BaseException) -> bool:
        if isinstance(exc, ToolArgumentsError):
            return False
        if retry_on is None:
            return transient(exc)
        if isinstance(retry_on, tuple):
            return isinstance(exc, retry_on)
        return bool(retry_on(exc))

    def before_sleep(state: Any) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        telemetry.event(
            event,
            level="info",
            **{kind: name},
            attempt=state.attempt_number + 1,
            delay=state.upcoming_sleep,
            error=type(exc).__name__ if exc is not None else None,
        )
        telemetry.instruments().guard.add(
            1, {"genfan.guard": f"{kind}_retry", f"genfan.{kind}": name}
        )

    return Retrier(
        policy, name=name, kind=kind, retry_on=should_retry, on_retry=before_sleep
    ).retrying()
