"""The error tree of genfan.

Every error genfan raises derives from [`GenfanError`][genfan.GenfanError]. Misuse (bad configuration, bad
arguments) is kept apart from failures that happen while talking to a backend::

    GenfanError
    ├── ConfigurationError            misuse: fix the code or the config file
    │   └── MissingExtraError         an optional dependency is not installed
    ├── BackendError(backend=)        a run-time failure of one backend call
    │   ├── BackendTimeoutError       the call ran past its timeout or the deadline
    │   ├── BackendConnectionError    the backend could not be reached
    │   ├── HTTPStatusError(status_code, rate_limit)
    │   │   └── RateLimitError(retry_after)   HTTP 429 (or a provider's quota error)
    │   ├── MalformedResponseError    the backend answered something we cannot read
    │   │   └── ResponseTooLargeError(limit)   an answer (or one event) past max_response_bytes
    │   ├── StreamInterruptedError(partial_text)   a stream cut after text was passed on
    │   ├── AnswerRejectedError(reason, completion)   an answer failed a ``validate=`` check
    │   ├── CircuitOpenError(retry_at, retry_after)   the breaker is open: not called
    │   ├── BulkheadFullError         too many calls in flight or queued: not called
    │   ├── RateLimitExceededError(retry_after)  a local rate limit refused the call
    │   ├── BudgetExceededError(scope, limit, spent)  a spend budget refused the call: not called
    │   ├── CallCancelledError        the call was cancelled (a race was won elsewhere)
    │   └── NoAnswerError(errors, explanation)   a composite called as a backend chose nothing
    └── AllBackendsFailedError        every backend failed; also an ``ExceptionGroup``

Subpackages add their own, under the same root: ``genfan.agents`` (``ToolError``,
``AgentStepLimitError``, ``StepTimeoutError``, ``ChainFailedError``) and ``genfan.resilience``
(``SharedQuotaError``: the shared Redis quota store could not be used); so do providers, such as
the local engine in ``genfan_providers.vllm`` (``ModelFolderError``, ``LocalEngineError``,
``EngineRequestError``).

Provider adapters translate transport and vendor errors at the edge with ``raise ... from exc``,
so the original cause is always kept as ``__cause__``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._types import Completion, RateLimitInfo

__all__ = [
    "AllBackendsFailedError",
    "AnswerRejectedError",
    "BackendConnectionError",
    "BackendError",
    "BackendTimeoutError",
    "BudgetExceededError",
    "BulkheadFullError",
    "CallCancelledError",
    "CircuitOpenError",
    "ConfigurationError",
    "GenfanError",
    "HTTPStatusError",
    "MalformedResponseError",
    "MissingExtraError",
    "NoAnswerError",
    "RateLimitError",
    "RateLimitExceededError",
    "ResponseTooLargeError",
    "StreamInterruptedError",
]


class GenfanError(Exception):
    """Root of every error raised by genfan."""


class ConfigurationError(GenfanError, ValueError):
    """genfan was used or configured wrongly; the message says what to fix."""


class MissingExtraError(ConfigurationError, ImportError):
    """An optional dependency is missing.

    Args:
        extra: the ``pip install 'genfan[EXTRA]'`` extra that provides it.
        package: the package that failed to import.
    """

    def __init__(self, package: str, extra: str, *, reason: str | None = None) -> None:
        self.package = package
        self.extra = extra
        msg = f"{package} is not installed; install it with: pip install 'genfan[{extra}]'"
        if reason:
            msg = f"{msg} ({reason})"
        super().__init__(msg)


class BackendError(GenfanError):
    """A call to one backend failed.

    Attributes:
        backend: the name of the backend that failed.
        retryable: whether trying again (later, or elsewhere) may succeed.
    """

    @property
    def retryable(self) -> bool:
        """Whether trying again (later, or elsewhere) may succeed."""
        return self._retryable

    @property
    def counts_as_failure(self) -> bool:
        """Whether a circuit breaker counts this failure by default."""
        return self._counts

    _retryable: bool = False
    _counts: bool = True

    def __init__(self, message: str, *, backend: str = "?") -> None:
        self.backend = backend
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return f"[{self.backend}] {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, message={self.message!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep errors picklable (Ray workers, multiprocessing) despite keyword-only fields.
        return (_rebuild, (type(self), self.__dict__.copy()))


def _rebuild(cls: type[BackendError], state: dict[str, Any]) -> BackendError:
    err = cls.__new__(cls)
    Exception.__init__(err, state.get("message", ""))
    err.__dict__.update(state)
    return err


class BackendTimeoutError(BackendError):
    """The call did not finish within its timeout or what was left of the deadline."""

    _retryable = True


class BackendConnectionError(BackendError):
    """The backend could not be reached (refused, reset, DNS, TLS)."""

    _retryable = True


class HTTPStatusError(BackendError):
    """The backend answered with an HTTP error status.

    5xx, 408 and 409 are retryable; other 4xx are not, and by default do not count against the
    circuit breaker (the request was at fault, not the backend).

    Attributes:
        status_code: the HTTP status.
        rate_limit: the quota the provider reported in the error response's rate-limit headers
            (OpenAI's ``x-ratelimit-*``, Anthropic's ``anthropic-ratelimit-*``); ``None`` when
            it sent none. The same [`RateLimitInfo`][genfan.RateLimitInfo] a completion carries.
    """

    def __init__(
        self,
        message: str,
        *,
        backend: str = "?",
        status_code: int,
        rate_limit: RateLimitInfo | None = None,
    ) -> None:
        super().__init__(message, backend=backend)
        self.status_code = status_code
        self.rate_limit = rate_limit

    @property
    def retryable(self) -> bool:
        return self.status_code >= 500 or self.status_code in (408, 409, 429)

    @property
    def counts_as_failure(self) -> bool:
        return self.status_code >= 500 or self.status_code in (408, 429)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.backend!r}, status_code={self.status_code}, "
            f"message={self.message!r})"
        )


class RateLimitError(HTTPStatusError):
    """The backend refused the call for rate limiting (HTTP 429).

    Attributes:
        retry_after: seconds the backend asked us to wait, when it said so.
        rate_limit: the provider's parsed rate-limit headers (see [`HTTPStatusError`][genfan.HTTPStatusError]).
    """

    def __init__(
        self,
        message: str,
        *,
        backend: str = "?",
        status_code: int = 429,
        retry_after: float | None = None,
        rate_limit: RateLimitInfo | None = None,
    ) -> None:
        super().__init__(message, backend=backend, status_code=status_code, rate_limit=rate_limit)
        self.retry_after = retry_after


class MalformedResponseError(BackendError):
    """The backend's answer could not be parsed into a completion."""

    _retryable = True


