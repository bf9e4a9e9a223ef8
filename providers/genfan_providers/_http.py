"""What the HTTP providers share: pooled clients, typed errors, SSE.

:class:`HTTPBackend` holds the parts every HTTP provider needs:

* connection pools that never queue and stay small. httpcore rescans its whole pool for every
  queued request (thousands queued cost milliseconds of CPU each), and its bookkeeping for one
  request grows with the square of its pool's size (it scans every connection, and for each
  idle one every connection again). So a backend's connections are split over small ``httpx``
  clients ("shards") of at most :data:`SHARD_SIZE` connections, each with
  ``httpx.Limits(max_connections=SHARD_SIZE)``, and a request takes a free slot of some shard
  (the most recently freed one, whose connection is warm): a shard is never asked for more
  connections than it has. With no free slot a new shard is added, so the pools hold as many
  connections as requests were ever in flight at once. Shards are created on first use and
  share one SSL context.
* no concurrency cap of its own by default: the bulkhead of the backend's guard stack
  (``genfan.resilience``, 64 calls by default) is the one cap, and it bounds the connections
  too. ``max_concurrency=N`` adds a cap here (an ``anyio.Semaphore``; more requests wait in
  genfan, never in httpcore) for a backend used without guards.
* the API key, kept as a ``pydantic.SecretStr`` and redacted from every error message (as is
  the value of every header given in ``headers=`` that carries a credential: ``authorization``,
  ``x-api-key``, ``api-key``, ``cookie``...), and where it comes from. A ``base_url`` with
  credentials in it (``https://user:pass@host``) is refused at construction: httpx would send
  them as Basic auth in place of the key, and the URL is shown in reprs and errors. A
  provider's own environment variable (``OPENAI_API_KEY``) is sent only to the provider's own
  host (``api.openai.com``), or to the base URL its SDK reads from the environment too
  (``OPENAI_BASE_URL``); any other ``base_url`` gets a key only when one is named
  (``api_key=``, ``api_key_env=``). The provider's own host without a key fails at
  construction, naming the variable; a 401 says which key was refused (never the key);
* the translation of every transport failure, HTTP status and unreadable body into the typed
  errors of :mod:`genfan.errors`, always with ``raise ... from exc``;
* bounded reads: a JSON body, or one event of a stream, larger than ``max_response_bytes``
  fails with :class:`~genfan.ResponseTooLargeError` before more is read; bodies are read
  decoded (``Content-Encoding`` undone), so a gzip'd stream parses like a plain one;
* a server-sent-events parser whose work is linear in the bytes received, however long one
  event is, and rate-limit header parsing, with every wait a server asks for (``Retry-After``,
  quota resets) cut to ``max_server_wait``.

* HTTP/2 where the server speaks it (``http2=True``, the ``http2`` extra: httpx's ``h2``), so
  many calls share one connection, and a call cancelled before its answer (a fan-out's loser)
  resets its stream (``RST_STREAM``: the server stops, the connection stays) instead of closing
  a connection, as HTTP/1.1 must. httpcore leaves a cancelled stream open
  (encode/httpcore#1022): the server is never told, the connection's flow-control window is
  never given back, and its stream count drifts; the backend's HTTP/2 pools reset it
  (:func:`_reset_cancelled_streams`).
* on asyncio, aiohttp under the backend (``transport="aiohttp"``, the ``aiohttp`` extra): its
  calls go to one ``aiohttp.ClientSession`` (its own pool, no shards) and come back as
  ``httpx.Response`` objects, read as any other (:class:`_Aiohttp`); ``backend.client`` is
  httpx over the same session (``httpx-aiohttp``, as the ``openai`` SDK uses). trio keeps
  httpx's transport: ``"aiohttp"`` there is a :class:`~genfan.ConfigurationError`, ``"auto"``
  picks aiohttp on asyncio and httpx elsewhere.

Timeouts: the backend's ``timeout`` is httpx's (connect, pool, write, and each read: a
stream that keeps sending is never cut). A request's own ``ChatRequest.timeout`` is a limit on
the whole call, enforced with an anyio cancel scope and reported as
:class:`~genfan.BackendTimeoutError`.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import email.utils
import enum
import functools
import importlib.util
import json
import math
import os
import re
import ssl
import sys
import time
from collections.abc import AsyncGenerator, Iterable, Mapping, Sized
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, NoReturn

import anyio
import httpcore
import httpx
from pydantic import SecretStr

from genfan import (
    BackendConnectionError,
    BackendError,
    BackendTimeoutError,
    BaseBackend,
    ChatRequest,
    ConfigurationError,
    HTTPStatusError,
    MalformedResponseError,
    RateLimitError,
    RateLimitInfo,
    ResponseTooLargeError,
    StreamInterruptedError,
    Usage,
    telemetry,
)
from genfan.cost import Price, PriceLike, lookup_price

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_MAX_SERVER_WAIT",
    "PROVIDER_KEY",
    "SHARD_SIZE",
    "HTTPBackend",
    "SSEParser",
    "StreamProgress",
    "Transport",
    "parse_duration",
    "parse_retry_after",
]

_ERROR_BODY_CHARS = 300
#: The most of an error body read (the message is in its first few hundred bytes).
_ERROR_BODY_BYTES = 64 * 1024

#: ``max_response_bytes``'s default: the most bytes of one answer (a JSON body, or one event of
#: a stream) held in memory.
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
#: ``max_server_wait``'s default: the longest wait a server's ``Retry-After`` or quota reset is
#: believed (seconds); longer ones are cut to it.
DEFAULT_MAX_SERVER_WAIT = 3600.0

#: Headers whose values are credentials (redacted from error messages), besides any whose
#: name says so (:data:`_SECRET_NAME`).
_SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "cookie",
        "x-goog-api-key",
        "ocp-apim-subscription-key",
    }
)
_SECRET_NAME = re.compile(r"auth|key|token|secret|cookie|session|passw|credential", re.IGNORECASE)
#: ``scheme://userinfo@``: credentials in a URL.
_URL_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)([^/?#]*)@")

#: The most connections one ``httpx`` client (one httpcore pool) of a backend holds.
SHARD_SIZE = 4
#: The slot of a request sent through aiohttp's transport (see :meth:`HTTPBackend._acquire`).
_AIOHTTP_SLOT = -2


def _json_bytes(body: Any) -> bytes:
    """``body`` as httpx's ``json=`` encodes it."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


class _ProviderKey(enum.Enum):
    """The type of :data:`PROVIDER_KEY` (a one-member enum, so type checkers can narrow it)."""

    PROVIDER_KEY = "PROVIDER_KEY"

    def __repr__(self) -> str:
        return self.value


#: ``api_key_env``'s default: the provider's own variable (``OPENAI_API_KEY``), read for the
#: provider's own host only (see :class:`HTTPBackend`).
PROVIDER_KEY: Final = _ProviderKey.PROVIDER_KEY


#: ``transport``'s values: httpx's own transport, aiohttp's (asyncio only), or aiohttp on
#: asyncio and httpx elsewhere.
Transport = Literal["httpx", "aiohttp", "auto"]
_TRANSPORTS: tuple[str, ...] = ("httpx", "aiohttp", "auto")

if TYPE_CHECKING:
    import aiohttp


@functools.cache
def _ssl_context(http2: bool = False) -> ssl.SSLContext:
    """One SSL context for every client that speaks HTTP/1.1 only, one for every HTTP/2 client
    (building one reads the CA bundle: ~20 ms). Two, because httpcore sets the protocols a
    context offers (ALPN) on it before each connection: a context shared by both kinds would
    offer each the other's."""
    return httpx.create_ssl_context()


