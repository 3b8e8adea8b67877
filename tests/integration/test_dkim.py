"""DKIM on real parts: worker processes sign what they send, and every message received verifies with dkimpy."""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import dkim as dkimpy
import dns.message
import dns.rcode
import dns.rrset
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from sqlalchemy import func, select

import smartmail
from smartmail.campaigns import lifecycle as campaigns
from smartmail.content import dkim
from smartmail.content.template_store import save_template
from smartmail.store.engine import session_scope
from smartmail.store.models import Message
from tests.conftest import reset_caches, wait_for
from tests.integration.test_campaigns import make_audience

pytestmark = pytest.mark.integration


def write_key(directory: Path, domain: str, selector: str, key) -> None:
    path = directory / domain / f"{selector}.pem"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory) -> Path:
    """One directory for the module (the shared worker is kept while settings stay the same):
    example.com (the tests' default sender) has RSA-2048 and Ed25519 keys, ed.example Ed25519 only."""
    directory = tmp_path_factory.mktemp("dkim-keys")
    write_key(directory, "example.com", "rsa2048", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    write_key(directory, "example.com", "ed1", ed25519.Ed25519PrivateKey.generate())
    write_key(directory, "ed.example", "ed2", ed25519.Ed25519PrivateKey.generate())
    return directory


@pytest.fixture
def relay(env, smtp_server, keys_dir, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_SMTP_URL", f"smtp://127.0.0.1:{smtp_server.port}?tls=none")
    monkeypatch.setenv("SMARTMAIL_PUBLIC_URL", "https://mail.example.com")
    monkeypatch.setenv("SMARTMAIL_DKIM_KEYS", str(keys_dir))
    reset_caches()
    return smtp_server


def dns_for(directory: Path):
    """dkimpy's DNS look-up, answering with the record `smartmail dkim generate` prints for each key."""
    records = {
        f"{key.selector}._domainkey.{domain}.".encode(): key.dns_value().encode()
        for domain, keys in dkim.load_keys(directory).keys.items()
        for key in keys
    }
    return lambda name, timeout=5: records.get(name)


def verdicts(data: bytes, directory: Path) -> list[tuple[str, bool]]:
    """(algorithm, dkimpy's verdict) for each DKIM-Signature, top first."""
    verifier = dkimpy.DKIM(data)
    signatures = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
    found = []
    for i, value in enumerate(signatures):
        algorithm = "ed25519-sha256" if b"a=ed25519-sha256" in value else "rsa-sha256"
        try:
            found.append((algorithm, bool(verifier.verify(idx=i, dnsfunc=dns_for(directory)))))
        except dkimpy.DKIMException:
            found.append((algorithm, False))
    return found


BOTH = [("rsa-sha256", True), ("ed25519-sha256", True)]


def states() -> collections.Counter:
    with session_scope() as session:
        return collections.Counter(
            dict(session.execute(select(Message.state, func.count()).group_by(Message.state)).all())
        )


def test_every_transactional_message_verifies_with_rsa_and_ed25519(relay, shared_worker, keys_dir):
    shared_worker(concurrency=2)
    for i in range(30):
        if i % 3 == 0:
            smartmail.send(f"p{i}@example{i % 4}.org", subject=f"Receipt {i}", text=f"Thanks  for order {i}.  \n\n")
        elif i % 3 == 1:
            smartmail.send(
                f"Person {i} <p{i}@example{i % 4}.org>",
                template="welcome",
                context={"first_name": f"Person{i}", "email": f"p{i}@example.org", "plan": "<Pro & Co>"},
                headers={"X-Order-Id": f"order-{i}"},
                reply_to="help@example.com",
            )
        else:
            smartmail.send(
                f"p{i}@example{i % 4}.org",
                subject="Grüße, a subject long enough to be folded over more than one line of the header " * 2,
                text="Ünïcode body " * 50,
                html="<p>" + "Ünïcode body " * 50 + "</p>",
            )
    wait_for(lambda: relay.count >= 30, 120, message="30 messages at the SMTP server")
    assert len(relay.messages) == 30
    for received in relay.messages:
        assert verdicts(received.data, keys_dir) == BOTH, received.data[:2000]
        assert received.data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com;")


def test_a_header_prepended_after_receipt_fails_verification(relay, shared_worker, keys_dir):
    shared_worker(concurrency=2)
    smartmail.send("ann@example.org", subject="Your invoice", text="Pay by Friday.")
    wait_for(lambda: relay.count >= 1, 60, message="the message at the SMTP server")
    data = relay.messages[0].data
    assert verdicts(data, keys_dir) == BOTH
    for field in (b"From: Billing <billing@example.com>", b"Subject: Your invoice (new bank details)"):
        assert verdicts(field + b"\r\n" + data, keys_dir) == [("rsa-sha256", False), ("ed25519-sha256", False)]
    body_changed = data.replace(b"Pay by Friday.", b"Pay by Monday.")
    assert verdicts(body_changed, keys_dir) == [("rsa-sha256", False), ("ed25519-sha256", False)]
    # Trace fields added by relays are not signed and do not matter.
    assert verdicts(b"Received: from mx.example.org by mx2; Fri, 4 Dec 2026\r\n" + data, keys_dir) == BOTH


def test_only_domains_with_keys_are_signed(relay, shared_worker, keys_dir):
    shared_worker(concurrency=2)
    smartmail.send("ann@example.org", subject="From ed", text="x", from_="Ed <news@ed.example>")
    smartmail.send("bob@example.org", subject="From other", text="x", from_="news@unsigned.example")
    wait_for(lambda: relay.count >= 2, 60, message="two messages at the SMTP server")
    by_rcpt = {m.rcpt_tos[0]: m.data for m in relay.messages}
    assert verdicts(by_rcpt["ann@example.org"], keys_dir) == [("ed25519-sha256", True)]
    assert b"d=ed.example;" in by_rcpt["ann@example.org"].split(b"\r\nFrom:")[0]
    assert b"DKIM-Signature" not in by_rcpt["bob@example.org"]


def test_every_campaign_message_verifies(relay, shared_worker, keys_dir):
    eligible = make_audience(200)
    with session_scope() as session:
        save_template(session, "news", subject="News for {{ first_name }}", html="<p>Hi {{ first_name }}</p>")
    shared_worker(concurrency=2, queues="bulk,default")
    campaigns.create_campaign("signed", template="news", lists=["news"])
    campaigns.launch_campaign("signed")
    wait_for(lambda: relay.count >= len(eligible), 120, interval=0.3, message=f"{len(eligible)} campaign messages")
    for received in relay.messages:
        assert verdicts(received.data, keys_dir) == BOTH
        signature = received.data.split(b"\r\nDKIM-Signature:")[0]
        assert b"List-Unsubscribe:List-Unsubscribe-Post:" in b"".join(signature.split())  # RFC 8058 section 4


def test_a_bad_key_file_defers_its_domain_until_it_is_fixed(env, smtp_server, monkeypatch, start_worker, tmp_path):
    directory = tmp_path / "keys"
    (directory / "example.com").mkdir(parents=True)
    broken = directory / "example.com" / "s1.pem"
    broken.write_bytes(b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    write_key(directory, "ed.example", "ed2", ed25519.Ed25519PrivateKey.generate())
    write_key(directory, "bad;d=evil.example", "s1", ed25519.Ed25519PrivateKey.generate())
    monkeypatch.setenv("SMARTMAIL_SMTP_URL", f"smtp://127.0.0.1:{smtp_server.port}?tls=none")
    monkeypatch.setenv("SMARTMAIL_DKIM_KEYS", str(directory))
    reset_caches()
    worker = start_worker(concurrency=1)
    sent = smartmail.send("ann@example.org", subject="Waits for its key", text="x")
    # Another domain's mail is signed and sent meanwhile; the refused folder signs nothing.
    smartmail.send("bob@example.org", subject="From ed", text="x", from_="Ed <news@ed.example>")
    wait_for(lambda: states().get("deferred"), 60, interval=0.2, message="the message deferred")
    wait_for(lambda: smtp_server.count >= 1, 60, interval=0.2, message="the other domain's message sent")
    with session_scope() as session:
        code, reply = session.execute(select(Message.smtp_code, Message.smtp_reply).where(Message.id == sent.id)).one()
    assert code == 451 and reply.startswith("4.3.5 message not signed") and str(broken) in reply
    assert "bm90IGEga2V5" not in reply
    assert [m.rcpt_tos[0] for m in smtp_server.messages] == ["bob@example.org"]
    assert verdicts(smtp_server.messages[0].data, directory) == [("ed25519-sha256", True)]
    assert "bm90IGEga2V5" not in worker.output() and "bad;d=evil.example" in worker.output()
    write_key(directory, "example.com", "s1", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    wait_for(lambda: smtp_server.count >= 2, 60, interval=0.2, message="the message sent once the key is fixed")
    assert verdicts(smtp_server.messages[1].data, directory) == [("rsa-sha256", True)]


class TxtServer:
    """A DNS server on UDP answering TXT queries from `records` (name → character-strings), NXDOMAIN otherwise."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            question = query.question[0]
            strings = self.records.get(question.name.to_text().rstrip("."))
            if strings == ["SERVFAIL"]:
                response.set_rcode(dns.rcode.SERVFAIL)
            elif strings is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
            else:
                text = " ".join(f'"{part}"' for part in strings)
                response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "TXT", text))
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def dns_server():
    server = TxtServer({})
    yield server
    server.close()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smartmail.cli", "dkim", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_generate_then_check_against_a_dns_server(monkeypatch, tmp_path, dns_server):
    monkeypatch.setenv("SMARTMAIL_DEFAULT_SENDER", "news@news.example")
    monkeypatch.setenv("SMARTMAIL_SECRET_KEY", "integration-test-secret-0123")
    monkeypatch.setenv("SMARTMAIL_DKIM_KEYS", str(tmp_path / "keys"))
    made = cli("generate", "news.example", "--selector", "2026a")
    assert made.returncode == 0, made.stderr
    name, record = made.stdout.splitlines()[-2:]
    assert name == "2026a._domainkey.news.example. IN TXT"
    strings = record.split('"')[1::2]  # as a zone file would take them: quoted strings of <= 255 octets
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    nameserver = f"127.0.0.1:{dns_server.port}"

    missing = cli("check", "news.example", "--nameserver", nameserver)
    assert missing.returncode == 1 and "2026a._domainkey.news.example: missing" in missing.stderr

    dns_server.records["2026a._domainkey.news.example"] = strings
    ok = cli("check", "news.example", "--nameserver", nameserver)
    assert ok.returncode == 0 and "ok: 2026a._domainkey.news.example publishes the key" in ok.stdout

    other = cli("generate", "other.example", "--selector", "2026a")
    dns_server.records["2026a._domainkey.news.example"] = other.stdout.splitlines()[-1].split('"')[1::2]
    mismatch = cli("check", "news.example", "--nameserver", nameserver)
    assert mismatch.returncode == 1 and "mismatch: the published public key differs" in mismatch.stderr

    dns_server.records["2026a._domainkey.news.example"] = ["SERVFAIL"]
    failing = cli("check", "news.example", "--nameserver", nameserver)
    assert failing.returncode not in (0, 1) and "DNS unreachable looking up 2026a._domainkey" in failing.stderr
