"""Unit tests for smartmail.feedback.inbound_server: the recipient policy, the limits, store-then-acknowledge."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from aiosmtpd.smtp import Envelope, Session
from sqlalchemy.exc import OperationalError
from structlog.testing import capture_logs

from smartmail.config.settings import get_settings
from smartmail.content.unsubscribe_links import mailto_address
from smartmail.errors import SettingsError
from smartmail.feedback.inbound_server import (
    MAX_RECIPIENTS,
    NOT_STORED,
    RELAYING_DENIED,
    SHUTTING_DOWN,
    TOO_FAST,
    ConnectionCounter,
    InboundHandler,
    ProcessRequests,
    RateLimiter,
    client_ip,
    recipient_allowed,
    tls_context,
)

BOUNCES = "bounces.example.com"
UNSUBSCRIBE = "unsubscribe@example.com"


@pytest.fixture
def env(settings_env):
    return settings_env


# --- Who may receive -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "bounce+0123abc@bounces.example.com",
        "bounce+x@BOUNCES.example.com",
        "anything@Bounces.Example.Com",
        "postmaster@bounces.example.com",
        "unsubscribe@example.com",
        "Unsubscribe@EXAMPLE.com",
        # A local part aiosmtpd kept quoted: still the bounce domain after the last `@`.
        '"odd local"@bounces.example.com',
        # `<@relay.example.net:user@bounces.example.com>`, as parsed: the source route dropped (RFC 5321 C).
        "user@bounces.example.com",
    ],
)
def test_accepted(address):
    assert recipient_allowed(address, BOUNCES, UNSUBSCRIBE)


@pytest.mark.parametrize(
    "address",
    [
        "user@other.com",
        "bounce+x@evil.com",
        '"a@bounces.example.com"@evil.com',  # the quoted `@` is the local part's
        "user@sub.bounces.example.com",  # a subdomain is not the bounce domain
        "user@bounces.example.com.evil.com",
        "user@evilbounces.example.com",
        "bounces.example.com",  # no local part
        "@bounces.example.com",
        "user@",
        "",
        "unsubscribe@other.com",
        "unsubscribe+x@example.com",  # only the address itself
        "news@example.com",  # the sender domain is not ours to receive for
        "a" * 240 + "@bounces.example.com",  # longer than an SMTP path may be
        # `<@bounces.example.com:user@evil.com>`, as parsed: the route names us, the mailbox does not.
        "user@evil.com",
    ],
)
def test_refused(address):
    assert not recipient_allowed(address, BOUNCES, UNSUBSCRIBE)


def test_without_a_bounce_domain_only_the_unsubscribe_address():
    assert recipient_allowed(UNSUBSCRIBE, None, UNSUBSCRIBE)
    assert not recipient_allowed("bounce+x@bounces.example.com", None, UNSUBSCRIBE)


def test_mailto_address_defaults_to_the_sender_domain(env):
    assert mailto_address() == "unsubscribe@example.com"
    env.setenv("SMARTMAIL_UNSUBSCRIBE_MAILTO", "Opt out <leave@lists.example.org>")
    get_settings.forget()
    assert mailto_address() == "leave@lists.example.org"


@pytest.mark.parametrize(
    ("peer", "ip"),
    [
        (("192.0.2.7", 40000), "192.0.2.7"),
        (("::ffff:192.0.2.7", 1, 0, 0), "192.0.2.7"),
        (("2001:db8::1", 1, 0, 0), "2001:db8::1"),
    ],
)
def test_client_ip(peer, ip):
    assert client_ip(peer) == ip


# --- Limits --------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_burst_then_rate():
    clock = Clock()
    limiter = RateLimiter(rate=5, burst=10, clock=clock)
    assert all(limiter.allow("192.0.2.1") for _ in range(10))
    assert not limiter.allow("192.0.2.1")
    assert limiter.allow("192.0.2.2")  # each address has its own bucket
    clock.now += 0.2  # one token back
    assert limiter.allow("192.0.2.1")
    assert not limiter.allow("192.0.2.1")
    clock.now += 3600  # refills up to the burst, no further
    assert sum(limiter.allow("192.0.2.1") for _ in range(20)) == 10


def test_token_bucket_refusals_do_not_take_tokens():
    clock = Clock()
    limiter = RateLimiter(rate=1, burst=2, clock=clock)
    assert limiter.allow("a") and limiter.allow("a")
    for _ in range(5):
        assert not limiter.allow("a")
    clock.now += 1
    assert limiter.allow("a")


def test_token_bucket_burst_is_at_least_one_message():
    limiter = RateLimiter(rate=0.1, burst=0.2, clock=Clock())
    assert limiter.allow("a")
    assert not limiter.allow("a")


def test_token_bucket_forgets_idle_addresses():
    clock = Clock()
    limiter = RateLimiter(rate=1, burst=2, clock=clock)
    for number in range(10_001):
        limiter.allow(f"10.0.{number // 256}.{number % 256}")
    assert len(limiter) == 10_001  # none full yet: all kept (and the next scan waits for twice as many)
    clock.now += 10  # those buckets are full again: the next scan drops them
    for number in range(10_005):
        limiter.allow(f"10.1.{number // 256}.{number % 256}")
    assert len(limiter) == 10_005


def test_connection_counter():
    counter = ConnectionCounter(limit=2)
    assert counter.open("a") and counter.open("a")
    assert not counter.open("a")
    assert counter.open("b")
    counter.close("a")
    assert counter.open("a")
    counter.close("a")
    counter.close("a")
    assert counter.count("a") == 0


# --- Asking for processing ---------------------------------------------------------------------


def test_process_requests_coalesce():
    calls: list[float] = []
    last_request = 0.0

    async def main():
        nonlocal last_request
        requests = ProcessRequests(lambda: calls.append(time.monotonic()), interval=0.2)
        for _ in range(50):
            requests.request()
            last_request = time.monotonic()
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.5)
        assert requests._task is None and requests._timer is None  # all published before flush
        await requests.flush()

    asyncio.run(main())
    # The first at once, then at most one per interval, and one after the last request.
    assert 2 <= len(calls) < 50
    assert all(b - a >= 0.19 for a, b in zip(calls, calls[1:], strict=False))
    assert calls[-1] >= last_request


def test_process_requests_survive_a_broker_failure():
    attempts = 0

    def failing() -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionError("redis is down")

    async def main():
        requests = ProcessRequests(failing, interval=0.01)
        requests.request()
        await asyncio.sleep(0.1)
        requests.request()
        await asyncio.sleep(0.1)
        await requests.flush()

    asyncio.run(main())
    assert attempts == 2


def test_process_requests_flush_publishes_what_is_wanted():
    calls = []

    async def main():
        requests = ProcessRequests(lambda: calls.append(1), interval=60)
        requests.request()
        await asyncio.sleep(0.05)
        requests.request()  # waits for the interval: flush publishes it now
        await requests.flush()

    asyncio.run(main())
    assert len(calls) == 2


# --- The handler -------------------------------------------------------------------------------


class FakeRequests:
    def __init__(self) -> None:
        self.count = 0

    def request(self) -> None:
        self.count += 1


def handler(store=None, rate: float = 100.0) -> InboundHandler:
    stored = []

    def default_store(mail_from, recipients, raw, peer):
        stored.append((mail_from, list(recipients), raw, peer, threading.current_thread()))
        return f"id{len(stored)}"

    made = InboundHandler(
        bounce_domain=BOUNCES,
        unsubscribe_address=UNSUBSCRIBE,
        rate=RateLimiter(rate, 2 * rate),
        connections=ConnectionCounter(5),
        requests=FakeRequests(),  # type: ignore[arg-type]
        store=store or default_store,
    )
    made.stored = stored  # type: ignore[attr-defined]
    return made


def session(ip: str = "192.0.2.10") -> Session:
    made = Session(loop=None)  # type: ignore[arg-type]
    made.peer = (ip, 50000)
    return made


class FakeServer:
    transport = None


def test_rcpt_policy_and_recipient_cap():
    h, s, envelope = handler(), session(), Envelope()

    async def main():
        assert await h.handle_RCPT(FakeServer(), s, envelope, "x@other.com", []) == RELAYING_DENIED
        for number in range(MAX_RECIPIENTS):
            assert (await h.handle_RCPT(FakeServer(), s, envelope, f"b+{number}@{BOUNCES}", [])).startswith("250")
        assert (await h.handle_RCPT(FakeServer(), s, envelope, f"b@{BOUNCES}", [])).startswith("452 4.5.3")

    asyncio.run(main())
    assert len(envelope.rcpt_tos) == MAX_RECIPIENTS


def test_mail_rate_limited_per_address():
    h = handler(rate=1)

    async def main():
        replies = [await h.handle_MAIL(FakeServer(), session(), Envelope(), "<>", []) for _ in range(3)]
        other = await h.handle_MAIL(FakeServer(), session("192.0.2.99"), Envelope(), "<>", [])
        return replies, other

    replies, other = asyncio.run(main())
    assert [r[:3] for r in replies] == ["250", "250", "451"]
    assert replies[2] == TOO_FAST
    assert other.startswith("250")


def test_mail_refused_while_draining():
    h = handler()
    h.draining = True
    assert asyncio.run(h.handle_MAIL(FakeServer(), session(), Envelope(), "a@b.c", [])) == SHUTTING_DOWN


def test_data_stores_in_a_thread_then_acknowledges():
    h, envelope = handler(), Envelope()
    envelope.mail_from = "<>"
    envelope.rcpt_tos = [f"bounce+x@{BOUNCES}"]
    envelope.original_content = b"From: MAILER-DAEMON\r\n\r\nbounced\r\n"
    reply = asyncio.run(h.handle_DATA(FakeServer(), session(), envelope))
    assert reply == "250 2.0.0 Ok: stored as id1"
    ((mail_from, recipients, raw, peer, thread),) = h.stored  # type: ignore[attr-defined]
    assert (mail_from, recipients, raw, peer) == ("", [f"bounce+x@{BOUNCES}"], envelope.original_content, "192.0.2.10")
    assert thread is not threading.main_thread()
    assert h.requests.count == 1  # type: ignore[attr-defined]
    assert h.accepted == 1


def test_data_not_acknowledged_when_the_store_fails():
    def broken(*_args):
        raise OperationalError(
            "INSERT INTO inbound_messages ...", {"raw": b"secret body"}, Exception("database is locked")
        )

    h, envelope = handler(store=broken), Envelope()
    envelope.mail_from = "a@b.c"
    envelope.rcpt_tos = [f"bounce@{BOUNCES}"]
    envelope.original_content = b"secret body"
    with capture_logs() as logs:
        assert asyncio.run(h.handle_DATA(FakeServer(), session(), envelope)) == NOT_STORED
    assert h.requests.count == 0  # type: ignore[attr-defined]
    logged = repr(logs)
    assert "database is locked" in logged
    assert "secret body" not in logged  # the reason is logged, never the mail


def test_tls_needs_both_files(env, tmp_path):
    env.setenv("SMARTMAIL_INBOUND_TLS_CERT", str(tmp_path / "cert.pem"))
    get_settings.forget()
    with pytest.raises(SettingsError, match="SMARTMAIL_INBOUND_TLS_KEY"):
        tls_context(get_settings())
    env.setenv("SMARTMAIL_INBOUND_TLS_KEY", str(tmp_path / "key.pem"))
    get_settings.forget()
    with pytest.raises(SettingsError, match="cannot load"):
        tls_context(get_settings())
