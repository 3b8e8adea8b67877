"""`smartmail inbound` as a real process: what it accepts, refuses and stores, its limits, STARTTLS and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import ssl
import sys
import time

import pytest
import redis
import trustme
from sqlalchemy import create_engine, text

from smartmail.feedback.inbound import PROCESS_TASK
from tests.conftest import RUN_PREFIX, wait_for
from tests.integration.conftest import Process, free_port

BOUNCES = "bounces.example.com"
UNSUBSCRIBE = "unsubscribe@example.com"  # the default: unsubscribe@<the default sender's domain>

# A DSN as a Postfix MTA sends it (RFC 3464), with a line that starts with a dot (dot-stuffed on the
# wire, RFC 5321 section 4.5.2) and an 8-bit byte, to check the stored bytes are the ones sent.
DSN = (
    b"From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n"
    b"To: bounce+0123abc@bounces.example.com\r\n"
    b"Subject: Undelivered Mail Returned to Sender\r\n"
    b"Auto-Submitted: auto-replied\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Ihre Nachricht konnte nicht zugestellt werden: Empf\xe4nger unbekannt.\r\n"
    b".a line that starts with a dot\r\n"
    b"--b1\r\n"
    b"Content-Type: message/delivery-status\r\n"
    b"\r\n"
    b"Reporting-MTA: dns; mx.example.net\r\n"
    b"\r\n"
    b"Final-Recipient: rfc822; gone@example.org\r\n"
    b"Action: failed\r\n"
    b"Status: 5.1.1\r\n"
    b"Diagnostic-Code: smtp; 550 5.1.1 <gone@example.org>: Recipient address rejected\r\n"
    b"--b1--\r\n"
)


class Inbound:
    """A running `smartmail inbound` and the means to talk to it and to read what it stored."""

    def __init__(self, process: Process, port: int, database_url: str) -> None:
        self.process, self.port, self.database_url = process, port, database_url
        self.clients: list[smtplib.SMTP] = []

    def connect(self) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
        self.clients.append(client)
        return client

    def stored(self) -> list[dict]:
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    text("SELECT state, peer, mail_from, recipients, raw FROM inbound_messages ORDER BY received_at")
                ).mappings()
                # JSON comes back as text from SQLite's driver, decoded from PostgreSQL's.
                return [{**row, "recipients": _json(row["recipients"])} for row in rows]
        finally:
            engine.dispose()


def _json(value):
    return json.loads(value) if isinstance(value, str) else value


@pytest.fixture
def start_inbound(env, monkeypatch, tmp_path):
    """start_inbound(SMARTMAIL_X=value, …): a `smartmail inbound` process with these settings on top of
    the test's, ready to take connections; killed (SIGKILL) when the test ends."""
    engine = create_engine(env["SMARTMAIL_DATABASE_URL"])
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM inbound_messages"))
    engine.dispose()
    started: list[Inbound] = []

    def start(*extra: str, **settings: str) -> Inbound:
        monkeypatch.setenv("SMARTMAIL_BOUNCE_DOMAIN", BOUNCES)
        monkeypatch.setenv("SMARTMAIL_LOG_LEVEL", "INFO")
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        port = free_port()
        argv = [sys.executable, "-m", "smartmail.cli", "inbound", "--host", "127.0.0.1", "--port", str(port), *extra]
        process = Process(argv, tmp_path / f"inbound-{len(started)}.log")
        inbound = Inbound(process, port, env["SMARTMAIL_DATABASE_URL"])
        started.append(inbound)
        wait_for(
            lambda: "listening on" in process.output() or not process.alive(),
            30,
            interval=0.02,
            message="smartmail inbound ready",
        )
        assert process.alive(), process.output()
        return inbound

    yield start
    for inbound in started:
        for client in inbound.clients:
            try:
                client.close()
            except OSError:
                pass
        inbound.process.kill()


def published(redis_url: str) -> int:
    """How many PROCESS_TASK messages wait in this run's Celery queues."""
    client = redis.Redis.from_url(redis_url)
    count = 0
    for key in client.scan_iter(match=f"{RUN_PREFIX}*"):
        if client.type(key) == b"list":
            count += sum(PROCESS_TASK.encode() in item for item in client.lrange(key, 0, -1))
    return count


