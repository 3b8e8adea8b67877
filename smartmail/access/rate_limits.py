"""Per-key request limits: the GCRA of the site limiter, one Redis key per API key, shared by all web processes."""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
import structlog

from smartmail import runtime
from smartmail.access.keys import Principal, revoked_mark
from smartmail.config import get_settings

log = structlog.get_logger("smartmail.access")

# GCRA on Redis' own clock (µs), as the site limiter: the key holds the theoretical arrival time of
# the next request; `burst` requests may go back to back, then one every `interval`. The same
# round trip reads the key's revocation mark, so a revoked key stops at once in every process.
# Returns {allowed, remaining, µs until the bucket is full again, µs until the next request may go, revoked}.
_TAKE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {0, 0, 0, 0, 1} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2]) * interval
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if tat + interval - now > capacity then
  return {0, 0, tat - now, tat + interval - capacity - now, 0}
end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {1, math.floor((capacity - (tat - now)) / interval), tat - now, 0, 0}
"""


@dataclass(frozen=True)
class Decision:
    """One request's verdict and what the IETF RateLimit headers say about the key's quota."""

    allowed: bool
    limit: int  # the quota: requests in a window
    window: float  # seconds
    remaining: int
    reset: float  # seconds until the full quota is back
    retry_after: float  # seconds until the next request may go (0 when allowed)
    revoked: bool = False
    checked: bool = True  # False: Redis did not answer and the request went unlimited

    def headers(self) -> dict[str, str]:
        """`RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers), plus
        `Retry-After` when refused. Integers, rounded up: a client that waits as told succeeds."""
        if not self.checked:
            return {}
        headers = {
            "RateLimit-Policy": f'"default";q={self.limit};w={max(1, math.ceil(self.window))}',
            "RateLimit": f'"default";r={self.remaining};t={math.ceil(self.reset)}',
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers


def quota(principal: Principal) -> tuple[float, int]:
    """(requests/s, burst) for a key: its own, else the settings'. The burst defaults to 2 s worth."""
    settings = get_settings()
    rate = principal.rate_limit or settings.api_rate_limit
    burst = principal.burst or settings.api_rate_burst or max(1, math.ceil(2 * rate))
    return rate, burst


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[redis.asyncio.Redis, Any]] = (
    weakref.WeakKeyDictionary()
)
_last_warning = 0.0


def _forget_clients(_close: bool = True) -> None:
    _clients.clear()


runtime.on_reset(_forget_clients)


def _client() -> tuple[redis.asyncio.Redis, Any]:
    # One client per event loop: an asyncio connection belongs to the loop that opened it.
    loop = asyncio.get_running_loop()
    entry = _clients.get(loop)
    if entry is None:
        client = redis.asyncio.Redis.from_url(get_settings().redis_url, socket_timeout=2, socket_connect_timeout=2)
        entry = (client, client.register_script(_TAKE))
        _clients[loop] = entry
    return entry


def async_redis() -> redis.asyncio.Redis:
    """The web process's asyncio Redis client for the running event loop."""
    return _client()[0]


async def take(principal: Principal) -> Decision:
    """Take one request from the key's bucket. When Redis does not answer, the request goes
    unlimited (an API that stops with its cache would be worse) and a warning says so, at most
    every ten seconds."""
    global _last_warning
    rate, burst = quota(principal)
    interval = max(1, math.ceil(1_000_000 / rate))
    prefix = get_settings().redis_key_prefix
    _, script = _client()
    try:
        allowed, remaining, reset_us, retry_us, revoked = await script(
            keys=[f"{prefix}smartmail:apikey:{principal.key_id}:tat", revoked_mark(principal.key_id)],
            args=[interval, burst],
        )
    except redis.RedisError as exc:
        if time.monotonic() - _last_warning > 10:
            _last_warning = time.monotonic()
            log.warning("api.rate_limit_unchecked", error=str(exc))
        return Decision(True, burst, burst / rate, burst, 0, 0, checked=False)
    return Decision(bool(allowed), burst, burst / rate, int(remaining), reset_us / 1e6, retry_us / 1e6, bool(revoked))
