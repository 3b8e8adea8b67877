"""Helpers for every test folder: the run's Redis key prefix, polling, and resetting per-process state.

Fixtures live with the tests that use them: tests/unit/conftest.py (fakes only) and
tests/integration/conftest.py (real Redis, databases, an SMTP server, worker and beat processes).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
TEST_SECRET = "test-secret-key-0123456789"
RUN_PREFIX = f"smartmail-test-{uuid.uuid4().hex[:8]}:"


def clear_redis(url: str) -> None:
    """This run's keys, but the leases of worker processes that live on (shared by a module's tests)."""
    client = redis.Redis.from_url(url)
    keys = [key for key in client.scan_iter(match=f"{RUN_PREFIX}*", count=1000) if b"smartmail:owner:" not in key]
    if keys:
        client.delete(*keys)


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05, message="condition"):
    """Poll `predicate` until it is truthy; `message` may be a callable that describes the state on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {message() if callable(message) else message}"
            )
        time.sleep(interval)


# --- Settings for a test -----------------------------------------------------------------------


def reset_caches() -> None:
    """Drop every per-process value (settings, engines, clients, caches), pushing handed-off ids first."""
    from smartmail import runtime

    runtime.reset()
