"""Calling genfan from synchronous code, and what sync code sees when it forgets it is not.

`run_sync` is what every ``run_sync()`` / ``complete_sync()`` method calls. It runs the
coroutine on **one event loop that genfan keeps for the whole process**, in a daemon thread
(``genfan-sync``), and blocks the calling thread until the answer is there:

* from a plain script (no event loop running), it is the whole story;
* from inside a running event loop (a Jupyter notebook, a caller under ``asyncio.run`` or
  trio), it works the same way, where ``anyio.run`` would refuse ("Already running asyncio in
  this thread"); the caller's loop is blocked meanwhile, exactly as a synchronous HTTP client
  would block it, so async code should ``await`` the async method instead.

Why one loop and not a fresh ``anyio.run`` per call: a backend keeps state bound to the loop
that used it (an ``httpx.AsyncClient``'s keep-alive connections, a local engine's output
handler), so a backend reused on a second, fresh loop fails ("Event loop is closed"). On the one
loop a backend made once at module level answers any number of sync calls.

The caller's context variables (bound log fields, the current OpenTelemetry span) are carried
to the call; an exception comes back unchanged (the same object); ``KeyboardInterrupt`` while
waiting cancels the call. Called from genfan's own loop thread (a sync tool run inline, which
calls ``run_sync`` again), the coroutine runs on a fresh loop in a new thread instead, since
waiting for its own loop would never end.

The misuse helpers: `not_awaited` turns a coroutine passed where a value belongs into a
``TypeError`` that says "did you forget 'await'?", `sync_with_error` is the error of
``with`` on an async context manager, and `clip` shortens text for one-line reprs.
"""

from __future__ import annotations

import atexit
import contextvars
import inspect
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, NoReturn, ParamSpec, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

__all__ = ["clip", "not_awaited", "run_sync", "sync_with_error"]

P = ParamSpec("P")
T = TypeVar("T")


class _Loop:
    """genfan's event loop for sync callers: a daemon thread serving a blocking portal."""

    def __init__(self) -> None:
        self.portal: BlockingPortal | None = None
        self.ident: int | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="genfan-sync", daemon=True)
        self.thread.start()
        self._ready.wait()
        if self.portal is None:
            raise RuntimeError("genfan could not start its event loop for sync calls") from (
                self._failure
            )

    def _main(self) -> None:
        async def serve() -> None:
            async with BlockingPortal() as portal:
                self.ident = threading.get_ident()
                self.portal = portal
                self._ready.set()
                await portal.sleep_until_stopped()

        try:
            anyio.run(serve)
        except BaseException as exc:  # pragma: no cover - the loop itself failed to start
            self._failure = exc
        finally:
            self._ready.set()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 2.0) -> None:
        """Cancel what is still running and end the thread (at interpreter exit)."""
        portal = self.portal
        if portal is None or not self.alive():
            return
        try:
            portal.start_task_soon(portal.stop, True)
        except RuntimeError:  # pragma: no cover - already stopping
            return
        self.thread.join(timeout)


_lock = threading.Lock()
_loop: _Loop | None = None


def _the_loop() -> _Loop:
    global _loop
    with _lock:
        if _loop is None or not _loop.alive():
            _loop = _Loop()
        return _loop


def _stop_loop() -> None:
    loop = _loop
    if loop is not None:
        loop.stop()


def _forget_loop_after_fork() -> None:
    # The child has no copy of the loop's thread: it starts its own on first use.
    global _loop, _lock
    _loop = None
    _lock = threading.Lock()


atexit.register(_stop_loop)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_loop_after_fork)


def _carried(context: contextvars.Context) -> list[tuple[contextvars.ContextVar[Any], Any]]:
    """The caller's context variables worth carrying: all but the caller's event-loop marker."""
    sniffio = sys.modules.get("sniffio")
    marker = getattr(sniffio, "current_async_library_cvar", None)
    return [(var, value) for var, value in context.items() if var is not marker]


class _Raised:
    """What the call raised, carried back to the caller's thread to be raised there."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def _call(
    values: list[tuple[contextvars.ContextVar[Any], Any]],
    fn: Callable[..., Awaitable[T]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> T | _Raised:
    # A task runs in a copy of the loop's context: setting the caller's values here is local
    # to this call.
    for var, value in values:
        var.set(value)
    try:
        return await fn(*args, **kwargs)
    except anyio.get_cancelled_exc_class():
        raise
    except BaseException as exc:  # even KeyboardInterrupt: the portal would re-raise a
        return _Raised(exc)  # BaseException in its own loop, and the loop would die


def run_sync(fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``await fn(*args, **kwargs)`` to completion and return its result, from sync code.

    Works with or without an event loop running in this thread; with one, that loop is blocked
    until the call returns (see the module's notes).

    Raises:
        Whatever the coroutine raised, unchanged.
    """
    values = _carried(contextvars.copy_context())
    loop = _the_loop()
    if threading.get_ident() == loop.ident:
        return _in_new_thread(values, fn, args, kwargs)
    assert loop.portal is not None
    future: Future[T | _Raised] = loop.portal.start_task_soon(
        _call, values, fn, args, kwargs, name="genfan.run_sync"
    )
    try:
        outcome = future.result()
    except BaseException:
        future.cancel()  # e.g. Ctrl+C while waiting: do not leave the call running
        raise
    return _unwrap(outcome)


def _in_new_thread(
    values: list[tuple[contextvars.ContextVar[Any], Any]],
    fn: Callable[..., Awaitable[T]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> T:
    box: list[T | _Raised] = []

    def main() -> None:
        try:
            box.append(anyio.run(_call, values, fn, args, kwargs))
        except BaseException as exc:  # pragma: no cover - cancellation of the whole run
            box.append(_Raised(exc))

    thread = threading.Thread(target=main, name="genfan-sync-nested", daemon=True)
    thread.start()
    thread.join()
    return _unwrap(box[0])


def _unwrap(outcome: T | _Raised) -> T:
    if not isinstance(outcome, _Raised):
        return outcome
    exc = outcome.exc
    try:
        raise exc
    finally:
        del exc, outcome  # no reference cycle through this frame


def not_awaited(value: object, where: str) -> None:
    """Raise ``TypeError`` when ``value`` is a coroutine: an ``await`` was forgotten.

    ``where`` names what received it, e.g. ``"FanOut.run()"``. The coroutine is closed (it was
    never started), so Python adds no "coroutine ... was never awaited" warning to the error.
    """
    if inspect.iscoroutine(value):
        name = getattr(value, "__qualname__", "a coroutine")
        value.close()  # it can never be used here: no second "never awaited" warning
        raise TypeError(
            f"{where} got a coroutine ({name}) instead of its result: did you forget 'await'?"
        )


def sync_with_error(obj: object) -> NoReturn:
    """The ``TypeError`` of ``with obj:`` where ``obj`` is an async context manager."""
    kind = type(obj).__name__
    sync_method = next((m for m in ("run_sync", "complete_sync") if hasattr(obj, m)), None)
    hint = f", or call .{sync_method}() from sync code" if sync_method else ""
    raise TypeError(f"{kind} is an async context manager: use 'async with', not 'with'{hint}")


def clip(text: str, limit: int = 60) -> str:
    """``text`` on one line, cut to ``limit`` characters (with an ellipsis), for a repr."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
