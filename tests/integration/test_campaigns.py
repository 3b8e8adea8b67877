"""Campaigns on real parts: fan-out, chunked bulk delivery by worker processes, pause/resume/cancel, beat, retries."""
from __future__ import annotations

import collections
import time

import pytest
from sqlalchemy import func, insert, select

from smartmail import campaigns
from smartmail.contacts import InvalidInput, create_list
from smartmail.db import get_engine, session_scope, utcnow
from smartmail.models import Campaign, Contact, ListMembership, Message, Suppression
from smartmail.template_store import save_template
from smartmail.unsubscribe import read_token
from tests.conftest import reset_caches, wait_for

pytestmark = pytest.mark.integration

DOMAINS = ["alpha.example", "beta.example", "gamma.example", "delta.example", "epsilon.example"]
HTML = "<html><body><p>Hello {{ first_name }}, your plan is {{ plan }}.</p></body></html>"


@pytest.fixture
def relay(env, smtp_server, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_SMTP_URL", f"smtp://127.0.0.1:{smtp_server.port}?tls=none")
    monkeypatch.setenv("SMARTMAIL_PUBLIC_URL", "https://mail.example.com")
    reset_caches()
    with session_scope() as session:
        save_template(session, "newsletter", subject="News for {{ first_name }}", html=HTML)
    return smtp_server


def make_audience(n: int, *, unsubscribed_every: int = 0, suppressed_every: int = 0, list_name: str = "news"):
    """n contacts over five domains, all in one list; return the addresses that may be mailed."""
    create_list(list_name)
    now = utcnow()
    rows = []
    for i in range(n):
        status = "unsubscribed" if unsubscribed_every and i % unsubscribed_every == 1 else "subscribed"
        rows.append({"email": f"c{i}@{DOMAINS[i % 5]}", "status": status, "created_at": now, "updated_at": now,
                     "attributes": {"first_name": f"Name{i}", "plan": ("free", "pro")[i % 2]}})
    suppressed = {rows[i]["email"] for i in range(n) if suppressed_every and i % suppressed_every == 2}
    with get_engine().begin() as connection:
        for start in range(0, n, 5000):
            connection.execute(insert(Contact), rows[start:start + 5000])
        list_id = connection.scalar(select(func.max(ListMembership.list_id)).select_from(ListMembership)) or None
        from smartmail.models import ContactList

        list_id = connection.scalar(select(ContactList.id).where(ContactList.name == list_name))
        ids = list(connection.scalars(select(Contact.id)))
        for start in range(0, len(ids), 5000):
            connection.execute(insert(ListMembership), [{"list_id": list_id, "contact_id": i, "status": "subscribed",
                                                         "joined_at": now} for i in ids[start:start + 5000]])
        if suppressed:
            connection.execute(insert(Suppression), [{"email": e, "reason": "hard_bounce", "created_at": now}
                                                     for e in suppressed])
    return {r["email"] for r in rows if r["status"] == "subscribed" and r["email"] not in suppressed}


def message_states(name: str) -> collections.Counter:
    return collections.Counter(campaigns.campaign_status(name).counts)


def start_bulk_worker(start_worker, concurrency: int = 2):
    return start_worker(concurrency=concurrency, queues="bulk,default")


def test_a_campaign_reaches_every_eligible_contact_exactly_once_with_unsubscribe_headers(relay, start_worker,
                                                                                          start_beat):
    eligible = make_audience(20_000, unsubscribed_every=40, suppressed_every=60)
    start_bulk_worker(start_worker)
    start_beat()
    campaigns.create_campaign("spring", template="newsletter", lists=["news"], tags=["spring"])
    campaigns.launch_campaign("spring")

    wait_for(lambda: relay.count >= len(eligible), 240, interval=0.5, message=f"{len(eligible)} messages")
    wait_for(lambda: campaigns.campaign_status("spring").state == "sent", 60, interval=0.5, message="campaign sent")
    time.sleep(0.5)
    got = [m.rcpt_tos[0] for m in relay.messages]
    assert len(got) == len(set(got)) and set(got) == eligible  # each eligible contact once, nobody else
    status = campaigns.campaign_status("spring")
    assert status.counts == {"sent": len(eligible)} and status.fanned_out

    with session_scope() as session:
        ids = dict(session.execute(select(Contact.email, Contact.id)).all())
        campaign_id = session.scalar(select(Campaign.id).where(Campaign.name == "spring"))
    for received in relay.messages[:300]:
        message = received.parsed()
        to = received.rcpt_tos[0]
        number = int(to.split("@")[0][1:])
        assert message["Subject"] == f"News for Name{number}"
        unsubscribe = message["List-Unsubscribe"]
        url = unsubscribe.split(">")[0].lstrip("<")
        assert url.startswith("https://mail.example.com/unsubscribe/") and "<mailto:" in unsubscribe
        assert read_token(url.rsplit("/", 1)[1]) == (ids[to], campaign_id)
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert message["X-SmartMail-Campaign"] == str(campaign_id) and message["X-SmartMail-Contact"] == str(ids[to])
        html = message.get_body(("html",)).get_content()
        assert f"Hello Name{number}, your plan is {('free', 'pro')[number % 2]}." in html
        assert url in html and url in message.get_body(("plain",)).get_content()  # a visible link

    # A relaunch adds nothing.
    with pytest.raises(InvalidInput, match="state"):
        campaigns.launch_campaign("spring")
    campaigns.fan_out(campaign_id)
    assert campaigns.campaign_status("spring").total == len(eligible)
