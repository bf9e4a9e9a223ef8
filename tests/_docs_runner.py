"""Runs one documentation snippet in a fresh process, for tests/test_docs.py.

``python tests/_docs_runner.py SPEC.json``, in the snippet's working directory. The spec says
what to run (``code`` at ``filename:line``, with a fixture's ``prelude`` and ``epilogue``; or
``argv``, a ``genfan`` command line) and how:

* always **offline**: host names other than ``localhost`` do not resolve, so a snippet can
  reach nothing but 127.0.0.1;
* ``server``: a ``FakeLLMServer`` answers every request to a vendor's API (any host that is not
  a loopback address) through httpx, API keys are dummies, the server is ``docs_server`` in the
  snippet's namespace and its URL is ``$GENFAN_DOCS_SERVER``. Nothing listens on other local
  ports: a snippet's "local server" there is down, as it would be on a fresh machine;
* ``fragment``: top-level ``await``/``async with`` are allowed, and the prelude, the snippet
  and the epilogue run in one event loop (asyncio); otherwise the snippet is a whole program;
* ``stop_when``: a program that runs until stopped gets SIGINT (Ctrl-C) once this Python
  expression (checked every 50 ms, beside it) is true; the ``KeyboardInterrupt`` it ends with
  is then a clean exit;
* ``parse_only``: for ``argv``, only parse the command line (its options and their types),
  without running the command.

Only the standard library is imported before the spec asks for more, so a snippet's imports
are its own.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "0.0.0.0", ""}


def _offline() -> None:
    """Refuse to resolve any host but the local one (a snippet must never go on the network)."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host or "")
        if name not in _LOCAL_NAMES and not name.startswith("127."):
            raise socket.gaierror(socket.EAI_NONAME, f"offline (docs test): {name}")
        return real(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo


def _is_loopback(host: str) -> bool:
    return host in _LOCAL_NAMES or host.startswith("127.")


def _serve_vendors() -> Any:
    """A FakeLLMServer that answers every request httpx sends to a non-loopback host."""
    import httpx

    from genfan.testserver import FakeLLMServer

    server = FakeLLMServer().start()
    real = httpx.AsyncHTTPTransport.handle_async_request

    async def routed(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        if not _is_loopback(request.url.host):
            request.url = request.url.copy_with(scheme="http", host=server.host, port=server.port)
        return await real(self, request)

    httpx.AsyncHTTPTransport.handle_async_request = routed  # type: ignore[method-assign]
    os.environ.update(
        OPENAI_API_KEY="sk-docs-test",
        ANTHROPIC_API_KEY="sk-ant-docs-test",
        OPENROUTER_API_KEY="sk-or-docs-test",
        TOGETHER_API_KEY="docs-test",
        GENFAN_DOCS_SERVER=server.url,
    )
    return server


def _compile(source: str, filename: str, line: int) -> Any:
    # Blank lines first, so that a traceback names the snippet's own line of the page.
    padded = "\n" * max(line - 1, 0) + source
    return compile(padded, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def _run_code(spec: dict[str, Any], namespace: dict[str, Any]) -> None:
    parts = [
        (spec.get("prelude", ""), f"<prelude {spec.get('fixture')}>", 1),
        (spec["code"], spec["filename"], spec["line"]),
        (spec.get("epilogue", ""), f"<epilogue {spec.get('fixture')}>", 1),
    ]
    codes = [_compile(src, name, line) for src, name, line in parts if src.strip()]
    if spec.get("fragment"):
        import anyio

        async def all_parts() -> None:
            for code in codes:
                result = eval(code, namespace)
                if inspect.iscoroutine(result):
                    await result

        anyio.run(all_parts)
        return
    for code in codes:
        result = eval(code, namespace)
        if inspect.iscoroutine(result):  # top-level await in a whole program
            result.close()
            raise SyntaxError(f"{spec['filename']}: top-level await: mark the block a fragment")


def _interrupt_when(condition: str) -> None:
    """Ctrl-C this process once ``condition`` holds (a program that runs until stopped)."""
    import time

    check = compile(condition, "<stop_when>", "eval")
    while not eval(check, {"Path": Path}):
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)


def _parse_command(argv: list[str]) -> None:
    """Parse a ``genfan`` command line as the CLI would, without running the command."""
    import typer

    from genfan.cli import app

    command: Any = typer.main.get_command(app)
    names = ["genfan"]
    ctx = command.make_context("genfan", list(argv))
    while hasattr(command, "resolve_command"):  # a group: on to its subcommand
        rest = [*getattr(ctx, "_protected_args", ()), *ctx.args]
        if not rest:
            break
        name, command, rest = command.resolve_command(ctx, rest)
        names.append(name)
        ctx = command.make_context(name, list(rest), parent=ctx)
    print("parsed:", " ".join(names), json.dumps(ctx.params, default=str))


def _snippet_frames(exc: BaseException) -> None:
    """Leave the runner's and the event loop's frames out of a traceback: the snippet's remain."""
    tb, kept = exc.__traceback__, []
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name != __file__ and "/anyio/" not in name and "/asyncio/" not in name:
            kept.append(tb)
        tb = tb.tb_next
    if kept:
        for a, b in zip(kept, [*kept[1:], None], strict=True):
            a.tb_next = b
        exc.__traceback__ = kept[0]


def main() -> None:
    try:
        _main()
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        import traceback

        _snippet_frames(exc)
        traceback.print_exception(exc)
        sys.exit(1)


def _main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    _offline()
    sys.path.insert(0, os.getcwd())  # the snippet's own modules (myapp/...) sit beside it
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
    if spec.get("server"):
        namespace["docs_server"] = _serve_vendors()
    if spec.get("argv") is not None:
        if spec.get("parse_only"):
            _parse_command(spec["argv"])
            return
        from genfan.cli import main as genfan

        sys.argv = ["genfan", *spec["argv"]]
        genfan()
        return
    stop_when = spec.get("stop_when")
    if stop_when:
        threading.Thread(target=_interrupt_when, args=(stop_when,), daemon=True).start()
    namespace["__file__"] = spec.get("file") or spec["filename"]
    try:
        _run_code(spec, namespace)
    except KeyboardInterrupt:
        if not stop_when:
            raise
        epilogue = spec.get("epilogue", "")
        if epilogue.strip():
            exec(_compile(epilogue, f"<epilogue {spec.get('fixture')}>", 1), namespace)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
