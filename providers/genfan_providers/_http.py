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
* the API key, kept as a ``pydantic.SecretStr`` and redacted from every error message, and
  where it comes from. A provider's own environment variable (``OPENAI_API_KEY``) is sent only
  to the provider's own host (``api.openai.com``), or to the base URL its SDK reads from the
  environment too (``OPENAI_BASE_URL``); any other ``base_url`` gets a key only when one is
  named (``api_key=``, ``api_key_env=``). The provider's own host without a key fails at
  construction, naming the variable; a 401 says which key was refused (never the key);
* the translation of every transport failure, HTTP status and unreadable body into the typed
  errors of :mod:`genfan.errors`, always with ``raise ... from exc``;
* a small, fast server-sent-events parser, and rate-limit header parsing.

Timeouts: the backend's ``timeout`` is httpx's (connect, pool, write, and each read: a
stream that keeps sending is never cut). A request's own ``ChatRequest.timeout`` is a limit on
the whole call, enforced with an anyio cancel scope and reported as
:class:`~genfan.BackendTimeoutError`.
"""

from __future__ import annotations

import email.utils
import enum
import functools
import json
import math
import os
import re
import time
from collections.abc import AsyncGenerator, Iterable, Mapping
from typing import Any, ClassVar, Final, NoReturn

import anyio
import httpx
from pydantic import SecretStr

from genfan import (
    BackendConnectionError,
    BackendError,
    BackendTimeoutError,
    BaseBackend,
    ConfigurationError,
    HTTPStatusError,
    MalformedResponseError,
    RateLimitError,
    RateLimitInfo,
    Usage,
    telemetry,
)

__all__ = [
    "PROVIDER_KEY",
    "SHARD_SIZE",
    "HTTPBackend",
    "SSEParser",
    "parse_duration",
    "parse_retry_after",
]

_ERROR_BODY_CHARS = 300

#: The most connections one ``httpx`` client (one httpcore pool) of a backend holds.
SHARD_SIZE = 4


class _ProviderKey(enum.Enum):
    """The type of :data:`PROVIDER_KEY` (a one-member enum, so type checkers can narrow it)."""

    PROVIDER_KEY = "PROVIDER_KEY"

    def __repr__(self) -> str:
        return self.value


#: ``api_key_env``'s default: the provider's own variable (``OPENAI_API_KEY``), read for the
#: provider's own host only (see :class:`HTTPBackend`).
PROVIDER_KEY: Final = _ProviderKey.PROVIDER_KEY


@functools.cache
def _ssl_context() -> Any:
    """One SSL context for every client (building one reads the CA bundle: ~20 ms)."""
    return httpx.create_ssl_context()


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
        price: USD per million input and output tokens, to fill ``Usage.cost``.
        client: an ``httpx.AsyncClient`` to use instead of creating one (it is not closed by
            :meth:`aclose`; its own pool limits apply).

    Raises:
        ConfigurationError: a bad argument; the provider's own host and no key (naming the
            variable to set); an ``api_key_env`` that is not set.
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
        price: tuple[float, float] | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        base_url, url_from_env = self._resolve_base_url(base_url)
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            where = f" (from ${self._base_url_env})" if url_from_env else ""
            raise ConfigurationError(
                f"base_url must be an http:// or https:// URL, got {base_url!r}{where}"
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
        if price is not None:
            if len(price) != 2 or not all(isinstance(p, int | float) and p >= 0 for p in price):
                raise ConfigurationError(
                    "price must be (USD per 1M input tokens, USD per 1M output tokens), "
                    f"both >= 0, got {price!r}"
                )
        super().__init__(name or (f"{self.provider}:{model}" if model else self.provider))
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.timeout = float(timeout)
        self.max_concurrency = max_concurrency
        self.price = (float(price[0]), float(price[1])) if price is not None else None
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

    def _new_shard(self, i: int) -> httpx.AsyncClient:
        if self._closed:
            raise ConfigurationError(f"backend {self.name!r} is closed; create a new one")
        size = self._slot_count(i)
        client = httpx.AsyncClient(
            headers=self._headers,
            timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
            verify=_ssl_context(),
        )
        self._shards[i] = client
        return client

    @property
    def client(self) -> httpx.AsyncClient:
        """The caller's ``httpx.AsyncClient``, or the first of the backend's own."""
        if self._client is not None:
            return self._client
        if not self._shards:
            self._add_shard()
        return self._shards[0] or self._new_shard(0)

    @property
    def clients(self) -> list[httpx.AsyncClient]:
        """Every ``httpx.AsyncClient`` in use now (created on demand, one per
        :data:`SHARD_SIZE` requests in flight at once)."""
        if self._client is not None:
            return [self._client]
        return [c for c in self._shards if c is not None]

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
        for client in shards:
            if client is not None:
                await client.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r})"

    # -- the request paths ---------------------------------------------------------------------

    async def _acquire(self) -> int:
        """Wait for a slot; return the index of its shard (-1: the caller's client)."""
        if self._closed:
            raise ConfigurationError(f"backend {self.name!r} is closed; create a new one")
        if self._sem is not None:
            try:
                self._sem.acquire_nowait()
            except anyio.WouldBlock:
                await self._sem.acquire()
        if self._client is not None:
            return -1
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

    async def _post_json(
        self, url: str, body: dict[str, Any], limit: float | None
    ) -> tuple[Any, httpx.Response]:
        """POST ``body`` as JSON and return the decoded JSON answer and the response.

        Raises:
            BackendError: a subclass for every way the call can fail.
        """
        slot = await self._acquire()
        try:
            client = self._client_for(slot)
            try:
                if limit is None:
                    response = await client.post(url, json=body, headers=self._request_headers)
                else:
                    with anyio.fail_after(limit):
                        response = await client.post(
                            url, json=body, headers=self._request_headers, timeout=limit
                        )
            except (httpx.HTTPError, TimeoutError) as exc:
                self._raise_transport(exc, url, limit)
        finally:
            self._release(slot)
        if response.status_code >= 400:
            self._raise_status(response, response.content, url)
        try:
            return response.json(), response
        except ValueError as exc:
            raise MalformedResponseError(
                f"non-JSON answer from {url} (HTTP {response.status_code}): "
                f"{self._snippet(response.content)}",
                backend=self.name,
            ) from exc

    async def _stream_sse(
        self, url: str, body: dict[str, Any], limit: float | None
    ) -> AsyncGenerator[tuple[str | None, str, httpx.Response], None]:
        """POST ``body`` and yield ``(event, data, response)`` for each server-sent event.

        The response is closed however the iteration ends (finished, failed, cancelled, or
        abandoned by the consumer), so its connection goes back to the pool or is dropped.
        """
        deadline = None if limit is None else anyio.current_time() + limit
        slot = await self._acquire()
        try:
            client = self._client_for(slot)
            request = client.build_request(
                "POST",
                url,
                json=body,
                headers=self._request_headers,
                timeout=limit or httpx.USE_CLIENT_DEFAULT,
            )
            try:
                if deadline is None:
                    response = await client.send(request, stream=True)
                else:
                    with anyio.fail_after(max(deadline - anyio.current_time(), 0.0)):
                        response = await client.send(request, stream=True)
            except (httpx.HTTPError, TimeoutError) as exc:
                self._raise_transport(exc, url, limit)
            try:
                if response.status_code >= 400:
                    try:
                        content = await response.aread()
                    except httpx.HTTPError:
                        content = b""
                    self._raise_status(response, content, url)
                parser = SSEParser()
                chunks = response.aiter_raw().__aiter__()
                while True:
                    try:
                        if deadline is None:
                            chunk = await chunks.__anext__()
                        else:
                            with anyio.fail_after(max(deadline - anyio.current_time(), 0.0)):
                                chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                    except (httpx.HTTPError, TimeoutError) as exc:
                        self._raise_transport(exc, url, limit)
                    for event, data in parser.feed(chunk):
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
        key = self._api_key.get_secret_value() if self._api_key is not None else ""
        if key and key in text:
            text = text.replace(key, "***")
        return text

    def _snippet(self, content: bytes) -> str:
        text = content[:_ERROR_BODY_CHARS].decode("utf-8", "replace")
        if len(content) > _ERROR_BODY_CHARS:
            text += "..."
        return self._redact(text) or "(empty body)"

    def _raise_transport(
        self, exc: httpx.HTTPError | TimeoutError, url: str, timeout: float | None
    ) -> NoReturn:
        """Raise the typed error for a transport failure (``from exc``)."""
        err: BackendError
        if isinstance(exc, httpx.TimeoutException | TimeoutError):
            limit = timeout if timeout is not None else self.timeout
            what = type(exc).__name__ if isinstance(exc, httpx.TimeoutException) else "call"
            err = BackendTimeoutError(
                f"{what} to {url} timed out after {limit:g}s; raise the timeout or check the server",
                backend=self.name,
            )
        elif isinstance(exc, httpx.DecodingError):
            err = MalformedResponseError(
                f"could not decode the answer from {url}: {self._redact(str(exc))}",
                backend=self.name,
            )
        else:
            detail = self._redact(str(exc)) or type(exc).__name__
            err = BackendConnectionError(
                f"{type(exc).__name__} talking to {url}: {detail}; is the server up and the "
                "base_url right?",
                backend=self.name,
            )
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
                retry_after=parse_retry_after(response.headers),
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
            f"answer from {url} is not {what} ({type(exc).__name__}: {exc}): "
            f"{self._snippet(response.content)}",
            backend=self.name,
        )

    def _unreadable(self, what: str, url: str, data: str, exc: Exception) -> MalformedResponseError:
        """The error for a stream ``what`` (chunk, event) that cannot be read (raise it
        ``from exc``)."""
        return MalformedResponseError(
            f"unreadable stream {what} from {url} ({type(exc).__name__}): "
            f"{self._redact(data[:300])}",
            backend=self.name,
        )

    def _truncated(self, url: str, missing: str) -> MalformedResponseError:
        """The error for a stream that ended before ``missing``."""
        return MalformedResponseError(
            f"stream from {url} ended without {missing} (truncated); the answer is incomplete",
            backend=self.name,
        )

    def _rate_limit_info(self, headers: httpx.Headers) -> RateLimitInfo | None:
        """The quota in a response's rate-limit headers (each provider reads its own), for
        completions and error statuses alike; ``None`` when there are none."""
        return None

    # -- shared helpers ------------------------------------------------------------------------

    def _usage(self, input_tokens: int, output_tokens: int) -> Usage:
        price = self.price
        cost = (
            None
            if price is None
            else (input_tokens * price[0] + output_tokens * price[1]) / 1_000_000
        )
        return Usage(input_tokens=input_tokens, output_tokens=output_tokens, cost=cost)


