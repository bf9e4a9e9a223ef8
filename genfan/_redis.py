"""A minimal Redis client on anyio: RESP2 over `anyio.connect_tcp`, a small connection pool.

It runs on asyncio and trio alike (redis-py's asyncio client would not run on trio) and knows
only what genfan's stores send: plain commands and Lua scripts (``EVALSHA``, falling back to
``EVAL``). Every command has a timeout; a dropped idle connection is replaced once; a Redis that
cannot be reached fails fast for ``reconnect_interval`` seconds before it is tried again.
Errors are raised as the caller's error type, and messages and reprs never show the URL's
password.

genfan's Redis stores all speak through it: the budget and cache stores (``genfan.cost``) and
the shared quota store (``genfan.resilience``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeAlias
from urllib.parse import unquote, urlsplit

import anyio
import anyio.abc

from ._errors import ConfigurationError

__all__ = [
    "RedisClient",
    "RespError",
    "RespParser",
    "RespProtocolError",
    "RespValue",
    "encode_command",
    "parse_redis_url",
    "redact_redis_url",
    "script_sha",
]


class RespError(str):
    """An error reply (``-ERR ...``) as a value."""

    __slots__ = ()


#: A decoded RESP2 reply: simple string (str), error, integer, bulk string (bytes), array, nil.
RespValue: TypeAlias = "str | RespError | int | bytes | list[RespValue] | None"

_MAX_BULK = 64 * 1024 * 1024  # a bigger length means a wrong peer
_MAX_LINE = 64 * 1024


def encode_command(*args: str | bytes | int | float) -> bytes:
    """One command as a RESP2 array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bool):
            raise TypeError("a Redis argument cannot be a bool")
        elif isinstance(arg, int):
            data = b"%d" % arg
        elif isinstance(arg, float):
            if not math.isfinite(arg):
                raise ValueError(f"a Redis argument must be finite, got {arg!r}")
            data = repr(arg).encode()
        else:
            raise TypeError(f"a Redis argument must be str, bytes, int or float, not {arg!r}")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Incomplete(Exception):
    pass


class RespProtocolError(Exception):
    """The bytes are not RESP2 (the peer is not Redis); `RedisClient` raises its error type."""

    def __init__(self, what: str) -> None:
        super().__init__(f"the server sent {what}: is it Redis (RESP2)?")


class _Refused(Exception):
    """Redis refused a connection's setup (``AUTH``, ``SELECT``): the reason."""


