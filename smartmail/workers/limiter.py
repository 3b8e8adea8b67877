"""Shared per-site traffic state in Redis: GCRA rate limits, connection leases, slow-downs, suspensions, counters."""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis

from smartmail import runtime
from smartmail.config import Settings, get_settings
from smartmail.workers.policy import Rule, Site

# Lua shared by the scripts below. A site's slow-down is a hash: `base` (msg/s set by the last
# cut), `step` (msg/s regained per quiet period), `after` (µs in a quiet period), `quiet` (µs: the
# last matching reply), `cut` (µs: the last cut) and `till` (µs: when it lifts whatever the rate).
# Recovery is TCP's additive increase: one step per whole quiet period since the last matching
# reply, computed from the clock whenever it is read, so no timer has to run anywhere.
_SLOWDOWN = """
local function clock(override)
  if override ~= '' then return tonumber(override) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function slowdown(key)
  local s = redis.call('HMGET', key, 'base', 'step', 'after', 'quiet', 'cut', 'till')
  if not s[1] then return nil end
  return {base = tonumber(s[1]), step = tonumber(s[2]), after = tonumber(s[3]), quiet = tonumber(s[4]),
          cut = tonumber(s[5]), till = tonumber(s[6])}
end
local function slowdown_rate(s, now, full)
  if not s or now >= s.till then return nil end
  local periods = math.max(0, math.floor((now - s.quiet) / s.after))
  local rate = s.base + periods * s.step
  if full > 0 and rate >= full * (1 - 1e-9) then return nil end
  return rate
end
local function slowdown_end(s, full)
  local done = s.till
  if full > 0 and s.step > 0 then
    local back = s.quiet + math.max(0, math.ceil((full - s.base) / s.step - 1e-9)) * s.after
    if back < done then done = back end
  end
  return done
end
"""

# GCRA (the generic cell rate algorithm, as in redis-cell and KumoMTA's throttles): one key per
# site holds the theoretical arrival time (TAT) of the next message, in microseconds of Redis'
# own clock, so every worker on every machine shares one bucket and one clock. A site allows
# `burst` messages back to back, then one every `interval`; in any window of W seconds at most
# burst + rate * W messages pass. Taking n tokens at once grants as many as are due now, and says
# exactly when the next one will be (retry_after). A suspension or slow-down, when present,
# overrides the configured pace in the same call.
#
# Messages refused now are spread over future slots (the "promise" key) so that, when they come
# back, they do not all race for the same token; the GCRA check at send time stays the authority.
_ACQUIRE = (
    _SLOWDOWN
    + """
local now = clock(ARGV[4])
local n = tonumber(ARGV[1])
local suspended = redis.call('PTTL', KEYS[3])
if suspended > 0 then return {0, suspended * 1000, suspended * 1000, 0} end
local interval = tonumber(ARGV[2])
local slowed = slowdown_rate(slowdown(KEYS[2]), now, tonumber(ARGV[5]))
if slowed then
  local slow = math.ceil(1000000 / slowed)
  if slow > interval then interval = slow end
end
if interval <= 0 then return {n, 0, 0, 0} end
local capacity = tonumber(ARGV[3]) * interval
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local granted = math.floor((capacity - (tat - now)) / interval)
if granted > n then granted = n end
if granted < 0 then granted = 0 end
tat = tat + granted * interval
if granted > 0 then
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.min(math.ceil((tat - now) / 1000) + 1000, 86400000))
end
local retry_after = tat + interval - capacity - now
if retry_after < 0 then retry_after = 0 end
local first = 0
local rest = n - granted
if rest > 0 then
  local promised = tonumber(redis.call('GET', KEYS[4]) or '0')
  local start = now + retry_after
  if promised > start then start = promised end
  local last = start + rest * interval
  local ttl = math.min(math.ceil((last - now) / 1000) + 1000, 86400000)
  redis.call('SET', KEYS[4], string.format('%.0f', last), 'PX', ttl)
  first = start - now
end
return {granted, retry_after, first, interval}
"""
)

# A connection lease: granted while fewer than max unexpired leases exist for the site.
_LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
return 1
"""

# Extend leases still held; return those already lost (expired, so maybe re-granted elsewhere).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lost = {}
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) > now then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
  else
    redis.call('ZREM', KEYS[1], ARGV[i])
    lost[#lost + 1] = ARGV[i]
  end
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return lost
"""

# Arm a suspension (value: the reply) for ttl ms. No rule shortens one already armed: it lasts
# until the longest of the durations that armed it runs out. Returns 1 when this suspended the
# site, 0 when it only kept or extended a suspension.
_SUSPEND = """
local left = redis.call('PTTL', KEYS[1])
local ttl = tonumber(ARGV[2])
if left < 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
  return 1
end
if ttl < left then ttl = left end
redis.call('PEXPIRE', KEYS[1], ttl)
return 0
"""

