"""The one seam to enqueue work: message ids to the Redis outboxes that drain tasks deliver from, and tasks by name."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import redis

from smartmail import runtime
from smartmail.config import get_settings
from smartmail.workers.app import app

# One Celery task per email costs more CPU than its delivery, so ids wait in a Redis list that a few
# drain tasks pop in batches (docs/architecture.md). Redis is not the source of truth: ids it
# loses leave rows `queued`, which the reconciler enqueues again.

# A drain renews its lease at every batch; one not heard from for this long is presumed dead and
# replaced. A slow batch that outlives it only means one drain more than the cap for a while.
LEASE_MS = 15_000

# Ids whose wait has ended move from the delayed set to the outbox list (at most 5,000 per call).
_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 5000)
if #due > 0 then
  redis.call('ZREM', KEYS[4], unpack(due))
  redis.call('RPUSH', KEYS[1], unpack(due))
end
"""

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Ids a drain popped wait in its in-flight list (KEYS[1]:inflight:<token>) until its next pop,
# when they are claimed; the list of a drain not heard from for a lease (its worker died between
# pop and claim) goes back to the outbox here. A claimed id pushed again is harmless: its row is
# no longer claimable. (Keys built in the script: one Redis, not a cluster.)
_RETURN_LOST = """
local lost = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now, 'LIMIT', 0, 100)
for _, token in ipairs(lost) do
  local list = KEYS[1] .. ':inflight:' .. token
  local ids = redis.call('LRANGE', list, 0, -1)
  for i = 1, #ids, 4000 do
    redis.call('RPUSH', KEYS[1], unpack(ids, i, math.min(i + 3999, #ids)))
  end
  redis.call('DEL', list)
  redis.call('ZREM', KEYS[6], token)
end
"""

# Start drains for the backlog, up to the cap, and one for waiting ids when no drain is active
# or timing them; return the new lease ids, which the caller publishes.
_START_DRAINS = (
    _RETURN_LOST
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local backlog = redis.call('LLEN', KEYS[1])
local active = redis.call('ZCARD', KEYS[2])
local wanted = math.min(tonumber(ARGV[1]), math.ceil(backlog / tonumber(ARGV[3]))) - active
if wanted < 1 and active == 0 and redis.call('ZCARD', KEYS[4]) > 0 and redis.call('EXISTS', KEYS[5]) == 0 then
  wanted = 1
end
local leases = {}
for i = 1, wanted do
  local lease = tostring(redis.call('INCR', KEYS[3]))
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), lease)
  leases[i] = lease
end
return leases
"""
)

# Push ids (ARGV[4..]) to the outbox.
_ENQUEUE = (
    _NOW
    + """
for i = 4, #ARGV, 4000 do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 3999, #ARGV)))
end
"""
    + _MOVE_DUE
    + _START_DRAINS
)

# Add ids to the delayed set (ARGV[4..]: score, id, score, id, ...). Starting a drain here, not
# only in _POP, matters: the drain that deferred them may have let its follow-up finish already.
# An id due before the timer drain wakes (its key lives wait + lease ms) ends that timer: else
# it would wait up to MAX_TIMER_MS for no reason; a drain started here, or an active one, times it anew.
_ENQUEUE_LATER = (
    _NOW
    + """
local earliest = nil
for i = 4, #ARGV, 2 do
  local due = tonumber(ARGV[i])
  if earliest == nil or due < earliest then earliest = due end
