"""Per-process state (settings, engines, clients, caches, the shaper, the transport) in one registry with reset()."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_lock = threading.RLock()
_values: dict[tuple, Any] = {}
_closers: dict[tuple, Callable[[Any, bool], None]] = {}
_hooks: list[Callable[[bool], None]] = []


class PerProcess(Generic[T]):
    """A getter whose value (per arguments) is made on first use and lives until reset()."""

    def __init__(self, make: Callable[..., T], close: Callable[[T, bool], None] | None) -> None:
        self._make, self._close = make, close
        self._name = f"{make.__module__}.{make.__qualname__}"
        functools.update_wrapper(self, make)

    def __call__(self, *args: Any) -> T:
        key = (self._name, *args)
        try:
            return _values[key]
        except KeyError:
            pass
        with _lock:  # reentrant: a getter may call others while it makes its value
            if key not in _values:
                _values[key] = self._make(*args)
                if self._close is not None:
                    _closers[key] = self._close
            return _values[key]

    def forget(self, *args: Any, close: bool = True) -> None:
        """Drop the value for `args`, releasing it first."""
        key = (self._name, *args)
        with _lock:
            value, closer = _values.pop(key, None), _closers.pop(key, None)
        if closer is not None:
            closer(value, close)

    def replace(self, value: T, *args: Any) -> None:
        """Put `value` in place of the value for `args`, releasing the old one."""
        key = (self._name, *args)
        with _lock:
            old, closer = _values.get(key), _closers.get(key)
            _values[key] = value
            if self._close is not None:
                _closers[key] = self._close
        if closer is not None and old is not None and old is not value:
            closer(old, True)


def per_process(close: Callable[[Any, bool], None] | None = None) -> Callable[[Callable[..., T]], PerProcess[T]]:
    """Decorate a getter whose result lives until reset(); `close(value, close)` releases it then,
    with close=False in a forked child, whose sockets are the parent's."""

    def decorate(make: Callable[..., T]) -> PerProcess[T]:
        return PerProcess(make, close)

    return decorate


def on_reset(hook: Callable[[bool], None]) -> Callable[[bool], None]:
    """Register `hook(close)` for state a module keeps itself (a dict cache, a compiled-template cache)."""
    _hooks.append(hook)
    return hook


def reset(*, close: bool = True) -> None:
    """Release and drop every per-process value, newest first, then run the hooks: after a fork
    (close=False) and between tests. Closers run outside the lock and before anything is dropped:
    a closer may use other values (the hand-off's thread pushes its pending ids through the outbox)."""
    with _lock:
        held = [(_values[key], _closers[key]) for key in reversed(list(_values)) if key in _closers]
    for value, closer in held:
        closer(value, close)
    with _lock:
        _values.clear()
        _closers.clear()
    for hook in _hooks:
        hook(close)


def _after_fork_in_child() -> None:
    # The lock may have been held by a thread that does not exist in the child.
    global _lock
    _lock = threading.RLock()
    reset(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)