def test_a_dsn_is_stored_exactly_then_acknowledged(start_inbound, env):
    inbound = start_inbound()
    client = inbound.connect()
    code, features = client.ehlo("mx.example.net")
    assert code == 250
    assert client.has_extn("8bitmime") and client.has_extn("size")
    assert not client.has_extn("auth") and not client.has_extn("starttls")
    recipients = ["bounce+0123abc@BOUNCES.Example.com", UNSUBSCRIBE]
    # Null reverse-path: a DSN is never answered (RFC 5321 section 4.5.5).
    refused = client.sendmail("<>", recipients, DSN, mail_options=["BODY=8BITMIME"])
    assert refused == {}
    client.quit()
    (row,) = inbound.stored()
    assert bytes(row["raw"]) == DSN
    assert row["mail_from"] == ""
    assert row["recipients"] == recipients
    assert row["peer"] == "127.0.0.1"
    assert row["state"] == "pending"
    # The workers are asked to process it (by name, on the broker), once for the one mail.
    wait_for(lambda: published(env["SMARTMAIL_REDIS_URL"]) == 1, 10, message="a PROCESS_TASK publish")
    log = inbound.process.output()
    assert "inbound.accepted" in log and f"size={len(DSN)}" in log and "recipients=2" in log
    assert "Empf" not in log and "Undelivered" not in log  # the content is never logged


def test_relaying_is_refused_and_nothing_stored(start_inbound):
    inbound = start_inbound()
    client = inbound.connect()
    client.ehlo("relay.example.net")
    assert client.mail("spammer@example.net")[0] == 250
    for address in (
        "<user@other.com>",
        '<"a@bounces.example.com"@evil.com>',  # the quoted `@` is the local part's
        "<@bounces.example.com:user@evil.com>",  # a source route through us to elsewhere
        "<user@sub.bounces.example.com>",
        "<unsubscribe@other.com>",
    ):
        code, reply = client.docmd(f"RCPT TO:{address}")
        assert (code, reply) == (550, b"5.7.1 Relaying denied"), address
    assert client.docmd("DATA")[0] == 503  # no recipient was accepted
    client.rset()
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        client.sendmail("a@example.net", ["victim@gmail.com"], b"Subject: relay me\r\n\r\nspam\r\n")
    # A source route that ends at the bounce domain is ours: the route is ignored (RFC 5321 appendix C).
    client.mail("<>")
    assert client.docmd("RCPT TO:<@relay.example.net:bounce+x@bounces.example.com>")[0] == 250
    client.rset()
    client.quit()
    assert inbound.stored() == []


def test_a_mail_that_cannot_be_stored_is_not_acknowledged(start_inbound, env, tmp_path):
    url = env["SMARTMAIL_DATABASE_URL"]
    broken = f"sqlite:///{tmp_path}/missing/smartmail.db" if url.startswith("sqlite") else url + "_missing"
    inbound = start_inbound(SMARTMAIL_DATABASE_URL=broken)
    client = inbound.connect()
    client.ehlo("mx.example.net")
    client.mail("<>")
    client.rcpt("bounce+x@bounces.example.com")
    code, reply = client.data(DSN)
    assert (code, reply[:5]) == (451, b"4.3.0")  # the sender keeps it and tries again later
    client.quit()
    log = inbound.process.output()
    assert "outage.started" in log and "inbound.database" in log
    assert "Empf" not in log and "Undelivered" not in log  # the reason is logged, never the mail


def test_oversize_mail_is_refused_and_nothing_stored(start_inbound):
    inbound = start_inbound(SMARTMAIL_INBOUND_MAX_BYTES="4096")
    client = inbound.connect()
    client.ehlo("mx.example.net")
    assert client.esmtp_features["size"] == "4096"
    # Declared too big (RFC 1870): refused at MAIL.
    assert client.mail("<>", ["SIZE=5000"]) == (552, b"5.3.4 Message size exceeds fixed maximum")
    # Not declared: read to its end, then refused; nothing of it is kept.
    assert client.mail("<>")[0] == 250
    assert client.rcpt("bounce+x@bounces.example.com")[0] == 250
    big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" + (b"y" * 78 + b"\r\n") * 100
    assert client.data(big) == (552, b"5.3.4 Message too big for system")
    # The session goes on: a mail within the limit is taken.
    assert client.sendmail("<>", ["bounce+y@bounces.example.com"], b"Subject: small\r\n\r\nok\r\n") == {}
    client.quit()
    (row,) = inbound.stored()
    assert bytes(row["raw"]) == b"Subject: small\r\n\r\nok\r\n"