# A reply matched a slow rule: cut the site's rate (multiplicative decrease from the rate in force
# now, or down to the rule's rate) and restart the quiet period. A factor cuts at most once per
# quiet period, since the replies to messages already in flight at the first cut say nothing new;
# it never takes a site below one message a minute. Returns {1 if the rate was cut, the rate}.
_SLOW = (
    _SLOWDOWN
    + """
local now = clock(ARGV[7])
local full, factor, target, step = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local s = slowdown(KEYS[1])
local slowed = slowdown_rate(s, now, full)
local current = slowed or full
local base = current
if factor > 0 then
  if slowed and now - s.cut < s.after then
    if full * factor < base then base = full * factor end
  else
    base = math.max(current * factor, math.min(1 / 60, current))
  end
elseif current == 0 or target < current then
  base = target
end
local changed = base > 0 and (current == 0 or base < current)
if not changed and not slowed then return {0, ''} end
local new = {base = base, step = step, after = tonumber(ARGV[5]), quiet = now, cut = now,
             till = now + tonumber(ARGV[6])}
if slowed then
  if new.till < s.till then new.till = s.till end
  if not changed then new.step, new.after, new.cut = s.step, s.after, s.cut end
end
redis.call('HSET', KEYS[1], 'base', string.format('%.17g', new.base), 'step', string.format('%.17g', new.step),
  'after', string.format('%.0f', new.after), 'quiet', string.format('%.0f', now),
  'cut', string.format('%.0f', new.cut), 'till', string.format('%.0f', new.till))
redis.call('PEXPIRE', KEYS[1], math.ceil((slowdown_end(new, full) - now) / 1000) + 1000)
return {changed and 1 or 0, string.format('%.17g', base)}
"""
)

# A slow-down as operators see it: {rate now, µs until back at full rate, quiet periods passed,
# µs until the next step (-1: none)}, or {} when the site is not slowed.
_SLOW_STATE = (
    _SLOWDOWN
    + """
local now = clock(ARGV[2])
local full = tonumber(ARGV[1])
local s = slowdown(KEYS[1])
local rate = slowdown_rate(s, now, full)
if not rate then return {} end
local periods = math.max(0, math.floor((now - s.quiet) / s.after))
local next_step = -1
if s.step > 0 then next_step = s.quiet + (periods + 1) * s.after - now end
return {string.format('%.17g', rate), slowdown_end(s, full) - now, periods, next_step}
"""
)

COUNTERS = ("sent", "deferred", "failed", "throttled", "unknown")


@dataclass(frozen=True)
class Grant:
    """Tokens taken now, and when the rest may go: `retry_after` is exact for the next token;
    message i of those refused is best retried at `first_wait + i * spacing` seconds from now."""

    granted: int
    retry_after: float
    first_wait: float
    spacing: float
    suspended: bool = False


@dataclass(frozen=True)
class Armed:
    """What a response rule did: `changed` when it cut the rate or suspended the site (not when it
    only extended a state already in force); `rate` is a slow-down's rate now (messages/s)."""

    changed: bool
    rate: float | None = None

    def __bool__(self) -> bool:
        return self.changed


@dataclass(frozen=True)
class SiteState:
    slowed_rate: float | None  # messages/s now, while a slow-down is in force
    slowed_for: float | None  # seconds until back at the configured rate (or until the slow-down lifts)
    suspended_for: float | None
    suspended_reason: str | None
    connections: int
    counters: dict[str, int]
    recovering: bool = False  # climbing back (at least one quiet period passed), not held at the cut rate
    next_step_in: float | None = None  # seconds until the rate climbs one step


def interval_us(rate: float | None) -> int:
    # Rounded up: a shorter interval than the true one would let a site exceed its rate.
    return 0 if rate is None else max(1, math.ceil(1_000_000 / rate))


