"""SMTP transport: connections pooled per site, leased across processes, transactions run by smtp_window."""

from __future__ import annotations

import functools
import os
import re
import smtplib
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import structlog

from smartmail.config.settings import SmtpUrl
from smartmail.outage import Outage, is_connection_error
from smartmail.workers import smtp_window
from smartmail.workers.outcomes import Reply
from smartmail.workers.outgoing import HELD_REPLY, NOT_SENT_REPLY, Outgoing
from smartmail.workers.policy import Site

log = structlog.get_logger("smartmail.smtp")
_LEADING_DOT = re.compile(rb"(?m)^\.")


class ConnectionGate(Protocol):
    """Cross-process connection limits per site (limiter.SiteThrottle implements it in Redis)."""

    lease_ms: int

    def lease_connection(self, site: Site, lease: str) -> bool: ...

    def renew_connections(self, site_name: str, leases: list[str]) -> list[str]: ...

    def release_connection(self, site_name: str, lease: str) -> None: ...

    def want_connection(self, site_name: str) -> None: ...

    def wanted(self, site_names: list[str]) -> set[str]: ...


# The reply for a message that found its site at the connection limit in every process: it was
# not attempted, and delivery puts it back to wait (see delivery.py).
AT_CONNECTION_LIMIT = "throttled"


class _Connection:
    def __init__(self, smtp: smtplib.SMTP, pool: str, lease: str | None, max_messages: int) -> None:
        self.smtp = smtp
        self.pool = pool
        self.lease = lease
        self.max_messages = max_messages
        self.sent = 0
        self.holders = 1  # transactions using it: two while a window's next one borrows it (smtp_window.Lend)
        self.idle_since = 0.0
        self.retired = False
        # RFC 2920: MAIL, RCPT and DATA go in one write, their replies are read after it: one
        # round trip instead of three.
        self.pipelining = smtp.has_extn("pipelining")
        self.owed = 0  # replies to pipelined commands not read yet
        self.inbox = bytearray()  # received, not yet parsed (smtp_window.run_window reads the socket itself)


def _dot_stuffed(data: bytes) -> bytes:
    """The message and its end-of-data line: dot-stuffing per RFC 5321 section 4.5.2."""
    body = _LEADING_DOT.sub(b"..", data) if data.startswith(b".") or b"\n." in data else data
    return body + (b".\r\n" if body.endswith(b"\r\n") else b"\r\n.\r\n")


def _reply_text(response: bytes | str) -> str:
    return response.decode("utf-8", "replace") if isinstance(response, bytes) else str(response)


