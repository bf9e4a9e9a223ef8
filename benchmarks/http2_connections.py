"""Issue 14, "connections kept": connections opened per 1,000 ``first`` fan-outs, HTTP/1.1 vs
HTTP/2.

Run: ``.venv/bin/python -m benchmarks.http2_connections [--fanouts 1000]``.

Two backends on the same local server (one answers in 5 ms, the other in 50 ms), each in the
default guard stack (``create_backend``), race in ``FanOut(mode="first")``: every fan-out
cancels the slower one's call. The server is hypercorn (HTTP/1.1 and HTTP/2 over TLS, a
certificate from ``trustme``'s throwaway CA) serving a tiny OpenAI-shaped ASGI app
(:class:`H2Server`, also the tests' HTTP/2 server), in a child process so that the client's CPU
(``time.process_time``) is its own; it counts, server-side, the TCP connections opened (distinct client address and port), the
requests, the HTTP version of each, and the requests whose client went away before the answer
(``http.disconnect``: a closed HTTP/1.1 connection, or an HTTP/2 ``RST_STREAM``). The same
fan-outs run with ``http2=False`` (the default) and ``http2=True``, alternating, in one run.

Prints a table and writes JSON to ``benchmarks/results/http2_connections.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"

#: The running servers by port, for :func:`_count_accepted_connections`.
_SERVERS: dict[int, H2Server] = {}


def _count_accepted_connections() -> None:
    """Have every TCP connection accepted on a server's port counted by that server, when the
    TLS layer first sees it: before the handshake, so a client that gives up during it (a
    fan-out's loser cancelled while connecting) counts too. asyncio's TLS protocol is wrapped
    once, in the process that runs the servers; connections of other ports pass untouched."""
    import asyncio.sslproto as sslproto

    base: Any = sslproto.SSLProtocol.connection_made
    if getattr(base, "genfan_counting", False):
        return

    def connection_made(self: Any, transport: Any) -> None:
        local = transport.get_extra_info("sockname")
        server = _SERVERS.get(local[1]) if isinstance(local, tuple) else None
        if server is not None:
            server.accepted_connection()
        base(self, transport)

    connection_made.genfan_counting = True  # type: ignore[attr-defined]
    sslproto.SSLProtocol.connection_made = connection_made  # type: ignore[method-assign]


class H2Server:
    """A local HTTPS server speaking HTTP/2 (and HTTP/1.1, by ALPN): hypercorn serving an
    OpenAI-shaped chat-completions app (JSON and streamed), in a background thread.

    Args:
        latencies: seconds before the answer, by the request's model (others: ``latency``).
        latency: seconds before the answer of any other model.

    Attributes:
        url: the ``base_url`` (``https://127.0.0.1:PORT/v1``).
        ca_path: the CA bundle that signed its certificate (the backend's ``verify=``).
        accepted: TCP connections accepted.
        connections: the client (address, port) pairs that sent requests.
        in_flight: requests being answered now.
        requests: requests received; ``cancelled``: those whose client went away before the
            answer; ``versions``: requests by HTTP version (``"1.1"``, ``"2"``).
    """

    def __init__(self, *, latencies: dict[str, float] | None = None, latency: float = 0.0) -> None:
        self.latencies = dict(latencies or {})
        self.latency = latency
        self.url = ""
        self.ca_path = ""
        self.accepted = 0
        self.in_flight = 0
        self.connections: set[tuple[str, int]] = set()
        self.requests = 0
        self.cancelled = 0
        self.versions: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="genfan-h2-")

    def reset(self) -> None:
        with self._lock:
            self.accepted = 0
            self.connections = set()
            self.requests = 0
            self.cancelled = 0
            self.versions = collections.Counter()

    # -- the app -------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["path"] in ("/stats", "/reset"):  # the benchmark's own questions, not counted
            if scope["path"] == "/reset":
                self.reset()
            await self._json(send, self.stats())
            return
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            self.versions[scope["http_version"]] += 1
            if scope.get("client"):
                self.connections.add(tuple(scope["client"]))
        try:
            await self._answer(scope, receive, send)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _answer(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        raw = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._count_cancelled()
                return
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = json.loads(raw or b"{}")
        model = str(body.get("model") or "")
        delay = self.latencies.get(model, self.latency)
        if delay > 0 and await self._client_left_within(receive, delay):
            self._count_cancelled()
            return
        text = "echo: " + str((body.get("messages") or [{}])[-1].get("content", ""))
        if body.get("stream"):
            # Stream while watching for the client to go away (a reset stream, a closed
            # connection): then stop, as a model server stops generating.
            streaming = asyncio.ensure_future(self._stream(send, model, text))
            watching = asyncio.ensure_future(receive())
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
            if watching.done() and watching.result()["type"] == "http.disconnect":
                streaming.cancel()
                if not streaming.done() or streaming.cancelled():
                    self._count_cancelled()
            else:
                watching.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await streaming
        else:
            answer = {
                "id": "chatcmpl-h2",
                "object": "chat.completion",
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
            }
            await self._json(send, answer)

    def accepted_connection(self) -> None:
        with self._lock:
            self.accepted += 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "accepted": self.accepted,
                "connections": len(self.connections),
                "requests": self.requests,
                "cancelled": self.cancelled,
                "versions": dict(self.versions),
            }

    @staticmethod
    async def _json(send: Any, body: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    async def _stream(self, send: Any, model: str, text: str) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        words = text.split(" ")
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            chunk = {
                "id": "chatcmpl-h2",
                "model": model,
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
            }
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + json.dumps(chunk).encode() + b"\n\n",
                    "more_body": True,
                }
            )
            await asyncio.sleep(self.latencies.get("stream-delay", 0.0))
        end = {
            "id": "chatcmpl-h2",
            "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
        await send(
            {
                "type": "http.response.body",
                "body": b"data: " + json.dumps(end).encode() + b"\n\ndata: [DONE]\n\n",
            }
        )

    @staticmethod
    async def _client_left_within(receive: Any, seconds: float) -> bool:
        """Wait ``seconds``; whether the client went away meanwhile."""
        try:
            message = await asyncio.wait_for(receive(), seconds)
        except TimeoutError:
            return False
        return bool(message["type"] == "http.disconnect")

    def _count_cancelled(self) -> None:
        with self._lock:
            self.cancelled += 1

    # -- running -------------------------------------------------------------------------------

    def start(self) -> H2Server:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        folder = Path(self._dir.name)
        self.ca_path = str(folder / "ca.pem")
        ca.cert_pem.write_to_path(self.ca_path)
        cert_path, key_path = folder / "cert.pem", folder / "key.pem"
        cert.cert_chain_pems[0].write_to_path(str(cert_path))
        cert.private_key_pem.write_to_path(str(key_path))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        sock.set_inheritable(True)
        port = sock.getsockname()[1]
        self.url = f"https://127.0.0.1:{port}/v1"
        _count_accepted_connections()
        _SERVERS[port] = self
        self._port = port

        from hypercorn.config import Config

        config = Config()
        # hypercorn takes the socket over (and closes it): ours lets go of the descriptor, or
        # closing it again could close whatever file reused the number.
        config.bind = [f"fd://{sock.detach()}"]
        config.certfile = str(cert_path)
        config.keyfile = str(key_path)
        config.alpn_protocols = ["h2", "http/1.1"]
        config.keep_alive_timeout = 60.0
        config.loglevel = "WARNING"
        ready = threading.Event()

        def run() -> None:
            from hypercorn.asyncio import serve

            loop = asyncio.new_event_loop()
            self._loop = loop
            self._stop = asyncio.Event()
            loop.call_soon(ready.set)
            try:
                loop.run_until_complete(
                    serve(self, config, shutdown_trigger=self._stop.wait)  # type: ignore[arg-type]
                )
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="genfan-h2-server", daemon=True)
        self._thread.start()
        ready.wait(10)
        self._wait_until_serving(port)
        deadline = time.monotonic() + 5
        while self.accepted < 1 and time.monotonic() < deadline:  # the probe's, not counted
            time.sleep(0.01)
        self.reset()
        return self

    @staticmethod
    def _wait_until_serving(port: int) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("the HTTP/2 server did not start")

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(10)
        self._thread = None
        _SERVERS.pop(getattr(self, "_port", 0), None)
        self._dir.cleanup()

    def __enter__(self) -> H2Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the benchmark -----------------------------------------------------------------------------


def _serve() -> None:
    """``--serve``: run the server until stdin closes (the benchmark's child process), after
    printing its URL and CA bundle."""
    with H2Server(latencies={"fast": 0.005, "slow": 0.05}) as server:
        print(server.url, server.ca_path, flush=True)
        sys.stdin.read()


async def _stats(root: str, ca_path: str, what: str = "stats") -> dict[str, Any]:
    """Ask the server for its counts (or to reset them), on a connection of its own: the
    reset's is made before the counts start, the final one's is taken off ``accepted``."""
    import httpx

    async with httpx.AsyncClient(verify=ca_path) as client:
        r = await client.get(f"{root}/{what}")
    return dict(r.json())


async def _race(url: str, ca_path: str, http2: bool, fanouts: int) -> dict[str, Any]:
    """``fanouts`` sequential ``first`` fan-outs of a 5 ms and a 50 ms backend."""
    from genfan import FanOut, create_backend

    def backend(model: str) -> Any:
        return create_backend(
            f"openai:{model}", base_url=url, api_key_env=None, verify=ca_path, http2=http2
        )

    root = url.removesuffix("/v1")
    won: collections.Counter[str] = collections.Counter()
    await _stats(root, ca_path, "reset")
    async with FanOut([backend("fast"), backend("slow")], mode="first") as fan:
        c0, w0 = time.process_time(), time.perf_counter()
        for i in range(fanouts):
            result = await fan.run(f"race {i}")
            won[result.chosen.backend if result.chosen else "none"] += 1
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        await asyncio.sleep(0.5)  # the last resets and disconnects reach the server
        seen = await _stats(root, ca_path)
    opened = seen["accepted"] - 1  # less the connection that asked
    return {
        "http2": http2,
        "fanouts": fanouts,
        "connections_opened": opened,
        "connections_per_1000_fanouts": opened * 1000 / fanouts,
        "connections_that_sent_requests": seen["connections"],
        "requests": seen["requests"],
        "cancelled_seen_by_server": seen["cancelled"],
        "http_versions": seen["versions"],
        "winners": dict(won),
        "client_cpu_per_fanout_ms": cpu / fanouts * 1e3,
        "wall_per_fanout_ms": wall / fanouts * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--fanouts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each protocol")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.serve:
        _serve()
        return
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()}-core {os.uname().machine}, shared",
        "python": sys.version.split()[0],
        "load_average_at_start": os.getloadavg(),
        "runs": [],
    }
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.http2_connections", "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        url, ca_path = child.stdout.readline().split()
        for _ in range(ns.rounds):
            for http2 in (False, True):
                out["runs"].append(asyncio.run(_race(url, ca_path, http2, ns.fanouts)))
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(15)
    out["load_average_at_end"] = os.getloadavg()
    print(
        f"{ns.fanouts} first fan-outs per run, a 5 ms and a 50 ms backend on one HTTPS server "
        "(hypercorn, its own process); counted by the server:"
    )
    print(
        f"    {'protocol':<10}{'connections':>12}{'per 1,000':>11}{'requests':>10}"
        f"{'cancelled':>11}{'CPU/fan-out ms':>16}{'wall/fan-out ms':>17}"
    )
    for r in out["runs"]:
        label = "HTTP/2" if r["http2"] else "HTTP/1.1"
        print(
            f"    {label:<10}{r['connections_opened']:>12}"
            f"{r['connections_per_1000_fanouts']:>11.0f}{r['requests']:>10}"
            f"{r['cancelled_seen_by_server']:>11}{r['client_cpu_per_fanout_ms']:>16.2f}"
            f"{r['wall_per_fanout_ms']:>17.2f}"
        )
    print(
        f"load average (1, 5, 15 min): start {out['load_average_at_start']}, end "
        f"{out['load_average_at_end']}"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "http2_connections.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'http2_connections.json'}")


if __name__ == "__main__":
    main()
