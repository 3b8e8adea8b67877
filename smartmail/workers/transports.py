"""Transports: the Transport protocol, file, console and in-memory sinks, and the one settings pick."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from smartmail import runtime
from smartmail.config import get_settings
from smartmail.config.settings import Settings
from smartmail.workers.outcomes import Reply

# Outgoing, HELD and the SMTP transport's names are re-exported: delivery and the tests import them from here.
from smartmail.workers.outgoing import HELD, HELD_REPLY, NOT_SENT, NOT_SENT_REPLY, Outgoing  # noqa: F401
from smartmail.workers.policy import Site
from smartmail.workers.smtp_transport import AT_CONNECTION_LIMIT, ConnectionGate, SmtpTransport, _dot_stuffed  # noqa: F401
from smartmail.workers.smtp_window import Marker


class Transport(Protocol):
    """Hands messages (Outgoing's fields) to the next hop and reports the replies; never raises for
    delivery failures. send_window sends a window's messages, up to `parallelism` at a time."""

    def send(
        self,
        sender: str,
        recipient: str,
        data: bytes,
        site: Site | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> Reply: ...

    def send_window(
        self, messages: Sequence[Outgoing], parallelism: int, marker: Marker | None = None
    ) -> list[Reply]: ...

    def close(self) -> None: ...


class _OneAtATime:
    """send_window for transports that do not wait on a network."""

    def send_window(self, messages: Sequence[Outgoing], parallelism: int, marker: Marker | None = None) -> list[Reply]:
        return [self._send_one(m, marker) for m in messages]

    def _send_one(self, m: Outgoing, marker: Marker | None) -> Reply:
        if marker is not None and m.key is not None and not marker([m.key]):
            return NOT_SENT_REPLY
        return self.send(m.sender, m.recipient, m.data, m.site, m.ready)  # type: ignore[attr-defined]


class FileTransport(_OneAtATime):
    """Writes each message as an .eml file: for staging systems that must never send."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def send(
        self,
        sender: str,
        recipient: str,
        data: bytes,
        site: Site | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> Reply:
        if ready is not None and not ready():
            return HELD_REPLY
        name = f"{time.time_ns()}-{uuid.uuid4().hex[:12]}-{recipient.replace('/', '_')}.eml"
        with open(self.directory / name, "xb") as out:  # never overwrite another message
            out.write(data)
        return Reply(250, f"2.0.0 written to {name}")

    def close(self) -> None:
        pass


class ConsoleTransport(_OneAtATime):
    """Prints each message to standard output: for development."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout

    def send(
        self,
        sender: str,
        recipient: str,
        data: bytes,
        site: Site | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> Reply:
        if ready is not None and not ready():
            return HELD_REPLY
        self.stream.write(f"--- message from {sender} to {recipient}\n{data.decode('utf-8', 'replace')}\n")
        self.stream.flush()
        return Reply(250, "2.0.0 printed")

    def close(self) -> None:
        pass


class MemoryTransport(_OneAtATime):
    """Keeps messages in a list: for unit tests."""

    def __init__(self) -> None:
        self.outbox: list[tuple[str, str, bytes]] = []

    def send(
        self,
        sender: str,
        recipient: str,
        data: bytes,
        site: Site | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> Reply:
        if ready is not None and not ready():
            return HELD_REPLY
        self.outbox.append((sender, recipient, data))
        return Reply(250, "2.0.0 stored in memory")

    def close(self) -> None:
        self.outbox.clear()


def build_transport(settings: Settings) -> Transport:
    from smartmail.workers.limiter import make_throttle

    if settings.transport == "smtp":
        return SmtpTransport(
            settings.smtp,
            timeout=settings.smtp_timeout,
            max_messages_per_connection=settings.smtp_max_messages_per_connection,
            local_hostname=settings.smtp_local_hostname,
            max_idle=settings.smtp_parallelism,
            idle_timeout=settings.smtp_idle_timeout,
            gate=make_throttle(settings) if settings.shaping else None,
        )
    if settings.transport == "file":
        return FileTransport(settings.file_transport_dir)
    if settings.transport == "console":
        return ConsoleTransport()
    return MemoryTransport()


def _close_transport(transport: Transport, close: bool) -> None:
    if close:  # QUIT pooled connections; in a forked child they are the parent's
        transport.close()


@runtime.per_process(close=_close_transport)
def get_transport() -> Transport:
    """The transport of this process, created on first use (after any fork)."""
    return build_transport(get_settings())


def set_transport(transport: Transport | None) -> None:
    """Replace the process transport, closing the old one (tests hand in a MemoryTransport); None forgets it."""
    if transport is None:
        get_transport.forget()
    else:
        get_transport.replace(transport)
