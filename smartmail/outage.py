"""Outage: one warning line when a component loses a dependency (Redis, the broker), one info line when it is back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# What a lost connection raises: a failure of these is an outage, not a bug, and needs no traceback.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    KombuOperationalError,
    ConnectionError,
    TimeoutError,
)


def is_connection_error(exc: BaseException | None) -> bool:
    """True if `exc` or an exception it was raised from (or while handling) is a lost connection; the
    chain is followed as a traceback shows it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, CONNECTION_ERRORS):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return False


def one_line(error: BaseException | str) -> str:
    """The error as one line: its type (for exceptions) and message, whitespace collapsed."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())


class Outage:
    """A component's view of one dependency. `failed()` on every failure and `ok()` on every success:
    the first failure is logged as `outage.started` (a warning, one line, with the error), repeats are
    counted silently, and the next success logs `outage.recovered` with how long it lasted."""

    def __init__(self, component: str, logger: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.component = component
        self._log = logger if logger is not None else structlog.get_logger("smartmail.outage")
        self._clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None
        self._failures = 0

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, error: BaseException | str, traceback: bool = False, **context: Any) -> bool:
        """Note a failure; True if it started an outage (and was logged). `traceback` adds the
        exception's traceback to that first line's record, for errors that may be bugs."""
        with self._lock:
            self._failures += 1
            if self._since is not None:
                return False
            self._since = self._clock()
        extra = {"exc_info": error} if traceback and isinstance(error, BaseException) else {}
        self._log.warning("outage.started", component=self.component, error=one_line(error), **context, **extra)
        return True

    def ok(self, **context: Any) -> bool:
        """Note a success; True if it ended an outage (and was logged)."""
        if self._since is None:  # the common case, without the lock: this runs on every success
            return False
        with self._lock:
            if self._since is None:
                return False
            seconds, failures = self._clock() - self._since, self._failures
            self._since, self._failures = None, 0
        self._log.info(
            "outage.recovered", component=self.component, seconds=round(seconds, 1), failures=failures, **context
        )
        return True
