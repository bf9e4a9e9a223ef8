"""A quota shared by processes and hosts: token buckets kept in Redis.

`RedisQuota` holds the buckets of `RateLimiter` in Redis, so
that every process using one provider key draws from one quota. One Lua script refills and takes
(or gives back, or learns) in a single atomic step, on Redis's own clock (``TIME``), so hosts
whose clocks disagree still agree on the quota; the script answers how long the caller must
wait, and the caller waits on anyio's clock.

It speaks RESP2 through genfan's anyio client (`genfan._redis`: ``EVALSHA``/``EVAL``,
``AUTH``, ``SELECT``, ``PING``, ``DEL``), so it runs on asyncio and trio alike; redis-py's
asyncio client would not run on trio. Every command has a timeout, a dropped connection is
replaced, and a Redis that cannot be reached fails fast (`SharedQuotaError`) for
``reconnect_interval`` seconds before it is tried again. Error messages and reprs never show
the URL's password.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .._errors import ConfigurationError, GenfanError
from .._redis import (
    RedisClient,
    RespValue,
    parse_redis_url,
    redact_redis_url,
    script_sha,
)

__all__ = ["RedisQuota", "SharedQuotaError", "parse_redis_url", "redact_redis_url"]


class SharedQuotaError(GenfanError):
    """The shared quota store could not be used: Redis refused the connection, did not answer
    in time, dropped the connection, or answered with an error. The message names the store
    without its password."""


# -- the quota script --------------------------------------------------------------------------

#: Token buckets that may go into debt (reservations are served in order). Numbers travel as
#: strings: Redis would truncate a Lua number in a reply to an integer.
_SCRIPT = """
-- KEYS: requests bucket, tokens bucket (hashes: level, updated), block (the time it ends)
-- ARGV[1] "acquire" | "update";  ARGV[2] now in seconds ("" = Redis TIME, shared by all hosts)
-- ARGV[3..6] requests: capacity ("" = no bucket), per second, amount, remaining ("" = unknown)
-- ARGV[7..10] tokens: the same
-- acquire: take amount unless the wait passes ARGV[11] ("" = any wait); ARGV[12] a least wait
-- update: add amount (give back; negative takes more), lower to remaining, block ARGV[11] s
-- returns {admitted 1|0, wait, blocked for, requests level, tokens level}
if redis.replicate_commands then redis.replicate_commands() end
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.17g', x) end

local buckets = {}
for i = 1, 2 do
  local a = 4 * (i - 1)
  local cap = tonumber(ARGV[3 + a])
  if cap then
    local b = {key = KEYS[i], cap = cap, rate = tonumber(ARGV[4 + a]),
               amount = tonumber(ARGV[5 + a]), remaining = tonumber(ARGV[6 + a])}
    local v = redis.call('HMGET', b.key, 'level', 'updated')
    local level, updated = tonumber(v[1]), tonumber(v[2])
    if level and updated then
      b.level = math.min(cap, level + math.max(0, now - updated) * b.rate)
    else
      b.level = cap  -- a missing bucket is a full one (idle buckets expire when full)
    end
    buckets[i] = b
  end
end

local blocked = 0
local ends = tonumber(redis.call('GET', KEYS[3]))
if ends and ends > now then blocked = ends - now end

local function save(b)
  if b.level >= b.cap then
    redis.call('DEL', b.key)
  else
    redis.call('HSET', b.key, 'level', fmt(b.level), 'updated', fmt(now))
    local full_in = math.ceil((b.cap - b.level) / b.rate * 1000) + 1000
    redis.call('PEXPIRE', b.key, string.format('%d', full_in))
  end
end

local function reply(admitted, wait)
  local levels = {}
  for i = 1, 2 do levels[i] = buckets[i] and fmt(buckets[i].level) or '' end
  return {admitted, fmt(wait), fmt(blocked), levels[1], levels[2]}
end

if ARGV[1] == 'acquire' then
  local wait = math.max(blocked, tonumber(ARGV[12]) or 0)
  for i = 1, 2 do
    local b = buckets[i]
    if b then
      b.amount = math.min(b.amount, b.cap)  -- more than the bucket waits for a full one
      local missing = b.amount - b.level
      if missing > 0 then wait = math.max(wait, missing / b.rate) end
    end
  end
  local limit = tonumber(ARGV[11])
  if wait > 0 and limit and wait > limit then return reply(0, wait) end
  for i = 1, 2 do
    local b = buckets[i]
    if b then
      b.level = b.level - b.amount
      save(b)
    end
  end
  return reply(1, wait)
end

for i = 1, 2 do
  local b = buckets[i]
  if b then
    b.level = math.min(b.cap, b.level + b.amount)
    if b.remaining then b.level = math.min(b.level, b.remaining) end
    save(b)
  end