def _context_for(verify: bool | str | ssl.SSLContext, http2: bool) -> ssl.SSLContext:
    """The SSL context for ``verify`` (see :class:`HTTPBackend`)."""
    if verify is True:
        return _ssl_context(http2)
    if verify is False:
        return httpx.create_ssl_context(verify=False)
    if isinstance(verify, str):
        if os.path.isdir(verify):
            return ssl.create_default_context(capath=verify)
        return ssl.create_default_context(cafile=verify)
    return verify


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _async_library() -> str | None:
    """The async library running this task: ``"asyncio"``, ``"trio"``, or ``None`` (none)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return "asyncio"
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
        else:
            return "trio"
    return None


def _from_aiohttp(exc: BaseException) -> BaseException | None:
    """The aiohttp exception behind ``exc`` (``exc`` itself, or the cause httpx-aiohttp mapped
    it from), if there is one."""
    for candidate in (exc, exc.__cause__):
        if candidate is not None and type(candidate).__module__.startswith("aiohttp"):
            return candidate
    return None


# -- HTTP/2: a cancelled stream is reset, its connection kept ----------------------------------

#: How long closing a cancelled HTTP/2 stream waits to send its RST_STREAM (the frame is tiny:
#: only another task's write can hold it up).
_RESET_FLUSH_SECONDS = 1.0


@functools.cache
def _resetting_pool_class() -> type[httpcore.AsyncConnectionPool]:
    """httpcore's connection pool, whose HTTP/2 connections reset a stream closed before its
    end, and count their streams so that a request cancelled while its connection opens leaves
    the count right (see :func:`_reset_cancelled_streams`). Built on first use: it needs
    ``h2``."""
    import h2.errors
    import h2.exceptions

    # Writing the RST_STREAM frame needs a request for its write timeout only.
    flush = httpcore.Request(
        "POST", "https://genfan.invalid/", extensions={"timeout": {"write": _RESET_FLUSH_SECONDS}}
    )

    class StreamPermits:
        """httpcore's count of the streams a connection may open, taking a free permit
        without a checkpoint. httpcore takes all but one of its permits in a loop of awaits
        when a connection opens (the rest come when the server's settings arrive): a request
        cancelled inside that loop (a fan-out's loser, first on its connection) left too many
        permits, then "semaphore released too many times" broke the connection when the
        settings came. Taking a free permit here never yields, so that loop cannot be
        interrupted; a request that has to wait for one waits in turn."""

        def __init__(self, bound: int) -> None:
            self._bound = bound
            self._free = bound
            self._waiters: collections.deque[anyio.Event] = collections.deque()

        async def acquire(self) -> None:
            if self._free and not self._waiters:
                self._free -= 1
                return
            granted = anyio.Event()
            self._waiters.append(granted)
            try:
                await granted.wait()
            except BaseException:
                if granted.is_set():  # handed a permit as it was cancelled: pass it on
                    self._release()
                else:
                    self._waiters.remove(granted)
                raise

        async def release(self) -> None:
            self._release()

        def _release(self) -> None:
            if self._waiters:
                self._waiters.popleft().set()  # the permit goes to the first waiter
            elif self._free >= self._bound:
                raise ValueError("semaphore released too many times")
            else:
                self._free += 1

    class ResettingHTTP2Connection(httpcore.AsyncHTTP2Connection):
        def __setattr__(self, name: str, value: Any) -> None:
            if name == "_max_streams_semaphore" and not isinstance(value, StreamPermits):
                value = StreamPermits(self._h2_state.local_settings.max_concurrent_streams)
            super().__setattr__(name, value)

        async def _response_closed(self, stream_id: int) -> None:
            # Called (shielded) when a response is closed, read to its end or not, and when a
            # request fails or is cancelled before its response began.
            stream = self._h2_state.streams.get(stream_id)
            reset = False
            if stream is not None and not stream.closed:
                try:
                    self._h2_state.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
                    reset = True
                except h2.exceptions.ProtocolError:
                    pass
            await super()._response_closed(stream_id)
            if reset and not self.is_closed():
                # Send it now (the server stops the answer at once), not with the next request;
                # only another task's write can hold it up.
                with anyio.move_on_after(_RESET_FLUSH_SECONDS, shield=True) as scope:
                    try:
                        await super()._write_outgoing_data(flush)
                    except Exception:  # the connection marked itself broken: the pool drops it
                        pass
                if scope.cancelled_caught:  # frames may be half sent: let the pool drop it
                    self._connection_error = True

        async def _write_outgoing_data(self, request: httpcore.Request) -> None:
            # Frames taken out of h2's buffer must reach the socket whole, or the connection
            # is corrupt for every stream on it (a frame lost, or half a TLS record); httpcore
            # lets a cancelled request abandon its write (a fan-out's loser, cancelled as it
            # sends). Cancellation waits for the write, which httpcore's write timeout bounds.
            with anyio.CancelScope(shield=True):
                await super()._write_outgoing_data(request)

    class ResettingConnection(httpcore.AsyncHTTPConnection):
        def __setattr__(self, name: str, value: Any) -> None:
            # httpcore makes the HTTP/2 connection once ALPN chose h2; swap in the subclass
            # (same layout, one method more) before any stream uses it.
            if name == "_connection" and type(value) is httpcore.AsyncHTTP2Connection:
                value.__class__ = ResettingHTTP2Connection
            super().__setattr__(name, value)

    class ResettingPool(httpcore.AsyncConnectionPool):
        def create_connection(self, origin: httpcore.Origin) -> httpcore.AsyncConnectionInterface:
            connection = super().create_connection(origin)
            if type(connection) is httpcore.AsyncHTTPConnection:  # not through a proxy
                connection.__class__ = ResettingConnection
            return connection

    return ResettingPool


def _reset_cancelled_streams(transport: httpx.AsyncHTTPTransport) -> bool:
    """Make ``transport``'s HTTP/2 connections reset a stream whose response is closed before
    its end (or whose request is cancelled before the answer), and send the reset at once.

    httpcore (1.0) only forgets such a stream (encode/httpcore#1022): no ``RST_STREAM`` goes
    out, so the server goes on producing an answer nobody reads (an LLM's tokens), the
    connection's flow-control window shrinks by every byte of it until the connection stalls,
    and h2's count of open streams drifts until new ones are refused. Resetting it, as HTTP/2
    intends (RFC 9113, 8.7), keeps the connection and tells the server to stop: what closing
    the connection does under HTTP/1.1. Returns whether the pool could be changed (a future
    httpx with another pool is left as it is)."""
    pool = getattr(transport, "_pool", None)
    if type(pool) is not httpcore.AsyncConnectionPool:
        return False
    pool.__class__ = _resetting_pool_class()
    return True


@dataclass(slots=True)
class StreamProgress:
    """How far a provider's stream got, for :meth:`HTTPBackend._stream_sse`: the text pieces
    and the other pieces (tool-call deltas) passed on so far (the provider's own lists, which
    it appends to), and whether the end marker (``[DONE]``, ``message_stop``) came."""

    text: list[str]
    pieces: Sized = ()
    ended: bool = False

    @property
    def passed(self) -> bool:
        """Whether any piece was passed on."""
        return bool(self.text) or bool(self.pieces)


# -- aiohttp: genfan's own calls go to aiohttp directly ----------------------------------------


class _AioBody(httpx.AsyncByteStream):
    """An aiohttp response's body as httpx's stream type: read as it comes, already decoded
    (aiohttp undoes ``Content-Encoding``), closed by ``httpx.Response.aclose()``: the
    connection goes back to aiohttp's pool when the body was read to its end, else it is
    closed (as httpx does with a response closed early)."""

    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncGenerator[bytes, None]:
        content = self._response.content
        while chunk := await content.readany():
            yield chunk

    async def aclose(self) -> None:
        response = self._response
        if response.content.at_eof():
            response.release()
        else:
            response.close()


def _decoded_chunks(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    """The pieces of ``response``'s body, decoded, as they come (close it when done)."""
    stream = response.stream
    if type(stream) is _AioBody:
        return stream.__aiter__()  # aiohttp decoded it; httpx's decoders would again
    return response.aiter_bytes()  # type: ignore[return-value]


class _Aiohttp:
    """A backend's calls over aiohttp, without httpx's request model in the way.

    httpx-aiohttp's transport alone measured 1.5x raw aiohttp's CPU per call (an
    ``httpx.Request`` per call, the URL, headers and timeouts converted for aiohttp, the body
    read through httpx's layers), before any of genfan's own work; so the backend's own calls
    go to one ``aiohttp.ClientSession`` here, and come back as an ``httpx.Response`` (the
    status and headers; the body read from aiohttp as it comes) that the request paths read
    as any other. The session's pool grows with the requests in flight (``max_concurrency``,
    if set, caps it) and keeps idle connections 5 s, as httpx does. The proxy for
    ``base_url`` in the environment (``HTTPS_PROXY``, ``NO_PROXY``...), if any, is read once
    here, as httpx reads it (aiohttp's ``trust_env`` reads it, and ``~/.netrc``, in a worker
    thread on every request). Timeouts: ``timeout`` (or a request's limit) for connecting
    (and waiting for a pooled connection) and for each read, as httpx's.
    """

    def __init__(self, backend: HTTPBackend) -> None:
        import aiohttp
        import yarl
        from aiohttp.helpers import get_env_proxy_for_url

        self._aiohttp = aiohttp
        self._yarl = yarl
        self.error: type[Exception] = aiohttp.ClientError
        self.context = _context_for(backend.verify, False)
        self._limit = backend.max_concurrency or 0  # aiohttp's 0: no limit
        self._headers = {**backend._headers, "content-type": "application/json"}
        self._timeout = self._timeout_of(backend.timeout)
        self._extra: dict[str, Any] = {}
        try:
            proxy, proxy_auth = get_env_proxy_for_url(yarl.URL(backend.base_url))
        except LookupError:
            pass
        else:
            self._extra = {"proxy": proxy, "proxy_auth": proxy_auth}
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, yarl.URL] = {}

    def _timeout_of(self, seconds: float) -> aiohttp.ClientTimeout:
        return self._aiohttp.ClientTimeout(
            total=None, connect=seconds, sock_connect=seconds, sock_read=seconds
        )

    def session(self) -> aiohttp.ClientSession:
        """The session (made on first use: it must be, in the event loop)."""
        if self._session is None or self._session.closed:
            aiohttp = self._aiohttp
            connector = aiohttp.TCPConnector(
                limit=self._limit, ssl=self.context, keepalive_timeout=5.0
            )
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def post(self, url: str, body: dict[str, Any], limit: float | None) -> httpx.Response:
        """POST ``body`` as JSON; the response comes back with its body not read yet."""
        target = self._urls.get(url)
        if target is None:
            if len(self._urls) >= 64:
                self._urls.clear()
            target = self._urls[url] = self._yarl.URL(url)
        response = await self.session().request(
            "POST",
            target,
            data=_json_bytes(body),
            headers=self._headers,
            timeout=self._timeout if limit is None else self._timeout_of(limit),
            allow_redirects=False,
            **self._extra,
        )
        return httpx.Response(
            response.status, headers=response.raw_headers, stream=_AioBody(response)
        )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _check_transport(
    http2: object, transport: object, verify: object, client: httpx.AsyncClient | None
) -> None:
    """Check ``http2``, ``transport`` and ``verify`` (see :class:`HTTPBackend`).

    Raises:
        ConfigurationError: a bad value, an extra that is not installed, or a combination
            that cannot work.
    """
    if not isinstance(http2, bool):
        raise ConfigurationError(f"http2 must be true or false, got {http2!r}")
    if transport not in _TRANSPORTS:
        raise ConfigurationError(
            f"transport must be one of {', '.join(map(repr, _TRANSPORTS))}, got {transport!r}"
        )
    if not isinstance(verify, bool | str | ssl.SSLContext):
        raise ConfigurationError(
            "verify must be true, false, the path of a CA bundle or folder, or an "
            f"ssl.SSLContext, got {verify!r}"
        )
    if isinstance(verify, str) and not os.path.exists(verify):
        raise ConfigurationError(f"verify={verify!r}: no such CA bundle file or folder")
    if client is not None and (http2 or transport != "httpx" or verify is not True):
        raise ConfigurationError(
            "http2, transport and verify configure genfan's own HTTP clients; with client= "
            "set them on your httpx.AsyncClient instead"
        )
    if http2 and transport == "aiohttp":
        raise ConfigurationError(
            "transport='aiohttp' speaks HTTP/1.1 only; drop http2=True or use "
            "transport='httpx' (or 'auto', which picks httpx when http2 is on)"
        )
    if http2 and not _installed("h2"):
        raise ConfigurationError(
            "http2=True needs the h2 package: pip install 'genfan-providers[http2]'"
        )
    if transport == "aiohttp" and not _installed("httpx_aiohttp"):
        raise ConfigurationError(
            "transport='aiohttp' needs httpx-aiohttp: pip install 'genfan-providers[aiohttp]'"
        )


class HTTPBackend(BaseBackend):
    """Base class of the HTTP providers (see the module docstring).

    Args:
        model: the default model (a request's ``model`` overrides it).
        name: the backend's name (default ``"<provider>:<model>"``).
        base_url: the API root, including its version path (``.../v1``). ``None``: the
            provider's environment variable (``OPENAI_BASE_URL``, ``ANTHROPIC_BASE_URL``) when it
            is set, as the vendor's SDK reads it, else the provider's own API.
        api_key: the key itself; takes precedence over ``api_key_env``, and is sent to whatever
            ``base_url`` is.
        api_key_env: the environment variable to read the key from, sent to whatever
            ``base_url`` is; it must be set. ``None`` (or ``""``): never read one. The default,
            :data:`PROVIDER_KEY`, reads the provider's own variable (``OPENAI_API_KEY``) only
            for the provider's own host (``api.openai.com``), or for a base URL that also came
            from the environment (``OPENAI_BASE_URL``, as the vendor's SDK does); any other
            ``base_url`` gets no key unless one is named.
        headers: extra headers sent with every request (e.g. ``HTTP-Referer`` for OpenRouter).
        timeout: httpx timeout in seconds for connecting, and for each read and write.
        max_concurrency: the most requests in flight at once on this backend (and the size of
            its connection pools); more wait their turn in genfan, not in httpx. ``None``
            (default): no cap here, the guard stack's bulkhead is the one cap, and the pools
            grow to the most requests in flight at once.
        price: what the model costs, to fill ``Usage.cost``: ``(input, output)`` USD per
            million tokens, or a :class:`~genfan.cost.Price` (with cache and reasoning
            prices). ``None`` (default): the price of the model in the genai-prices table
            (found by ``base_url``, else by provider), cached input and reasoning tokens
            included; a model the table does not know costs ``None`` (unknown).
        client: an ``httpx.AsyncClient`` to use instead of creating one (it is not closed by
            :meth:`aclose`; its own pool limits apply).
        max_response_bytes: the most bytes of one answer held in memory: a whole JSON body, or
            one event of a stream (decoded, after ``Content-Encoding``). A larger one fails
            with :class:`~genfan.ResponseTooLargeError` before more is read. ``None``: no
            limit.
        max_server_wait: the longest wait, in seconds, that a server's ``Retry-After`` or
            quota reset (``RateLimitError.retry_after``, ``RateLimitInfo.reset_*``) is believed;
            a longer one (an HTTP-date in 2099, ``1e308``) is cut to it, so no server can stop
            a backend's rate limiter for longer.
        http2: offer HTTP/2 (needs the ``http2`` extra, httpx's ``h2``). A server that takes
            it (over TLS, chosen by ALPN; a plain ``http://`` server gets HTTP/1.1) carries
            many calls on one connection, and a call cancelled before its answer (a fan-out's
            loser, a deadline) resets its stream and keeps the connection, where HTTP/1.1
            drops it (against a hosted API, a new TLS handshake for the next call).
        transport: what carries the requests: ``"httpx"`` (default), ``"aiohttp"`` (asyncio
            only; needs the ``aiohttp`` extra, ``httpx-aiohttp``; less client CPU per call,
            one aiohttp connection pool; HTTP/1.1 only), or ``"auto"`` (aiohttp on asyncio
            when it is installed and ``http2`` is off, httpx otherwise). Chosen at the first
            call; ``"aiohttp"`` called on trio raises :class:`~genfan.ConfigurationError`.
        verify: how servers' certificates are checked: ``True`` (default: the certifi bundle,
            or ``$SSL_CERT_FILE`` / ``$SSL_CERT_DIR`` as httpx reads them), the path of a CA
            bundle (a file) or of a folder of CA certificates (a private gateway, a local
            server with its own CA), an ``ssl.SSLContext``, or ``False`` (no check: testing
            only).

    Raises:
        ConfigurationError: a bad argument; a ``base_url`` with credentials in it
            (``user:password@``: pass the key as ``api_key=``); the provider's own host and no
            key (naming the variable to set); an ``api_key_env`` that is not set; ``http2``
            or ``transport="aiohttp"`` without their extra installed, or together; either,
            or ``verify``, with a ``client`` of your own (configure that client instead).
    """

    provider = "http"
    #: the header that carries the key, and how its value is written.
    _auth_header = "authorization"
    _auth_prefix = "Bearer "
    #: the provider's own API, its environment variables for the key and the base URL (as its
    #: official SDK reads them); ``None`` for a provider without them.
    _default_base_url: ClassVar[str | None] = None
    _key_env: ClassVar[str | None] = None
    _base_url_env: ClassVar[str | None] = None

    def __init__(
        self,
        model: str | None = None,
        *,
        name: str | None = None,
        base_url: str | None = None,
        api_key: str | SecretStr | None = None,
        api_key_env: str | _ProviderKey | None = PROVIDER_KEY,
        headers: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        max_concurrency: int | None = None,
        price: PriceLike | None = None,
        client: httpx.AsyncClient | None = None,
        max_response_bytes: int | None = DEFAULT_MAX_RESPONSE_BYTES,
        max_server_wait: float = DEFAULT_MAX_SERVER_WAIT,
        http2: bool = False,
        transport: Transport = "httpx",
        verify: bool | str | ssl.SSLContext = True,
    ) -> None:
        _check_transport(http2, transport, verify, client)
        base_url, url_from_env = self._resolve_base_url(base_url)
        where = f" (from ${self._base_url_env})" if url_from_env else ""
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            shown = redact_url(base_url) if isinstance(base_url, str) else base_url
            raise ConfigurationError(
                f"base_url must be an http:// or https:// URL, got {shown!r}{where}"
            )
        if _URL_USERINFO.match(base_url):
            # httpx would send them as Basic auth, silently in place of the key, and the URL is
            # shown in reprs, errors and logs: refuse them (without echoing them).
            raise ConfigurationError(
                f"base_url must not carry credentials (user:password@), got "
                f"{redact_url(base_url)!r}{where}; pass the key with api_key= or api_key_env= "
                "(or a header in headers=)"
            )
        if max_response_bytes is not None and not (
            isinstance(max_response_bytes, int)
            and not isinstance(max_response_bytes, bool)
            and max_response_bytes >= 1
        ):
            raise ConfigurationError(
                f"max_response_bytes must be None or an integer >= 1, got {max_response_bytes!r}"
            )
        if not (
            isinstance(max_server_wait, int | float)
            and not isinstance(max_server_wait, bool)
            and max_server_wait >= 0
            and math.isfinite(max_server_wait)
        ):
            raise ConfigurationError(
                f"max_server_wait must be a finite number of seconds >= 0, got {max_server_wait!r}"
            )
        if not (isinstance(timeout, int | float) and timeout > 0 and math.isfinite(timeout)):
            raise ConfigurationError(
                f"timeout must be a positive number of seconds, got {timeout!r}"
            )
        if max_concurrency is not None and not (
            isinstance(max_concurrency, int) and max_concurrency >= 1
        ):
            raise ConfigurationError(
                f"max_concurrency must be None or an integer >= 1, got {max_concurrency!r}"
            )
        own_price = Price.of(price) if price is not None else None
        super().__init__(name or (f"{self.provider}:{model}" if model else self.provider))
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.timeout = float(timeout)
        self.max_concurrency = max_concurrency
        #: the price given with ``price=`` (``None``: the genai-prices table's, see `price_for`).
        self.price: Price | None = own_price
        #: the table's price of the default model (looked up at the first call).
        self._table_price: Price | bool | None = False
        self.max_response_bytes = max_response_bytes
        self.max_server_wait = float(max_server_wait)
        self.http2 = http2
        self.transport: Transport = transport
        self.verify = verify
        #: aiohttp, once chosen (``None``: httpx, or not chosen yet).
        self._aio: _Aiohttp | None = None
        #: ``None``: the transport is chosen at the first call ("aiohttp", "auto").
        self._chosen: str | None = "httpx" if transport == "httpx" or client is not None else None
        #: What a failed send or read raises (aiohttp's own errors too, once it is chosen).
        self._transport_errors: tuple[type[BaseException], ...] = (httpx.HTTPError, TimeoutError)
        #: Parsed URLs (httpx parses a URL string again for every request: ~0.1 ms).
        self._urls: dict[str, httpx.URL] = {}
        self._headers: dict[str, str] = self._default_headers()
        if headers:
            self._headers.update(headers)
        #: the environment variable the key was read from (``None``: not from one).
        self.api_key_env: str | None = None
        #: where the key came from, for error messages: "argument", "environment", "headers",
        #: "client" or "none".
        self._key_source = "argument"
        if api_key is None:
            api_key = self._key_from_environment(api_key_env, url_from_env, client)
        self._api_key: SecretStr | None = (
            api_key if isinstance(api_key, SecretStr) or api_key is None else SecretStr(api_key)
        )
        if self._api_key is not None and self._api_key.get_secret_value():
            self._headers[self._auth_header] = self._auth_prefix + self._api_key.get_secret_value()
        #: what :meth:`_redact` hides: the key and every credential header's value (the
        #: caller's client's own headers included).
        own = dict(client.headers.items()) if client is not None else {}
        self._secrets = _secrets_of(self._api_key, {**own, **self._headers})
        self._own_client = client is None
        self._client = client
        # Headers go on our own clients once; a caller's client gets them per request.
        self._request_headers: dict[str, str] | None = None if client is None else self._headers
        self._sem = None if max_concurrency is None else anyio.Semaphore(max_concurrency)
        self._shards: list[httpx.AsyncClient | None] = []
        # A stack of free slots (shard indexes); shard 0's on top, so light load stays on one
        # shard and its warm connections.
        self._slots: list[int] = []
        if client is None and max_concurrency is not None:
            count = -(-max_concurrency // SHARD_SIZE)
            self._shards = [None] * count
            self._slots = [i for i in reversed(range(count)) for _ in range(self._slot_count(i))]
        self._closed = False
        self._ssl: ssl.SSLContext | None = None
        self._aio_client: httpx.AsyncClient | None = None

    def _slot_count(self, i: int) -> int:
        """How many connections shard ``i`` holds (the last of a capped backend: what is left)."""
        if self.max_concurrency is None or i < len(self._shards) - 1:
            return SHARD_SIZE
        return self.max_concurrency - SHARD_SIZE * i

    # -- set-up --------------------------------------------------------------------------------

    def _default_headers(self) -> dict[str, str]:
        return {}

    # -- the base URL and the key --------------------------------------------------------------

    def _resolve_base_url(self, base_url: str | None) -> tuple[str | None, bool]:
        """``(base_url, whether it came from the environment)``: the argument, else the
        provider's base-URL variable, else the provider's own API."""
        if base_url is not None:
            return base_url, False
        if self._base_url_env:
            value = os.environ.get(self._base_url_env, "").strip()
            if value:
                return self._base_url_from_env(value), True
        if self._default_base_url is None:
            raise ConfigurationError(f"{type(self).__name__} needs a base_url")
        return self._default_base_url, False

    def _base_url_from_env(self, value: str) -> str:
        """``base_url`` for the value of the provider's base-URL variable, read as the vendor's
        SDK reads it."""
        return value

    @property
    def _home(self) -> str | None:
        """The provider's own host (``api.openai.com``), if it has one."""
        return httpx.URL(self._default_base_url).host if self._default_base_url else None

    def _at_home(self, base_url: str) -> bool:
        """Whether ``base_url`` is on the provider's own host."""
        try:
            return self._home is not None and httpx.URL(base_url).host == self._home
        except httpx.InvalidURL:
            return False

    def _key_from_environment(
        self, api_key_env: str | _ProviderKey | None, url_from_env: bool, client: object
    ) -> str | None:
        """The key when no ``api_key`` was passed (and where it came from, in
        ``api_key_env`` and ``_key_source``).

        Raises:
            ConfigurationError: a named variable is not set, or the provider's own host gets no
                key.
        """
        if api_key_env is PROVIDER_KEY:
            var = self._key_env
            # The provider's own key goes to its own host, or to a base URL the environment
            # named too (OPENAI_BASE_URL: the official SDKs send OPENAI_API_KEY there).
            if var and (url_from_env or self._at_home(self.base_url)):
                value = os.environ.get(var)
                if value:
                    self.api_key_env, self._key_source = var, "environment"
                    return value
        elif api_key_env:
            value = os.environ.get(api_key_env)
            if not value:
                raise ConfigurationError(f"{api_key_env} is not set; pass api_key=... or set it")
            self.api_key_env, self._key_source = api_key_env, "environment"
            return value
        if self._auth_header in {k.lower() for k in self._headers}:
            self._key_source = "headers"
        elif client is not None:
            self._key_source = "client"  # its own headers may carry a key
        else:
            self._key_source = "none"
            if self._at_home(self.base_url):
                if api_key_env is PROVIDER_KEY:
                    raise ConfigurationError(
                        f"{self._key_env} is not set; pass api_key=... or set it"
                    )
                raise ConfigurationError(
                    f"{self.base_url} needs an API key, and api_key_env={api_key_env!r} reads"
                    " none; pass api_key=... or api_key_env='VARIABLE'"
                )
        return None

    def _key_hint(self) -> str:
        """What a 401 or 403 tells about the key: where it came from (never the key)."""
        cls = type(self).__name__
        check = "check it and its permissions"
        source = self._key_source
        if source == "environment":
            return f"the key from {self.api_key_env} was refused; {check}"
        if source == "argument":
            return f"the api_key passed to {cls} was refused; {check}"
        if source == "headers":
            return f"the {self._auth_header} header passed to {cls} was refused; {check}"
        if source == "client":
            return f"genfan sent no key; check the headers of the httpx client passed to {cls}"
        hint = f"no key was sent to {self.base_url}; pass api_key=... or api_key_env=..."
        if self._key_env and self._home:
            hint += (
                f" (${self._key_env} is sent only to {self._home} or ${self._base_url_env}:"
                f" name it with api_key_env={self._key_env!r} to send it here)"
            )
        return hint

    def _ssl_for_clients(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = _context_for(self.verify, self.http2)
        return self._ssl

    def _new_shard(self, i: int) -> httpx.AsyncClient:
        if self._closed:
            raise ConfigurationError(f"backend {self.name!r} is closed; create a new one")
        size = self._slot_count(i)
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        context = self._ssl_for_clients()
        transport = None
        if self.http2:
            transport = httpx.AsyncHTTPTransport(verify=context, http2=True, limits=limits)
            _reset_cancelled_streams(transport)
        client = httpx.AsyncClient(
            headers=self._headers,
            timeout=httpx.Timeout(self.timeout),
            limits=limits,
            verify=context,
            http2=self.http2,
            transport=transport,
        )
        self._shards[i] = client
        return client

    def _choose_transport(self) -> None:
        """Choose the transport (``"aiohttp"``, ``"auto"``): at the first call, on the async
        library that makes it.

        Raises:
            ConfigurationError: ``transport="aiohttp"`` on trio.
        """
        library = _async_library()
        if self.transport == "aiohttp":
            if library == "trio":
                raise ConfigurationError(
                    f"backend {self.name!r}: transport='aiohttp' runs on asyncio only, and this "
                    "call runs on trio; use transport='auto' (aiohttp on asyncio, httpx "
                    "elsewhere) or 'httpx'"
                )
            use_aiohttp = True
        else:  # "auto"
            use_aiohttp = library != "trio" and not self.http2 and _installed("httpx_aiohttp")
        if use_aiohttp:
            self._build_aiohttp()
        self._chosen = "aiohttp" if use_aiohttp else "httpx"
        telemetry.event(
            "backend_transport_chosen",
            level="debug",
            backend=self.name,
            transport=self._chosen,
            asked=self.transport,
        )

    def _build_aiohttp(self) -> None:
        """Get aiohttp ready (its session is made at the first request, in the event loop)."""
        self._aio = _Aiohttp(self)
        # For callers of .client: httpx over aiohttp (httpx-aiohttp), on the same session.
        from httpx_aiohttp import AiohttpTransport

        self._aio_client = httpx.AsyncClient(
            transport=AiohttpTransport(verify=self._aio.context, client=self._aio.session),
            headers=self._headers,
            timeout=httpx.Timeout(self.timeout),
            trust_env=False,
        )
        self._transport_errors = (httpx.HTTPError, TimeoutError, self._aio.error)

    @property
    def client(self) -> httpx.AsyncClient:
        """The caller's ``httpx.AsyncClient``, or the first of the backend's own (with
        ``transport="aiohttp"``, one over aiohttp's transport)."""
        if self._client is not None:
            return self._client
        if self._closed:
            raise ConfigurationError(f"backend {self.name!r} is closed; create a new one")
        if self._chosen is None:
            self._choose_transport()
        if self._aio_client is not None:
            return self._aio_client
        if not self._shards:
            self._add_shard()
        return self._shards[0] or self._new_shard(0)

    async def warm(self) -> None:
        """Build the first HTTP client (its connection pool and TLS context) and look the
        model's price up (loading the genai-prices table: ~0.5 s once per process, in a worker
        thread) before any call, so that neither counts against a deadline or a latency."""
        if not self._closed:
            _ = self.client
        if self.price is None and self._table_price is False and self.model:
            await anyio.to_thread.run_sync(self._price_of, self.model)

    @property
    def clients(self) -> list[httpx.AsyncClient]:
        """Every ``httpx.AsyncClient`` in use now (created on demand, one per
        :data:`SHARD_SIZE` requests in flight at once)."""
        if self._client is not None:
            return [self._client]
        own = [c for c in self._shards if c is not None]
        return own if self._aio_client is None else [self._aio_client, *own]

    @property
    def has_api_key(self) -> bool:
        """Whether a key is configured (the key itself is never shown)."""
        return self._api_key is not None

    @property
    def key_source(self) -> str:
        """Where the key came from: ``"argument"`` (``api_key=``), ``"environment"`` (the
        variable :attr:`api_key_env`), ``"headers"`` (``headers=``), ``"client"`` (the caller's
        httpx client, if anywhere) or ``"none"`` (no key is sent)."""
        return self._key_source

    async def aclose(self) -> None:
        """Close the connection pools (a client passed in by the caller is left open)."""
        self._closed = True
        shards, self._shards = self._shards, [None] * len(self._shards)
        aio_client, self._aio_client = self._aio_client, None
        for client in [aio_client, *shards]:
            if client is not None:
                await client.aclose()
        if self._aio is not None:
            await self._aio.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r})"

    # -- the request paths ---------------------------------------------------------------------

    async def _acquire(self) -> int:
        """Wait for a slot; return the index of its shard (-1: the caller's client, -2:
        aiohttp's transport).

        Raises:
            ConfigurationError: the backend is closed; ``transport="aiohttp"`` on trio.
        """
        if self._closed:
            raise ConfigurationError(f"backend {self.name!r} is closed; create a new one")
        if self._chosen is None:
            self._choose_transport()
        if self._sem is not None:
            try:
                self._sem.acquire_nowait()
            except anyio.WouldBlock:
                await self._sem.acquire()
        if self._client is not None:
            return -1
        if self._aio is not None:
            return _AIOHTTP_SLOT
        # A capped backend's semaphore admits at most as many requests as there are slots.
        if not self._slots:
            self._add_shard()
        return self._slots.pop()

    def _add_shard(self) -> None:
        """Room for :data:`SHARD_SIZE` more connections (an uncapped backend, every slot taken)."""
        self._slots.extend([len(self._shards)] * SHARD_SIZE)
        self._shards.append(None)

    def _release(self, slot: int) -> None:
        if slot >= 0:
            self._slots.append(slot)
        if self._sem is not None:
            self._sem.release()

    def _client_for(self, slot: int) -> httpx.AsyncClient:
        if slot < 0:
            assert self._client is not None
            return self._client
        return self._shards[slot] or self._new_shard(slot)

    async def _send(
        self, slot: int, url: str, body: dict[str, Any], limit: float | None
    ) -> httpx.Response:
        """POST ``body`` as JSON to ``url`` through ``slot``'s client or transport; the response
        comes back with its body not read yet (close it)."""
        target = self._urls.get(url)
        if target is None:
            if len(self._urls) >= 64:
                self._urls.clear()
            target = self._urls[url] = httpx.URL(url)
        aio = self._aio
        if slot == _AIOHTTP_SLOT and aio is not None:
            if self._closed:
                raise ConfigurationError(f"backend {self.name!r} is closed; create a new one")
            return await aio.post(url, body, limit)
        client = self._client_for(slot)
        request = client.build_request(
            "POST",
            target,
            json=body,
            headers=self._request_headers,
            timeout=httpx.USE_CLIENT_DEFAULT if limit is None else limit,
        )
        return await client.send(request, stream=True)

    async def _post_json(
        self, url: str, body: dict[str, Any], limit: float | None
    ) -> tuple[Any, httpx.Response]:
        """POST ``body`` as JSON and return the decoded JSON answer and the response.

        Raises:
            BackendError: a subclass for every way the call can fail.
        """
        slot = await self._acquire()
        try:
            try:
                if limit is None:
                    response = await self._send_and_read(slot, url, body, limit)
                else:
                    with anyio.fail_after(limit):
                        response = await self._send_and_read(slot, url, body, limit)
            except self._transport_errors as exc:
                self._raise_transport(exc, url, limit)
        finally:
            self._release(slot)
        if response.status_code >= 400:
            self._raise_status(response, response.content, url)
        try:
            return json.loads(response.content), response
        except ValueError as exc:
            raise MalformedResponseError(
                f"non-JSON answer from {url} (HTTP {response.status_code}): "
                f"{self._snippet(response.content)}",
                backend=self.name,
            ) from exc

    async def _send_and_read(
        self, slot: int, url: str, body: dict[str, Any], limit: float | None
    ) -> httpx.Response:
        """POST ``body`` and read the answer (at most ``max_response_bytes`` of it; of an error
        status, at most 64 KiB): the response comes back closed, its ``content`` read."""
        response = await self._send(slot, url, body, limit)
        try:
            if response.status_code >= 400:
                content = await self._read_body(response, url, _ERROR_BODY_BYTES, cut=True)
            else:
                content = await self._read_body(response, url, self.max_response_bytes)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await response.aclose()
            raise
        if not response.is_closed:  # an error body cut short: the connection is let go
            with anyio.CancelScope(shield=True):
                await response.aclose()
        # What Response.aread() keeps: .content (and .json(), .text) stay readable.
        response._content = content
        return response

    async def _read_body(
        self, response: httpx.Response, url: str, limit: int | None, *, cut: bool = False
    ) -> bytes:
        """The decoded body of a streamed ``response``, refused (or, with ``cut``, cut) past
        ``limit`` bytes, before more is read.

        Raises:
            ResponseTooLargeError: the body is larger than ``limit`` (and not ``cut``).
        """
        if limit is not None and not cut:
            announced = response.headers.get("content-length", "")
            if announced.isdigit() and int(announced) > limit:
                raise self._too_large(url, limit, int(announced), "the answer")
        parts: list[bytes] = []
        size = 0
        async with aclosing(_decoded_chunks(response)) as pieces:
            async for part in pieces:
                size += len(part)
                if limit is not None and size > limit:
                    if not cut:
                        raise self._too_large(url, limit, size, "the answer")
                    parts.append(part[: len(part) - (size - limit)])
                    break
                parts.append(part)
        return b"".join(parts)

    def _too_large(self, url: str, limit: int, size: int, what: str) -> ResponseTooLargeError:
        return ResponseTooLargeError(
            f"{what} from {url} is larger than max_response_bytes={limit} ({size} bytes or more "
            "read or announced); raise max_response_bytes if it is expected, else check the "
            "server",
            backend=self.name,
            limit=limit,
            size=size,
        )

    async def _stream_sse(
        self,
        url: str,
        body: dict[str, Any],
        limit: float | None,
        *,
        progress: StreamProgress | None = None,
    ) -> AsyncGenerator[tuple[str | None, str, httpx.Response], None]:
        """POST ``body`` and yield ``(event, data, response)`` for each server-sent event.

        The response is closed however the iteration ends (finished, failed, cancelled, or
        abandoned by the consumer), so its connection goes back to the pool or is dropped.

        ``progress``: what the caller has passed on so far, and whether the stream's end marker
        came. Once a piece was passed on, a connection that breaks raises
        :class:`~genfan.StreamInterruptedError` with the text so far, not the retryable
        :class:`~genfan.BackendConnectionError`; once the end marker came, the answer is whole,
        and a connection that breaks while the rest of the body is read is no error.
        """
        deadline = None if limit is None else anyio.current_time() + limit
        slot = await self._acquire()
        try:
            errors = self._transport_errors
            try:
                if deadline is None:
                    response = await self._send(slot, url, body, limit)
                else:
                    with anyio.fail_after(max(deadline - anyio.current_time(), 0.0)):
                        response = await self._send(slot, url, body, limit)
            except errors as exc:
                self._raise_transport(exc, url, limit)
            try:
                if response.status_code >= 400:
                    try:
                        content = await self._read_body(response, url, _ERROR_BODY_BYTES, cut=True)
                    except errors:
                        content = b""
                    self._raise_status(response, content, url)
                max_event = self.max_response_bytes
                parser = SSEParser(max_event_bytes=max_event)
                # Decoded bytes: a gzip'd (or brotli'd...) stream parses like a plain one.
                chunks = _decoded_chunks(response)
                while True:
                    try:
                        if deadline is None:
                            chunk = await chunks.__anext__()
                        else:
                            with anyio.fail_after(max(deadline - anyio.current_time(), 0.0)):
                                chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                    except errors as exc:
                        if progress is not None and progress.ended:
                            break  # the answer is whole; only the body's end is missing
                        self._raise_transport(exc, url, limit, progress=progress)
                    try:
                        events = parser.feed(chunk)
                    except EventTooLarge as exc:
                        assert max_event is not None
                        raise self._too_large(url, max_event, exc.size, "one event") from None
                    for event, data in events:
                        yield event, data, response
                for event, data in parser.close():
                    yield event, data, response
            finally:
                with anyio.CancelScope(shield=True):
                    await response.aclose()
        finally:
            self._release(slot)

    # -- error translation ---------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        """``text`` without the key or any credential header's value (each becomes ``***``)."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def _snippet(self, content: bytes) -> str:
        # Redacted before it is cut, so no secret is left half-shown at the cut.
        text = self._redact(content[: _ERROR_BODY_CHARS + 4096].decode("utf-8", "replace"))
        if len(text) > _ERROR_BODY_CHARS or len(content) > _ERROR_BODY_CHARS + 4096:
            text = text[:_ERROR_BODY_CHARS] + "..."
        return text or "(empty body)"

    def _raise_transport(
        self,
        exc: BaseException,
        url: str,
        timeout: float | None,
        *,
        progress: StreamProgress | None = None,
    ) -> NoReturn:
        """Raise the typed error for a transport failure (``from exc``); a connection that
        broke after pieces of a stream were passed on (see :meth:`_stream_sse`) raises
        :class:`~genfan.StreamInterruptedError`.

        aiohttp's errors are judged by what they are, not by what httpx-aiohttp maps them to
        (it maps every ``ClientConnectionError``, a server that hung up included, to
        ``httpx.ConnectTimeout``): an aiohttp timeout is a timeout, any other aiohttp error a
        connection error, as the same failure is through httpx's transport."""
        err: BackendError
        origin = _from_aiohttp(exc)
        if origin is not None:
            timed_out = isinstance(origin, TimeoutError)
        else:
            timed_out = isinstance(exc, httpx.TimeoutException | TimeoutError)
        if timed_out:
            limit = timeout if timeout is not None else self.timeout
            what = (
                type(exc).__name__
                if isinstance(exc, httpx.TimeoutException) and origin is None
                else "call"
            )
            err = BackendTimeoutError(
                f"{what} to {url} timed out after {limit:g}s; raise the timeout or check the server",
                backend=self.name,
            )
        elif isinstance(exc, httpx.DecodingError) or (
            origin is not None and "content-encoding" in str(origin).lower()
        ):  # aiohttp: ClientPayloadError("Can not decode content-encoding: gzip")
            err = MalformedResponseError(
                f"could not decode the answer from {url}: {self._redact(str(origin or exc))}",
                backend=self.name,
            )
        else:
            shown = exc if origin is None else origin
            detail = self._redact(str(shown)) or type(shown).__name__
            err = BackendConnectionError(
                f"{type(shown).__name__} talking to {url}: {detail}; is the server up and the "
                "base_url right?",
                backend=self.name,
            )
        if progress is not None and progress.passed and isinstance(err, BackendConnectionError):
            err = self._interrupted(url, "".join(progress.text), err)
        telemetry.event(
            "backend_http_failed", level="info", backend=self.name, error=type(err).__name__
        )
        raise err from exc

    def _error_message(self, data: Any) -> str | None:
        """The vendor's error message in a decoded error body, if any."""
        if isinstance(data, dict):
            error = data.get("error")
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                return str(error["message"])
            if isinstance(error, str):
                return error
            if isinstance(data.get("message"), str):
                return str(data["message"])
        return None

    def _status_hint(self, status: int) -> str:
        if status in (401, 403):
            return self._key_hint()
        if status == 404:
            return "check base_url and the model name"
        if status == 429:
            return "slow down, or retry after the time the server asked for"
        if status >= 500:
            return "the server failed; retrying later may help"
        return "the request was rejected; fix it before retrying"

    def _raise_status(self, response: httpx.Response, content: bytes, url: str) -> NoReturn:
        """Raise :class:`HTTPStatusError` / :class:`RateLimitError` for an error status, with
        the quota from the response's rate-limit headers as ``rate_limit``."""
        status = response.status_code
        try:
            detail = self._error_message(json.loads(content))
        except ValueError:
            detail = None
        text = self._redact(detail)[:_ERROR_BODY_CHARS] if detail else self._snippet(content)
        message = f"HTTP {status} from {url}: {text}; {self._status_hint(status)}"
        rate_limit = self._rate_limit_info(response.headers)
        err: HTTPStatusError
        if status == 429:
            err = RateLimitError(
                message,
                backend=self.name,
                retry_after=self._wait(parse_retry_after(response.headers)),
                rate_limit=rate_limit,
            )
        else:
            err = HTTPStatusError(
                message, backend=self.name, status_code=status, rate_limit=rate_limit
            )
        telemetry.event("backend_http_failed", level="info", backend=self.name, status_code=status)
        raise err from None

    def _not_a(
        self, what: str, url: str, response: httpx.Response, exc: Exception
    ) -> MalformedResponseError:
        """The error for an answer that decoded but is not ``what`` (raise it ``from exc``)."""
        return MalformedResponseError(
            self._redact(
                f"answer from {url} is not {what} ({type(exc).__name__}: {str(exc)[:200]}): "
                f"{self._snippet(response.content)}"
            ),
            backend=self.name,
        )

    def _unreadable(self, what: str, url: str, data: str, exc: Exception) -> MalformedResponseError:
        """The error for a stream ``what`` (chunk, event) that cannot be read (raise it
        ``from exc``)."""
        return MalformedResponseError(
            f"unreadable stream {what} from {url} ({type(exc).__name__}): "
            f"{self._redact(data[:4096])[:_ERROR_BODY_CHARS]}",
            backend=self.name,
        )

    def _truncated(self, url: str, missing: str) -> MalformedResponseError:
        """The error for a stream that ended before ``missing`` (nothing was passed on yet)."""
        return MalformedResponseError(
            f"stream from {url} ended without {missing} (truncated); the answer is incomplete",
            backend=self.name,
        )

    def _cut_short(
        self, url: str, missing: str, text: list[str], pieces: Sized = ()
    ) -> MalformedResponseError | StreamInterruptedError:
        """The error for a stream that ended cleanly but before ``missing`` (its end marker):
        :class:`~genfan.StreamInterruptedError` with the ``text`` passed on when any piece was
        (``text`` or ``pieces``), else the retryable :class:`~genfan.MalformedResponseError`."""
        if text or pieces:
            return self._interrupted(url, "".join(text), missing)
        return self._truncated(url, missing)

    def _interrupted(
        self, url: str, partial_text: str, cause: BackendError | str
    ) -> StreamInterruptedError:
        """The error for a stream cut (``cause``: the transport error, or the end marker that
        never came) after some of it was passed on."""
        why = f"ended without {cause}" if isinstance(cause, str) else f"broke ({cause.message})"
        return StreamInterruptedError(
            f"stream from {url} {why} after {len(partial_text)} characters of text were passed "
            "on; the answer is incomplete (partial_text holds what came)",
            backend=self.name,
            partial_text=partial_text,
        )

    def _rate_limit_info(self, headers: httpx.Headers) -> RateLimitInfo | None:
        """The quota in a response's rate-limit headers (each provider reads its own in
        :meth:`_read_rate_limit`), for completions and error statuses alike, with every reset
        cut to ``max_server_wait``; ``None`` when there are none."""
        info = self._read_rate_limit(headers)
        if info is None:
            return None
        cap = self.max_server_wait
        if (info.reset_requests or 0.0) <= cap and (info.reset_tokens or 0.0) <= cap:
            return info
        return info.model_copy(
            update={
                "reset_requests": self._wait(info.reset_requests),
                "reset_tokens": self._wait(info.reset_tokens),
            }
        )

    def _read_rate_limit(self, headers: httpx.Headers) -> RateLimitInfo | None:
        """The quota in a response's rate-limit headers, as the provider reports it."""
        return None

    def _wait(self, seconds: float | None) -> float | None:
        """A wait a server asked for, cut to ``max_server_wait`` (``None``, NaN: none)."""
        if seconds is None or math.isnan(seconds):
            return None
        return min(max(seconds, 0.0), self.max_server_wait)

    # -- shared helpers ------------------------------------------------------------------------

    def price_for(self, request: ChatRequest) -> Price | None:
        """What ``request`` is billed at: ``price=``, else the genai-prices table's price of
        its model (``request.model`` or the backend's); ``None``: unknown."""
        if self.price is not None:
            return self.price
        model = request.model or self.model
        if model is None:
            return None
        return self._price_of(model)

    def _price_of(self, model: str | None) -> Price | None:
        """The price of ``model`` (a completion's): ``price=``, else the table's."""
        if self.price is not None:
            return self.price
        if not model:
            return None
        if model == self.model:
            found = self._table_price
            if found is False:
                found = self._table_price = lookup_price(
                    model, provider=self.provider, base_url=self.base_url
                )
            return found if isinstance(found, Price) else None
        return lookup_price(model, provider=self.provider, base_url=self.base_url)

    def _usage(
        self,
        input_tokens: int,
        output_tokens: int,
        *,
        model: str | None = None,
        cache_read: int = 0,
        cache_write: int = 0,
        reasoning: int = 0,
    ) -> Usage:
        """Usage priced at ``model``'s price (``None``: the backend's model); counts that
        contradict each other (more cached than input tokens) are clipped."""
        cache_read = min(cache_read, input_tokens)
        cache_write = min(cache_write, input_tokens - cache_read)
        reasoning = min(reasoning, output_tokens)
        price = self._price_of(model or self.model)
        return Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cache_read_tokens=cache_read,
            cache_write_tokens=cache_write,
            reasoning_tokens=reasoning,
            cost=None
            if price is None
            else price.cost_of(
                input_tokens,
                output_tokens,
                cache_read_tokens=cache_read,
                cache_write_tokens=cache_write,
                reasoning_tokens=reasoning,
            ),
        )


# -- credentials -------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """``url`` with any credentials in it (``user:password@``) shown as ``***@``."""
    return _URL_USERINFO.sub(r"\1***@", url)


def _secrets_of(api_key: SecretStr | None, headers: Mapping[str, str]) -> tuple[str, ...]:
    """What error messages must never show: the key, and the value of every header that
    carries a credential (with the credential alone of ``Bearer <token>``-style values, and
    each cookie's value), longest first."""
    found: set[str] = set()
    key = api_key.get_secret_value() if api_key is not None else ""
    if key:
        found.add(key)
    for name, value in headers.items():
        lower = name.lower()
        if not value or not (lower in _SECRET_HEADERS or _SECRET_NAME.search(lower)):
            continue
        value = value.strip()
        found.add(value)
        parts = value.split()
        if len(parts) > 1:  # "Bearer sk-...", "Basic ...": the credential alone too
            found.add(parts[-1])
        if "cookie" in lower:
            for pair in value.split(";"):
                found.add(pair.partition("=")[2].strip())
    # Short strings are no credentials, and would blank out ordinary words.
    return tuple(sorted((s for s in found if s == key or len(s) >= 8), key=len, reverse=True))


# -- server-sent events ------------------------------------------------------------------------


class EventTooLarge(ValueError):
    """An event (or one line) of a stream is larger than :class:`SSEParser`'s limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"an event of {size} bytes or more, over the limit of {limit}")
        self.size = size
        self.limit = limit


class SSEParser:
    """An incremental parser of ``text/event-stream`` bodies, linear in the bytes fed.

    Feed it the body's (decoded) bytes as they arrive; it returns the complete events as
    ``(event, data)`` pairs (``event`` is ``None`` when the server named none; multi-line data
    is joined with ``\\n``). Comments and ``id:``/``retry:`` fields are ignored. Lines end with
    ``\\n``, ``\\r\\n`` or ``\\r`` (split across chunks or not).

    Each byte is looked at a fixed number of times, however long an event is: the pieces of a
    line that has not ended yet are kept in a list and joined once, when it ends (never copied
    on every chunk).

    Args:
        max_event_bytes: the most bytes one event (its data, and the line being read) may hold;
            past it :meth:`feed` raises :class:`EventTooLarge`. ``None``: no limit.
    """

    __slots__ = ("_after_cr", "_data", "_data_bytes", "_event", "_limit", "_pending", "_size")

    def __init__(self, max_event_bytes: int | None = None) -> None:
        self._limit = max_event_bytes
        self._pending: list[bytes] = []  # the line being read, in pieces
        self._size = 0  # bytes in _pending
        self._after_cr = False  # the last chunk ended with "\r": skip a "\n" that follows
        self._event: str | None = None
        self._data: list[str] = []
        self._data_bytes = 0

    def feed(self, chunk: bytes) -> list[tuple[str | None, str]]:
        """The events that ``chunk`` completes.

        Raises:
            EventTooLarge: the event being read is past ``max_event_bytes``.
        """
        if self._after_cr:
            self._after_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._after_cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        tail = lines.pop()
        if not lines:  # no line ends here: keep the piece (not a copy of what came before)
            if tail:
                self._pending.append(tail)
                self._size += len(tail)
                if self._limit is not None and self._size > self._limit:
                    raise EventTooLarge(self._size, self._limit)
            return []
        if self._pending:
            self._pending.append(lines[0])
            lines[0] = b"".join(self._pending)
            self._pending = []
        self._size = len(tail)
        if tail:
            self._pending.append(tail)
        out = self._lines(lines)
        if self._limit is not None and self._data_bytes + self._size > self._limit:
            raise EventTooLarge(self._data_bytes + self._size, self._limit)
        return out

    def close(self) -> list[tuple[str | None, str]]:
        """The event left when the body ended, if its lines were whole (a server that leaves
        out the last blank line); a line cut short is dropped, as the SSE standard says."""
        self._pending = []
        self._size = 0
        out: list[tuple[str | None, str]] = []
        if self._data:
            out.append((self._event, "\n".join(self._data)))
        self._data = []
        self._data_bytes = 0
        self._event = None
        return out

    def _lines(self, lines: Iterable[bytes]) -> list[tuple[str | None, str]]:
        out: list[tuple[str | None, str]] = []
        limit = self._limit
        for raw in lines:
            if not raw:
                if self._data:
                    out.append((self._event, "\n".join(self._data)))
                    self._data = []
                    self._data_bytes = 0
                self._event = None
                continue
            if raw.startswith(b"data:"):
                value = raw[6:] if raw[5:6] == b" " else raw[5:]
            elif raw == b"data":
                value = b""
            else:
                if raw.startswith(b"event:"):
                    self._event = raw[6:].strip().decode("utf-8", "replace")
                continue  # comments (":...") and other fields are ignored
            if limit is not None:
                self._data_bytes += len(value)
                if self._data_bytes > limit:
                    raise EventTooLarge(self._data_bytes, limit)
            self._data.append(value.decode("utf-8", "replace"))
        return out


# -- headers -----------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(value: str | None) -> float | None:
    """Seconds in an OpenAI-style duration: ``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``.

    A bare number counts as seconds; anything unreadable (``"inf"``, ``"nan"`` included) gives
    ``None``.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    total = 0.0
    pos = 0
    for m in _DURATION.finditer(value):
        if m.start() != pos:
            return None
        pos = m.end()
        amount = float(m.group(1))
        total += amount * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2)]
    if pos != len(value) or pos == 0 or not math.isfinite(total):
        return None
    return total