class ResponseTooLargeError(MalformedResponseError):
    """The backend's answer is larger than the backend allows (its ``max_response_bytes``): a
    whole non-streamed body, or one event of a stream. Nothing past the limit was read.

    Not retryable (the same server would most likely send the same again), but a fallback moves
    on to the next backend as for any [`BackendError`][genfan.BackendError].

    Attributes:
        limit: the most bytes allowed.
        size: the size the server announced (``Content-Length``) or the bytes read when the
            limit was passed.
    """

    _retryable = False

    def __init__(self, message: str, *, backend: str = "?", limit: int, size: int) -> None:
        super().__init__(message, backend=backend)
        self.limit = limit
        self.size = size


class StreamInterruptedError(BackendError):
    """A stream ended (the connection broke, or the server stopped) before its end marker
    (OpenAI's ``[DONE]`` and finish reason, Anthropic's ``message_stop``, the local engine's
    finish), after some of the answer had already been passed on.

    The pieces passed on cannot be taken back, so no guard retries the stream itself; the answer
    so far is kept here. A stream cut *before* anything was passed on raises the retryable error
    of the cause instead ([`BackendConnectionError`][genfan.BackendConnectionError], [`MalformedResponseError`][genfan.MalformedResponseError]), which
    retries and fallbacks handle like any other.

    Retryable (asking again may well succeed), and counted by circuit breakers.

    Attributes:
        partial_text: the text passed on before the stream was cut (``""`` when only tool-call
            pieces were).
    """

    _retryable = True

    def __init__(self, message: str, *, backend: str = "?", partial_text: str = "") -> None:
        super().__init__(message, backend=backend)
        self.partial_text = partial_text


class AnswerRejectedError(BackendError):
    """The backend answered, but its answer failed a check of what a good answer is (the
    ``validate=`` of `Fallback`, [`FanOut`][genfan.FanOut] and
    [`Cascade`][genfan.Cascade]: a schema, a refusal detector, your own function).

    A fallback moves on to the next backend, a cascade tier whose answers are all rejected
    escalates, and in a fan-out the answer is a failed candidate (its completion kept, so its
    tokens still count). An answer that is not a valid ``output_type`` raises its subclass
    [`OutputValidationError`][genfan.OutputValidationError].

    Retryable (another sample, or another model, may well answer better); not counted by
    circuit breakers (the backend itself worked).

    Attributes:
        reason: why the answer was rejected (``"refuses"``, ``"population: Input should be a
            valid integer"``, what your check returned).
        completion: the rejected answer.
        check: the name of the check that rejected it (``""`` when unknown).
    """

    _retryable = True
    _counts = False

    def __init__(
        self,
        message: str,
        *,
        backend: str = "?",
        reason: str = "",
        completion: Completion | None = None,
        check: str = "",
    ) -> None:
        super().__init__(message, backend=backend)
        self.reason = reason or message
        self.completion = completion
        self.check = check