def test_connections_per_address_are_limited(start_inbound):
    inbound = start_inbound(SMARTMAIL_INBOUND_MAX_CONNECTIONS_PER_IP="2")
    first, second = inbound.connect(), inbound.connect()
    assert first.noop()[0] == 250 and second.noop()[0] == 250
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        inbound.connect()
    assert refused.value.smtp_code == 421
    assert refused.value.smtp_error.startswith(b"4.7.0")
    first.quit()

    def third_taken() -> bool:
        try:
            return inbound.connect().noop()[0] == 250
        except smtplib.SMTPConnectError:
            return False

    wait_for(third_taken, 10, message="a connection taken after one closed")
    assert second.noop()[0] == 250


def test_messages_per_address_are_rate_limited(start_inbound):
    inbound = start_inbound(SMARTMAIL_INBOUND_RATE_PER_IP="1")  # burst: 2 s worth, 2 messages
    client = inbound.connect()
    client.ehlo("mx.example.net")
    replies = []
    for _ in range(3):
        replies.append(client.mail("<>"))
        client.rset()
    assert [code for code, _ in replies] == [250, 250, 451]
    assert replies[2][1].startswith(b"4.7.1")
    time.sleep(1.1)  # a token back
    assert client.sendmail("<>", ["bounce+x@bounces.example.com"], b"Subject: later\r\n\r\nok\r\n") == {}
    client.quit()
    assert len(inbound.stored()) == 1


def test_starttls(start_inbound, tmp_path):
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "inbound.pem", tmp_path / "inbound.key"
    server.cert_chain_pems[0].write_to_path(str(cert))
    server.private_key_pem.write_to_path(str(key))
    inbound = start_inbound(SMARTMAIL_INBOUND_TLS_CERT=str(cert), SMARTMAIL_INBOUND_TLS_KEY=str(key))
    client = inbound.connect()
    client.ehlo("mx.example.net")
    assert client.has_extn("starttls")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    assert client.starttls(context=context)[0] == 220
    client.ehlo("mx.example.net")
    assert not client.has_extn("starttls") and not client.has_extn("auth")  # no AUTH: nothing is relayed
    assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert client.sendmail("<>", ["bounce+x@bounces.example.com"], DSN) == {}
    client.quit()
    (row,) = inbound.stored()
    assert bytes(row["raw"]) == DSN


def test_sigterm_finishes_the_transaction_under_way_then_exits(start_inbound):
    inbound = start_inbound()
    busy, idle = inbound.connect(), inbound.connect()
    busy.ehlo("mx.example.net")
    idle.ehlo("mx.example.net")
    assert busy.mail("<>")[0] == 250
    assert busy.rcpt("bounce+x@bounces.example.com")[0] == 250
    os.killpg(inbound.process.popen.pid, signal.SIGTERM)
    # No new connections ...

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", inbound.port), timeout=5).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_for(refused, 10, message="the listening socket closed")
    # ... the idle session is told so (RFC 5321 section 3.8) ...
    assert reply_or_421(idle.noop)[0] == 421
    # ... the transaction under way completes and is stored, and the next is refused.
    assert busy.data(b"Subject: last\r\n\r\nok\r\n")[0] == 250
    assert reply_or_421(lambda: busy.mail("<>"))[0] == 421
    assert inbound.process.popen.wait(20) == 0
    assert "stopped (1 message(s) accepted)" in inbound.process.output()
    (row,) = inbound.stored()
    assert bytes(row["raw"]) == b"Subject: last\r\n\r\nok\r\n"


def reply_or_421(command) -> tuple[int, bytes]:
    """The reply to a command sent to a server that is shutting down: its 421, or the end of the
    connection that followed it (RFC 5321 section 3.8: the server closes after the 421)."""
    try:
        return command()
    except smtplib.SMTPServerDisconnected:
        return 421, b"(closed)"