end
local block = tonumber(ARGV[11]) or 0
if block > blocked then
  redis.call('SET', KEYS[3], fmt(now + block), 'PX', string.format('%d', math.ceil(block * 1000)))
  blocked = block
end
return reply(1, 0)
"""
_SHA = script_sha(_SCRIPT)


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """One bucket as a limiter sees it, and the amount of one operation on it.

    Attributes:
        capacity: the most it holds (the burst).
        per_second: the refill rate.
        amount: ``acquire``: what to take; ``update``: what to add (negative: take).
        remaining: ``update``: the level the provider reported (``None``: unknown).
    """

    capacity: float
    per_second: float
    amount: float
    remaining: float | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """The script's answer.

    Attributes:
        admitted: the amounts were taken (``acquire``; always true for ``update``).
        wait: seconds until the reservation is due (when admitted) or until quota is back.
        blocked: seconds left of a stop the provider asked for (0: none).
        requests, tokens: the buckets' levels afterwards (``None``: no such bucket).
    """

    admitted: bool
    wait: float
    blocked: float
    requests: float | None
    tokens: float | None


def _num(value: float | None) -> str:
    return "" if value is None or value == math.inf else repr(float(value))


def _spec_args(spec: BucketSpec | None) -> list[str]:
    if spec is None:
        return ["", "", "", ""]
    return [_num(spec.capacity), _num(spec.per_second), _num(spec.amount), _num(spec.remaining)]


def _level(value: RespValue) -> float | None:
    return float(value) if isinstance(value, bytes) and value else None


class RedisQuota:
    """Rate-limit buckets kept in Redis, shared by every process (and host) that uses them.

    The one way to share a quota: make one store, and give it to every guard stack that shares
    it, ``guard(backend, rate_limit=policy, rate_limit_store=store)`` (in TOML: a
    ``[rate_limit_stores.NAME]`` table, named by ``rate_limit_store = "NAME"`` in the guards).
    The store holds the connection; the policies hold only the limits. Buckets are keyed by
    the backend's name and the quota's kind
    (``{key_prefix}{{name}}:requests``, ``...:tokens``, ``...:block``; the braces keep one
    backend's keys in one Redis Cluster slot) and expire once they would have refilled, so idle
    quotas vanish.

    One instance serves one event loop; it opens connections on first use (at most
    ``max_connections``) and `aclose` (or ``async with``) closes them: whoever makes the
    store closes it. `from_env` reads the URL from an environment variable, which keeps
    a password out of code and config files.

    Args:
        url: ``redis://[[username]:password@]host[:port][/db]`` (TLS is not supported yet).
        key_prefix: prepended to every key (separate applications or environments with it).
        timeout: seconds for one command, connecting included; past it the command fails.
        reconnect_interval: after a failure, commands fail at once for this many seconds
            before Redis is tried again (a Redis that is down costs no time per call).
        max_connections: connections open at once (further commands wait for one).

    Raises:
        ConfigurationError: a bad URL or value.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        key_prefix: str = "genfan:quota:",
        timeout: float = 1.0,
        reconnect_interval: float = 1.0,
        max_connections: int = 8,
    ) -> None:
        if not isinstance(key_prefix, str):
            raise ConfigurationError(f"RedisQuota.key_prefix must be a string, got {key_prefix!r}")
        for name, value in (("timeout", timeout), ("reconnect_interval", reconnect_interval)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigurationError(f"RedisQuota.{name} must be a number > 0, got {value!r}")
            if not math.isfinite(value):
                raise ConfigurationError(f"RedisQuota.{name} must be finite, got {value!r}")
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise ConfigurationError(
                f"RedisQuota.max_connections must be an integer >= 1, got {max_connections!r}"
            )
        if max_connections < 1:
            raise ConfigurationError(
                f"RedisQuota.max_connections must be an integer >= 1, got {max_connections!r}"
            )
        self._client = RedisClient(
            url,
            error=SharedQuotaError,
            what="the shared quota store",
            timeout=timeout,
            reconnect_interval=reconnect_interval,
            max_connections=max_connections,
        )
        self.key_prefix = key_prefix
        self._holders = 0

    @classmethod
    def from_env(
        cls,
        var: str = "GENFAN_REDIS_URL",
        *,
        key_prefix: str = "genfan:quota:",
        timeout: float = 1.0,
        reconnect_interval: float = 1.0,
        max_connections: int = 8,
    ) -> RedisQuota:
        """A store whose URL is the value of the environment variable ``var``.

        Raises:
            ConfigurationError: ``var`` is not set, or its URL is bad (the message names the
                variable, never the password).
        """
        if not isinstance(var, str) or not var:
            raise ConfigurationError(
                f"RedisQuota.from_env needs an environment variable's name, got {var!r}"
            )
        url = os.environ.get(var)
        if not url:
            raise ConfigurationError(
                f"the environment variable {var} is not set; set it to a redis:// URL"
            )
        try:
            parse_redis_url(url)
        except ConfigurationError as exc:
            raise ConfigurationError(f"the URL in ${var}: {exc}") from None
        return cls(
            url,
            key_prefix=key_prefix,
            timeout=timeout,
            reconnect_interval=reconnect_interval,
            max_connections=max_connections,
        )

    @property
    def url(self) -> str:
        """The URL, its password replaced by ``***``."""
        return self._client.url

    @property
    def timeout(self) -> float:
        """Seconds for one command, connecting included."""
        return self._client.timeout

    @property
    def reconnect_interval(self) -> float:
        """After a failure, commands fail at once for this many seconds."""
        return self._client.reconnect_interval

    @property
    def max_connections(self) -> int:
        """Connections open at once."""
        return self._client.max_connections

    def __repr__(self) -> str:
        return f"RedisQuota({self.url!r}, key_prefix={self.key_prefix!r})"

    def keys(self, name: str) -> tuple[str, str, str]:
        """The keys of backend ``name``: its requests bucket, tokens bucket and block."""
        base = f"{self.key_prefix}{{{name}}}"
        return f"{base}:requests", f"{base}:tokens", f"{base}:block"

    async def __aenter__(self) -> RedisQuota:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections; later commands fail with `SharedQuotaError`."""
        await self._client.aclose()

    @property
    def _closed(self) -> bool:
        return self._client.closed

    def _hold(self) -> None:
        """One more guard stack holds this store (a store built from the TOML config)."""
        self._holders += 1

    async def _release(self) -> None:
        """A holder is done with the store; the last one closes it."""
        self._holders -= 1
        if self._holders <= 0:
            await self.aclose()

    async def ping(self) -> None:
        """Check that Redis answers (raises `SharedQuotaError` if not)."""
        await self._execute("PING")

    async def reset(self, name: str) -> None:
        """Forget backend ``name``'s shared quota (its buckets start full again)."""
        await self._execute("DEL", *self.keys(name))

    async def _acquire(
        self,
        name: str,
        *,
        requests: BucketSpec | None,
        tokens: BucketSpec | None,
        limit: float | None,
        min_wait: float = 0.0,
        now: float | None = None,
    ) -> Grant:
        """Reserve ``amount`` of each bucket of backend ``name``, unless the wait would pass
        ``limit`` seconds (``None``: any wait). ``min_wait`` adds the caller's own stop; ``now``
        replaces Redis's clock (for tests)."""
        return await self._run(
            "acquire", name, requests, tokens, _num(limit), _num(min_wait), now=now
        )

    async def _update(
        self,
        name: str,
        *,
        requests: BucketSpec | None,
        tokens: BucketSpec | None,
        block: float = 0.0,
        now: float | None = None,
    ) -> Grant:
        """Give back (or take) ``amount``, lower to ``remaining``, and stop every call to backend
        ``name`` for ``block`` seconds (the longer stop wins)."""
        return await self._run("update", name, requests, tokens, _num(block), "", now=now)

    async def _run(
        self,
        op: str,
        name: str,
        requests: BucketSpec | None,
        tokens: BucketSpec | None,
        arg11: str,
        arg12: str,
        *,
        now: float | None,
    ) -> Grant:
        argv = [op, _num(now), *_spec_args(requests), *_spec_args(tokens), arg11, arg12]
        keys = self.keys(name)
        reply = await self._client.script(_SCRIPT, _SHA, list(keys), argv)
        if not (isinstance(reply, list) and len(reply) == 5 and isinstance(reply[1], bytes)):
            raise SharedQuotaError(f"Redis at {self.url}: unexpected script reply {reply!r:.80}")
        try:
            return Grant(
                admitted=reply[0] == 1,
                wait=max(0.0, float(reply[1])),
                blocked=max(0.0, float(reply[2])) if isinstance(reply[2], bytes) else 0.0,
                requests=_level(reply[3]),
                tokens=_level(reply[4]),
            )
        except ValueError:
            raise SharedQuotaError(
                f"Redis at {self.url}: unexpected script reply {reply!r:.80}"
            ) from None

    async def _execute(self, *args: str | bytes | int | float) -> RespValue:
        """Send one command and return its reply.

        Raises:
            SharedQuotaError: Redis unreachable, too slow, the connection dropped, or an error
                reply.
        """
        return await self._client.execute(*args)