class CircuitOpenError(BackendError):
    """The backend's circuit breaker is open; the call was not sent.

    Attributes:
        retry_at: the ``anyio.current_time()`` at which the breaker lets a probe through.
        retry_after: seconds from the rejection until ``retry_at``.
    """

    _counts = False

    def __init__(
        self, message: str, *, backend: str = "?", retry_at: float, retry_after: float
    ) -> None:
        super().__init__(message, backend=backend)
        self.retry_at = retry_at
        self.retry_after = retry_after


class BulkheadFullError(BackendError):
    """The backend's bulkhead is full (or the queue wait ran out); the call was shed."""

    _counts = False


class RateLimitExceededError(BackendError):
    """A local rate limit refused the call (policy ``reject``), or the wait exceeded the deadline.

    Attributes:
        retry_after: seconds until enough quota is available.
    """

    _counts = False

    def __init__(self, message: str, *, backend: str = "?", retry_after: float) -> None:
        super().__init__(message, backend=backend)
        self.retry_after = retry_after


class BudgetExceededError(BackendError):
    """A spend budget (``genfan.cost.Budget``) refused the call: what its scope has spent in
    the current period, plus the calls in flight, plus this call's reserve, would pass the
    limit. The call was not sent.

    Not retryable before the period resets (``resets_at``), and not counted by circuit breakers
    (the backend is fine). A fallback moves on to its next backend, which may have a budget of
    its own.

    Attributes:
        scope: the budget's scope (an application, a key, a schedule).
        limit: the limit in USD for the period.
        spent: USD recorded in the current period.
        reserved: USD reserved by calls in flight.
        requested: USD this call wanted to reserve.
        period: the budget's period (``"day"``, ``"month"``, ``"total"``, or seconds as text).
        resets_at: the Unix time the next period starts (``None`` for a total budget).
    """

    _counts = False

    def __init__(
        self,
        message: str,
        *,
        backend: str = "?",
        scope: str,
        limit: float,
        spent: float,
        reserved: float,
        requested: float,
        period: str,
        resets_at: float | None,
    ) -> None:
        super().__init__(message, backend=backend)
        self.scope = scope
        self.limit = limit
        self.spent = spent
        self.reserved = reserved
        self.requested = requested
        self.period = period
        self.resets_at = resets_at

    @property
    def retry_after(self) -> float | None:
        """Seconds from now until the period resets (``None`` for a total budget)."""
        if self.resets_at is None:
            return None
        import time

        return max(0.0, self.resets_at - time.time())


class CallCancelledError(BackendError):
    """The call was cancelled before it finished (for example another backend won the race)."""

    _counts = False


class NoAnswerError(BackendError):
    """A composite (``FanOut``, ``Cascade``, ``Synthesis``) called as a backend gave no answer.

    ``complete()`` and ``stream()`` raise it where ``run()`` raises
    [`AllBackendsFailedError`][genfan.AllBackendsFailedError] (every inner backend failed), and also when the backends
    answered but the selector chose none. Being a [`BackendError`][genfan.BackendError], a composite nested in
    another one fails as one typed candidate, and guards around a composite can classify it.
    The [`AllBackendsFailedError`][genfan.AllBackendsFailedError], when there was one, is its ``__cause__``.

    Attributes:
        errors: the inner backends' errors (one per failed candidate; nested composites give
            their own [`NoAnswerError`][genfan.NoAnswerError]).
        explanation: the selector's explanation when answers came back but none was chosen.
        retryable: whether any inner error is retryable.
        counts_as_failure: whether any inner error counts as a circuit-breaker failure (a
            selector declining healthy answers does not).
    """

    def __init__(
        self,
        message: str,
        *,
        backend: str = "?",
        errors: Sequence[Exception] = (),
        explanation: str | None = None,
    ) -> None:
        super().__init__(message, backend=backend)
        self.errors: tuple[Exception, ...] = tuple(errors)
        self.explanation = explanation

    @property
    def retryable(self) -> bool:
        return any(isinstance(e, BackendError) and e.retryable for e in self.errors)

    @property
    def counts_as_failure(self) -> bool:
        return any(isinstance(e, BackendError) and e.counts_as_failure for e in self.errors)


class AllBackendsFailedError(GenfanError, ExceptionGroup):  # type: ignore[misc,unused-ignore]
    """Every backend of a fan-out failed.

    It is an ``ExceptionGroup`` of the per-backend [`BackendError`][genfan.BackendError] s, so both
    ``except GenfanError`` and ``except* RateLimitError`` work.
    """

    def __new__(cls, message: str, exceptions: Sequence[Exception]) -> AllBackendsFailedError:
        return super().__new__(cls, message, exceptions)

    def __init__(self, message: str, exceptions: Sequence[Exception]) -> None:
        super().__init__(message, exceptions)

    def derive(self, excs: Sequence[Exception]) -> AllBackendsFailedError:  # type: ignore[override,unused-ignore]
        return AllBackendsFailedError(self.message, excs)
