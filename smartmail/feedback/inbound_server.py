"""The inbound SMTP server of `smartmail inbound` (aiosmtpd): who may send what, stored before it is acknowledged."""

from __future__ import annotations

import asyncio
import ipaddress
import math
import re
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy.exc import DBAPIError

from smartmail.config import Settings
from smartmail.content.unsubscribe_links import mailto_address
from smartmail.errors import SettingsError
from smartmail.feedback.inbound import PROCESS_TASK, GroupSpool, spool
from smartmail.outage import Outage, is_connection_error
from smartmail.workers import dispatch

log = structlog.get_logger("smartmail.inbound")

# RFC 5321 section 4.5.3.1.3: a path is at most 256 octets, angle brackets included.
MAX_ADDRESS = 254
# RFC 5321 section 4.5.3.1.8: a server must accept at least 100 recipients per transaction.
MAX_RECIPIENTS = 100
# RFC 5321 section 4.5.3.2.7: a server waits at least 5 minutes for the next command.
SESSION_TIMEOUT = 300.0
STORING_THREADS = 64  # sessions whose mail can wait for the same group commit

RELAYING_DENIED = "550 5.7.1 Relaying denied"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your address, try again later"
TOO_FAST = "451 4.7.1 Too many messages from your address, try again later"
NOT_STORED = "451 4.3.0 Temporary failure storing the message, try again later"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"  # RFC 5321 section 3.8

# NUL and other controls have no place in an address (RFC 5321 section 4.1.2), and the databases
# refuse NUL in text.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
BAD_SENDER = "501 5.1.7 Bad sender address syntax"

# aiosmtpd's size replies carry no enhanced status code; RFC 3463 X.3.4 is "message too big for system".
_ENHANCED = {
    "552 Error: Too much mail data": "552 5.3.4 Message too big for system",
    "552 Error: message size exceeds fixed maximum message size": "552 5.3.4 Message size exceeds fixed maximum",
}


def recipient_allowed(address: str, bounce_domain: str | None, unsubscribe_address: str) -> bool:
    """Whether RCPT TO `address` (an addr-spec as aiosmtpd parsed it, source route dropped) is ours:
    any local part at the bounce domain, or the unsubscribe mailto address. Nothing is ever relayed."""
    if not address or len(address) > MAX_ADDRESS or _CONTROL.search(address):
        return False
    # The domain follows the last `@`: in `"a@bounce.example.com"@evil.com` the first is quoted.
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return False
    if bounce_domain and domain.lower() == bounce_domain.lower().rstrip("."):
        return True
    return address.lower() == unsubscribe_address.lower()


def client_ip(peer: Any) -> str:
    """The client's address from a peername tuple; an IPv4-mapped IPv6 address as plain IPv4."""
    host = peer[0] if isinstance(peer, tuple) and peer else str(peer)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return str(host)
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


class RateLimiter:
    """Token buckets per client address in this process's memory: `rate` messages per second, `burst` at once.
    In-process is enough: one inbound server runs per host, and each host answers for itself."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, max(1.0, burst), clock
        self._buckets: dict[str, tuple[float, float]] = {}  # address → (tokens, when counted)
        self._prune_at = 10_000

    def allow(self, key: str) -> bool:
        """Take one token for `key`; False when its bucket is empty."""
        now = self._clock()
        tokens, then = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        allowed = tokens >= 1
        self._buckets[key] = (tokens - 1 if allowed else tokens, now)
        if len(self._buckets) > self._prune_at:
            self._prune(now)
        return allowed

    def _prune(self, now: float) -> None:
        # A full bucket is the same as none; the threshold grows so a crowd of busy clients is not rescanned per call.
        full = [k for k, (tokens, then) in self._buckets.items() if tokens + (now - then) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]
        self._prune_at = max(10_000, 2 * len(self._buckets))

    def __len__(self) -> int:
        return len(self._buckets)


class ConnectionCounter:
    """Concurrent sessions per client address, at most `limit` each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def open(self, key: str) -> bool:
        count = self._open.get(key, 0)
        if count >= self.limit:
            return False
        self._open[key] = count + 1
        return True

    def close(self, key: str) -> None:
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)

    def count(self, key: str) -> int:
        return self._open.get(key, 0)


