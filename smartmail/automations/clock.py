"""The scheduler's clock: the time automations run by, which tests (and rehearsals) can move forward."""

from __future__ import annotations

from datetime import datetime, timedelta

import redis

from smartmail import runtime
from smartmail.config import get_settings
from smartmail.store.engine import utcnow


@runtime.per_process()
def _redis() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url, socket_timeout=5, socket_connect_timeout=3)


def _offset_key() -> str:
    return f"{get_settings().redis_key_prefix}smartmail:scheduler_clock_offset"


def now() -> datetime:
    """The time (naive UTC) waits, due dates and time-of-day steps are measured against: the system
    clock, plus the offset `advance` stored when SMARTMAIL_SCHEDULER_CLOCK is `adjustable` (every
    worker and beat process reads the same offset, so a test moves them all at once)."""
    if get_settings().scheduler_clock != "adjustable":
        return utcnow()
    offset = _redis().get(_offset_key())
    return utcnow() + timedelta(seconds=float(offset or 0))


def advance(seconds: float) -> datetime:
    """Move the adjustable clock forward by `seconds` (refused with the system clock); the new time."""
    if get_settings().scheduler_clock != "adjustable":
        raise RuntimeError("the scheduler's clock is the system clock (SMARTMAIL_SCHEDULER_CLOCK=system)")
    _redis().incrbyfloat(_offset_key(), seconds)
    return now()


def reset() -> None:
    """Back to the system time (the adjustable clock's offset removed)."""
    _redis().delete(_offset_key())