class RespParser:
    """An incremental (sans-I/O) RESP2 reply parser: `feed` bytes, then take complete replies
    with `next`.

    Raises:
        RespProtocolError: the bytes are not RESP2.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> tuple[RespValue] | None:
        """The next complete reply as a 1-tuple (a reply may be ``None``), or ``None`` when more
        bytes are needed."""
        try:
            value, end = self._parse(0)
        except _Incomplete:
            return None
        del self._buf[:end]
        return (value,)

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self._buf.find(b"\r\n", pos)
        if end < 0:
            if len(self._buf) - pos > _MAX_LINE:
                raise RespProtocolError("a reply line without an end")
            raise _Incomplete
        return bytes(self._buf[pos:end]), end + 2

    def _parse(self, pos: int) -> tuple[RespValue, int]:
        if pos >= len(self._buf):
            raise _Incomplete
        kind = self._buf[pos : pos + 1]
        line, pos = self._line(pos + 1)
        if kind == b"+":
            return line.decode("utf-8", "replace"), pos
        if kind == b"-":
            return RespError(line.decode("utf-8", "replace")), pos
        if kind == b":":
            return _int(line), pos
        if kind == b"$":
            n = _int(line)
            if n == -1:
                return None, pos
            if not 0 <= n <= _MAX_BULK:
                raise RespProtocolError(f"a bulk string of length {n}")
            if len(self._buf) < pos + n + 2:
                raise _Incomplete
            if self._buf[pos + n : pos + n + 2] != b"\r\n":
                raise RespProtocolError("a bulk string without its end")
            return bytes(self._buf[pos : pos + n]), pos + n + 2
        if kind == b"*":
            n = _int(line)
            if n == -1:
                return None, pos
            if not 0 <= n <= _MAX_BULK:
                raise RespProtocolError(f"an array of length {n}")
            items: list[RespValue] = []
            for _ in range(n):
                item, pos = self._parse(pos)
                items.append(item)
            return items, pos
        raise RespProtocolError(f"a reply starting with {bytes(kind)!r}")


def _int(line: bytes) -> int:
    try:
        return int(line)
    except ValueError:
        raise RespProtocolError(f"{line[:20]!r} where a number belongs") from None


@dataclass(frozen=True, slots=True, repr=False)
class RedisAddress:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None

    @property
    def redacted(self) -> str:
        auth = ""
        if self.username or self.password:
            auth = f"{self.username or ''}{':***' if self.password else ''}@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{auth}{host}:{self.port}/{self.db}"

    def __repr__(self) -> str:
        return f"RedisAddress({self.redacted!r})"


_URL_FORM = "redis://[[username]:password@]host[:port][/db]"


def redact_redis_url(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    try:
        return parse_redis_url(url).redacted
    except ConfigurationError:
        return "<a URL that is not redis://...>"


def parse_redis_url(url: str) -> RedisAddress:
    """Parse ``redis://[[username]:password@]host[:port][/db]``.

    Raises:
        ConfigurationError: another form; the message never repeats the password.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"a Redis URL must be a string like {_URL_FORM}")
    parts = urlsplit(url)
    if parts.scheme == "rediss":
        raise ConfigurationError(
            f"rediss:// (TLS) is not supported yet; reach Redis through a TLS tunnel and write"
            f" {_URL_FORM}"
        )
    if parts.scheme != "redis":
        raise ConfigurationError(f"a Redis URL must look like {_URL_FORM}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ConfigurationError(
            f"the Redis URL's port is not a number; write {_URL_FORM}"
        ) from None
    if not parts.hostname:
        raise ConfigurationError(f"the Redis URL has no host; write {_URL_FORM}")
    path = parts.path.strip("/")
    if not (path == "" or path.isdigit()):
        raise ConfigurationError(f"the Redis URL's database must be a number; write {_URL_FORM}")
    if parts.query or parts.fragment:
        raise ConfigurationError(f"the Redis URL takes no ?query or #fragment; write {_URL_FORM}")
    return RedisAddress(
        host=parts.hostname,
        port=port,
        db=int(path or 0),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


_DROPPED = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class _Connection:
    __slots__ = ("parser", "stream")

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.parser = RespParser()

    async def call(self, *args: str | bytes | int | float) -> RespValue:
        await self.stream.send(encode_command(*args))
        while (reply := self.parser.next()) is None:
            self.parser.feed(await self.stream.receive(65536))
        return reply[0]


class RedisClient:
    """A small pool of RESP2 connections to one Redis.

    Args:
        url: ``redis://[[username]:password@]host[:port][/db]``.
        error: the exception type raised when Redis cannot be used (called with a message).
        what: how messages name this client's owner (``"the budget store"``).
        timeout: seconds for one command, connecting included.
        reconnect_interval: after a failure, commands fail at once for this long.
        max_connections: connections open at once.
    """

    def __init__(
        self,
        url: str,
        *,
        error: Callable[[str], Exception],
        what: str = "Redis",
        timeout: float = 1.0,
        reconnect_interval: float = 1.0,
        max_connections: int = 8,
    ) -> None:
        self.address = parse_redis_url(url)
        for name, value in (("timeout", timeout), ("reconnect_interval", reconnect_interval)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigurationError(f"{what}: {name} must be a number > 0, got {value!r}")
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise ConfigurationError(f"{what}: max_connections must be an integer >= 1")
        if max_connections < 1:
            raise ConfigurationError(f"{what}: max_connections must be an integer >= 1")
        self._error = error
        self.what = what
        self.timeout = float(timeout)
        self.reconnect_interval = float(reconnect_interval)
        self.max_connections = max_connections
        self._idle: list[_Connection] = []
        self._slots: anyio.Semaphore | None = None
        self._down_until = -math.inf
        self._down_reason = ""
        self._closed = False

    @property
    def url(self) -> str:
        """The URL, its password replaced by ``***``."""
        return self.address.redacted

    def __repr__(self) -> str:
        return f"RedisClient({self.url!r})"

    @property
    def closed(self) -> bool:
        """Whether `aclose` was called."""
        return self._closed

    async def aclose(self) -> None:
        """Close the connections; later commands fail."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await anyio.aclose_forcefully(conn.stream)

    async def script(self, source: str, sha: str, keys: list[str], args: list[str]) -> RespValue:
        """Run a Lua script (``EVALSHA``, or ``EVAL`` when Redis does not know it yet)."""
        reply = await self.execute("EVALSHA", sha, len(keys), *keys, *args, script_missing=True)
        if isinstance(reply, RespError) and reply.startswith("NOSCRIPT"):
            reply = await self.execute("EVAL", source, len(keys), *keys, *args)
        return reply

    async def execute(
        self, *args: str | bytes | int | float, script_missing: bool = False
    ) -> RespValue:
        """Send one command and return its reply.

        Raises:
            Exception: the ``error`` type: Redis unreachable, too slow, the connection dropped,
                or an error reply (a ``NOSCRIPT`` one is returned instead when
                ``script_missing``).
        """
        if self._closed:
            raise self._error(f"{self.what} at {self.url} is closed")
        now = anyio.current_time()
        if now < self._down_until:
            raise self._error(
                f"Redis at {self.url} is unavailable ({self._down_reason}); trying again in"
                f" {self._down_until - now:.1f}s"
            )
        try:
            with anyio.fail_after(self.timeout):
                reply = await self._pooled(args)
        except TimeoutError:
            self._down(f"no answer within {self.timeout:g}s")
        except (RespProtocolError, _Refused) as exc:
            self._down(str(exc))
        except _DROPPED as exc:
            self._down(_describe(exc))
        self._down_until = -math.inf
        if isinstance(reply, RespError):
            if script_missing and reply.startswith("NOSCRIPT"):
                return reply
            raise self._error(f"Redis at {self.url} answered: {reply}")
        return reply

    def _down(self, reason: str) -> NoReturn:
        self._down_until = anyio.current_time() + self.reconnect_interval
        self._down_reason = reason
        raise self._error(f"Redis at {self.url}: {reason}")

    async def _pooled(self, args: tuple[str | bytes | int | float, ...]) -> RespValue:
        if self._slots is None:
            self._slots = anyio.Semaphore(self.max_connections)
        async with self._slots:
            for attempt in range(2):
                if self._idle:
                    conn, fresh = self._idle.pop(), False
                else:
                    conn, fresh = await self._connect(), True
                try:
                    reply = await conn.call(*args)
                except _DROPPED:
                    await anyio.aclose_forcefully(conn.stream)
                    if fresh or attempt:
                        raise
                    # The server closed an idle connection (a restart, its idle timeout): the
                    # other idle ones are likely gone too. Try once on a fresh one.
                    stale, self._idle = self._idle, []
                    for other in stale:
                        await anyio.aclose_forcefully(other.stream)
                    continue
                except BaseException:
                    # cancelled or failed mid-command: its reply may still come; never reuse
                    await anyio.aclose_forcefully(conn.stream)
                    raise
                if self._closed:
                    await anyio.aclose_forcefully(conn.stream)
                else:
                    self._idle.append(conn)
                return reply
        raise AssertionError("unreachable")  # pragma: no cover

    async def _connect(self) -> _Connection:
        a = self.address
        stream = await anyio.connect_tcp(a.host, a.port)
        conn = _Connection(stream)
        try:
            if a.password is not None:
                auth = ("AUTH", a.username, a.password) if a.username else ("AUTH", a.password)
                reply = await conn.call(*auth)
                if isinstance(reply, RespError):
                    raise _Refused(f"AUTH failed: {reply}")
            if a.db:
                reply = await conn.call("SELECT", a.db)
                if isinstance(reply, RespError):
                    raise _Refused(f"SELECT {a.db} failed: {reply}")
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise
        return conn


def script_sha(source: str) -> str:
    """The SHA1 Redis names a script by."""
    return hashlib.sha1(source.encode()).hexdigest()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, anyio.EndOfStream | anyio.BrokenResourceError):
        return "the connection was closed"
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    return f"cannot connect: {exc}" if str(exc) else f"cannot connect: {type(exc).__name__}"
