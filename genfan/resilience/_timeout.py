"""The per-attempt timeout."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import aclosing

import anyio
import anyio.lowlevel

from .._backend import Backend
from .._errors import BackendTimeoutError
from .._types import ChatRequest, Completion, StreamEvent
from ._base import Guard, decision
from ._policies import TimeoutPolicy

__all__ = ["Timeout"]


class Timeout(Guard):
    """Limit each call to ``policy.timeout`` seconds (or the request's ``timeout``, if smaller).

    A call that runs past it is cancelled and fails with
    [`BackendTimeoutError`][genfan.BackendTimeoutError] (which the retry guard may retry). The fan-out's
    deadline is separate: when it passes, the whole fan-out is cancelled from outside.
    """

    def __init__(self, inner: Backend, policy: TimeoutPolicy | None = None) -> None:
        super().__init__(inner)
        self.policy = policy or TimeoutPolicy()

    def _limit(self, request: ChatRequest) -> float:
        t = self.policy.timeout
        return min(t, request.timeout) if request.timeout is not None else t

    def _expired(self, limit: float) -> BackendTimeoutError:
        decision("timeout_expired", backend=self.name, level="info", timeout=limit)
        return BackendTimeoutError(f"no answer within {limit:g}s", backend=self.name)

    async def complete(self, request: ChatRequest) -> Completion:
        limit = self._limit(request)
        with anyio.move_on_after(limit) as scope:
            return await self.inner.complete(request)
        if scope.cancelled_caught:
            raise self._expired(limit)
        raise AssertionError("unreachable")  # pragma: no cover

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """The whole stream must end within the limit, its first event come within
        ``first_token`` and no gap between events pass ``idle`` (when set)."""
        limit = self._limit(request)
        end = anyio.current_time() + limit
        first = True
        gap: float | None = None
        bounded_by_gap = False
        # One scope, entered before the inner stream is read: a stream that holds scopes of its
        # own across its events (a fan-out's task group) nests inside it, where it could not
        # nest inside a scope around each event. Its deadline is set while an event is awaited
        # and lifted while the event is with the caller.
        with anyio.CancelScope() as scope:
            async with aclosing(self.inner.stream(request)) as events:  # type: ignore[type-var]
                iterator = aiter(events)
                while True:
                    gap = self.policy.first_token if first else self.policy.idle
                    now = anyio.current_time()
                    left = end - now
                    bounded_by_gap = gap is not None and gap < left
                    scope.deadline = now + (gap if gap is not None and bounded_by_gap else left)
                    try:
                        event = await anext(iterator)
                    except StopAsyncIteration:
                        return
                    scope.deadline = math.inf
                    if scope.cancel_called:  # the deadline passed as the event came
                        await anyio.lowlevel.checkpoint()  # the scope catches it: see below
                    first = False
                    yield event
        # Only reached when the scope caught its own cancellation: a deadline passed.
        if not bounded_by_gap:
            raise self._expired(limit)
        why = f"no first token within {gap:g}s" if first else f"stream idle for {gap:g}s"
        decision("stream_stalled", backend=self.name, level="info", reason=why)
        raise BackendTimeoutError(why, backend=self.name)
