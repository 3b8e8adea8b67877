"""A worker process's claims: an owner id in claimed rows, a lease in Redis, write-ahead marks of transmissions."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Iterable, Sequence

import redis
import structlog
from redis.exceptions import NoScriptError, RedisError

from smartmail import runtime
from smartmail.config import get_settings

log = structlog.get_logger("smartmail.ownership")

# A message's id is marked before its final dot goes out (the window marks a few ahead, see
# smtp_window), so after a crash the marks say which claimed messages may have reached the relay
# (`unknown`) and which surely did not (queued again). Marking fails once the owner's lease is
# gone, atomically with the check: a worker that was frozen past its lease, whose messages were
# given to others meanwhile, finds out before it transmits them (fencing). ARGV[1] counts the ids
# to forget (their outcomes are recorded), which follow; the ids to mark come after them.
_MARK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local forget = tonumber(ARGV[1])
if forget > 0 then redis.call('SREM', KEYS[2], unpack(ARGV, 2, forget + 1)) end
if #ARGV > forget + 1 then redis.call('SADD', KEYS[2], unpack(ARGV, forget + 2, #ARGV)) end
return 1
"""
# The lease is renewed, never made again: a lapsed owner stays dead, its process takes a new id.
_RENEW = """
if redis.call('PEXPIRE', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""
# The marks set holds a sentinel, so that recovery can tell "nothing marked" from "Redis lost it".
SENTINEL = "-"
_MARKS_TTL_MS = 7 * 86400 * 1000


def lease_key(prefix: str, owner: str) -> str:
    return f"{prefix}smartmail:owner:{owner}"


def marks_key(prefix: str, owner: str) -> str:
    return f"{prefix}smartmail:owner:{owner}:marks"


class Owner:
    """This process's owner id and lease; a daemon thread renews the lease every third of it."""

    def __init__(self, client: redis.Redis, prefix: str, lease_seconds: float) -> None:
        self.id = f"{socket.gethostname()[:32]}:{os.getpid()}:{secrets.token_hex(4)}"
        self.client = client
        self.keys = [lease_key(prefix, self.id), marks_key(prefix, self.id)]
        self.lease_ms = int(lease_seconds * 1000)
        self.lost = threading.Event()
        self._stopped = threading.Event()
        self._recorded: list[str] = []
        self._lock = threading.Lock()
        self._renew = client.register_script(_RENEW)
        # Marks go over a connection of their own, packed by hand: they are on the send path, and
        # redis-py's per-command machinery would cost more than Redis's work.
        self._connection = client.connection_pool.make_connection()
        self._mark_lock = threading.Lock()
        self._mark_sha = b""
        try:
            with client.pipeline() as pipe:
                pipe.set(self.keys[0], "1", px=self.lease_ms)
                pipe.sadd(self.keys[1], SENTINEL)
                pipe.pexpire(self.keys[1], _MARKS_TTL_MS)
                pipe.execute()
        except RedisError as exc:  # no lease: nothing is transmitted, the claimed messages are deferred
            log.warning("ownership.lease_unavailable", owner=self.id, error=str(exc))
            self.lost.set()
            return
        threading.Thread(target=self._keep, name="smartmail-owner-lease", daemon=True).start()

    def mark(self, ids: Sequence[str]) -> bool:
        """Record that `ids` are about to be transmitted; False if this owner's lease is gone (or
        Redis cannot say), and then none of them may be."""
        if self.lost.is_set():
            return False
        with self._lock:
            forget, self._recorded = self._recorded, []
        try:
            marked = self._call_mark([str(len(forget)), *forget, *ids])
        except (RedisError, OSError) as exc:
            log.warning("ownership.mark_failed", owner=self.id, error=str(exc))
            with self._lock:
                self._recorded.extend(forget)
            return False
        if not marked:
            self._lose()
        return bool(marked)

    def _call_mark(self, args: list[str]) -> int:
        with self._mark_lock:
            for _ in range(2):
                if not self._mark_sha:
                    self._mark_sha = self.client.script_load(_MARK).encode()
                words = [
                    b"EVALSHA",
                    self._mark_sha,
                    b"2",
                    *(k.encode() for k in self.keys),
                    *(a.encode() for a in args),
                ]
                packed = b"".join([b"*%d\r\n" % len(words), *(b"$%d\r\n%b\r\n" % (len(w), w) for w in words)])
                try:
                    self._connection.send_packed_command([packed], check_health=False)
                    return self._connection.read_response()
                except NoScriptError:  # Redis restarted and forgot the script: load it again
                    self._mark_sha = b""
                except (RedisError, OSError):
                    self._connection.disconnect()
                    raise
            raise RedisError("the mark script could not be loaded")

    def recorded(self, ids: Iterable[str]) -> None:
        """The outcomes of `ids` are committed: their marks can go (with the next mark call)."""
        with self._lock:
            self._recorded.extend(ids)

    def close(self, close: bool = True) -> None:
        self._stopped.set()
        self._connection.disconnect()
        if close and not self.lost.is_set():
            try:  # a clean exit leaves nothing claimed: no need to wait for the lease to lapse
                self.client.delete(*self.keys)
            except RedisError:
                pass

    def _keep(self) -> None:
        failing = False
        while not self._stopped.wait(self.lease_ms / 3000):
            try:
                renewed = self._renew(keys=self.keys, args=[self.lease_ms, _MARKS_TTL_MS])
            except RedisError as exc:
                if not failing:
                    log.warning("ownership.renew_failed", owner=self.id, error=str(exc))
                failing = True
                continue
            if failing:
                log.info("ownership.renewed", owner=self.id)
                failing = False
            if not renewed:
                self._lose()
                return

    def _lose(self) -> None:
        if not self.lost.is_set():
            self.lost.set()
            log.warning("ownership.lease_lost", owner=self.id)


@runtime.per_process(close=lambda owner, close: owner.close(close))
def _owner() -> Owner:
    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    return Owner(client, settings.redis_key_prefix, settings.owner_lease)


def current() -> Owner:
    """This process's owner; a new one (a new id) once the lease of the last was lost."""
    owner = _owner()
    if owner.lost.is_set():
        _owner.forget()
        owner = _owner()
    return owner


def inspect(client: redis.Redis, prefix: str, owners: Sequence[str]) -> dict[str, set[str] | None]:
    """For each owner whose lease is gone: the ids it marked, or None when Redis lost its marks."""
    with client.pipeline(transaction=False) as pipe:
        for owner in owners:
            pipe.exists(lease_key(prefix, owner))
        alive = pipe.execute()
    dead = [owner for owner, live in zip(owners, alive) if not live]
    with client.pipeline(transaction=False) as pipe:
        for owner in dead:
            pipe.smembers(marks_key(prefix, owner))
        marks = pipe.execute()
    found: dict[str, set[str] | None] = {}
    for owner, members in zip(dead, marks):
        ids = {m.decode() if isinstance(m, bytes) else m for m in members}
        found[owner] = ids - {SENTINEL} if SENTINEL in ids else None
    return found


def forget(client: redis.Redis, prefix: str, owners: Iterable[str]) -> None:
    """Drop the marks of owners whose claims were recovered."""
    keys = [marks_key(prefix, owner) for owner in owners]
    if keys:
        client.delete(*keys)
