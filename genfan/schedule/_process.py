"""A job in a child process, which can be killed: ``SchedulePolicy(isolation="process")``.

A sync job in a worker thread cannot be stopped: Python has no way to stop a thread, so a timeout
only abandons it and the function runs on. Here the job runs in a fresh interpreter
(``python -m genfan.schedule._process``), in a process group of its own: when the attempt times
out or is cancelled, the group is killed (SIGKILL) and the job stops at once. The child gets the
job's import path, arguments and [`RunContext`][genfan.schedule.RunContext] as one JSON line on stdin and answers with
one JSON line on a descriptor of its own (the job's prints go to stderr). It exits by itself if
the scheduler dies (its stdin closes), so no job outlives its replica.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import anyio

from ._jobs import RunContext, resolve_callable, takes_context

__all__ = ["JobProcessError", "call_in_process"]


class JobProcessError(Exception):
    """The job failed in its child process (its error type and message), or the process ended
    without an answer."""

    def __init__(self, message: str, *, error_type: str | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type

    def __str__(self) -> str:
        text = super().__str__()
        return f"{self.error_type}: {text}" if self.error_type else text


def _kill(process: anyio.abc.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
        if hasattr(os, "killpg"):
            os.killpg(process.pid, signal.SIGKILL)
        else:  # pragma: no cover - not POSIX
            process.kill()


async def call_in_process(
    ref: str, args: Sequence[Any], kwargs: Mapping[str, Any], ctx: RunContext
) -> None:
    """Run the job ``ref`` (``"pkg.mod:func"``, sync or async) in a child process; kill it
    (and anything it started in its process group) if this is cancelled or times out.

    Raises:
        JobProcessError: the job raised (its type and message), or the process died.
    """
    request = {
        "func": ref,
        "args": list(args),
        "kwargs": dict(kwargs),
        "context": ctx.to_dict(),
        "path": sys.path,
        "cwd": os.getcwd(),
    }
    read_fd, write_fd = os.pipe()
    try:
        process = await anyio.open_process(
            [sys.executable, "-m", "genfan.schedule._process", str(write_fd)],
            stdin=subprocess.PIPE,
            stdout=None,
            stderr=None,
            start_new_session=True,
            pass_fds=(write_fd,),
        )
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        raise
    os.close(write_fd)
    try:
        assert process.stdin is not None
        await process.stdin.send(json.dumps(request).encode() + b"\n")
        answer = await anyio.to_thread.run_sync(_read_all, read_fd, abandon_on_cancel=True)
        code = await process.wait()
    except BaseException:
        with anyio.CancelScope(shield=True):
            _kill(process)
            await process.wait()
        raise
    finally:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                if process.stdin is not None:
                    await process.stdin.aclose()
    try:
        reply = json.loads(answer) if answer else None
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        raise JobProcessError(f"the job's process {how} without an answer")
    if not reply.get("ok"):
        raise JobProcessError(
            str(reply.get("message", "")), error_type=str(reply.get("type", "Error"))
        )


def _read_all(fd: int) -> bytes:
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


# -- the child --------------------------------------------------------------------------------


def _watch_parent() -> None:
    """Exit when stdin closes: the scheduler that started this process is gone."""
    with contextlib.suppress(Exception):
        while sys.stdin.buffer.read(65536):
            pass
    os._exit(70)


def _child(answer_fd: int) -> int:
    os.set_inheritable(answer_fd, False)  # not to the job's own children
    request = json.loads(sys.stdin.buffer.readline())
    threading.Thread(target=_watch_parent, daemon=True).start()
    sys.path[:] = request["path"]
    with contextlib.suppress(OSError):
        os.chdir(request["cwd"])
    os.dup2(2, 1)  # the job's prints go to stderr; the answer has a descriptor of its own
    reply: dict[str, Any]
    try:
        fn = resolve_callable(request["func"])
        kw = dict(request["kwargs"])
        if takes_context(fn):
            kw["context"] = RunContext.from_dict(request["context"])
        call = partial(fn, *request["args"], **kw)
        if inspect.iscoroutinefunction(fn):
            anyio.run(call)
        else:
            out = call()
            if inspect.isawaitable(out):

                async def wait() -> None:
                    await out

                anyio.run(wait)
        reply = {"ok": True}
    except BaseException as exc:  # the job's error goes back to the scheduler
        reply = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
    with os.fdopen(answer_fd, "wb") as fh:
        fh.write(json.dumps(reply).encode())
    return 0


if __name__ == "__main__":
    sys.exit(_child(int(sys.argv[1])))