end
for i = 4, #ARGV, 4000 do
  redis.call('ZADD', KEYS[4], unpack(ARGV, i, math.min(i + 3999, #ARGV)))
end
local ttl = redis.call('PTTL', KEYS[5])
if earliest and ttl > 0 and earliest < now + ttl - tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[5])
end
"""
    + _MOVE_DUE
    + _START_DRAINS
)

# Pop a batch for a drain and renew its lease. With nothing to pop, end the lease in the same
# step (so an enqueue either sees this drain still active, or starts a new one); and if ids are
# waiting and no drain is timing them, this drain becomes the timer: it returns {'wait', ms}
# and comes back (a Celery countdown) when the first of them is due.
_POP = (
    _NOW
    + _MOVE_DUE
    + """
local inflight = KEYS[1] .. ':inflight:' .. ARGV[5]
redis.call('DEL', inflight)
local ids = redis.call('LPOP', KEYS[1], tonumber(ARGV[3]))
if ids then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('RPUSH', inflight, unpack(ids))
  redis.call('ZADD', KEYS[6], now + tonumber(ARGV[2]), ARGV[5])
  return ids
end
redis.call('ZREM', KEYS[6], ARGV[5])
redis.call('ZREM', KEYS[2], ARGV[1])
local timer = redis.call('GET', KEYS[5])
if timer == ARGV[1] then redis.call('DEL', KEYS[5]); timer = false end
local first = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
if #first > 0 and not timer then
  local wait = math.min(math.max(tonumber(first[2]) - now, 0), tonumber(ARGV[4]))
  redis.call('SET', KEYS[5], ARGV[1], 'PX', wait + tonumber(ARGV[2]))
  return {'wait', tostring(wait)}
end
return {}
"""
)

# A drain that ends (its ids claimed) drops its in-flight list.
_FINISH = """
redis.call('DEL', KEYS[1] .. ':inflight:' .. ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
"""

# Streams of messages, each with its own outbox and drain task on its own queue, so a campaign's
# backlog never delays a password reset.
TRANSACTIONAL, BULK = "transactional", "bulk"

# The longest a timer drain sleeps before looking again (a Celery countdown, far below the
# broker's visibility timeout); the beat job also restarts timing if the timer drain died.
MAX_TIMER_MS = 30_000


class Outbox:
    """The Redis side of dispatch; `client` is any redis-py client (tests pass fakeredis)."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "",
        max_drains: int = 4,
        batch_size: int = 100,
        stream: str = TRANSACTIONAL,
    ) -> None:
        self.client = client
        self.stream = stream
        base = f"{prefix}smartmail:outbox" + ("" if stream == TRANSACTIONAL else f":{stream}")
        self.keys = [base, f"{base}:drains", f"{base}:lease", f"{base}:delayed", f"{base}:timer", f"{base}:inflight"]
        self.max_drains = max_drains
        self.batch_size = batch_size
        self._enqueue = client.register_script(_ENQUEUE)
        self._enqueue_later = client.register_script(_ENQUEUE_LATER)
        self._pop = client.register_script(_POP)
        self._finish = client.register_script(_FINISH)

    def push(self, ids: Sequence[str]) -> list[str]:
        """Add ids; return the leases of drains the caller must publish (often none). With no ids,
        only starts drains for a backlog whose drains died (beat calls it so)."""
        leases = self._enqueue(keys=self.keys, args=[self.max_drains, LEASE_MS, self.batch_size, *ids])
        return [lease.decode() if isinstance(lease, bytes) else str(lease) for lease in leases]

    def push_later(self, due: Sequence[tuple[str, float]]) -> list[str]:
        """Hold ids until their time (epoch seconds), then hand them to drains: for waits too short
        for beat's schedule (throttled messages, quick retries). Returns leases to publish, as push."""
        if not due:
            return []
        # Rounded up: an id moved a fraction of a millisecond before its row is due would not be
        # claimed, and would wait for beat's next round.
        args = [x for message_id, at in due for x in (math.ceil(at * 1000), message_id)]
        leases = self._enqueue_later(keys=self.keys, args=[self.max_drains, LEASE_MS, self.batch_size, *args])
        return [lease.decode() if isinstance(lease, bytes) else str(lease) for lease in leases]

    def pop(self, lease: str, token: str | None = None) -> list[str] | float:
        """The next batch for the drain holding `lease`; empty means the drain is done; a number
        means: come back in that many seconds, ids are waiting. `token` names the drain's in-flight
        list (the task's id): the batch popped before this one was claimed, this one is not yet."""
        args: list[str | int] = [lease, LEASE_MS, self.batch_size, MAX_TIMER_MS, token or lease]
        ids = self._pop(keys=self.keys, args=args)
        ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
        if ids and ids[0] == "wait":
            return int(ids[1]) / 1000
        return ids

    def finish(self, token: str) -> None:
        """The drain named `token` claimed everything it popped."""
        self._finish(keys=self.keys, args=[token])

    def backlog(self) -> int:
        return self.client.llen(self.keys[0])

    def waiting(self) -> int:
        return self.client.zcard(self.keys[3])

    def active_drains(self) -> int:
        """Drains whose lease has not expired (expired ones are only pruned by the scripts)."""
        seconds, micros = self.client.time()
        return self.client.zcount(self.keys[1], seconds * 1000 + micros // 1000, "+inf")


@runtime.per_process()
def get_outbox(stream: str = TRANSACTIONAL) -> Outbox:
    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
    batch_size = settings.batch_size if stream == TRANSACTIONAL else settings.bulk_batch_size
    return Outbox(client, settings.redis_key_prefix, settings.dispatch_drains, batch_size, stream)


# The drain task of each stream, by name (tasks/send.py registers them).
DRAIN_TASKS = {TRANSACTIONAL: "smartmail.drain", BULK: "smartmail.drain_bulk"}


def enqueue(message_ids: Sequence[str], stream: str = TRANSACTIONAL) -> None:
    """Hand committed, queued message ids to the workers (call after the database commit); with no
    ids, restart drains for ids left in the outbox by drains that died."""
    leases = get_outbox(stream).push(message_ids)
    if leases:
        _start_drains(leases, stream)


def enqueue_later(due: Sequence[tuple[str, float]], stream: str = TRANSACTIONAL) -> None:
    """Hand committed, deferred message ids to the workers when due (epoch seconds)."""
    leases = get_outbox(stream).push_later(due)
    if leases:
        _start_drains(leases, stream)


def publish(task_name: str, *args: Any, countdown: float | None = None, expires: float | None = None) -> None:
    """Ask the workers to run a task, by its registered name: the one way code below `tasks/`
    starts work, so that no feature imports a task module. Routing comes from the Celery config;
    a task not started within `expires` seconds is dropped."""
    app.send_task(task_name, args=args, countdown=countdown, expires=expires)


def _start_drains(leases: Sequence[str], stream: str) -> None:
    name = DRAIN_TASKS[stream]
    with app.producer_or_acquire() as producer:
        batch = getattr(producer, "batch", None)  # kombu >= 5.7 pipelines a batch of publishes
        if batch is None or len(leases) == 1:
            for lease in leases:
                app.send_task(name, args=(lease,), producer=producer)
            return
        with batch():
            for lease in leases:
                app.send_task(name, args=(lease,), producer=producer)
