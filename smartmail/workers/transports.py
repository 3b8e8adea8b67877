"""Transports: SMTP with a per-process connection pool, plus file, console and in-memory sinks chosen by settings."""
from __future__ import annotations

import re
import smtplib
import ssl
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Protocol

import structlog

from smartmail.config.settings import Settings, SmtpUrl
from smartmail.outcomes import Reply

log = structlog.get_logger("smartmail.smtp")
_LEADING_DOT = re.compile(rb"(?m)^\.")


class Transport(Protocol):
    """Hands one message to the next hop and reports the reply; never raises for delivery failures."""

    def send(self, sender: str, recipient: str, data: bytes) -> Reply: ...

    def close(self) -> None: ...


class _Connection:
    def __init__(self, smtp: smtplib.SMTP) -> None:
        self.smtp = smtp
        self.sent = 0


def _reply_text(response: bytes | str) -> str:
    return response.decode("utf-8", "replace") if isinstance(response, bytes) else str(response)


class SmtpTransport:
    """SMTP client that reuses connections across messages (RSET after a failed transaction).

    A connection is retired after `max_messages_per_connection` transactions, as relays limit
    them. A pooled connection the relay has closed meanwhile is replaced once, transparently,
    when that is noticed before DATA started — never after, so nothing is sent twice.
    """

    def __init__(self, url: SmtpUrl, *, timeout: float = 30.0, max_messages_per_connection: int = 100,
                 local_hostname: str | None = None, max_idle: int = 8) -> None:
        self.url = url
        self.timeout = timeout
        self.max_messages = max_messages_per_connection
        self.local_hostname = local_hostname
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        self.connections_opened = 0

    def _tls_context(self) -> ssl.SSLContext:
        # Built once per transport, and only when TLS is used: it loads the CA bundle, ~16 ms.
        if self._context is None:
            self._context = ssl.create_default_context()
        return self._context

    def _open(self) -> _Connection:
        context = self._tls_context() if self.url.tls != "none" else None
        if self.url.tls == "ssl":
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(self.url.host, self.url.port, local_hostname=self.local_hostname,
                                                  timeout=self.timeout, context=context)
        else:
            smtp = smtplib.SMTP(self.url.host, self.url.port, local_hostname=self.local_hostname, timeout=self.timeout)
        try:
            code, response = smtp.ehlo()
            if code != 250:  # RFC 5321 section 3.2: fall back to HELO for servers without ESMTP
                code, response = smtp.helo()
                if code != 250:
                    raise smtplib.SMTPHeloError(code, response)
            if self.url.tls == "starttls":
                smtp.starttls(context=context)
                smtp.ehlo()
            if self.url.username:
                smtp.login(self.url.username, self.url.password or "")
        except BaseException:
            smtp.close()
            raise
        self.connections_opened += 1
        return _Connection(smtp)

    def _acquire(self) -> tuple[_Connection, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._open(), False

    def _release(self, conn: _Connection) -> None:
        if conn.sent >= self.max_messages:
            self._quit(conn)
            return
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        self._quit(conn)

    @staticmethod
    def _quit(conn: _Connection) -> None:
        try:
            conn.smtp.quit()
        except (smtplib.SMTPException, OSError):
            conn.smtp.close()

    def send(self, sender: str, recipient: str, data: bytes) -> Reply:
        if not (sender.isascii() and recipient.isascii()):
            # Non-ASCII addresses need SMTPUTF8 (RFC 6531 section 3.7.4.1), which we do not use.
            return Reply(553, "5.6.7 non-ASCII address requires SMTPUTF8, which SmartMail does not use")
        for attempt in range(2):
            try:
                # A retry opens a fresh connection: the other idle ones may be just as dead.
                conn, reused = self._acquire() if attempt == 0 else (self._open(), False)
            except smtplib.SMTPResponseException as exc:
                # A refusal while setting up the session (421/554 greeting, 535 AUTH) is about the
                # relay or our credentials, not this message: report no reply, so it is deferred.
                return Reply(None, f"session setup refused: {exc.smtp_code} {_reply_text(exc.smtp_error)}")
            except (smtplib.SMTPException, OSError) as exc:
                return Reply(None, f"connection to {self.url.host}:{self.url.port} failed: {exc}")
            stage = "mail"
            try:
                code, response = conn.smtp.mail(sender)
                if code == 421 and reused:
                    # RFC 5321 section 3.8: 421 closes the session; on a pooled idle connection it is
                    # the relay's idle timeout, so try once more on a fresh connection.
                    conn.smtp.close()
                    continue
                if code == 250:
                    stage = "rcpt"
                    code, response = conn.smtp.rcpt(recipient)
                if code in (250, 251):
                    code, response = conn.smtp.docmd("DATA")
                    if code == 354:
                        stage = "data"  # from here on, a lost connection may have delivered it
                        code, response = self._send_body(conn.smtp, data)
                conn.sent += 1
                if code // 100 != 2:
                    # RFC 5321 section 4.1.1.5: clear the failed transaction, keep the session. A relay
                    # that hung up after answering must not turn its answer into "connection lost".
                    self._safe_rset(conn)
            except (smtplib.SMTPServerDisconnected, OSError) as exc:
                conn.smtp.close()
                if reused and stage == "mail":
                    continue  # the relay closed an idle pooled connection; open a fresh one
                return Reply(None, f"connection lost at {stage.upper()}: {exc}", stage)
            self._release(conn)
            return Reply(code, _reply_text(response), stage)
        return Reply(None, "connection lost twice before DATA")

    def _send_body(self, smtp: smtplib.SMTP, data: bytes) -> tuple[int, bytes]:
        # Dot-stuffing per RFC 5321 section 4.5.2; the body is CRLF-terminated already (mime.py).
        body = _LEADING_DOT.sub(b"..", data)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        smtp.send(body + b".\r\n")
        # RFC 5321 section 4.5.3.2.6: wait up to 10 minutes for the reply to the final dot; giving
        # up earlier would leave a message the relay may still accept as `unknown`.
        smtp.sock.settimeout(max(self.timeout, 600.0))
        try:
            return smtp.getreply()
        finally:
            if smtp.sock is not None:
                smtp.sock.settimeout(self.timeout)

    def _safe_rset(self, conn: _Connection) -> None:
        try:
            conn.smtp.rset()
        except (smtplib.SMTPException, OSError):
            conn.sent = self.max_messages  # retire it on release

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            self._quit(conn)


class FileTransport:
    """Writes each message as an .eml file: for staging systems that must never send."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def send(self, sender: str, recipient: str, data: bytes) -> Reply:
        name = f"{time.time_ns()}-{uuid.uuid4().hex[:12]}-{recipient.replace('/', '_')}.eml"
        with open(self.directory / name, "xb") as out:  # never overwrite another message
            out.write(data)
        return Reply(250, f"2.0.0 written to {name}")

    def close(self) -> None:
        pass


class ConsoleTransport:
    """Prints each message to standard output: for development."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout

    def send(self, sender: str, recipient: str, data: bytes) -> Reply:
        self.stream.write(f"--- message from {sender} to {recipient}\n{data.decode('utf-8', 'replace')}\n")
        self.stream.flush()
        return Reply(250, "2.0.0 printed")

    def close(self) -> None:
        pass


class MemoryTransport:
    """Keeps messages in a list: for unit tests."""

    def __init__(self) -> None:
        self.outbox: list[tuple[str, str, bytes]] = []

    def send(self, sender: str, recipient: str, data: bytes) -> Reply:
        self.outbox.append((sender, recipient, data))
        return Reply(250, "2.0.0 stored in memory")

    def close(self) -> None:
        self.outbox.clear()


def build_transport(settings: Settings) -> Transport:
    if settings.transport == "smtp":
        return SmtpTransport(settings.smtp, timeout=settings.smtp_timeout,
                             max_messages_per_connection=settings.smtp_max_messages_per_connection,
                             local_hostname=settings.smtp_local_hostname, max_idle=settings.smtp_parallelism)
    if settings.transport == "file":
        return FileTransport(settings.file_transport_dir)
    if settings.transport == "console":
        return ConsoleTransport()
    return MemoryTransport()


_transport: Transport | None = None


def get_transport() -> Transport:
    """The transport of this process, created on first use (after any fork)."""
    global _transport
    if _transport is None:
        from smartmail.config import get_settings

        _transport = build_transport(get_settings())
    return _transport


def set_transport(transport: Transport | None) -> None:
    """Replace the process transport (tests hand in a MemoryTransport); None forgets it."""
    global _transport
    if _transport is not None and transport is not _transport:
        _transport.close()
    _transport = transport
