"""Bounces and complaints end to end: a campaign through the SMTP server with VERP return paths,
then DSNs and ARF reports delivered by SMTP to a real `smartmail inbound`, processed by a real
events worker: messages bounced, contacts suppressed, the next campaign skips them; the
complaint-rate auto-pause; a kill -9 of the events worker mid-processing."""

from __future__ import annotations

import smtplib
import sys
import time
from email.utils import formatdate

import pytest
from sqlalchemy import func, insert, select

from smartmail.audience.contacts import add_members, create_contact, create_list
from smartmail.campaigns import lifecycle as campaigns
from smartmail.content import return_path
from smartmail.content.template_store import save_template
from smartmail.feedback import inbound
from smartmail.store.engine import session_scope
from smartmail.store.ids import new_ids
from smartmail.store.models import Campaign, Contact, Event, InboundMessage, Message, Suppression
from smartmail.workers.dispatch import publish
from tests.conftest import reset_caches, wait_for
from tests.integration.conftest import Process, ReceivedMessage, free_port

pytestmark = pytest.mark.integration

BOUNCE_DOMAIN = "bounces.example.com"


def postfix_dsn(original: ReceivedMessage, status: str = "5.1.1", action: str = "failed") -> bytes:
    """A DSN as Postfix writes it (RFC 3464), to the message's envelope sender, with its headers."""
    recipient = original.rcpt_tos[0]
    headers = original.data.split(b"\r\n\r\n", 1)[0].decode()
    diagnostic = {
        "5.1.1": f"550 5.1.1 <{recipient}>: Recipient address rejected: User unknown in virtual mailbox table",
        "4.2.2": f"452 4.2.2 <{recipient}>: Mailbox full",
    }.get(status, f"550 {status} rejected")
    return (
        f"From: MAILER-DAEMON@mx.example.org (Mail Delivery System)\r\n"
        f"To: {original.mail_from}\r\n"
        f"Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {formatdate()}\r\n"
        f"Auto-Submitted: auto-replied\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="DSN.b1"\r\n'
        f"\r\n"
        f"--DSN.b1\r\n"
        f"Content-Type: text/plain; charset=us-ascii\r\n"
        f"\r\n"
        f"I'm sorry to have to inform you that your message could not be delivered.\r\n"
        f"\r\n"
        f"--DSN.b1\r\n"
        f"Content-Type: message/delivery-status\r\n"
        f"\r\n"
        f"Reporting-MTA: dns; mx.example.org\r\n"
        f"Arrival-Date: {formatdate()}\r\n"
        f"\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\n"
        f"Original-Recipient: rfc822;{recipient}\r\n"
        f"Action: {action}\r\n"
        f"Status: {status}\r\n"
        f"Remote-MTA: dns; mailstore.example.org\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n"
        f"\r\n"
        f"--DSN.b1\r\n"
        f"Content-Type: text/rfc822-headers\r\n"
        f"\r\n"
        f"{headers}\r\n"
        f"\r\n"
        f"--DSN.b1--\r\n"
    ).encode()


def arf_report(original: ReceivedMessage) -> bytes:
    """An RFC 5965 abuse report about a message, as a mailbox provider's feedback loop sends it."""
    head, body = original.data.split(b"\r\n\r\n", 1)
    returned = f"Return-Path: <{original.mail_from}>\r\n".encode() + head + b"\r\n\r\n" + body[:2000]
    return (
        (
            f"From: feedbackloop@fbl.example.net\r\n"
            f"To: fbl@{BOUNCE_DOMAIN}\r\n"
            f"Subject: FW: complaint\r\n"
            f"Date: {formatdate()}\r\n"
            f"MIME-Version: 1.0\r\n"
            f'Content-Type: multipart/report; report-type=feedback-report; boundary="ARF.b2"\r\n'
            f"\r\n"
            f"--ARF.b2\r\n"
            f"Content-Type: text/plain\r\n"
            f"\r\n"
            f"This is an email abuse report for an email message received.\r\n"
            f"\r\n"
            f"--ARF.b2\r\n"
            f"Content-Type: message/feedback-report\r\n"
            f"\r\n"
            f"Feedback-Type: abuse\r\n"
            f"User-Agent: ExampleFBL/1.0\r\n"
            f"Version: 1\r\n"
            f"Original-Mail-From: <{original.mail_from}>\r\n"
            f"Original-Rcpt-To: <{original.rcpt_tos[0]}>\r\n"
            f"Arrival-Date: {formatdate()}\r\n"
            f"\r\n"
            f"--ARF.b2\r\n"
            f"Content-Type: message/rfc822\r\n"
            f"\r\n"
        ).encode()
        + returned
        + b"\r\n--ARF.b2--\r\n"
    )


