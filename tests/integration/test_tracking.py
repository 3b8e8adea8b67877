"""Open and click tracking on real parts: a campaign through a worker and an SMTP server, its links
followed by an HTTP client against `smartmail web`, the hits stored by an events worker."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time

import httpx
import pytest
from sqlalchemy import func, select, text

from smartmail.audience import contacts, segments
from smartmail.audience.contacts import add_members, create_contact, create_list
from smartmail.campaigns import lifecycle as campaigns
from smartmail.content import tracking_links
from smartmail.content.template_store import save_template
from smartmail.content.unsubscribe_links import make_token
from smartmail.devtools import localredis
from smartmail.feedback import engagement, stats
from smartmail.store.engine import get_engine, session_scope, utcnow
from smartmail.store.models import Contact, Event, Message, MessageState
from smartmail.workers import claims
from smartmail.workers.outcomes import Reply
from tests.conftest import TEST_SECRET, reset_caches, wait_for

pytestmark = pytest.mark.integration

HUMAN = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0"
HTML = """<html><head><style>p { color: #333 }</style></head><body>
<p>Hello {{ first_name }}.</p>
<p><a href="https://shop.example/p?u={{ first_name }}&amp;x=1">Shop</a></p>
<p><a href="https://blog.example/post" data-track="off">Blog</a> <a href="mailto:help@example.com">Help</a>
<a href="javascript:alert(1)">Script</a> <a href="data:text/html,hi">Data</a></p>
<p><a href="https://docs.example/guide">Guide</a></p>
</body></html>"""
TEXT = "Hello {{ first_name }}. Shop: https://shop.example/p?u={{ first_name }}&x=1 Docs: https://other.example/t.\n"
_TRACKED = re.compile(r"https://mail\.example\.com(/t/[co]/[A-Za-z0-9._-]*[A-Za-z0-9_-])")


@pytest.fixture
def relay(env, smtp_server, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_SMTP_URL", f"smtp://127.0.0.1:{smtp_server.port}?tls=none")
    monkeypatch.setenv("SMARTMAIL_PUBLIC_URL", "https://mail.example.com")
    monkeypatch.setenv("SMARTMAIL_SCANNER_CLICK_SECONDS", "0")  # the test clicks within a second of delivery
    reset_caches()
    with session_scope() as session:
        save_template(session, "news", subject="News for {{ first_name }}", html=HTML, text=TEXT)
    return smtp_server


def campaign_to(relay, shared_worker, people: dict[str, str]) -> dict[str, dict]:
    """Send the `news` template to `people` (address: first name) by a bulk + events worker; each
    recipient's message: its tracked paths, HTML and text."""
    create_list("news")
    for email, name in people.items():
        create_contact(email, attributes={"first_name": name})
    add_members("news", people)
    shared_worker(queues="bulk,events,default")
    campaigns.create_campaign("spring", template="news", lists=["news"])
    campaigns.launch_campaign("spring")
    wait_for(lambda: relay.count >= len(people), 60, message="the campaign delivered")
    received = {}
    for message in relay.messages:
        parsed = message.parsed()
        html = parsed.get_body(("html",)).get_content()
        plain = parsed.get_body(("plain",)).get_content()
        received[message.rcpt_tos[0]] = {
            "html": html,
            "text": plain,
            "opens": [p for p in _TRACKED.findall(html) if p.startswith("/t/o/")],
            "clicks": [p for p in _TRACKED.findall(html) if p.startswith("/t/c/")],
            "text_clicks": [p for p in _TRACKED.findall(plain) if p.startswith("/t/c/")],
        }
    return received


def events(kind: str) -> list[Event]:
    with session_scope() as session:
        return list(session.scalars(select(Event).where(Event.type == kind).order_by(Event.id)))


def test_opens_and_clicks_land_once_per_unique_hit_and_fill_the_engagement_segments(relay, api, shared_worker):
    mail = campaign_to(relay, shared_worker, {"ann@a.example": "Ann", "bob@b.example": "Bob", "cy@c.example": "Cy"})
    ann = mail["ann@a.example"]
    # The links: rewritten in both parts (the same link, the same tracked URL); left alone where asked.
    assert len(ann["opens"]) == 1 and len(ann["clicks"]) == 2
    assert ann["text_clicks"][0] == ann["clicks"][0]  # the shop link, in both parts
    assert len(ann["text_clicks"]) == 2  # and the text part's own link, numbered after the HTML's
    assert '<a href="https://blog.example/post">Blog</a>' in ann["html"]  # data-track="off" is gone, the link not
    for kept in ('href="mailto:help@example.com"', 'href="javascript:alert(1)"', 'href="data:text/html,hi"'):
        assert kept in ann["html"]
    assert "/unsubscribe/" in ann["html"] and "/unsubscribe/" in ann["text"]  # never tracked

    person = httpx.Client(base_url=api.url, headers={"User-Agent": HUMAN}, follow_redirects=False)
    api.clients.append(person)
    for _ in range(2):
        pixel = person.get(ann["opens"][0])
        assert pixel.status_code == 200 and pixel.headers["content-type"] == "image/gif" and len(pixel.content) == 43
        assert "no-store" in pixel.headers["cache-control"]
        shop = person.get(ann["clicks"][0])
        assert shop.status_code == 302 and shop.headers["location"] == "https://shop.example/p?u=Ann&x=1"
    assert person.get(mail["bob@b.example"]["opens"][0]).status_code == 200
    guide = person.get(mail["bob@b.example"]["text_clicks"][1])
    assert guide.headers["location"] == "https://other.example/t"  # the sentence's full stop is not the URL's

    # The web process asked for a drain; the events worker stored the hits.
    wait_for(lambda: len(events("opened")) == 3 and len(events("clicked")) == 3, 30, message="hits stored")
    opened, clicked = events("opened"), events("clicked")
    assert not any(e.machine for e in opened + clicked)
    assert sorted(e.properties["unique"] for e in opened) == [False, True, True]  # Ann twice, Bob once
    assert sorted(e.properties["unique"] for e in clicked) == [False, True, True]
    campaign_id = campaigns.get_campaign("spring")["id"]
    assert {e.campaign_id for e in opened + clicked} == {campaign_id}
    assert {e.properties["link"] for e in clicked} == {1, 3}  # the text part's own link is number 3
    assert all(e.properties["ip"] == "127.0.0.0" for e in opened)  # truncated to /24 by default

    with session_scope() as session:
        seen = {c.email: (c.last_open_at, c.last_click_at) for c in session.scalars(select(Contact))}
    assert seen["ann@a.example"][0] and seen["ann@a.example"][1]
    assert seen["bob@b.example"][0] and seen["bob@b.example"][1]
    assert seen["cy@c.example"] == (None, None)
    assert segments.count({"opened_within": 1}) == 2
    assert segments.count({"clicked_within": 1}) == 2
    assert segments.count({"not": {"opened_within": 1}}) == 1

    rates = api.client("campaigns:read").get("/v1/campaigns/spring/engagement").json()
    assert (rates["sent"], rates["opens"], rates["clicks"]) == (3, {"unique": 2, "total": 3}, {"unique": 2, "total": 3})
    assert rates["open_rate"] == rates["click_rate"] == round(2 / 3, 4) and rates["click_to_open_rate"] == 1.0

    # Erasing a contact erases its events, tracking and delivery ones alike.
    ann_id = contacts.get_contact("ann@a.example")["id"]
    assert contacts.delete_contact("ann@a.example")
    with session_scope() as session:
        left = session.scalars(select(Event.type).where(Event.contact_id == ann_id)).all()
        types = set(session.scalars(select(Event.type)))
    assert left == [] and types == {"sent", "opened", "clicked"}  # Bob's and Cy's remain


def test_a_token_not_made_here_gets_404_and_no_redirect(env, api):
    message_id = "01JD0000000000000000000000"
    good = tracking_links.click_url(message_id, 1, "https://shop.example/a").rsplit("/", 1)[1]
    opened = tracking_links.open_url(message_id).rsplit("/", 1)[1]
    payload, signature = good.rsplit(".", 1)

    def signed(data: str, purpose: str, secret: str = TEST_SECRET) -> str:
        key = hmac.new(secret.encode(), b"smartmail.token:" + purpose.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(hmac.digest(key, data.encode(), "sha256")).rstrip(b"=").decode()[:22]

    evil = base64.urlsafe_b64encode(b"https://evil.example/").rstrip(b"=").decode()
    bad_clicks = {
        "forged": f"{payload}.{'A' * 22}",
        "one character changed": f"{payload}.{signature[:-1]}{'B' if signature[-1] != 'B' else 'C'}",
        "truncated": good[:-5],
        "URL swapped": f"{message_id}.1.{evil}.{signature}",
        "re-signed with another key": f"{payload}.{signed(payload, 'click', 'another-secret-key-0123')}",
        "an open token's signature": f"{payload}.{signed(payload, 'open')}",
        "an unsubscribe token": make_token(42, 7),
        "a javascript: URL, validly signed": (
            f"{message_id}.1.{(js := base64.urlsafe_b64encode(b'javascript:alert(1)').rstrip(b'=').decode())}"
            f".{signed(f'{message_id}.1.{js}', 'click')}"
        ),
        "empty": ".",
    }
    client = httpx.Client(base_url=api.url, follow_redirects=False)
    api.clients.append(client)
    assert client.get(f"/t/c/{good}").status_code == 302  # the one made here
    for why, token in bad_clicks.items():
        answer = client.get(f"/t/c/{token}")
        assert answer.status_code == 404 and "location" not in answer.headers, why
    assert client.get(f"/t/o/{opened}").status_code == 200
    for why, token in {
        "a click token": good,
        "forged": f"{message_id}.{'A' * 22}",
        "click-signed": f"{message_id}.{signed(message_id, 'click')}",
    }.items():
        assert client.get(f"/t/o/{token}").status_code == 404, why


def test_clicks_redirect_while_redis_is_down_and_what_was_held_is_stored_after(
    relay, monkeypatch, tmp_path, _module_web
):
    port = localredis.free_port()
    redis_server = localredis.start(port, tmp_path / "redis")
    try:
        monkeypatch.setenv("SMARTMAIL_REDIS_URL", f"redis://127.0.0.1:{port}/0")
        reset_caches()
        url = _module_web.start()
        with get_engine().begin() as connection:  # a sent message to click in
            connection.execute(
                text(
                    "INSERT INTO messages (id, state, sender, recipient, subject, text, headers, tags,"
                    " message_id_header, attempts, created_at, finished_at)"
                    " VALUES ('01JD0000000000000000000001', 'sent', 's@x', 'r@y', 's', 't', '{}', '[]',"
                    " '<m@x>', 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
        link = tracking_links.click_url("01JD0000000000000000000001", 1, "https://shop.example/a")
        path = link.split("https://mail.example.com", 1)[1]
        client = httpx.Client(base_url=url, headers={"User-Agent": HUMAN}, follow_redirects=False)
        assert client.get(path).status_code == 302
        wait_for(lambda: engagement.drain()[0] == 1, 10, message="the first click stored")

        redis_server.terminate()
        redis_server.wait(10)
        started = time.monotonic()
        for _ in range(5):
            answer = client.get(path)
            assert answer.status_code == 302 and answer.headers["location"] == "https://shop.example/a"
        assert time.monotonic() - started < 2  # answered at once, not after Redis timeouts
        time.sleep(1.5)  # the recorder tries, fails, holds the hits

        redis_server = localredis.start(port, tmp_path / "redis")  # back, empty
        reset_caches()
        wait_for(lambda: engagement.drain() and len(events("clicked")) == 6, 20, message="the held hits stored")
        assert [e.properties["unique"] for e in events("clicked")] == [True] + [False] * 5
        assert "tracking.redis_unavailable" in _module_web.process.output()
        client.close()
    finally:
        redis_server.terminate()
        _module_web.kill()


def test_an_outcome_event_is_written_if_and_only_if_its_state_change_commits(relay):
    with get_engine().begin() as connection:
        for n in (1, 2):
            connection.execute(
                text(
                    "INSERT INTO messages (id, state, sender, recipient, subject, text, headers, tags,"
                    " message_id_header, attempts, created_at, claimed_by)"
                    f" VALUES ('01JD000000000000000000000{n}', 'sending', 's@x', 'r@y', 's', 't', '{{}}', '[]',"
                    f" '<m{n}@x>', 1, CURRENT_TIMESTAMP, 'me')"
                )
            )

    class Sent:
        def __init__(self, message_id: str, state) -> None:
            self.id, self.recipient, self.state = message_id, "r@y", state
            self.reply, self.next_attempt_at, self.reason = Reply(250, "2.0.0 ok", "data"), None, None
            self.suppress, self.attempted = False, True

    engine, now = get_engine(), utcnow()
    # Rolled back: neither the state nor the event.
    with pytest.raises(RuntimeError), engine.begin() as connection:
        claims.record_and_claim_on(connection, [Sent("01JD0000000000000000000001", MessageState.SENT)], now, (), "me")
        raise RuntimeError("the transaction fails after the outcome was written")
    with session_scope() as session:
        assert session.scalar(select(Message.state).where(Message.id == "01JD0000000000000000000001")) == "sending"
        assert session.scalar(select(func.count()).select_from(Event)) == 0
    # Committed: both, once; a second attempt at the same outcome (not the owner's row any more) adds nothing.
    for _ in range(2):
        claims.record_and_claim(engine, [Sent("01JD0000000000000000000001", MessageState.SENT)], (), now, "me")
    with session_scope() as session:
        assert session.scalar(select(Message.state).where(Message.id == "01JD0000000000000000000001")) == "sent"
        sent = list(session.scalars(select(Event)))
    assert [(e.type, e.message_id, e.properties) for e in sent] == [
        ("sent", "01JD0000000000000000000001", {"smtp_code": 250, "reply": "2.0.0 ok"})
    ]


def test_proxy_opens_and_scanner_clicks_are_kept_flagged_and_left_out_of_the_rates(relay, api):
    with get_engine().begin() as connection:
        for n in range(1, 5):
            connection.execute(
                text(
                    "INSERT INTO messages (id, state, sender, recipient, subject, text, headers, tags,"
                    " message_id_header, attempts, created_at, finished_at, campaign_id)"
                    f" VALUES ('01JD000000000000000000000{n}', 'sent', 's@x', 'r{n}@y', 's', 't', '{{}}', '[]',"
                    f" '<m{n}@x>', 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 9)"
                )
            )
    client = httpx.Client(base_url=api.url, follow_redirects=False)
    api.clients.append(client)

    def path(url: str) -> str:
        return url.split("https://mail.example.com", 1)[1]

    def click(n: int, link: int, **kwargs) -> httpx.Response:
        url = tracking_links.click_url(f"01JD000000000000000000000{n}", link, f"https://shop.example/{link}")
        return client.request(kwargs.pop("method", "GET"), path(url), **kwargs)

    opened = {n: path(tracking_links.open_url(f"01JD000000000000000000000{n}")) for n in range(1, 5)}
    assert client.get(opened[1], headers={"User-Agent": "Mozilla/5.0"}).status_code == 200  # Apple's proxy
    assert (
        client.get(opened[2], headers={"User-Agent": "Mozilla/5.0 (via ggpht.com GoogleImageProxy)"}).status_code == 200
    )
    assert client.get(opened[3], headers={"User-Agent": HUMAN}).status_code == 200  # a person
    assert click(1, 1, method="HEAD", headers={"User-Agent": HUMAN}).status_code == 302  # a link check
    assert click(2, 1, headers={"User-Agent": "Mozilla/5.0 BingPreview/1.0b"}).status_code == 302
    for link in (1, 2, 3):  # every link of message 4 within a second: a scanner behind a browser's agent
        assert click(4, link, headers={"User-Agent": HUMAN}).status_code == 302
    assert click(3, 2, headers={"User-Agent": HUMAN}).status_code == 302  # a person

    wait_for(lambda: engagement.drain() and len(events("opened")) + len(events("clicked")) == 9, 20, message="stored")
    reasons = {
        (e.type, e.message_id[-1], e.properties.get("link")): e.properties.get("machine_reason")
        for e in events("opened") + events("clicked")
    }
    assert reasons == {
        ("opened", "1", None): "apple-mail-privacy-protection",
        ("opened", "2", None): "google-image-proxy",
        ("opened", "3", None): None,
        ("clicked", "1", 1): "head-request",
        ("clicked", "2", 1): "microsoft-link-check",
        ("clicked", "4", 1): "many-links-at-once",
        ("clicked", "4", 2): "many-links-at-once",
        ("clicked", "4", 3): "many-links-at-once",
        ("clicked", "3", 2): None,
    }
    assert all(
        e.machine == (reasons[(e.type, e.message_id[-1], e.properties.get("link"))] is not None)
        for e in events("opened") + events("clicked")
    )

    human = stats.campaign_engagement(9)
    assert (
        human["sent"] == 4
        and human["opens"] == {"unique": 1, "total": 1}
        and human["clicks"] == {"unique": 1, "total": 1}
    )
    assert human["open_rate"] == 0.25 and human["click_rate"] == 0.25 and human["machine"] == {"opens": 2, "clicks": 5}
    everything = stats.campaign_engagement(9, include_machine=True)
    assert everything["opens"]["total"] == 3 and everything["clicks"]["total"] == 6
