"""Crash recovery on real parts: a worker killed or frozen mid-send, its claims recovered by beat on the defaults."""

from __future__ import annotations

import collections
import os
import signal
import threading
import time

import pytest
from sqlalchemy import func, select

import smartmail
from smartmail.campaigns import lifecycle as campaigns
from smartmail.content.template_store import save_template
from smartmail.store.engine import session_scope
from smartmail.store.models import Message
from tests.conftest import reset_caches, wait_for
from tests.integration.test_campaigns import HTML, make_audience

# Unknown messages that never reached the server: marked ahead of their transmission, at most
# three times SMARTMAIL_SMTP_PARALLELISM (4) per process (the contents of one flush, and smtp_window's
# look-ahead of twice it). Unknown messages that did reach it are the window whose outcomes were
# being recorded (they were accepted).
NEVER_SENT_PER_PROCESS = 3 * 4


@pytest.fixture
def relay(env, smtp_server, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_SMTP_URL", f"smtp://127.0.0.1:{smtp_server.port}?tls=none")
    monkeypatch.setenv("SMARTMAIL_PUBLIC_URL", "https://mail.example.com")
    # Beat's default cadence: with the default owner lease and drain lease, recovery within 30 s.
    monkeypatch.setenv("SMARTMAIL_SCHEDULER_INTERVAL", "5")
    reset_caches()
    with session_scope() as session:
        save_template(session, "newsletter", subject="News for {{ first_name }}", html=HTML)
    return smtp_server


def states() -> collections.Counter:
    with session_scope() as session:
        return collections.Counter(
            dict(session.execute(select(Message.state, func.count()).group_by(Message.state)).all())
        )


def settled(total: int):
    """The states once every message is sent or unknown (nothing left claimed, queued or waiting)."""

    def check():
        counts = states()
        return counts if counts["sent"] + counts["unknown"] == total else None

    return check


def assert_exactly_once_but_unknown(relay, processes_lost: int, window: int) -> tuple[set[str], set[str]]:
    """No Message-ID received twice; sent ones received; received ones sent or unknown; few unknown
    that never reached the server, and no more unknown in all than the two claim windows per
    process that claims without marks left. The unknown ids that did and did not reach the server."""
    received = relay.message_ids()
    duplicates = [i for i, n in collections.Counter(received).items() if n > 1]
    assert not duplicates, f"received twice: {duplicates[:5]}"
    with session_scope() as session:
        sent = set(session.scalars(select(Message.message_id_header).where(Message.state == "sent")))
        unknown = set(session.scalars(select(Message.message_id_header).where(Message.state == "unknown")))
    assert sent <= set(received), "a message recorded as sent never reached the server"
    assert set(received) <= sent | unknown, "a message reached the server but is recorded as neither sent nor unknown"
    arrived, never_sent = unknown & set(received), unknown - set(received)
    print(f"unknown: {len(arrived)} reached the server, {len(never_sent)} did not")
    assert len(never_sent) <= NEVER_SENT_PER_PROCESS * processes_lost, f"{len(never_sent)} unknown never sent"
    assert len(unknown) <= 2 * window * processes_lost, f"{len(unknown)} unknown"
    return arrived, never_sent


def test_a_killed_campaign_worker_is_recovered_within_30_seconds_on_the_defaults(relay, start_worker, start_beat):
    total = 4000
    make_audience(total)
    victim, survivor = start_worker.many(2, concurrency=2, queues="bulk,default")
    start_beat()
    campaigns.create_campaign("crash", template="newsletter", lists=["news"])
    campaigns.launch_campaign("crash")
    wait_for(lambda: relay.count >= 800, 120, message="800 delivered before the kill")
    victim.kill9()
    killed_at = time.monotonic()
    assert relay.count < total, "the campaign finished before the kill; the test proved nothing"

    counts = wait_for(settled(total), 30, interval=0.5, message=lambda: f"settled; states {dict(states())}")
    print(f"settled {time.monotonic() - killed_at:.1f} s after the kill: {dict(counts)}")
    assert_exactly_once_but_unknown(relay, processes_lost=2, window=50)
    assert "maintenance.claims_recovered" in survivor.output()  # beat's job ran on the survivor
    assert campaigns.campaign_status("crash").counts.keys() <= {"sent", "unknown"}


def test_a_killed_transactional_worker_is_recovered_within_30_seconds_on_the_defaults(relay, start_worker, start_beat):
    total = 3000
    victim, _survivor = start_worker.many(2, concurrency=2)
    start_beat()
    specs = [{"to": f"t{i}@example.com", "subject": f"Receipt {i}", "text": f"body {i}"} for i in range(total)]
    producer = threading.Thread(target=smartmail.send_many, args=(specs,))
    producer.start()
    wait_for(lambda: relay.count >= 600, 120, message="600 delivered before the kill")
    victim.kill9()
    killed_at = time.monotonic()
    producer.join(60)
    assert relay.count < total, "everything was delivered before the kill; the test proved nothing"

    counts = wait_for(settled(total), 30, interval=0.5, message=lambda: f"settled; states {dict(states())}")
    print(f"settled {time.monotonic() - killed_at:.1f} s after the kill: {dict(counts)}")
    assert_exactly_once_but_unknown(relay, processes_lost=2, window=10)


def test_a_worker_frozen_past_its_lease_sends_nothing_twice(relay, start_worker, start_beat, monkeypatch):
    """SIGSTOP for longer than the owner lease: beat gives its unmarked claims to the other worker,
    which delivers them. Resumed, the frozen worker may not transmit them (its marks are refused),
    and its late outcomes land only on the rows it had marked (recorded `unknown` meanwhile, they
    end with what the server answered), never on the rows given away."""
    monkeypatch.setenv("SMARTMAIL_OWNER_LEASE", "2")
    monkeypatch.setenv("SMARTMAIL_SCHEDULER_INTERVAL", "0.5")
    reset_caches()
    total = 3000
    make_audience(total)
    frozen, other = start_worker.many(2, concurrency=1, queues="bulk,default")
    start_beat()
    campaigns.create_campaign("frozen", template="newsletter", lists=["news"])
    campaigns.launch_campaign("frozen")
    wait_for(lambda: relay.count >= 600, 120, message="600 delivered before the freeze")
    os.killpg(frozen.popen.pid, signal.SIGSTOP)
    try:
        assert relay.count < total, "the campaign finished before the freeze; the test proved nothing"
        wait_for(settled(total), 60, interval=0.5, message=lambda: f"settled; states {dict(states())}")
        assert "maintenance.claims_recovered" in other.output(), "the frozen worker held no claims"
    finally:
        os.killpg(frozen.popen.pid, signal.SIGCONT)
    before = states()
    time.sleep(5)  # the resumed worker finishes what it had under way, and records it
    after = states()
    print(f"while frozen: {dict(before)}; after resuming: {dict(after)}")
    assert after["sent"] + after["unknown"] == total and after["unknown"] <= before["unknown"]
    assert_exactly_once_but_unknown(relay, processes_lost=1, window=50)


def test_recovery_queues_unmarked_claims_marks_the_rest_unknown_and_resends_them_for_at_least_once_campaigns(
    relay,
):
    """Beat's recovery without processes: two campaigns' messages claimed by an owner whose lease
    is gone, some of them marked; the at-least-once campaign's marked ones are queued again too."""
    from sqlalchemy import update

    from smartmail.campaigns import fan_out
    from smartmail.store.models import Campaign
    from smartmail.workers import maintenance, ownership
    from smartmail.workers.dispatch import get_outbox
    from tests.integration.test_campaigns import started

    make_audience(10)
    campaigns.create_campaign("once", template="newsletter", lists=["news"])
    campaigns.create_campaign("twice", template="newsletter", lists=["news"], resend_unknown=True)
    ids = {}
    for name in ("once", "twice"):
        campaign_id = started(name)
        fan_out.fan_out(campaign_id)
        with session_scope() as session:
            ids[name] = sorted(session.scalars(select(Message.id).where(Message.campaign_id == campaign_id)))
            session.execute(
                update(Message).where(Message.campaign_id == campaign_id).values(state="sending", claimed_by="gone")
            )
    client = get_outbox().client
    prefix = os.environ["SMARTMAIL_REDIS_KEY_PREFIX"]
    client.sadd(ownership.marks_key(prefix, "gone"), ownership.SENTINEL, *ids["once"][:3], *ids["twice"][:3])

    report = maintenance.recover_lost_claims()

    with session_scope() as session:
        state = dict(session.execute(select(Message.id, Message.state)).all())
        resend = session.scalar(select(Campaign.resend_unknown).where(Campaign.name == "twice"))
    assert resend is True
    assert [state[i] for i in ids["once"]] == ["unknown"] * 3 + ["queued"] * 7
    assert [state[i] for i in ids["twice"]] == ["queued"] * 10
    assert (report.unknown, report.requeued) == (3, 17)
    assert not client.exists(ownership.marks_key(prefix, "gone"))  # the marks of a recovered owner go