class SmtpTransport:
    """SMTP client that reuses connections across messages (RSET after a failed transaction).

    Connections are pooled per site. A connection is retired after the site's
    `max_messages_per_connection` transactions, as relays limit them, and closed after
    `idle_timeout` seconds unused. A pooled connection the relay has closed meanwhile is replaced
    once, transparently, when that is noticed before DATA started — never after, so nothing is
    sent twice. With a `gate`, every open connection holds a lease on its site's
    `max_connections` across all processes; a background thread renews the leases of open
    connections, so those of a process that died expire on their own.
    """

    def __init__(
        self,
        url: SmtpUrl,
        *,
        timeout: float = 30.0,
        max_messages_per_connection: int = 100,
        local_hostname: str | None = None,
        max_idle: int = 8,
        idle_timeout: float = 5.0,
        gate: ConnectionGate | None = None,
        keep_wanted_for: float = 1.0,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.max_messages = max_messages_per_connection
        self.local_hostname = local_hostname
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.gate = gate
        self.keep_wanted_for = keep_wanted_for
        self._idle: dict[str, list[_Connection]] = {}
        self._busy: dict[str, set[_Connection]] = {}
        self._opening: dict[str, int] = {}  # connections being opened, by pool
        self._lock = threading.Condition()
        self._context: ssl.SSLContext | None = None
        self._sweeper: threading.Thread | None = None
        self._closed = threading.Event()
        self.connections_opened = 0
        self._connector_threads: ThreadPoolExecutor | None = None
        self._connector_pid: int | None = None

    def _tls_context(self) -> ssl.SSLContext:
        # Built once per transport, and only when TLS is used: loading the CA bundle is slow.
        if self._context is None:
            self._context = ssl.create_default_context()
        return self._context

    def _connect(self) -> smtplib.SMTP:
        context = self._tls_context() if self.url.tls != "none" else None
        if self.url.tls == "ssl":
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                self.url.host, self.url.port, local_hostname=self.local_hostname, timeout=self.timeout, context=context
            )
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
        return smtp

    def _open(self, site: Site | None) -> _Connection | None:
        """A new connection for the site, or None when the site is at its connection limit."""
        pool = site.name if site else ""
        with self._lock:  # counted before the lease is asked for: a waiter never sees our lease taken but no connection
            self._opening[pool] = self._opening.get(pool, 0) + 1
        try:
            return self._lease_and_connect(site, pool)
        finally:
            with self._lock:
                self._opening[pool] -= 1
                self._lock.notify_all()

    def _lease_and_connect(self, site: Site | None, pool: str) -> _Connection | None:
        lease = None
        if site is not None and self.gate is not None:
            lease = uuid.uuid4().hex
            if not self.gate.lease_connection(site, lease):
                return None
        self._start_sweeper()
        try:
            conn = _Connection(
                self._connect(), pool, lease, site.max_messages_per_connection if site else self.max_messages
            )
        except BaseException:
            if lease and self.gate is not None:
                self.gate.release_connection(pool, lease)
            raise
        with self._lock:
            self.connections_opened += 1
            self._busy.setdefault(pool, set()).add(conn)
        return conn

    def _want(self, site: Site) -> None:
        """Ask other processes to give back their idle connections to the site. Not while waiting
        for one of our own: our sweeper would close it the moment it is idle (close_wanted)."""
        if self.gate is None:
            return
        try:
            self.gate.want_connection(site.name)
        except Exception:  # noqa: BLE001 - only a hint
            pass

    def _take_idle(self, site: Site | None) -> tuple[_Connection, bool] | None:
        """An idle pooled connection, now, or None."""
        pool = site.name if site else ""
        with self._lock:
            idle = self._idle.get(pool)
            if not idle:
                return None
            conn = idle.pop()
            conn.holders = 1
            self._busy.setdefault(pool, set()).add(conn)
            return conn, True

    def _share(self, conn: _Connection) -> tuple[_Connection, bool]:
        """The connection for one more transaction (a window's borrower), as _take_idle returns it."""
        with self._lock:
            conn.holders += 1
        return conn, True

    def _acquire(self, site: Site | None) -> tuple[_Connection | None, bool]:
        """An idle pooled connection, else a new one, else (None, False) at the site's limit. While
        this process's own connections to the site are all busy, wait for one of them: they free
        up within a transaction, where other processes' may not for seconds."""
        pool = site.name if site else ""
        deadline = time.monotonic() + self.timeout
        while True:
            if taken := self._take_idle(site):
                return taken
            conn = self._open(site)
            if conn is not None:
                return conn, False
            with self._lock:
                if self._idle.get(pool):  # released meanwhile
                    continue
                # Wait while one of ours is busy or being opened: it will be free within a transaction.
                if not (self._busy.get(pool) or self._opening.get(pool)) or time.monotonic() > deadline:
                    return None, False
                self._lock.wait(0.05)

    def _release(self, conn: _Connection) -> None:
        with self._lock:
            conn.holders -= 1
            if conn.holders:
                return  # the borrower releases it
            idle = self._idle.setdefault(conn.pool, [])
            if not conn.retired and conn.sent < conn.max_messages and len(idle) < self.max_idle:
                self._busy.get(conn.pool, set()).discard(conn)
                conn.idle_since = time.monotonic()
                idle.append(conn)
                self._lock.notify_all()
                return
        self._quit(conn)  # busy until then: see _forget

    def _forget(self, conn: _Connection) -> None:
        """A connection that closed: give back its lease, then drop it from the books. In that
        order: a thread waiting in _acquire for this connection to end wakes up to a free lease
        (the other way round it found neither a lease nor a busy connection, and gave up)."""
        if conn.lease and self.gate is not None:
            try:
                self.gate.release_connection(conn.pool, conn.lease)
            except Exception:  # noqa: BLE001 - an unreleased lease only expires later
                log.warning("smtp.lease_release_failed", site=conn.pool)
        with self._lock:
            self._busy.get(conn.pool, set()).discard(conn)
            self._lock.notify_all()

    def _quit(self, conn: _Connection) -> None:
        try:
            conn.smtp.quit()
        except (smtplib.SMTPException, OSError):
            conn.smtp.close()
        self._forget(conn)

    def _drop(self, conn: _Connection) -> None:
        conn.smtp.close()
        with self._lock:
            conn.holders -= 1
            if conn.holders:
                return  # the other holder's transaction fails too, and forgets it
        self._forget(conn)

    def send(
        self,
        sender: str,
        recipient: str,
        data: bytes,
        site: Site | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> Reply:
        return smtp_window.run(self._transaction(sender, recipient, data, site, ready))

    def send_window(
        self, messages: Sequence[Outgoing], parallelism: int, marker: smtp_window.Marker | None = None
    ) -> list[Reply]:
        """The messages' transactions side by side over up to `parallelism` connections, driven
        from this thread (smtp_window.run_window); with a `marker`, content goes once marked."""
        transactions = [self._transaction(*message) for message in messages]
        keys = [message.key for message in messages]
        return smtp_window.run_window(transactions, parallelism, self._connector(), marker, keys)

    def _connector(self) -> ThreadPoolExecutor:
        """Threads that open connections (or wait for a busy one) while a window's loop goes on."""
        if self._connector_threads is None or self._connector_pid != os.getpid():  # threads do not survive a fork
            self._connector_threads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="smtp-connect")
            self._connector_pid = os.getpid()
        return self._connector_threads

    def _transaction(
        self,
        sender: str,
        recipient: str,
        data: bytes,
        site: Site | None,
        ready: Callable[[], bool] | None,
        key: str | None = None,
    ) -> smtp_window.Transaction:
        """One message's SMTP transaction, as a generator of the I/O it needs (smtp_window drives it)."""
        if not (sender.isascii() and recipient.isascii()):
            # Non-ASCII addresses need SMTPUTF8 (RFC 6531 section 3.7.4.1), which we do not use.
            return Reply(553, "5.6.7 non-ASCII address requires SMTPUTF8, which SmartMail does not use")
        if "\n" in sender + recipient or "\r" in sender + recipient:  # would end the command, add another
            return Reply(553, "5.1.3 envelope address contains a line break")
        commands = (
            f"MAIL FROM:<{sender}>\r\n".encode("ascii"),
            f"RCPT TO:<{recipient}>\r\n".encode("ascii"),
            b"DATA\r\n",
        )
        pool = site.name if site else ""
        for attempt in range(2):
            try:
                # A retry opens a fresh connection: the other idle ones may be just as dead.
                if attempt == 0:
                    conn, reused = yield smtp_window.Acquire(
                        lambda: self._take_idle(site), lambda: self._acquire(site), pool
                    )
                else:
                    conn, reused = (yield smtp_window.Acquire(lambda: None, lambda: self._open(site))), False
            except smtplib.SMTPResponseException as exc:
                # A refusal while setting up the session (421/554 greeting, 535 AUTH) is about the
                # relay or our credentials, not this message: report no reply, so it is deferred.
                return Reply(None, f"session setup refused: {exc.smtp_code} {_reply_text(exc.smtp_error)}")
            except (smtplib.SMTPException, OSError) as exc:
                return Reply(None, f"connection to {self.url.host}:{self.url.port} failed: {exc}")
            if conn is None:  # only a site's pool has a connection limit
                assert site is not None
                self._want(site)
                return Reply(
                    None, f"site {site.name} is at its limit of {site.max_connections} connections", AT_CONNECTION_LIMIT
                )
            if ready is not None:
                if not ready():
                    self._release(conn)
                    return HELD_REPLY
                ready = None  # once: a retry on a fresh connection is the same message
            stage = "mail"
            try:
                # RFC 2920: with PIPELINING, MAIL, RCPT and DATA go in one write and their replies
                # are read after it: one round trip instead of three.
                if conn.pipelining:
                    yield smtp_window.Write(conn, b"".join(commands))
                    conn.owed = 3
                code, response = yield from self._command(conn, commands[0])
                if code == 421 and reused:
                    # RFC 5321 section 3.8: 421 closes the session; on a pooled idle connection it is
                    # the relay's idle timeout, so try once more on a fresh connection.
                    self._drop(conn)
                    continue
                if code == 250:
                    stage = "rcpt"
                    code, response = yield from self._command(conn, commands[1])
                if code in (250, 251):
                    code, response = yield from self._command(conn, commands[2])
                    if code == 354:
                        stage = "data"  # from here on, a lost connection may have delivered it
                        code, response = yield from self._content(conn, data, key, pool)
                conn.sent += 1
                if code == 421:  # RFC 5321 section 3.8: the relay is closing the session
                    conn.retired = True
                if code // 100 != 2 and stage != "data":
                    # RFC 5321 section 4.1.1.5: clear the failed transaction, keep the session (the
                    # end of data clears it by itself, section 4.1.1.4). A relay that hung up after
                    # answering must not turn its answer into "connection lost".
                    yield from self._safe_rset(conn)
            except smtp_window.NotTransmitted:
                # The content never left: the relay discards a transaction without its final dot.
                self._drop(conn)
                return NOT_SENT_REPLY
            except (smtplib.SMTPServerDisconnected, OSError) as exc:
                self._drop(conn)
                if reused and stage == "mail":
                    continue  # the relay closed an idle pooled connection; open a fresh one
                return Reply(None, f"connection lost at {stage.upper()}: {exc}", stage)
            self._release(conn)
            return Reply(code, _reply_text(response), stage)
        return Reply(None, "connection lost twice before DATA")

    def _content(self, conn: _Connection, data: bytes, key: str | None, pool: str):
        """The message's content and final dot (write-ahead marked when it has a key); the reply.
        RFC 5321 section 4.5.3.2.6: wait up to 10 minutes for that reply; giving up earlier would
        leave a message the relay may accept `unknown`."""
        content = _dot_stuffed(data)
        yield smtp_window.Transmit(conn, content, key) if key else smtp_window.Write(conn, content)
        if conn.pipelining and not conn.retired and conn.sent + 2 <= conn.max_messages:
            yield smtp_window.Lend(conn, pool, functools.partial(self._share, conn))
        return (yield smtp_window.Read(conn, max(self.timeout, 600.0)))

    @staticmethod
    def _command(conn: _Connection, command: bytes):
        """Its reply; already written when pipelined (conn.owed counts the replies not read)."""
        if conn.owed:
            conn.owed -= 1
        else:
            yield smtp_window.Write(conn, command)
        return (yield smtp_window.Read(conn))

    def _safe_rset(self, conn: _Connection):
        """Read the replies still owed to pipelined commands after an earlier one failed, then RSET."""
        try:
            while conn.owed:
                conn.owed -= 1
                code, _ = yield smtp_window.Read(conn)
                if code == 354:  # a relay that takes DATA although no recipient was accepted: end it empty
                    yield smtp_window.Write(conn, b".\r\n")
                    yield smtp_window.Read(conn)
            yield smtp_window.Write(conn, b"RSET\r\n")
            yield smtp_window.Read(conn)
        except (smtplib.SMTPException, OSError):
            conn.retired = True  # closed on release

    # --- Housekeeping: idle connections close, leases of open ones stay renewed -----------------

    def _start_sweeper(self) -> None:
        if self._sweeper is None or not self._sweeper.is_alive():
            with self._lock:
                if self._sweeper is None or not self._sweeper.is_alive():
                    self._closed.clear()
                    self._sweeper = threading.Thread(target=self._sweep_forever, name="smtp-sweeper", daemon=True)
                    self._sweeper.start()

    def _sweep_forever(self) -> None:
        renew_every = self.gate.lease_ms / 3000 if self.gate else 10.0
        last_renewal = time.monotonic()
        outage = Outage("smtp.sweeper", log)
        while not self._closed.wait(min(0.25, self.idle_timeout / 2)):
            try:
                self.close_idle(time.monotonic() - self.idle_timeout)
                self.close_wanted(time.monotonic() - self.keep_wanted_for)
                if time.monotonic() - last_renewal >= renew_every:
                    last_renewal = time.monotonic()
                    self.renew_leases()
            except Exception as exc:  # noqa: BLE001 - keep sweeping; Redis may be back next time
                # One line per outage, not a traceback every sweep; anything else may be a bug.
                outage.failed(exc, traceback=not is_connection_error(exc))
            else:
                outage.ok()

    def close_idle(self, idle_before: float = float("inf")) -> None:
        """Close pooled connections idle since before `idle_before` (monotonic); all by default."""
        with self._lock:
            stale = [c for idle in self._idle.values() for c in idle if c.idle_since < idle_before]
            for pool, idle in self._idle.items():
                self._idle[pool] = [c for c in idle if c.idle_since >= idle_before]
        for conn in stale:
            self._quit(conn)

    def close_wanted(self, idle_before: float = float("inf")) -> None:
        """Close idle connections of sites another process is waiting for: an idle connection
        holds one of the site's few leases that a busy worker could use. Only those idle since
        before `idle_before` (monotonic; the sweeper keeps `keep_wanted_for` of grace): a site's
        work comes back through the outbox to either process, and a lease handed over at every
        pause in it is a new session each time, which receivers read as a reconnect storm."""
        if self.gate is None:
            return
        with self._lock:
            sites = [
                pool for pool, idle in self._idle.items() if any(c.lease and c.idle_since < idle_before for c in idle)
            ]
        wanted = self.gate.wanted(sites) if sites else set()
        if wanted:
            with self._lock:
                closing = []
                for pool in wanted:
                    idle = self._idle.get(pool, [])
                    closing += [c for c in idle if c.idle_since < idle_before]
                    self._idle[pool] = [c for c in idle if c.idle_since >= idle_before]
            for conn in closing:
                self._quit(conn)

    def renew_leases(self) -> None:
        if self.gate is None:
            return
        with self._lock:
            by_site: dict[str, list[_Connection]] = {}
            for conn in [c for idle in self._idle.values() for c in idle] + [c for b in self._busy.values() for c in b]:
                if conn.lease:
                    by_site.setdefault(conn.pool, []).append(conn)
        for site_name, conns in by_site.items():
            lost = set(self.gate.renew_connections(site_name, [c.lease for c in conns if c.lease]))
            for conn in conns:
                if conn.lease in lost:
                    # Another process may hold this permit now: stop using the connection.
                    log.warning("smtp.lease_lost", site=site_name)
                    conn.lease = None
                    conn.retired = True
        self.close_idle_retired()

    def close_idle_retired(self) -> None:
        with self._lock:
            retired = [c for idle in self._idle.values() for c in idle if c.retired]
            for pool, idle in self._idle.items():
                self._idle[pool] = [c for c in idle if not c.retired]
        for conn in retired:
            self._quit(conn)

    def close(self) -> None:
        self._closed.set()
        self.close_idle()
        if self._connector_threads is not None:
            self._connector_threads.shutdown(wait=False)
            self._connector_threads = None
