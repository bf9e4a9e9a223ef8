"""The gateway's HTTP errors, in OpenAI's shape, and how genfan's errors map onto them.

Every error answer is ``{"error": {"message", "type", "param", "code"}}``. How genfan's error
tree (``genfan/_errors.py``) maps onto statuses:

| genfan error | status | ``type`` / ``code`` |
|---|---|---|
| ``RateLimitExceededError``, ``RateLimitError`` (upstream 429) | 429 + ``Retry-After`` | ``rate_limit_exceeded`` |
| ``BudgetExceededError`` (a backend's own budget) | 429 (+ ``Retry-After`` until the period resets) | ``insufficient_quota`` |
| ``CircuitOpenError``, ``BulkheadFullError`` | 503 + ``Retry-After`` | ``overloaded`` / ``backend_unavailable`` |
| ``BackendTimeoutError`` | 504 | ``timeout`` |
| ``HTTPStatusError`` 4xx (the backend refused the request) | 400 | ``invalid_request_error`` / ``upstream_rejected`` |
| ``BackendConnectionError``, ``HTTPStatusError`` 5xx, ``MalformedResponseError``, ``StreamInterruptedError``, ``AnswerRejectedError`` | 502 | ``upstream_error`` |
| ``NoAnswerError``, ``AllBackendsFailedError`` | as their causes when they all agree (all 429: 429), else 502 | ``upstream_error`` |
| ``ConfigurationError`` (a request the backend cannot carry) | 400 | ``invalid_request_error`` |
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from .._errors import (
    AllBackendsFailedError,
    BackendConnectionError,
    BackendError,
    BackendTimeoutError,
    BudgetExceededError,
    BulkheadFullError,
    CircuitOpenError,
    ConfigurationError,
    GenfanError,
    HTTPStatusError,
    NoAnswerError,
    RateLimitError,
    RateLimitExceededError,
)

__all__ = ["GatewayError", "from_genfan_error"]


class GatewayError(GenfanError):
    """An HTTP error answer of the gateway, in OpenAI's error shape.

    Attributes:
        status: the HTTP status.
        message: what went wrong and what to do about it.
        type: OpenAI's error ``type`` (``invalid_request_error``, ``rate_limit_exceeded``...).
        param: the request field at fault, if one is.
        code: a short machine-readable code.
        retry_after: seconds for the ``Retry-After`` header (429 and 503).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.retry_after is None:
            return []
        return [(b"retry-after", str(max(1, math.ceil(self.retry_after))).encode())]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, NoAnswerError) and exc.errors:
        return [leaf for e in exc.errors for leaf in _leaves(e)]
    if isinstance(exc, AllBackendsFailedError):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def _one(exc: BaseException) -> GatewayError:
    backend = getattr(exc, "backend", "?")
    msg = f"backend {backend!r}: {getattr(exc, 'message', str(exc))}"
    if isinstance(exc, RateLimitExceededError | RateLimitError):
        wait = getattr(exc, "retry_after", None)
        return GatewayError(
            429,
            msg,
            type="rate_limit_exceeded",
            code="rate_limit_exceeded",
            retry_after=wait if wait is not None else 1.0,
        )
    if isinstance(exc, BudgetExceededError):  # a backend's own budget (BackendConfig.budget)
        reset = exc.resets_at
        return GatewayError(
            429,
            msg,
            type="insufficient_quota",
            code="insufficient_quota",
            retry_after=None if reset is None else max(1.0, reset - time.time()),
        )
    if isinstance(exc, CircuitOpenError):
        return GatewayError(
            503, msg, type="overloaded", code="backend_unavailable", retry_after=exc.retry_after
        )
    if isinstance(exc, BulkheadFullError):
        return GatewayError(503, msg, type="overloaded", code="overloaded", retry_after=1.0)
    if isinstance(exc, BackendTimeoutError):
        return GatewayError(504, msg, type="timeout", code="timeout")
    if isinstance(exc, HTTPStatusError) and 400 <= exc.status_code < 500:
        return GatewayError(400, msg, type="invalid_request_error", code="upstream_rejected")
    if isinstance(exc, ConfigurationError):
        return GatewayError(400, str(exc), type="invalid_request_error", code="unsupported")
    if isinstance(exc, BackendConnectionError | BackendError):
        return GatewayError(502, msg, type="upstream_error", code="upstream_error")
    return GatewayError(500, "internal error", type="server_error", code="internal_error")


def from_genfan_error(exc: BaseException) -> GatewayError:
    """The HTTP answer for a genfan error: a composite's failure takes its causes' status when
    they all agree (every backend said 429: 429, with the soonest ``Retry-After``)."""
    leaves: Sequence[BaseException] = _leaves(exc)
    mapped = [_one(e) for e in leaves] or [_one(exc)]
    statuses = {m.status for m in mapped}
    if len(mapped) == 1 or (
        len(statuses) == 1 and not isinstance(exc, NoAnswerError | AllBackendsFailedError)
    ):
        return mapped[0]
    if len(statuses) == 1:
        first = mapped[0]
        waits = [m.retry_after for m in mapped if m.retry_after is not None]
        message = "; ".join(m.message for m in mapped)
        return GatewayError(
            first.status,
            f"every backend failed: {message}",
            type=first.type,
            code=first.code,
            retry_after=min(waits) if waits else None,
        )
    message = "; ".join(m.message for m in mapped)
    return GatewayError(
        502, f"every backend failed: {message}", type="upstream_error", code="upstream_error"
    )