class ProcessRequests:
    """Asks the workers to process the spool after new mail: at most one publish per `interval`, and a
    request waits at most that long. A failed publish is logged once per outage and dropped: beat drains
    the spool too."""

    def __init__(
        self,
        publish: Callable[[], None],
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._publish, self._interval, self._clock = publish, interval, clock
        self._last = -math.inf
        self._wanted = False  # a request not yet covered by a publish
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._outage = Outage("inbound.broker", log)

    def request(self) -> None:
        """Called on the event loop after each stored mail."""
        self._wanted = True
        if self._timer is None and self._task is None:
            delay = max(0.0, self._last + self._interval - self._clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._start)

    def _start(self) -> None:
        self._timer = None
        self._wanted = False
        self._last = self._clock()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await asyncio.to_thread(self._publish_once)  # a Redis round trip must not stall the sessions
        finally:
            self._task = None
            if self._wanted:
                self.request()

    def _publish_once(self) -> None:
        try:
            self._publish()
        except Exception as exc:  # noqa: BLE001 - logged; processing is only delayed until beat's run
            self._outage.failed(exc, traceback=not is_connection_error(exc))
        else:
            self._outage.ok()

    async def flush(self) -> None:
        """At shutdown: let a publish under way finish, and make the one still wanted."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._wanted:
            self._wanted = False
            await asyncio.to_thread(self._publish_once)


def _publish_process_task() -> None:
    dispatch.publish(PROCESS_TASK)


class InboundHandler:
    """aiosmtpd's handler: the recipient policy at RCPT, the rate limit at MAIL, and store-then-acknowledge at DATA."""

    def __init__(
        self,
        *,
        bounce_domain: str | None,
        unsubscribe_address: str,
        rate: RateLimiter,
        connections: ConnectionCounter,
        requests: ProcessRequests,
        store: Callable[[str, Sequence[str], bytes, str | None], str] = spool,
    ) -> None:
        self.bounce_domain, self.unsubscribe_address = bounce_domain, unsubscribe_address
        self.rate, self.connections, self.requests, self.store = rate, connections, requests, store
        self.sessions: set[InboundSMTP] = set()
        self.storing: set[asyncio.Future[str]] = set()
        self.draining = False
        self.accepted = 0
        self._database = Outage("inbound.database", log)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        # No AUTH: nothing is relayed, so nobody needs to log in (aiosmtpd offers it after STARTTLS).
        return [line for line in responses if not line.startswith("250-AUTH")]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.draining:
            # Written before the close runs: the client reads the 421, then the end of the connection.
            if server.transport is not None:
                asyncio.get_running_loop().call_soon(server.transport.close)
            return SHUTTING_DOWN
        if address and _CONTROL.search(address):
            return BAD_SENDER
        if not self.rate.allow(client_ip(session.peer)):
            return TOO_FAST
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if not recipient_allowed(address, self.bounce_domain, self.unsubscribe_address):
            return RELAYING_DENIED
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    def _stored(self, stored: asyncio.Future[str]) -> None:
        self.storing.discard(stored)
        if not stored.cancelled():
            stored.exception()  # retrieved: a session that hung up mid-commit never awaits it

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        # aiosmtpd keeps the null reverse-path of a DSN (RFC 5321 section 4.5.5) as "<>"; it is stored empty.
        mail_from = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        recipients = list(envelope.rcpt_tos)
        peer = client_ip(session.peer)
        # The commit runs in a thread so the loop keeps serving; shielded, so a client that hangs up
        # mid-commit does not leave shutdown without the write to wait for.
        stored = asyncio.ensure_future(asyncio.to_thread(self.store, mail_from, recipients, raw, peer))
        self.storing.add(stored)
        stored.add_done_callback(self._stored)
        try:
            inbound_id = await asyncio.shield(stored)
        except Exception as exc:  # noqa: BLE001 - any failure to store means "not accepted": the sender retries
            # The reason only: a statement error's text would quote its parameters, the mail itself.
            reason = " ".join(str(exc.orig).split()) if isinstance(exc, DBAPIError) else type(exc).__name__
            self._database.failed(reason, peer=peer)
            return NOT_STORED
        self._database.ok()
        self.accepted += 1
        log.info("inbound.accepted", inbound_id=inbound_id, peer=peer, size=len(raw), recipients=len(recipients))
        self.requests.request()
        return f"250 2.0.0 Ok: stored as {inbound_id}"


class InboundSMTP(SMTP):
    """aiosmtpd's SMTP session with the per-address connection limit and enhanced status codes on size replies."""

    def __init__(self, handler: InboundHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.inbound = handler
        self._counted: str | None = None  # the client address this session counts against
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # the TCP connection (STARTTLS calls this again with the TLS transport)
            ip = client_ip(transport.get_extra_info("peername"))
            if not self.inbound.connections.open(ip):
                self._refused = True
                transport.write(f"{TOO_MANY_CONNECTIONS}\r\n".encode())  # type: ignore[attr-defined]
                transport.close()
                log.info("inbound.connection_refused", peer=ip, limit=self.inbound.connections.limit)
                return
            self._counted = ip
            self.inbound.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return  # no session was started
        if self._counted is not None:
            self.inbound.connections.close(self._counted)
            self.inbound.sessions.discard(self)
            self._counted = None
        super().connection_lost(error)

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            status = _ENHANCED.get(status, status)
        await super().push(status)

    @property
    def idle(self) -> bool:
        """No mail transaction under way (no MAIL yet, or its DATA answered)."""
        return self.envelope is None or not self.envelope.mail_from

    def close_now(self) -> None:
        """End the session with RFC 5321 section 3.8's shutdown reply."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(f"{SHUTTING_DOWN}\r\n".encode())  # type: ignore[attr-defined]
            self.transport.close()


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server-side TLS context for STARTTLS (RFC 3207), when a certificate and key are configured."""
    cert, key = settings.inbound_tls_cert, settings.inbound_tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise SettingsError("SMARTMAIL_INBOUND_TLS_CERT and SMARTMAIL_INBOUND_TLS_KEY must be set together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # no client certificates asked for
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(
            f"SMARTMAIL_INBOUND_TLS_CERT / SMARTMAIL_INBOUND_TLS_KEY: cannot load {cert} with {key}: {exc}"
        ) from None
    return context


class InboundServer:
    """The listening socket and its sessions; `start()`, then `shutdown()` to stop accepting and finish sessions."""

    def __init__(self, settings: Settings, publish: Callable[[], None] = _publish_process_task) -> None:
        self.settings = settings
        self.hostname = settings.smtp_local_hostname or socket.getfqdn()
        self.tls = tls_context(settings)
        try:
            unsubscribe_address = mailto_address()
        except ValueError as exc:  # names SMARTMAIL_UNSUBSCRIBE_MAILTO
            raise SettingsError(str(exc)) from None
        rate = settings.inbound_rate_per_ip
        self.handler = InboundHandler(
            bounce_domain=settings.bounce_domain,
            unsubscribe_address=unsubscribe_address,
            rate=RateLimiter(rate, burst=2 * rate),
            connections=ConnectionCounter(settings.inbound_max_connections_per_ip),
            requests=ProcessRequests(publish),
            store=GroupSpool(),
        )
        self._server: asyncio.Server | None = None

    def _session(self) -> InboundSMTP:
        return InboundSMTP(
            self.handler,
            data_size_limit=self.settings.inbound_max_bytes,  # advertised in EHLO SIZE; DATA beyond it is dropped
            enable_SMTPUTF8=False,
            decode_data=False,  # the exact bytes are stored, and 8BITMIME is offered
            hostname=self.hostname,
            ident="ESMTP SmartMail",
            tls_context=self.tls,
            require_starttls=False,
            timeout=SESSION_TIMEOUT,
            auth_exclude_mechanism=("LOGIN", "PLAIN"),
            loop=asyncio.get_running_loop(),
        )

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        # A thread per session waiting for its group commit (GroupSpool): the loop's default pool
        # (CPUs + 4 threads) would cap a group at that many sessions.
        loop.set_default_executor(ThreadPoolExecutor(max_workers=STORING_THREADS, thread_name_prefix="inbound"))
        self._server = await loop.create_server(self._session, host=host, port=port)
        log.info(
            "inbound.listening",
            host=host,
            port=port,
            starttls=self.tls is not None,
            bounce_domain=self.handler.bounce_domain,
            unsubscribe_address=self.handler.unsubscribe_address,
        )
        if not self.handler.bounce_domain:
            log.warning(
                "inbound.no_bounce_domain", note="SMARTMAIL_BOUNCE_DOMAIN is unset: only unsubscribe mail is accepted"
            )

    async def shutdown(self, grace: float) -> None:
        """Stop accepting; close idle sessions with 421; give the others `grace` seconds to finish their
        transaction; wait for every store under way (it was, or will be, acknowledged)."""
        handler = self.handler
        handler.draining = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace
        while handler.sessions and time.monotonic() < deadline:
            for session in [s for s in handler.sessions if s.idle]:
                session.close_now()
            await asyncio.sleep(0.05)
        if handler.storing:
            await asyncio.gather(*handler.storing, return_exceptions=True)
            await asyncio.sleep(0.1)  # the sessions whose mail was just stored write their 250 first
        for session in list(handler.sessions):
            session.close_now()  # unacknowledged mail: the client sends it again later
        await asyncio.sleep(0)  # let the closed transports report their ends
        await handler.requests.flush()
        log.info("inbound.stopped", accepted=handler.accepted)