def parse_retry_after(headers: httpx.Headers | Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``Retry-After`` (seconds or an HTTP-date).

    As the server said it (a backend cuts it to its ``max_server_wait``); ``None`` when there
    is none or it cannot be read (``inf``, ``nan``).
    """
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000.0
            if math.isfinite(value):
                return max(value, 0.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    raw = raw.strip()
    try:
        value = float(raw)
        return max(value, 0.0) if math.isfinite(value) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
        # An absolute date can only be read against the wall clock (a naive one is UTC).
        stamp = when.timestamp() if when.tzinfo else when.replace(tzinfo=datetime.UTC).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError, AttributeError):
        return None
    return max(stamp - time.time(), 0.0)


# -- validating what a server sent -------------------------------------------------------------


def text_field(obj: Mapping[str, Any], key: str) -> str | None:
    """``obj[key]`` when it is a string, ``None`` when missing or null.

    Raises:
        TypeError: anything else (a list, a number...), for the caller to report as a
            :class:`~genfan.MalformedResponseError`.
    """
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"{key} must be a string, got {type(value).__name__}")


def token_count(obj: Mapping[str, Any], key: str) -> int:
    """``obj[key]`` as a count of tokens: a whole number >= 0 (``0`` when missing or null).

    Raises:
        TypeError, ValueError: anything else (``"lots"``, ``-1``, ``1.5``, ``true``).
    """
    value = obj.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{key} must be a number of tokens, got {type(value).__name__}")
    if value < 0 or (isinstance(value, float) and not value.is_integer()):  # nan, inf too
        raise ValueError(f"{key} must be a whole number >= 0, got {value!r}")
    return int(value)


def usage_field(obj: Mapping[str, Any], key: str, counts: tuple[str, ...]) -> Mapping[str, Any]:
    """``obj[key]``, a usage object whose ``counts`` are token counts (``{}`` when missing).

    Raises:
        TypeError, ValueError: it is not an object, or one of its counts is no count.
    """
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{key} must be an object, got {type(value).__name__}")
    for count in counts:
        token_count(value, count)
    return value


def prefixed_headers(headers: httpx.Headers, prefix: bytes) -> dict[bytes, str] | None:
    """The headers whose lower-cased name starts with ``prefix`` (lower-case bytes), keyed by
    the lower-cased rest of the name; ``None`` when there are none."""
    n = len(prefix)
    found: dict[bytes, str] | None = None
    for key, value in headers.raw:
        if len(key) > n and key[:n].lower() == prefix:
            if found is None:
                found = {}
            found[key[n:].lower()] = value.decode("latin-1")
    return found


def parse_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(float(value))
    except (ValueError, OverflowError):  # "x", "nan"; "inf", "1e999"
        return None
