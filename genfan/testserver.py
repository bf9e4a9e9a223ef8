"""A small, fast, fake LLM server for tests and benchmarks: OpenAI- and Anthropic-compatible.

`FakeLLMServer` speaks HTTP/1.1 on 127.0.0.1 (keep-alive, ``Content-Length`` bodies,
chunked server-sent events) and answers:

* ``POST /v1/chat/completions`` (streaming or not, tool calls, usage in the last chunk),
* ``POST /v1/embeddings`` (deterministic vectors),
* ``POST /v1/messages`` (the Anthropic Messages API, streaming or not, tool use),
* the batch APIs: OpenAI's ``/v1/files`` and ``/v1/batches``, Anthropic's
  ``/v1/messages/batches`` (``server.batches``: see `genfan._testserver_batches`),
* ``GET /health``.

By default it echoes the prompt (``"echo: <last user message>"``; a JSON object when the request
asks for JSON). Scripts, a handler function, latency and fault injection change that::

    with FakeLLMServer(latency=0.0) as srv:
        srv.script("model-x", [ToolCallsReply([("lookup", {"q": "a"})]), TextReply("done")])
        srv.set_faults(Fault("status", status=503), rate=0.5)
        backend = OpenAIBackend("model-x", base_url=srv.url)      # srv.url ends in /v1
        ...
        assert srv.count("/v1/chat/completions") == 2

A single request can ask for a fault with the header ``x-fake-fault`` (``503``,
``429;retry-after=2``, ``hang``, ``drop``, ``malformed``, ``truncate``, ``truncate;at=120``,
``cut;at=120``, ``gzip``, ``huge;size=50000000``, ``echo;status=401``) and for latency with
``x-fake-latency: 0.25``.

It runs in a background thread of the test process (``with FakeLLMServer() as srv``), or as a
separate process so that its CPU does not count against a benchmarked client::

    python -m genfan.testserver --port 0 --latency 0.5      # prints its URL on stdout

The server is the one part of ``genfan`` written on plain ``asyncio`` (an ``asyncio.Protocol``
for speed): it runs on its own event loop in its own thread or process, never on the caller's,
so asyncio and trio clients can both use it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gzip
import hashlib
import itertools
import json
import math
import random
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ._types import ToolCall

__all__ = [
    "FakeLLMServer",
    "Fault",
    "FaultKind",
    "RawReply",
    "RecordedRequest",
    "ServerProcess",
    "TextReply",
    "ToolCallsReply",
]

FaultKind = Literal[
    "status", "hang", "drop", "malformed", "truncate", "cut", "gzip", "huge", "echo"
]
_KINDS = ("status", "hang", "drop", "malformed", "truncate", "cut", "gzip", "huge", "echo")


@dataclass(frozen=True)
class TextReply:
    """Answer with ``text`` (``usage``: input and output tokens; default: word counts)."""

    text: str
    finish_reason: str = "stop"
    usage: tuple[int, int] | None = None
    latency: float | None = None


@dataclass(frozen=True, init=False)
class ToolCallsReply:
    """Answer with one or several (parallel) tool calls.

    ``calls`` holds [`ToolCall`][genfan.ToolCall] s or ``(name, arguments)`` pairs, where
    arguments is a dict or a JSON string; ids are generated when missing.
    """

    calls: tuple[ToolCall, ...]
    text: str = ""
    latency: float | None = None

    def __init__(
        self,
        calls: Sequence[ToolCall | tuple[str, Mapping[str, Any] | str]],
        *,
        text: str = "",
        latency: float | None = None,
    ) -> None:
        made: list[ToolCall] = []
        for i, c in enumerate(calls):
            if isinstance(c, ToolCall):
                made.append(c)
            else:
                name, args = c
                made.append(
                    ToolCall(
                        id=f"call_{i}_{name}",
                        name=name,
                        arguments=args if isinstance(args, str) else json.dumps(dict(args)),
                    )
                )
        object.__setattr__(self, "calls", tuple(made))
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "latency", latency)


@dataclass(frozen=True, kw_only=True)
class RawReply:
    """Answer exactly this: a status, a body (bytes, text, or JSON-able) and headers."""

    status: int = 200
    body: bytes | str | Mapping[str, Any] | list[Any] = b""
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Fault:
    """A failure to inject.

    Attributes:
        kind: ``status`` (an HTTP error), ``hang`` (never answer), ``drop`` (close the
            connection in the middle of the answer), ``malformed`` (a body that is not JSON /
            a stream chunk that is not JSON), ``truncate`` (a stream that ends cleanly but
            early, without ``[DONE]``/``message_stop``; a non-streamed answer that is JSON of
            the wrong shape; with ``at``: the real answer, ended cleanly after ``at`` bytes of
            its body), ``cut`` (the real answer, streamed or not, of which ``at`` bytes of the
            body are sent before the socket is closed, mid-body: by default half), ``gzip``
            (the real answer, its body gzip'd with ``content-encoding: gzip``; a stream is
            compressed event by event, each flushed as it is sent), ``huge`` (an answer whose
            text is ``size`` bytes: one JSON body, or one stream event of that size), ``echo``
            (an error ``status`` whose message quotes every header of the request, as some
            servers do with a refused key).
        status: the status of a ``status`` or ``echo`` fault (429 and 529 get vendor-shaped
            bodies).
        retry_after: the ``Retry-After`` header to send (seconds, or an HTTP-date string).
        at: where ``cut`` and ``truncate`` stop, in bytes of the body (of the whole
            ``text/event-stream`` for a stream).
        size: the text's size for ``huge``, in bytes.
    """

    kind: FaultKind = "status"
    status: int = 503
    retry_after: float | str | None = None
    at: int | None = None
    size: int = 1_000_000

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """A fault from the ``x-fake-fault`` header syntax: ``503``, ``429;retry-after=2``,
        ``cut;at=120``, ``huge;size=1000000``, ``echo;status=401``..."""
        head, *params = spec.strip().split(";")
        retry_after: float | str | None = None
        options: dict[str, int] = {}
        for param in params:
            name, _, value = param.partition("=")
            name, value = name.strip().lower(), value.strip()
            if name == "retry-after":
                try:
                    retry_after = float(value)
                except ValueError:
                    retry_after = value
            elif name in ("at", "size", "status"):
                options[name] = int(value)
            elif name:
                raise ValueError(f"unknown fault option {name!r} in {spec!r}")
        head = head.strip().lower()
        if head.isdigit():
            return cls("status", status=int(head), retry_after=retry_after)
        if head in _KINDS:
            return cls(head, retry_after=retry_after, **options)  # type: ignore[arg-type]
        raise ValueError(f"unknown fault {spec!r}")


Reply = TextReply | ToolCallsReply | RawReply | Fault | str
Handler = Callable[[str, dict[str, Any]], Reply | None]


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: Any
    at: float


@dataclass
class _Outage:
    start: float
    end: float
    fault: Fault


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    408: "Request Timeout",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    529: "Overloaded",
}


class FakeLLMServer:
    """The fake server (see the module docstring).

    Args:
        host: the address to listen on.
        port: the port (0: any free port; read `port` or `url`).
        latency: seconds to wait before every answer.
        chunk_delay: seconds between streamed chunks.
        record: how many requests to keep in `requests` (counts are always kept).
        rate_limit_headers: headers added to every successful answer (e.g. OpenAI's
            ``x-ratelimit-remaining-requests``), to test rate-limit parsing.
        seed: seed of the random draw behind ``set_faults(..., rate=...)``.
        cache_ttl: seconds a prompt prefix stays cached on the Anthropic endpoint after its
            last use (a ``cache_control`` with ``"ttl": "1h"``: an hour). A prefix marked with
            ``cache_control`` is written on first sight (billed as
            ``cache_creation_input_tokens``) and read by later requests once the writing
            request's answer has started (``cache_read_input_tokens``); requests that arrive
            while it is still being written write it too, as at Anthropic. Tokens are words.
            The totals are in ``cache_write_tokens`` and ``cache_read_tokens``.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        chunk_delay: float = 0.0,
        record: int = 10_000,
        rate_limit_headers: Mapping[str, str] | None = None,
        seed: int = 0,
        cache_ttl: float = 300.0,
    ) -> None:
        self.host = host
        self.port = port
        self.latency = latency
        self.chunk_delay = chunk_delay
        self.rate_limit_headers = dict(rate_limit_headers or {})
        self.handler: Handler | None = None
        self.requests: collections.deque[RecordedRequest] = collections.deque(maxlen=record or 1)
        self._record = record > 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.connections_opened = 0
        self.connections_closed = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.abandoned = 0
        self._scripts: dict[str, collections.deque[Reply]] = {}
        self._model_latency: dict[str, float] = {}
        self._fault: Fault | None = None
        self._fault_rate = 1.0
        self._fault_paths: tuple[str, ...] | None = None
        self._outages: list[_Outage] = []
        self._random = random.Random(seed)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[_Connection] = set()
        self._t0 = time.monotonic()
        self.cache_ttl = cache_ttl
        #: prompt-cache entries: prefix key -> (readable from, expires at), monotonic seconds.
        self._prompt_cache: dict[str, tuple[float, float]] = {}
        self.cache_write_tokens = 0
        self.cache_read_tokens = 0
        from ._testserver_batches import BatchEmulator

        #: The batch APIs (OpenAI Files + Batches, Anthropic Message Batches): see
        #: `genfan._testserver_batches`; ``batches.complete_after(s)``, ``batches.creates``...
        self.batches = BatchEmulator(self)

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def root_url(self) -> str:
        """``http://host:port`` (no version path)."""
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The ``base_url`` for both providers: ``http://host:port/v1``."""
        return self.root_url + "/v1"

    def start(self) -> FakeLLMServer:
        """Start serving in a background thread; returns once the port is bound."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # report bind errors to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="genfan-fake-llm-server", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop serving and close every connection."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        with contextlib.suppress(Exception):
            fut.result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        self._thread = None
        self._loop = None

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.host, self.port, backlog=8192, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def serve_forever(self, started: Callable[[], None] | None = None) -> None:
        """Serve on the running asyncio loop until cancelled (the subprocess mode uses this).

        ``started`` is called once the port is bound.
        """
        self._loop = asyncio.get_running_loop()
        await self._listen()
        if started is not None:
            started()
        try:
            await asyncio.Event().wait()
        finally:
            await self._shutdown()

    # -- scripting -----------------------------------------------------------------------------

    def script(self, model: str, replies: Sequence[Reply]) -> None:
        """Answer requests for ``model`` (``"*"``: any model) with ``replies``, in order.

        Once a script is used up, the default echo answers again. Replies for the same model
        are appended to what is left of its script.
        """
        with self._lock:
            self._scripts.setdefault(model, collections.deque()).extend(replies)

    def set_handler(self, handler: Handler | None) -> None:
        """A function ``(path, body) -> reply or None`` consulted before scripts (``None``: no
        opinion, go on with scripts and the default)."""
        self.handler = handler

    def set_latency(self, seconds: float, *, model: str | None = None) -> None:
        """Latency for every answer, or only for ``model``'s."""
        if model is None:
            self.latency = seconds
        else:
            self._model_latency[model] = seconds

    def set_faults(
        self,
        fault: Fault | str | None,
        *,
        rate: float = 1.0,
        paths: Sequence[str] | None = None,
    ) -> None:
        """Inject ``fault`` into a ``rate`` share of requests (``None`` clears it).

        Args:
            fault: a `Fault`, or its header syntax (``"503"``, ``"hang"``...).
            rate: the share of requests that fail (drawn from the server's seeded random).
            paths: only requests whose path ends with one of these (default: every API path).
        """
        self._fault = Fault.parse(fault) if isinstance(fault, str) else fault
        self._fault_rate = rate
        self._fault_paths = tuple(paths) if paths is not None else None

    def set_outage(
        self, start: float, end: float, fault: Fault | str = Fault("status", status=503)
    ) -> None:
        """Fail every API request from ``start`` to ``end`` seconds after now."""
        now = time.monotonic()
        parsed = Fault.parse(fault) if isinstance(fault, str) else fault
        self._outages.append(_Outage(now + start, now + end, parsed))

    def clear_faults(self) -> None:
        """Remove every fault and outage."""
        self._fault = None
        self._outages.clear()

    def reset(self) -> None:
        """Forget scripts, faults, handler and records (not the connection counters)."""
        with self._lock:
            self._scripts.clear()
        self.clear_faults()
        self.handler = None
        self.requests.clear()
        self.counts.clear()
        self._prompt_cache.clear()
        self.cache_write_tokens = self.cache_read_tokens = 0

    # -- inspection ----------------------------------------------------------------------------

    def count(self, path: str | None = None) -> int:
        """Requests received on ``path`` (all API requests when ``None``)."""
        if path is None:
            return sum(v for k, v in self.counts.items() if k != "/health")
        return self.counts[path]

    def last_body(self, path: str | None = None) -> Any:
        """The JSON body of the last recorded request (on ``path``)."""
        for r in reversed(self.requests):
            if path is None or r.path == path:
                return r.body
        raise LookupError(f"no request recorded on {path!r}")

    def bodies(self, path: str | None = None) -> list[Any]:
        """Every recorded body (on ``path``), oldest first."""
        return [r.body for r in self.requests if path is None or r.path == path]

    @property
    def open_connections(self) -> int:
        """Connections open now."""
        return self.connections_opened - self.connections_closed

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Poll ``predicate`` (from a thread other than the server's) until true or timeout."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(0.005)
        return predicate()

    # -- answering -----------------------------------------------------------------------------

    def _pick_fault(self, path: str, headers: Mapping[str, str]) -> Fault | None:
        spec = headers.get("x-fake-fault")
        if spec:
            try:
                return Fault.parse(spec)
            except ValueError:
                return Fault("status", status=400)
        if self._outages:
            now = time.monotonic()
            for o in self._outages:
                if o.start <= now < o.end:
                    return o.fault
        fault = self._fault
        if fault is not None:
            if self._fault_paths is not None and not path.endswith(self._fault_paths):
                return None
            if self._fault_rate >= 1.0 or self._random.random() < self._fault_rate:
                return fault
        return None

    def _next_reply(self, path: str, body: dict[str, Any]) -> Reply | None:
        if self.handler is not None:
            reply = self.handler(path, body)
            if reply is not None:
                return reply
        if self._scripts:
            model = str(body.get("model") or "")
            with self._lock:
                for key in (model, "*"):
                    queue = self._scripts.get(key)
                    if queue:
                        return queue.popleft()
        return None

    def _cache_usage(self, body: Mapping[str, Any], latency: float) -> tuple[int, int]:
        """``(read, written)`` prompt-cache tokens of an Anthropic request answered after
        ``latency`` seconds (see ``cache_ttl``)."""
        prefix = _cache_prefix(body)
        if prefix is None:
            return 0, 0
        key, tokens, ttl = prefix
        ttl = ttl if ttl is not None else self.cache_ttl
        now = time.monotonic()
        entry = self._prompt_cache.get(key)
        if entry is not None and entry[0] <= now < entry[1]:
            self._prompt_cache[key] = (entry[0], now + ttl)  # a read refreshes it
            self.cache_read_tokens += tokens
            return tokens, 0
        if entry is None or entry[1] <= now:
            self._prompt_cache[key] = (now + latency, now + latency + ttl)
        self.cache_write_tokens += tokens
        return 0, tokens

    def _latency_for(self, body: dict[str, Any], headers: Mapping[str, str]) -> float:
        header = headers.get("x-fake-latency")
        if header:
            try:
                return float(header)
            except ValueError:
                pass
        if self._model_latency:
            model = str(body.get("model") or "")
            if model in self._model_latency:
                return self._model_latency[model]
        return self.latency


class _Hang(Exception):
    pass


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, answers them one at a time."""

    def __init__(self, server: FakeLLMServer) -> None:
        self.srv = server
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.pending: collections.deque[tuple[str, str, dict[str, str], bytes]] = (
            collections.deque()
        )
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.srv.connections_opened += 1
        self.srv._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.srv.connections_closed += 1
        self.srv._conns.discard(self)
        if self.task is not None and not self.task.done():
            self.srv.abandoned += 1
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    self._simple(431, b"headers too large", close=True)
                return
            head = self.buf[:end].decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, target, _version = lines[0].split(" ", 2)
            except ValueError:
                self._simple(400, b"bad request line", close=True)
                return
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "chunked" in headers.get("transfer-encoding", ""):
                self._simple(501, b"chunked request bodies are not supported", close=True)
                return
            length = int(headers.get("content-length") or 0)
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = self.buf[end + 4 : total]
            self.buf = self.buf[total:]
            self.pending.append((method, target.split("?", 1)[0], headers, body))
            if self.task is None or self.task.done():
                self._next()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # answering

    def _next(self) -> None:
        if self.pending and not self.closed:
            self.task = asyncio.ensure_future(self._serve(*self.pending.popleft()))

    def _write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def _simple(self, status: int, body: bytes, *, close: bool = False) -> None:
        self._write(_head(status, "text/plain", len(body), {}, close) + body)
        if close and self.transport is not None:
            self.transport.close()

    async def _serve(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> None:
        srv = self.srv
        srv.in_flight += 1
        srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        close = headers.get("connection", "").lower() == "close"
        try:
            await self._answer(method, path, headers, raw, close)
        except _Hang:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # a bad script or handler: answer 500 rather than hang
            self._json(500, {"error": {"message": f"fake server error: {exc!r}"}}, close)
        finally:
            srv.in_flight -= 1
        if close and self.transport is not None:
            self.transport.close()
        else:
            self._next()

    async def _answer(
        self, method: str, path: str, headers: dict[str, str], raw: bytes, close: bool
    ) -> None:
        srv = self.srv
        srv.counts[path] += 1
        if method == "GET" and path.endswith("/health"):
            self._json(200, {"status": "ok"}, close)
            return
        if srv.batches.handles(path):
            await self._batch_api(method, path, headers, raw, close)
            return
        if method != "POST":
            self._json(404, {"error": {"message": f"no route {method} {path}"}}, close)
            return
        try:
            body = json.loads(raw) if raw else {}
            if not isinstance(body, dict):
                raise ValueError("body must be an object")
        except ValueError:
            self._json(400, {"error": {"message": "body is not a JSON object"}}, close)
            return
        if srv._record:
            srv.requests.append(RecordedRequest(method, path, headers, body, time.monotonic()))
        if path.endswith("/chat/completions"):
            kind = "openai"
        elif path.endswith("/messages"):
            kind = "anthropic"
        elif path.endswith("/embeddings"):
            kind = "embeddings"
        else:
            self._json(404, {"error": {"message": f"no route POST {path}"}}, close)
            return
        stream = bool(body.get("stream"))
        fault = srv._pick_fault(path, headers)
        reply = None if fault is not None else srv._next_reply(path, body)
        scripted = isinstance(reply, Fault)
        if isinstance(reply, Fault):
            fault, reply = reply, None
        # Faults that change how the real answer is sent, not what is sent.
        shape: Fault | None = None
        if fault is not None and (
            fault.kind in ("cut", "gzip", "huge")
            or (fault.kind == "truncate" and fault.at is not None)
        ):
            shape, fault = fault, None
            if not scripted:  # the answer it shapes: a scripted one, or the echo
                reply = srv._next_reply(path, body)
                if isinstance(reply, Fault):
                    reply = None
            if shape.kind == "huge":
                reply = TextReply("x" * shape.size)  # one word: one stream event
        latency = srv._latency_for(body, headers)
        if isinstance(reply, TextReply | ToolCallsReply) and reply.latency is not None:
            latency = reply.latency
        cache = (
            srv._cache_usage(body, latency)
            if kind == "anthropic" and fault is None and not isinstance(reply, RawReply)
            else (0, 0)
        )
        if latency > 0:
            await asyncio.sleep(latency)
        if fault is not None:
            await self._fault(fault, kind, stream, close, headers)
            return
        if isinstance(reply, RawReply):
            payload = reply.body
            if isinstance(payload, str):
                data = payload.encode()
            elif isinstance(payload, bytes):
                data = payload
            else:
                data = json.dumps(payload).encode()
            ctype = reply.headers.get("content-type", "application/json")
            extra = {k: v for k, v in reply.headers.items() if k.lower() != "content-type"}
            self._write(_head(reply.status, ctype, len(data), extra, close) + data)
            return
        if kind == "embeddings":
            self._json(200, _embeddings(body), close, shape=shape)
            return
        if isinstance(reply, str):
            reply = TextReply(reply)
        if reply is None:
            forced = _forced_tool(kind, body)
            reply = (
                ToolCallsReply([(forced, {"echo": _prompt(body)})])
                if forced
                else TextReply(_default_text(kind, body))
            )
        rid = next(srv._ids)
        if kind == "openai":
            if stream:
                await self._stream(_openai_events(rid, body, reply), close, shape=shape)
            else:
                completion = _openai_completion(rid, body, reply)
                self._json(200, completion, close, srv.rate_limit_headers, shape=shape)
        elif stream:
            await self._stream(_anthropic_events(rid, body, reply, cache), close, shape=shape)
        else:
            message = _anthropic_message(rid, body, reply, cache)
            self._json(200, message, close, srv.rate_limit_headers, shape=shape)

    async def _batch_api(
        self, method: str, path: str, headers: dict[str, str], raw: bytes, close: bool
    ) -> None:
        srv = self.srv
        fault = headers.get("x-fake-fault") or (
            srv._fault_paths is not None and path.endswith(srv._fault_paths)
        )
        if fault:  # only asked for, by header or by set_faults(paths=...): not every fault
            picked = srv._pick_fault(path, headers)
            if picked is not None:
                await self._fault(
                    picked, "anthropic" if "/messages/" in path else "openai", False, close, headers
                )
                return
        delay = srv.batches.latency_for(method, path)
        if delay > 0:
            await asyncio.sleep(delay)
        status, obj, ctype = srv.batches.handle(method, path, headers, raw)
        creating = method == "POST" and path.rstrip("/").endswith(
            ("/v1/batches", "/messages/batches")
        )
        if creating and status == 200 and srv.batches.lose_this_create():
            self.abort()  # accepted, but the client never hears of it
            return
        if isinstance(obj, bytes):
            self._write(_head(status, ctype, len(obj), {}, close) + obj)
        else:
            self._json(status, obj, close)

    def _json(
        self,
        status: int,
        obj: Any,
        close: bool,
        extra: Mapping[str, str] | None = None,
        *,
        shape: Fault | None = None,
    ) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode()
        if shape is None or shape.kind == "huge":
            self._write(_head(status, "application/json", len(data), extra or {}, close) + data)
            return
        if shape.kind == "gzip":
            data = gzip.compress(data)
            headers = {**(extra or {}), "content-encoding": "gzip"}
            self._write(_head(status, "application/json", len(data), headers, close) + data)
            return
        at = len(data) // 2 if shape.at is None else min(shape.at, len(data))
        if shape.kind == "truncate":  # a clean, short body
            self._write(_head(status, "application/json", at, extra or {}, close) + data[:at])
            return
        # cut: promise the whole body, send ``at`` bytes of it, close the socket
        self._write(_head(status, "application/json", len(data), extra or {}, close) + data[:at])
        if self.transport is not None:
            self.transport.close()

    async def _stream(
        self,
        events: list[bytes],
        close: bool,
        *,
        cut: str | None = None,
        shape: Fault | None = None,
    ) -> None:
        head = (
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            "transfer-encoding: chunked\r\n"
        )
        for k, v in self.srv.rate_limit_headers.items():
            head += f"{k}: {v}\r\n"
        if close:
            head += "connection: close\r\n"
        compressor = None
        if shape is not None and shape.kind == "gzip":
            head += "content-encoding: gzip\r\n"
            compressor = zlib.compressobj(wbits=31)  # the gzip container
        self._write((head + "\r\n").encode())
        if cut == "drop":
            events = events[: max(len(events) // 2, 1)]
        elif cut == "truncate":
            events = events[: max(len(events) // 2, 1)]
        stop = None
        if shape is not None and shape.kind in ("cut", "truncate"):
            total = sum(len(ev) for ev in events)
            at = total // 2 if shape.at is None else min(shape.at, total)
            kept: list[bytes] = []
            for ev in events:
                if at <= 0:
                    break
                kept.append(ev[:at])
                at -= len(ev)
            events, stop = kept, shape.kind
        if compressor is not None:
            events = [
                compressor.compress(ev) + compressor.flush(zlib.Z_SYNC_FLUSH) for ev in events
            ]
            events.append(compressor.flush())
        delay = self.srv.chunk_delay
        if delay > 0:
            for ev in events:
                if ev:  # an empty chunk would end the body
                    self._write(_chunk(ev))
                    await asyncio.sleep(delay)
        else:
            self._write(b"".join(_chunk(ev) for ev in events if ev))
        if cut == "drop":
            # give the kernel a moment to send what was written, then reset the connection
            await asyncio.sleep(0.01)
            self.abort()
            return
        if stop == "cut":
            # what was written is sent, then the socket is closed: a body cut short
            if self.transport is not None:
                self.transport.close()
            return
        self._write(b"0\r\n\r\n")

    async def _fault(
        self, fault: Fault, kind: str, stream: bool, close: bool, headers: Mapping[str, str]
    ) -> None:
        if fault.kind == "hang":
            raise _Hang
        if fault.kind == "echo":
            quoted = ", ".join(f"{k}: {v}" for k, v in headers.items())
            body = _error_body(kind, fault.status)
            body["error"]["message"] = f"refused; you sent {quoted}"
            self._json(fault.status, body, close)
            return
        if fault.kind == "status":
            status = fault.status
            extra: dict[str, str] = {}
            if fault.retry_after is not None:
                ra = fault.retry_after
                whole = isinstance(ra, int | float) and math.isfinite(ra) and ra == int(ra)
                extra["retry-after"] = str(int(ra)) if whole else str(ra)
            self._json(status, _error_body(kind, status), close, extra)
            return
        if fault.kind == "malformed":
            if stream:
                await self._stream([b"data: {this is not json\n\n"], close)
            else:
                data = b'{"choices": [{"message": '
                self._write(_head(200, "application/json", len(data), {}, close) + data)
            return
        body = {"model": "fault", "messages": [{"role": "user", "content": "fault"}]}
        reply = TextReply("this answer will be cut off before it ends")
        if stream:
            events = (
                _openai_events(0, body, reply)
                if kind == "openai"
                else _anthropic_events(0, body, reply)
            )
            await self._stream(events, close, cut=fault.kind)
            return
        if fault.kind == "truncate":
            self._json(200, {"id": "truncated", "object": "chat.completion"}, close)
            return
        # drop: promise a body, send half of it, then reset the connection
        data = json.dumps(
            _openai_completion(0, body, reply)
            if kind != "anthropic"
            else _anthropic_message(0, body, reply)
        ).encode()
        self._write(_head(200, "application/json", len(data), {}, close) + data[: len(data) // 2])
        await asyncio.sleep(0.01)
        self.abort()


# -- wire helpers ------------------------------------------------------------------------------


def _head(status: int, ctype: str, length: int, extra: Mapping[str, str], close: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
        f"content-type: {ctype}\r\ncontent-length: {length}\r\n"
    )
    for k, v in extra.items():
        head += f"{k}: {v}\r\n"
    if close:
        head += "connection: close\r\n"
    return (head + "\r\n").encode("latin-1")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(obj: Any, event: str | None = None) -> bytes:
    data = json.dumps(obj, separators=(",", ":"))
    if event:
        return f"event: {event}\ndata: {data}\n\n".encode()
    return f"data: {data}\n\n".encode()


def _error_body(kind: str, status: int) -> dict[str, Any]:
    if kind == "anthropic":
        etype = {
            429: "rate_limit_error",
            529: "overloaded_error",
            401: "authentication_error",
            404: "not_found_error",
            400: "invalid_request_error",
        }.get(status, "api_error")
        return {"type": "error", "error": {"type": etype, "message": f"injected {status}"}}
    etype = {429: "rate_limit_exceeded", 401: "invalid_api_key"}.get(status, "server_error")
    return {"error": {"message": f"injected {status}", "type": etype, "code": status}}


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    out.append(part["text"])
                elif part.get("type") == "tool_result":
                    out.append(_text_of(part.get("content")))
        return " ".join(out)
    return ""


def _prompt(body: Mapping[str, Any]) -> str:
    for m in reversed(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") in ("user", "tool"):
            return _text_of(m.get("content"))
    return ""


def _wants_json(kind: str, body: Mapping[str, Any]) -> bool:
    if kind == "openai":
        fmt = body.get("response_format")
        return isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")
    system = body.get("system")
    return isinstance(system, str) and "JSON" in system


def _forced_tool(kind: str, body: Mapping[str, Any]) -> str | None:
    """The tool a request forces the model to call, if it names one."""
    choice = body.get("tool_choice")
    if not isinstance(choice, dict):
        return None
    if kind == "anthropic" and choice.get("type") == "tool":
        return str(choice.get("name"))
    if kind == "openai" and choice.get("type") == "function":
        return str((choice.get("function") or {}).get("name"))
    return None


def _default_text(kind: str, body: Mapping[str, Any]) -> str:
    prompt = _prompt(body)
    if _wants_json(kind, body):
        return json.dumps({"echo": prompt})
    return f"echo: {prompt}"


def _count_words(body: Mapping[str, Any]) -> int:
    n = len(_text_of(body.get("system")).split()) if body.get("system") else 0
    for m in body.get("messages") or []:
        if isinstance(m, dict):
            n += len(_text_of(m.get("content")).split())
    return n


def _usage(body: Mapping[str, Any], reply: TextReply | ToolCallsReply) -> tuple[int, int]:
    if isinstance(reply, TextReply) and reply.usage is not None:
        return reply.usage
    out = len(reply.text.split())
    if isinstance(reply, ToolCallsReply):
        out += sum(len(c.arguments) // 4 + 1 for c in reply.calls)
    return _count_words(body), out


def _openai_completion(
    rid: int, body: Mapping[str, Any], reply: TextReply | ToolCallsReply
) -> dict[str, Any]:
    inp, out = _usage(body, reply)
    message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
    finish = "stop"
    if isinstance(reply, ToolCallsReply):
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in reply.calls
        ]
        finish = "tool_calls"
    else:
        finish = reply.finish_reason
        message["content"] = reply.text
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion",
        "created": 1700000000,
        "model": body.get("model") or "fake-model",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out},
    }


def _pieces(text: str, n: int = 3) -> list[str]:
    if not text:
        return []
    size = max(len(text) // n, 1)
    return [text[i : i + size] for i in range(0, len(text), size)]


def _openai_events(
    rid: int, body: Mapping[str, Any], reply: TextReply | ToolCallsReply
) -> list[bytes]:
    model = body.get("model") or "fake-model"
    base = {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": 1700000000}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _sse(
            {
                **base,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )

    events = [chunk({"role": "assistant", "content": ""})]
    words = reply.text.split(" ") if reply.text else []
    for i, w in enumerate(words):
        events.append(chunk({"content": w if i == 0 else " " + w}))
    finish = "stop"
    if isinstance(reply, ToolCallsReply):
        finish = "tool_calls"
        for i, c in enumerate(reply.calls):
            pieces = _pieces(c.arguments) or [""]
            first = {
                "index": i,
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": ""},
            }
            events.append(chunk({"tool_calls": [first]}))
            for p in pieces:
                events.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": p}}]}))
    else:
        finish = reply.finish_reason
    events.append(chunk({}, finish))
    if (body.get("stream_options") or {}).get("include_usage"):
        inp, out = _usage(body, reply)
        events.append(
            _sse(
                {
                    **base,
                    "model": model,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": inp,
                        "completion_tokens": out,
                        "total_tokens": inp + out,
                    },
                }
            )
        )
    events.append(b"data: [DONE]\n\n")
    return events


_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _anthropic_usage(inp: int, cache: tuple[int, int]) -> dict[str, int]:
    """Anthropic's input counts: ``input_tokens`` leaves out the cached ones."""
    read, written = cache
    if not read and not written:
        return {"input_tokens": inp}
    return {
        "input_tokens": max(inp - read - written, 0),
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": read,
    }


def _cache_prefix(body: Mapping[str, Any]) -> tuple[str, int, float | None] | None:
    """The prompt prefix an Anthropic request marks for caching (tools, then system, then
    messages, up to the last block with ``cache_control``): its key, its tokens (words) and
    its TTL in seconds (``None``: the server's); ``None`` when nothing is marked."""
    parts: list[str] = [str(body.get("model"))]
    words = 0
    found: tuple[int, int, float | None] | None = None

    def add(key: Any, text: str, block: Any) -> None:
        nonlocal words, found
        parts.append(json.dumps(key, sort_keys=True, default=str))
        words += len(text.split())
        control = block.get("cache_control") if isinstance(block, dict) else None
        if isinstance(control, dict):
            found = (len(parts), words, 3600.0 if control.get("ttl") == "1h" else None)

    for tool in body.get("tools") or []:
        add(tool, "", tool)
    system = body.get("system")
    for block in system if isinstance(system, list) else [system] if system else []:
        add(block, _text_of([block] if isinstance(block, dict) else block), block)
    for m in body.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        role = m.get("role") if isinstance(m, dict) else None
        for block in content if isinstance(content, list) else [content]:
            text = _text_of([block] if isinstance(block, dict) else block)
            add({"role": role, "block": block}, text, block)
    if found is None:
        return None
    n, tokens, ttl = found
    key = hashlib.sha256("\0".join(parts[:n]).encode()).hexdigest()
    return key, tokens, ttl


def _anthropic_message(
    rid: int,
    body: Mapping[str, Any],
    reply: TextReply | ToolCallsReply,
    cache: tuple[int, int] = (0, 0),
) -> dict[str, Any]:
    inp, out = _usage(body, reply)
    content: list[dict[str, Any]] = []
    if reply.text:
        content.append({"type": "text", "text": reply.text})
    stop = "end_turn"
    if isinstance(reply, ToolCallsReply):
        stop = "tool_use"
        for c in reply.calls:
            content.append(
                {"type": "tool_use", "id": c.id, "name": c.name, "input": c.parsed_arguments()}
            )
    else:
        stop = _STOP_REASONS.get(reply.finish_reason, reply.finish_reason)
    return {
        "id": f"msg_{rid}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model") or "fake-model",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {**_anthropic_usage(inp, cache), "output_tokens": out},
    }