@pytest.fixture
def relay(env, smtp_server, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_SMTP_URL", f"smtp://127.0.0.1:{smtp_server.port}?tls=none")
    monkeypatch.setenv("SMARTMAIL_BOUNCE_DOMAIN", BOUNCE_DOMAIN)
    monkeypatch.setenv("SMARTMAIL_AUTO_PAUSE_MIN_DELIVERED", "10")
    monkeypatch.setenv("SMARTMAIL_AUTO_PAUSE_COMPLAINT_RATE", "0.05")
    reset_caches()
    with session_scope() as session:
        save_template(session, "news", subject="News", html="<p>Hello {{ email }}</p>", text="Hello {{ email }}")
    return smtp_server


@pytest.fixture
def inbound_server(relay, tmp_path):
    """A `smartmail inbound` process on a free port; its port."""
    port = free_port()
    argv = [sys.executable, "-m", "smartmail.cli", "inbound", "--host", "127.0.0.1", "--port", str(port)]
    process = Process(argv, tmp_path / "inbound.log")

    def ready() -> bool:
        assert process.alive(), process.output()
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=2) as client:
                return client.noop()[0] == 250
        except OSError:
            return False

    wait_for(ready, 30, message="smartmail inbound ready")
    yield port
    process.kill()


def deliver(port: int, mail_from: str, rcpt: str, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(mail_from, [rcpt], data)


def campaign_to(name: str, emails: list[str], **options) -> None:
    campaigns.create_campaign(name, template="news", lists=["people"], **options)
    campaigns.launch_campaign(name)


def _people(count: int) -> list[str]:
    emails = [f"person{i}@example.org" for i in range(count)]
    create_list("people")
    for email in emails:
        create_contact(email)
    add_members("people", emails)
    return emails


def test_dsns_and_a_complaint_by_smtp_bounce_suppress_and_spare_the_next_campaign(relay, inbound_server, shared_worker):
    emails = _people(12)
    shared_worker(queues="bulk,events,default")
    campaign_to("first", emails)
    wait_for(lambda: relay.count >= 12, 60, message="the first campaign delivered")
    by_recipient = {m.rcpt_tos[0]: m for m in relay.messages}
    # Every message went out with its own signed return path, naming it.
    with session_scope() as session:
        ids = {row.recipient: row.id for row in session.execute(select(Message.recipient, Message.id))}
    for email, received in by_recipient.items():
        assert received.mail_from == return_path.bounce_address(ids[email])
        assert return_path.message_of(received.mail_from) == ids[email]

    hard, soft, complainer = emails[0:3], emails[3], emails[4]
    for email in hard:
        original = by_recipient[email]
        deliver(inbound_server, "", original.mail_from, postfix_dsn(original))
    deliver(inbound_server, "", by_recipient[soft].mail_from, postfix_dsn(by_recipient[soft], "4.2.2"))
    deliver(inbound_server, "fbl@fbl.example.net", f"fbl@{BOUNCE_DOMAIN}", arf_report(by_recipient[complainer]))
    # The same DSN again (relays retry): processed, and changes nothing more.
    deliver(inbound_server, "", by_recipient[hard[0]].mail_from, postfix_dsn(by_recipient[hard[0]]))

    def processed() -> bool:
        with session_scope() as session:
            return not session.scalar(select(func.count()).where(InboundMessage.state == "pending")) and (
                session.scalar(select(func.count()).select_from(InboundMessage)) == 6
            )

    wait_for(processed, 60, message="the inbound mail processed")
    with session_scope() as session:
        states = {row.recipient: row.state for row in session.execute(select(Message.recipient, Message.state))}
        suppressions = {row.email: row.reason for row in session.execute(select(Suppression.email, Suppression.reason))}
        statuses = {row.email: row.status for row in session.execute(select(Contact.email, Contact.status))}
        bounced_events = session.scalar(select(func.count()).where(Event.type == "bounced"))
        first = session.scalar(select(Campaign).where(Campaign.name == "first"))
        counters = (first.hard_bounces, first.soft_bounces, first.complaints)
    assert {e for e, s in states.items() if s == "bounced"} == set(hard)
    assert states[soft] == "sent" and states[complainer] == "sent"
    assert suppressions == {**dict.fromkeys(hard, "hard_bounce"), complainer: "complaint"}
    assert {e for e, s in statuses.items() if s != "subscribed"} == {*hard, complainer}
    assert statuses[complainer] == "complained"
    assert bounced_events == 4  # three hard, one soft; the repeated DSN added none
    assert counters == (3, 1, 1)

    relay.reset()
    campaign_to("second", emails)
    wait_for(lambda: relay.count >= 8, 60, message="the second campaign delivered")
    time.sleep(0.5)
    assert sorted(m.rcpt_tos[0] for m in relay.messages) == sorted(set(emails) - {*hard, complainer})


def test_a_campaign_pauses_itself_when_complaints_pass_the_threshold(relay, inbound_server, shared_worker):
    emails = _people(60)
    shared_worker(queues="bulk,events,default")
    campaign_to("slow", emails, rate_cap=4)  # 15 s to send: the complaints arrive while it sends
    wait_for(lambda: relay.count >= 12, 60, message="a dozen delivered")
    for received in list(relay.messages)[:2]:  # 2 of at least 12 delivered: over 5%
        deliver(inbound_server, "fbl@fbl.example.net", f"fbl@{BOUNCE_DOMAIN}", arf_report(received))

    def paused() -> bool:
        return campaigns.get_campaign("slow")["state"] == "paused"

    wait_for(paused, 30, message="the campaign paused itself")
    reason = campaigns.get_campaign("slow")["paused_reason"]
    assert reason.startswith("complaint rate ") and "passed 5.00%" in reason
    delivered_at_pause = relay.count
    time.sleep(1.5)
    assert relay.count <= delivered_at_pause + 4  # at most what was already in flight
    assert relay.count < len(emails)


def test_spooled_mail_survives_a_kill_9_of_the_events_worker_and_is_applied_once(relay, start_worker):
    count = 2000
    ids = new_ids(count)
    with session_scope() as session:  # sent messages, as a campaign's delivery leaves them
        session.execute(
            insert(Message),
            [
                {
                    "id": message_id,
                    "state": "sent",
                    "sender": "news@example.com",
                    "recipient": f"r{i}@example.org",
                    "subject": "News",
                    "text": "Hello",
                    "headers": {},
                    "tags": [],
                    "message_id_header": f"<{message_id}@example.com>",
                }
                for i, message_id in enumerate(ids)
            ],
        )
    for i, message_id in enumerate(ids):  # spooled as the inbound server does, before any processing
        original = ReceivedMessage(
            return_path.bounce_address(message_id),
            [f"r{i}@example.org"],
            f"Message-ID: <{message_id}@example.com>\r\nSubject: News\r\n\r\nHello".encode(),
            time.time(),
        )
        inbound.spool("", [original.mail_from], postfix_dsn(original), "127.0.0.1")

    def processed() -> int:
        with session_scope() as session:
            return session.scalar(select(func.count()).where(InboundMessage.state == "processed"))

    events = start_worker(queues="events", concurrency=1)
    publish(inbound.PROCESS_TASK)
    wait_for(lambda: processed() > 0, 60, interval=0.01, message="processing started")
    events.kill9()
    done_at_kill = processed()
    assert done_at_kill < count, "the kill came too late to interrupt processing"

    start_worker(queues="events", concurrency=1)
    publish(inbound.PROCESS_TASK)
    wait_for(lambda: processed() == count, 120, message="every spooled DSN processed after the restart")
    with session_scope() as session:
        bounced = session.scalar(select(func.count()).where(Message.state == "bounced"))
        events_per_message = session.execute(
            select(Event.message_id, func.count()).where(Event.type == "bounced").group_by(Event.message_id)
        ).all()
        suppressed = session.scalar(select(func.count()).select_from(Suppression))
    assert bounced == count and suppressed == count
    assert len(events_per_message) == count and {n for _, n in events_per_message} == {1}
