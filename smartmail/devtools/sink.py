"""A local SMTP sink (aiosmtpd) that stores or prints what it receives: `smartmail sink`, the demo and tests use it."""

from __future__ import annotations

import email
import email.policy
import itertools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.controller import Controller


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: str
    received_at: float = field(default_factory=time.time)

    def parsed(self) -> email.message.EmailMessage:
        return email.message_from_bytes(self.data, policy=email.policy.default)


class SinkHandler:
    """Accepts every message; keeps it in memory, writes it as an .eml file, and/or prints a summary."""

    def __init__(self, directory: Path | None = None, echo: bool = False, keep: bool = True) -> None:
        self.directory = directory
        self.echo = echo
        self.keep = keep
        self.messages: list[Received] = []
        self.count = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        if directory:
            directory.mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server, session, envelope) -> str:
        item = Received(
            envelope.mail_from,
            list(envelope.rcpt_tos),
            envelope.original_content or envelope.content,
            str(session.peer),
        )
        with self._lock:
            number = next(self._ids)
            self.count += 1
            if self.keep:
                self.messages.append(item)
        if self.directory:
            (self.directory / f"{int(item.received_at * 1000)}-{number:08d}.eml").write_bytes(item.data)
        if self.echo:
            message = item.parsed()
            print(
                f"[sink] #{number} from {item.mail_from} to {', '.join(item.rcpt_tos)}: {message['Subject']}",
                flush=True,
            )
        return f"250 2.0.0 Ok: queued as {number}"


def start_sink(handler: SinkHandler, host: str = "127.0.0.1", port: int = 8025) -> Controller:
    """Run the sink in a background thread; stop it with `.stop()`."""
    # decode_data=False keeps the bytes exactly as sent; a generous size limit for test bodies.
    controller = Controller(
        handler,
        hostname=host,
        port=port,
        decode_data=False,
        data_size_limit=50 * 1024 * 1024,
        server_hostname="smartmail-sink",
    )
    controller.start()
    return controller