def _anthropic_events(
    rid: int,
    body: Mapping[str, Any],
    reply: TextReply | ToolCallsReply,
    cache: tuple[int, int] = (0, 0),
) -> list[bytes]:
    inp, out = _usage(body, reply)
    model = body.get("model") or "fake-model"
    events = [
        _sse(
            {
                "type": "message_start",
                "message": {
                    "id": f"msg_{rid}",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {**_anthropic_usage(inp, cache), "output_tokens": 1},
                },
            },
            "message_start",
        ),
        _sse({"type": "ping"}, "ping"),
    ]
    index = 0
    if reply.text:
        events.append(
            _sse(
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
                "content_block_start",
            )
        )
        words = reply.text.split(" ")
        for i, w in enumerate(words):
            events.append(
                _sse(
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": w if i == 0 else " " + w},
                    },
                    "content_block_delta",
                )
            )
        events.append(_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
        index = 1
    stop = "end_turn"
    if isinstance(reply, ToolCallsReply):
        stop = "tool_use"
        for c in reply.calls:
            events.append(
                _sse(
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {
                            "type": "tool_use",
                            "id": c.id,
                            "name": c.name,
                            "input": {},
                        },
                    },
                    "content_block_start",
                )
            )
            for p in _pieces(c.arguments):
                events.append(
                    _sse(
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": p},
                        },
                        "content_block_delta",
                    )
                )
            events.append(
                _sse({"type": "content_block_stop", "index": index}, "content_block_stop")
            )
            index += 1
    else:
        stop = _STOP_REASONS.get(reply.finish_reason, reply.finish_reason)
    events.append(
        _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": out},
            },
            "message_delta",
        )
    )
    events.append(_sse({"type": "message_stop"}, "message_stop"))
    return events


