"""The transactional send path on real parts: Redis, celery worker processes, beat, and an SMTP server."""

from __future__ import annotations

import collections
import threading
import time
from datetime import UTC

import pytest
from sqlalchemy import func, select

import smartmail
from smartmail.store.engine import session_scope
from smartmail.store.models import Message, Suppression
from tests.conftest import clear_redis, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def relay(env, smtp_server, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_SMTP_URL", f"smtp://127.0.0.1:{smtp_server.port}?tls=none")
    from tests.conftest import reset_caches

    reset_caches()
    return smtp_server


def states() -> collections.Counter:
    with session_scope() as session:
        return collections.Counter(
            dict(session.execute(select(Message.state, func.count()).group_by(Message.state)).all())
        )


def wait_until_final(total: int, timeout: float = 120) -> collections.Counter:
    final = {"sent", "failed", "suppressed", "unknown"}
    return wait_for(
        lambda: (c := states()) and sum(v for k, v in c.items() if k in final) >= total and c,
        timeout,
        interval=0.2,
        message=f"{total} messages in a final state",
    )


def test_300_personalized_messages_arrive_exactly_once(relay, shared_worker):
    shared_worker(concurrency=2)
    people = [(f"Person{i} <p{i}@example{i % 7}.org>", f"Person{i}", f"p{i}@example{i % 7}.org") for i in range(300)]
    results = [
        smartmail.send(
            to,
            template="welcome",
            context={"first_name": name, "email": addr, "plan": "<Pro & Co>"},
            headers={"X-Order-Id": f"order-{i}"},
            tags=["welcome"],
            reply_to="help@example.com",
        )
        for i, (to, name, addr) in enumerate(people)
    ]
    assert len({r.id for r in results}) == 300 and {r.state for r in results} == {"queued"}
    wait_for(lambda: relay.count >= 300, 120, message="300 messages at the SMTP server")
    assert wait_until_final(300)["sent"] == 300

    ids = relay.message_ids()
    assert len(ids) == len(set(ids)) == 300
    with session_scope() as session:
        rows = {m.message_id_header: m for m in session.scalars(select(Message))}
    by_rcpt = {m.rcpt_tos[0]: m for m in relay.messages}
    for i, (to, name, addr) in enumerate(people):
        message = by_rcpt[addr].parsed()
        assert message["To"] == to
        assert message["Subject"] == f"Welcome to SmartMail, {name}!"
        assert message["X-Order-Id"] == f"order-{i}"
        assert message["Reply-To"] == "help@example.com"
        assert rows[message["Message-ID"]].recipient == to
        html = message.get_body(("html",)).get_content()
        plain = message.get_body(("plain",)).get_content()
        assert f"Hello {name}," in html and f"<b>{addr}</b>" in html
        assert "&lt;Pro &amp; Co&gt;" in html  # context values are escaped in HTML
        assert f"Hello {name}," in plain and "<Pro & Co>" in plain  # and not in the generated text part
        assert by_rcpt[addr].mail_from == "tests@example.com"


def test_same_idempotency_key_sends_one_email(relay, shared_worker):
    shared_worker(concurrency=2)
    first = smartmail.send("ann@example.org", subject="Receipt", text="Thanks", idempotency_key="order-42")
    second = smartmail.send("ann@example.org", subject="Receipt", text="Thanks", idempotency_key="order-42")
    assert second.id == first.id and second.duplicate and not first.duplicate
    batch = smartmail.send_many(
        [
            {"to": "ann@example.org", "subject": "Receipt", "text": "x", "idempotency_key": "order-42"},
            {"to": "bob@example.org", "subject": "Receipt", "text": "x", "idempotency_key": "order-43"},
            {"to": "bob@example.org", "subject": "Receipt", "text": "x", "idempotency_key": "order-43"},
        ]
    )
    assert batch[0].id == first.id and batch[0].duplicate
    assert batch[2].id == batch[1].id and batch[2].duplicate
    assert wait_until_final(2) == {"sent": 2}  # two rows: the duplicates were never stored
    recipients = collections.Counter(m.rcpt_tos[0] for m in relay.messages)
    assert recipients == {"ann@example.org": 1, "bob@example.org": 1}


def test_send_many_of_1000_sends_1000(relay, shared_worker):
    shared_worker(concurrency=2)
    specs = [
        {
            "to": f"user{i}@example.com",
            "template": "password-reset",
            "context": {"email": f"user{i}@example.com", "reset_url": f"https://example.com/r/{i}"},
        }
        for i in range(1000)
    ]
    results = smartmail.send_many(specs)
    assert len({r.id for r in results}) == 1000
    wait_for(lambda: relay.count >= 1000, 120, message="1000 messages")
    assert wait_until_final(1000)["sent"] == 1000
    assert len(set(relay.message_ids())) == 1000
    urls = {
        m.parsed().get_body(("plain",)).get_content().split("https://example.com/r/")[1].split()[0]
        for m in relay.messages
    }
    assert urls == {str(i) for i in range(1000)}


def test_451_twice_then_250_is_delivered_on_the_third_attempt(relay, shared_worker, start_beat):
    relay.script["slow@example.com"] = ["451 4.3.0 Try again later", "451 4.3.0 Try again later"]
    shared_worker(concurrency=2)
    start_beat()
    result = smartmail.send("slow@example.com", subject="Hello", text="patience")
    wait_for(lambda: smartmail.status(result.id)["state"] == "sent", 60, interval=0.2, message="delivery after retries")
    info = smartmail.status(result.id)
    assert info["attempts"] == 3 and info["smtp_code"] == 250
    assert relay.attempts["slow@example.com"] == 3 and relay.count == 1


def test_550_hard_bounce_fails_suppresses_and_blocks_later_sends(relay, shared_worker):
    relay.script["gone@example.com"] = ["550 5.1.1 <gone@example.com>: Recipient address rejected: User unknown"]
    shared_worker(concurrency=2)
    result = smartmail.send("Gone <gone@example.com>", subject="Hello", text="anyone?")
    wait_for(lambda: smartmail.status(result.id)["state"] == "failed", 60, message="failed state")
    info = smartmail.status(result.id)
    assert info["smtp_code"] == 550 and "5.1.1" in info["smtp_reply"] and info["reason"] == "hard bounce"
    with session_scope() as session:
        assert session.get(Suppression, "gone@example.com").reason == "hard_bounce"

    later = smartmail.send("GONE@example.com", subject="Hello again", text="still there?")
    assert later.state == "suppressed" and "hard_bounce" in later.reason
    assert smartmail.status(later.id)["state"] == "suppressed"  # final at once: never published
    other = smartmail.send("other@example.com", subject="Hello", text="still delivering")
    wait_for(lambda: smartmail.status(other.id)["state"] == "sent", 60, message="a later message")
    assert relay.attempts["gone@example.com"] == 1  # only the first, bounced attempt reached the server
    assert [m.rcpt_tos[0] for m in relay.messages] == ["other@example.com"]


@pytest.mark.parametrize("batched,window", [(False, 1), (True, 10)], ids=["send-window1", "send_many-window10"])
def test_kill_9_of_a_busy_worker_never_sends_twice(relay, start_worker, monkeypatch, batched, window):
    """2,000 in flight, the worker's whole process group killed with SIGKILL, a new worker and the
    reconciler finish the job: no Message-ID twice, every message sent or unknown, and at most
    two claim windows per worker process unknown: the window being sent and the one claimed
    meanwhile (with a window of 1: at most two per worker process)."""
    concurrency = 2
    monkeypatch.setenv("SMARTMAIL_CLAIM_WINDOW", str(window))
    first = start_worker(concurrency=concurrency)
    specs = [{"to": f"k{i}@example.com", "subject": f"Message {i}", "text": f"body {i}"} for i in range(2000)]
    # Produce in the background, so the kill lands while messages are still arriving as well.
    producer = threading.Thread(
        target=lambda: smartmail.send_many(specs) if batched else [smartmail.send(**spec) for spec in specs]
    )
    producer.start()
    wait_for(lambda: relay.count >= 300, 120, message="300 delivered before the kill")
    first.kill9()
    delivered_before = relay.count
    producer.join(120)
    assert delivered_before < 2000, "the worker finished before it could be killed; the test proved nothing"

    # The reconciler: `sending` rows older than the timeout become unknown; `queued` rows whose
    # tasks died with the worker (prefetched, unacked) are published again.
    monkeypatch.setenv("SMARTMAIL_SENDING_TIMEOUT", "1")
    monkeypatch.setenv("SMARTMAIL_RECONCILE_QUEUED_AFTER", "1")
    from smartmail.workers import maintenance
    from tests.conftest import reset_caches

    reset_caches()
    time.sleep(1.2)
    maintenance.reconcile()
    start_worker(concurrency=concurrency)

    def done():
        maintenance.reconcile()
        counts = states()
        return sum(counts[s] for s in ("sent", "unknown")) == 2000 and counts

    counts = wait_for(done, 180, interval=1.0, message="every message sent or unknown")
    print(f"killed after {delivered_before} deliveries; final states {dict(counts)}")
    ids = relay.message_ids()
    duplicates = [i for i, n in collections.Counter(ids).items() if n > 1]
    assert not duplicates, f"received twice: {duplicates[:5]}"
    bound = 2 * concurrency * window
    assert counts["unknown"] <= bound, counts
    with session_scope() as session:
        sent = set(session.scalars(select(Message.message_id_header).where(Message.state == "sent")))
        unknown = set(session.scalars(select(Message.message_id_header).where(Message.state == "unknown")))
    assert sent <= set(ids), "a message recorded as sent never reached the server"
    assert set(ids) <= sent | unknown


def test_scheduled_message_is_sent_by_beat_when_due(relay, shared_worker, start_beat):
    from datetime import datetime, timedelta

    shared_worker(concurrency=2)
    start_beat()
    send_at = datetime.now(UTC) + timedelta(seconds=2)
    result = smartmail.send("later@example.com", subject="Reminder", text="now", send_at=send_at)
    assert result.state == "scheduled"
    wait_for(lambda: relay.count >= 1, 30, message="the scheduled message")
    assert relay.messages[0].at >= send_at.timestamp()
    # The outcome is recorded just after the relay's reply, so it may lag the receipt a moment.
    wait_for(lambda: smartmail.status(result.id)["state"] == "sent", 10, message="the outcome recorded")


def test_messages_whose_tasks_redis_lost_are_sent_once_by_the_reconciler(relay, start_worker, monkeypatch):
    smartmail.send_many([{"to": f"lost{i}@example.com", "subject": "s", "text": "t"} for i in range(50)])
    assert smartmail.flush()  # the ids reach Redis (from a background thread), and then
    clear_redis(smartmail.config.get_settings().redis_url)  # the broker forgets every task
    start_worker(concurrency=2)
    time.sleep(1.5)
    assert relay.count == 0 and states()["queued"] == 50

    monkeypatch.setenv("SMARTMAIL_RECONCILE_QUEUED_AFTER", "1")
    from smartmail.workers import maintenance
    from tests.conftest import reset_caches

    reset_caches()
    assert maintenance.reconcile().requeued == 50
    wait_for(lambda: relay.count >= 50, 60, message="50 recovered messages")
    assert wait_until_final(50)["sent"] == 50
    assert sorted(m.rcpt_tos[0] for m in relay.messages) == sorted(f"lost{i}@example.com" for i in range(50))