class SiteThrottle:
    """The Redis side of traffic shaping; `client` is any redis-py client (unit tests pass fakeredis)."""

    def __init__(self, client: redis.Redis, prefix: str = "", lease_ms: int = 30_000) -> None:
        self.client = client
        self.prefix = f"{prefix}smartmail:site:"
        self.lease_ms = lease_ms
        self._acquire = client.register_script(_ACQUIRE)
        self._lease = client.register_script(_LEASE)
        self._renew = client.register_script(_RENEW)
        self._suspend = client.register_script(_SUSPEND)
        self._slow = client.register_script(_SLOW)
        self._slow_state = client.register_script(_SLOW_STATE)

    def _key(self, site: str, part: str) -> str:
        return f"{self.prefix}{site}:{part}"

    def acquire(self, site: Site, n: int, *, now_us: int | None = None) -> Grant:
        """Take up to n send tokens for the site in one round trip (now_us: a clock for tests)."""
        keys = [self._key(site.name, k) for k in ("tat", "slowdown", "suspend", "promise")]
        args = [n, interval_us(site.rate), site.burst, "" if now_us is None else now_us, site.rate or 0]
        granted, retry_after, first, interval = self._acquire(keys=keys, args=args)
        suspended = granted == 0 and interval == 0 and retry_after > 0
        return Grant(int(granted), retry_after / 1e6, first / 1e6, interval / 1e6, suspended)

    # Connection leases (a semaphore per site whose permits expire with a worker that died).
    def lease_connection(self, site: Site, lease: str) -> bool:
        return bool(
            self._lease(keys=[self._key(site.name, "connections")], args=[site.max_connections, lease, self.lease_ms])
        )

    def renew_connections(self, site_name: str, leases: list[str]) -> list[str]:
        """Extend the given leases; return those lost (their connections must close)."""
        lost = self._renew(keys=[self._key(site_name, "connections")], args=[self.lease_ms, *leases])
        return [x.decode() if isinstance(x, bytes) else x for x in lost]

    def release_connection(self, site_name: str, lease: str) -> None:
        self.client.zrem(self._key(site_name, "connections"), lease)

    def want_connection(self, site_name: str) -> None:
        """Say, for two seconds, that a worker found the site at its connection limit."""
        self.client.set(self._key(site_name, "wanted"), 1, px=2000)

    def wanted(self, site_names: list[str]) -> set[str]:
        """Those of the sites some worker is waiting to connect to."""
        values = self.client.mget([self._key(name, "wanted") for name in site_names])
        return {name for name, value in zip(site_names, values) if value}

    # Response rules.
    def apply_rule(self, site: Site, rule: Rule, reply_text: str, *, now_us: int | None = None) -> Armed:
        """Arm the rule's slow-down or suspension for every worker (now_us: a clock for tests)."""
        if rule.action == "slow":
            if site.slowed_rate(rule) is None:
                return Armed(False)
            # An unlimited site has no configured rate to regain: it climbs by steps of the rule's rate.
            step = rule.recover_step * (site.rate if site.rate is not None else rule.rate or 0)
            args = [
                site.rate or 0,
                rule.factor or 0,
                rule.rate or 0,
                step,
                round(rule.recover_after * 1_000_000),
                round(rule.duration * 1_000_000),
                "" if now_us is None else now_us,
            ]
            changed, rate = self._slow(keys=[self._key(site.name, "slowdown")], args=args)
            return Armed(bool(changed), float(rate) if rate else None)
        if rule.action == "suspend":
            ttl = max(1, int(rule.duration * 1000))
            return Armed(bool(self._suspend(keys=[self._key(site.name, "suspend")], args=[reply_text[:500], ttl])))
        return Armed(False)

    def count(self, counts: dict[str, dict[str, int]]) -> None:
        """Add outcome counts per site (site → counter → n) in one pipeline."""
        if not counts:
            return
        with self.client.pipeline(transaction=False) as pipe:
            for site_name, by_state in counts.items():
                for counter, n in by_state.items():
                    pipe.hincrby(self._key(site_name, "counters"), counter, n)
            pipe.execute()

    def state(self, site_name: str, rate: float | None = None, *, now_us: int | None = None) -> SiteState:
        """The site's shared state; `rate` is its configured rate, to tell when a slow-down ends."""
        with self.client.pipeline(transaction=False) as pipe:
            self._slow_state(
                keys=[self._key(site_name, "slowdown")], args=[rate or 0, "" if now_us is None else now_us], client=pipe
            )
            pipe.get(self._key(site_name, "suspend"))
            pipe.pttl(self._key(site_name, "suspend"))
            pipe.time()
            pipe.zrange(self._key(site_name, "connections"), 0, -1, withscores=True)
            pipe.hgetall(self._key(site_name, "counters"))
            slow, suspend, suspend_ttl, (seconds, micros), leases, counters = pipe.execute()
        now_ms = seconds * 1000 + micros // 1000
        slowed_rate, slowed_us, periods, next_step_us = slow if slow else (None, None, 0, -1)
        return SiteState(
            slowed_rate=float(slowed_rate) if slowed_rate is not None else None,
            slowed_for=slowed_us / 1e6 if slowed_us is not None else None,
            suspended_for=suspend_ttl / 1000 if suspend else None,
            suspended_reason=suspend.decode("utf-8", "replace") if suspend else None,
            connections=sum(1 for _, score in leases if score > now_ms),
            counters={k.decode(): int(v) for k, v in counters.items()},
            recovering=periods > 0,
            next_step_in=next_step_us / 1e6 if next_step_us >= 0 else None,
        )

    def known_sites(self) -> set[str]:
        """Sites with any state in Redis (for the status view of domains no policy site names)."""
        names = set()
        for key in self.client.scan_iter(match=f"{self.prefix}*", count=1000):
            key = key.decode() if isinstance(key, bytes) else key
            names.add(key[len(self.prefix) :].rsplit(":", 1)[0])
        return names


def make_throttle(settings: Settings) -> SiteThrottle:
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
    return SiteThrottle(client, settings.redis_key_prefix)


@runtime.per_process()
def get_throttle() -> SiteThrottle:
    return make_throttle(get_settings())