def _embeddings(body: Mapping[str, Any]) -> dict[str, Any]:
    inputs = body.get("input")
    texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
    dims = int(body.get("dimensions") or 8)
    data = []
    for i, t in enumerate(texts):
        digest = hashlib.sha256(str(t).encode()).digest()
        while len(digest) < dims:
            digest += hashlib.sha256(digest).digest()
        vector = [round(b / 127.5 - 1.0, 6) for b in digest[:dims]]
        data.append({"object": "embedding", "index": i, "embedding": vector})
    n = sum(len(str(t).split()) for t in texts)
    return {
        "object": "list",
        "model": body.get("model") or "fake-embedding",
        "data": data,
        "usage": {"prompt_tokens": n, "total_tokens": n},
    }


# -- the server as a separate process ----------------------------------------------------------


class ServerProcess:
    """A fake server in a child process (its CPU does not count against the caller).

    Use as a context manager: ``with ServerProcess(latency=0.5) as proc: proc.url``.

    Args:
        latency: seconds before every answer.
        args: more command-line arguments for ``python -m genfan.testserver``.
    """

    def __init__(self, *, latency: float = 0.0, args: Sequence[str] = ()) -> None:
        self.latency = latency
        self.args = list(args)
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> ServerProcess:
        cmd = [
            sys.executable,
            "-m",
            "genfan.testserver",
            "--port",
            "0",
            "--latency",
            str(self.latency),
            "--record",
            "0",
            *self.args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http"):
            self.stop()
            raise RuntimeError(f"fake server did not start (said {line!r})")
        self.url = line
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m genfan.testserver``: serve until terminated, after printing the URL."""
    parser = argparse.ArgumentParser(description="genfan's fake OpenAI/Anthropic server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--record", type=int, default=0, help="requests to keep in memory")
    parser.add_argument("--fault", default=None, help="a fault for every request, e.g. 503")
    parser.add_argument("--fault-rate", type=float, default=1.0)
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's own loop")
    ns = parser.parse_args(argv)
    srv = FakeLLMServer(
        host=ns.host,
        port=ns.port,
        latency=ns.latency,
        chunk_delay=ns.chunk_delay,
        record=ns.record,
    )
    if ns.fault:
        srv.set_faults(ns.fault, rate=ns.fault_rate)

    async def run() -> None:
        await srv.serve_forever(started=lambda: print(srv.url, flush=True))

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if not ns.no_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            pass
    import signal

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            runner.run(run())


if __name__ == "__main__":
    main()