# -- server-sent events ------------------------------------------------------------------------


class SSEParser:
    """An incremental parser of ``text/event-stream`` bodies.

    Feed it raw bytes as they arrive; it returns the complete events as ``(event, data)``
    pairs (``event`` is ``None`` when the server named none; multi-line data is joined with
    ``\\n``). Comments and ``id:``/``retry:`` fields are ignored.
    """

    __slots__ = ("_buf", "_data", "_event")

    def __init__(self) -> None:
        self._buf = b""
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[tuple[str | None, str]]:
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            if buf.endswith(b"\r"):
                # a "\r\n" may be split across chunks: keep the "\r" for next time
                self._buf = b"\r"
                buf = buf[:-1]
            else:
                self._buf = b""
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            lines = buf.split(b"\n")
            self._buf = lines.pop() + self._buf
        else:
            lines = buf.split(b"\n")
            self._buf = lines.pop()
        return self._lines(lines)

    def close(self) -> list[tuple[str | None, str]]:
        """Events left when the body ended (a last event without its blank line)."""
        lines = [self._buf] if self._buf else []
        self._buf = b""
        out = self._lines(lines)
        if self._data:
            out.append((self._event, "\n".join(self._data)))
            self._data = []
            self._event = None
        return out

    def _lines(self, lines: Iterable[bytes]) -> list[tuple[str | None, str]]:
        out: list[tuple[str | None, str]] = []
        for raw in lines:
            if not raw:
                if self._data:
                    out.append((self._event, "\n".join(self._data)))
                    self._data = []
                self._event = None
                continue
            if raw.startswith(b"data:"):
                value = raw[5:]
                if value.startswith(b" "):
                    value = value[1:]
                self._data.append(value.decode("utf-8", "replace"))
            elif raw.startswith(b"event:"):
                self._event = raw[6:].strip().decode("utf-8", "replace")
            # comments (":...") and other fields are ignored
        return out


# -- headers -----------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(value: str | None) -> float | None:
    """Seconds in an OpenAI-style duration: ``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``.

    A bare number counts as seconds; anything unreadable gives ``None``.
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    total = 0.0
    pos = 0
    for m in _DURATION.finditer(value):
        if m.start() != pos:
            return None
        pos = m.end()
        amount = float(m.group(1))
        total += amount * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2)]
    if pos != len(value) or pos == 0:
        return None
    return total


def parse_retry_after(headers: httpx.Headers | Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``Retry-After`` (seconds or an HTTP-date)."""
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
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    # An absolute date can only be read against the wall clock.
    return max(when.timestamp() - time.time(), 0.0)


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
    except ValueError:
        return None
