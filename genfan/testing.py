"""A test kit for genfan users (and genfan's own tests).

* `FakeBackend`: scripted replies, latency and failures, with call records;
* `FunctionBackend`: a backend from a plain (sync or async) function;
* `capture_events`: collect genfan's structlog events in a list;
* `set_testing`: turn off retry backoff and jitter so tests run at full speed.

Latency is slept with ``anyio.sleep``, so under trio's ``MockClock(autojump_threshold=0)`` a
10-second fake backend answers instantly while timing logic still sees 10 seconds.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from . import _settings
from ._backend import BaseBackend
from ._errors import BackendError, ConfigurationError
from ._types import ChatRequest, Completion, StreamEnd, StreamEvent, TextDelta, ToolCall, Usage

__all__ = [
    "Fail",
    "FakeBackend",
    "FunctionBackend",
    "Reply",
    "capture_events",
    "fake_backend",
    "is_testing",
    "set_testing",
]


def set_testing(on: bool = True, *, attempts: int | None = None) -> None:
    """Turn testing mode on: retries wait 0 seconds (and try at most ``attempts`` times)."""
    _settings.set_testing_mode(on, attempts)


def is_testing() -> tuple[bool, int | None]:
    """Whether testing mode is on, and its attempts cap."""
    return _settings.is_testing()


@dataclass(frozen=True, kw_only=True)
class Reply:
    """One scripted answer.

    ``latency`` is the whole answer's. ``ttft``, when set, shapes `FakeBackend.stream`: the
    first word arrives after ``ttft`` and the others are spread evenly over the rest of
    ``latency`` (by default the stream waits the whole latency, then sends every word).
    """

    text: str = ""
    latency: float = 0.0
    ttft: float | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    usage: Usage | None = None
    finish_reason: str = "stop"


@dataclass(frozen=True, kw_only=True)
class Fail:
    """One scripted failure: raise ``error`` after ``latency`` seconds."""

    error: BackendError | type[BackendError]
    latency: float = 0.0


ScriptItem = Reply | Fail | str


class FakeBackend(BaseBackend):
    """A backend that follows a script.

    Args:
        name: backend name.
        replies: what to answer, in order (cycled): strings, `Reply` or `Fail`; or
            a function ``request -> item`` (sync or async) for per-call logic.
        latency: default latency of each call, in seconds.
        model: the model name reported in completions.

    Attributes:
        calls: every request received (including ones that were cancelled).
        in_flight: calls running now; ``max_in_flight``: the most at once.
        cancelled: how many calls were cancelled while running.
        closed: whether `aclose` was called.
    """

    def __init__(
        self,
        name: str = "fake",
        replies: Sequence[ScriptItem]
        | Callable[[ChatRequest], ScriptItem | Awaitable[ScriptItem]] = ("ok",),
        *,
        latency: float = 0.0,
        model: str = "fake-model",
    ) -> None:
        super().__init__(name)
        if not callable(replies) and not replies:
            raise ConfigurationError("FakeBackend needs at least one reply")
        self._script = replies if callable(replies) else itertools.cycle(list(replies))
        self.latency = latency
        self.model = model
        self.calls: list[ChatRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.cancelled = 0
        self.completed = 0
        self.failed = 0
        self.closed = False

    async def _next(self, request: ChatRequest) -> ScriptItem:
        if callable(self._script):
            item = self._script(request)
            if inspect.isawaitable(item):
                item = await item
            return item
        return next(self._script)

    async def complete(self, request: ChatRequest) -> Completion:
        self._enter(request)
        start = anyio.current_time()
        try:
            item = await self._reply(request)
            if item.latency:
                await anyio.sleep(item.latency)
            return self._finish(request, item, start)
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """Streams the scripted reply word by word (paced by `Reply.ttft`, when set)."""
        self._enter(request)
        start = anyio.current_time()
        ended = False
        try:
            item = await self._reply(request)
            if isinstance(item, Fail) or item.ttft is None:
                if item.latency:
                    await anyio.sleep(item.latency)
                gap = 0.0
            else:
                first = min(item.ttft, item.latency)
                await anyio.sleep(first)
                gap = (item.latency - first) / len(item.text.split(" "))
            if isinstance(item, Fail):
                self._finish(request, item, start)  # raises the scripted error
                return
            words = item.text.split(" ")
            for i, word in enumerate(words):
                if i and gap:
                    await anyio.sleep(gap)
                yield TextDelta(text=word if i == 0 else " " + word)
            if gap:
                await anyio.sleep(gap)
            completion = self._finish(request, item, start)
            ended = True
            yield StreamEnd(completion=completion)
        except (anyio.get_cancelled_exc_class(), GeneratorExit):
            if not ended:
                self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1

    def _enter(self, request: ChatRequest) -> None:
        self.calls.append(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    async def _reply(self, request: ChatRequest) -> Reply | Fail:
        item = await self._next(request)
        if isinstance(item, str):
            return Reply(text=item, latency=self.latency)
        if not item.latency and self.latency:
            return dataclasses.replace(item, latency=self.latency)
        return item

    def _finish(self, request: ChatRequest, item: Reply | Fail, start: float) -> Completion:
        """The completion of a reply, or the scripted failure raised."""
        if isinstance(item, Fail):
            self.failed += 1
            err = item.error
            if isinstance(err, type):
                err = err(f"scripted {err.__name__}", backend=self.name)
            raise err
        self.completed += 1
        usage = item.usage or Usage(
            input_tokens=sum(len((m.content or "").split()) for m in request.messages),
            output_tokens=len(item.text.split()),
        )
        return Completion(
            text=item.text,
            tool_calls=item.tool_calls,
            finish_reason="tool_calls" if item.tool_calls else item.finish_reason,
            usage=usage,
            model=request.model or self.model,
            backend=self.name,
            latency=anyio.current_time() - start,
        )

    async def aclose(self) -> None:
        self.closed = True


def fake_backend(model: str | None = None, **options: Any) -> FakeBackend:
    """Registry factory for ``"fake:MODEL"`` specs (``type = "fake"`` in a config file).

    Options are `FakeBackend`'s (``name``, ``replies``, ``latency``).
    """
    return FakeBackend(model=model or "fake-model", **options)


class FunctionBackend(BaseBackend):
    """A backend from a function ``request -> str | Completion`` (sync or async)."""

    def __init__(
        self,
        fn: Callable[[ChatRequest], str | Completion | Awaitable[str | Completion]],
        name: str | None = None,
    ) -> None:
        super().__init__(name or str(getattr(fn, "__name__", "function")))
        self._fn = fn

    async def complete(self, request: ChatRequest) -> Completion:
        start = anyio.current_time()
        out = self._fn(request)
        if inspect.isawaitable(out):
            out = await out
        if isinstance(out, Completion):
            return out if out.backend else out.model_copy(update={"backend": self.name})
        return Completion(
            text=str(out),
            backend=self.name,
            model=request.model or self.name,
            latency=anyio.current_time() - start,
        )


@contextmanager
def capture_events() -> Iterator[list[MutableMapping[str, Any]]]:
    """Collect genfan's structlog events (as dicts with ``event`` and ``log_level``).

    Every level is captured, whatever level filter the application configured, and bound
    context variables (such as ``request_id``) are merged into each event.

    On the way out structlog is left as it was found: the application's configuration is put
    back, and a structlog nobody had configured is unconfigured again (so genfan goes back to
    logging nothing, as `genfan.telemetry` promises, instead of printing to stdout).
    """
    capture = structlog.testing.LogCapture()
    was_configured = structlog.is_configured()
    old = structlog.get_config()
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, capture],
        wrapper_class=structlog.make_filtering_bound_logger(0),
        cache_logger_on_first_use=False,
    )
    try:
        yield capture.entries
    finally:
        if was_configured:
            structlog.configure(**old)
        else:
            # configure() would mark structlog configured, and telemetry.event() would then
            # print every event with structlog's defaults.
            structlog.reset_defaults()
