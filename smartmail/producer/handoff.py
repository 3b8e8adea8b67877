"""Producers hand committed message ids to one background thread, which pushes them to the outbox."""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Sequence

import structlog
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from smartmail import runtime
from smartmail.outage import Outage
from smartmail.workers import dispatch

log = structlog.get_logger("smartmail.dispatch")

# One warning line per Redis outage in this process, not one per push (a sender may push often).
_redis = Outage("dispatch.handoff", log)


class Handoff:
    """Ids waiting for their push, by stream, and the thread that pushes them (started on first use)."""

    def __init__(self) -> None:
        lock = threading.Lock()
        self._has_work = threading.Condition(lock)
        self._is_idle = threading.Condition(lock)
        self._pending: dict[str, list[str]] = {}
        self._pushing = False
        self._thread: threading.Thread | None = None

    def put(self, message_ids: Sequence[str], stream: str = dispatch.TRANSACTIONAL) -> None:
        if not message_ids:
            return
        with self._has_work:
            self._pending.setdefault(stream, []).extend(message_ids)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="smartmail-dispatch", daemon=True)
                self._thread.start()
            self._has_work.notify()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every id put so far has been pushed (or its push has failed and been logged);
        False if `timeout` seconds passed first."""
        deadline = time.monotonic() + timeout
        with self._is_idle:
            while self._pending or self._pushing:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._is_idle.wait(remaining):
                    return not (self._pending or self._pushing)
        return True

    def _run(self) -> None:
        while True:
            with self._has_work:
                while not self._pending:
                    self._has_work.wait()
                batches, self._pending = self._pending, {}
                self._pushing = True
            try:
                for stream, ids in batches.items():
                    try:
                        hand_off_now(ids, stream)
                    except Exception:  # noqa: BLE001 - the thread must outlive a bug, or ids would pile up
                        log.exception("dispatch.failed", count=len(ids), stream=stream)
            finally:
                with self._is_idle:
                    self._pushing = False
                    if not self._pending:
                        self._is_idle.notify_all()


def hand_off_now(message_ids: Sequence[str], stream: str = dispatch.TRANSACTIONAL) -> None:
    """Push committed ids to the outbox in this thread. A failure is logged, not raised: the rows
    are committed and the reconciler dispatches them; raising would invite the caller to send again."""
    try:
        dispatch.enqueue(message_ids, stream)
    except (RedisError, KombuError, OSError) as exc:
        _redis.failed(exc, stream=stream)
        log.debug("dispatch.failed", error=str(exc), count=len(message_ids), stream=stream)
    else:
        _redis.ok()


def _flush_on_reset(handoff: Handoff, close: bool) -> None:
    # In a forked child there is no pusher thread: the parent pushes what was pending at the fork.
    if close:
        handoff.flush()


@runtime.per_process(close=_flush_on_reset)
def _handoff() -> Handoff:
    return Handoff()


def hand_off(message_ids: Sequence[str], stream: str = dispatch.TRANSACTIONAL) -> None:
    """Have committed, queued ids pushed to the outbox soon, without waiting for it."""
    _handoff().put(message_ids, stream)


def flush(timeout: float = 10.0) -> bool:
    """Wait until the ids this process handed off have been pushed; False on timeout."""
    return _handoff().flush(timeout)


atexit.register(flush)
