"""The unsubscribe page and RFC 8058 one-click endpoint, /healthz and problem+json errors, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import threading

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select

from smartmail.audience import contacts
from smartmail.audience.unsubscribe import unsubscribe
from smartmail.content.unsubscribe_links import list_unsubscribe_headers, make_token
from smartmail.store.engine import session_scope
from smartmail.store.models import Contact, Event, Suppression
from smartmail.web.app import app
from tests.conftest import reset_caches

ONE_CLICK = {"List-Unsubscribe": "One-Click"}


@pytest.fixture
def client(env):
    with TestClient(app) as test_client:
        yield test_client


def state() -> dict:
    """Everything an unsubscribe may change: statuses, suppressions, events."""
    with session_scope() as session:
        return {
            "contacts": dict(session.execute(select(Contact.email, Contact.status)).all()),
            "suppressions": dict(session.execute(select(Suppression.email, Suppression.reason)).all()),
            "events": [(e.type, e.contact_id, e.properties) for e in session.scalars(select(Event).order_by(Event.id))],
        }


def path(token: str) -> str:
    return f"/unsubscribe/{token}"


def assert_html_security_headers(response) -> None:
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "form-action 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "script-src" not in csp


def test_get_shows_the_confirm_page_and_changes_nothing(client):
    ann = contacts.create_contact("ann@example.org")
    before = state()
    response = client.get(path(make_token(ann["id"], 7)))
    assert response.status_code == 200
    assert_html_security_headers(response)
    assert "ann@example.org" in response.text
    assert '<form method="post"><button type="submit">Unsubscribe</button></form>' in response.text
    assert state() == before
    assert before["contacts"] == {"ann@example.org": "subscribed"} and before["suppressions"] == {}


def test_one_click_post_unsubscribes_once(client):
    ann = contacts.create_contact("ann@example.org")
    token = make_token(ann["id"], 7)
    response = client.post(path(token), data=ONE_CLICK)  # application/x-www-form-urlencoded, no cookies
    assert response.status_code == 200
    assert_html_security_headers(response)
    assert "You are unsubscribed" in response.text
    after = state()
    assert after == {
        "contacts": {"ann@example.org": "unsubscribed"},
        "suppressions": {"ann@example.org": "unsubscribed"},
        "events": [("unsubscribed", ann["id"], {"campaign_id": 7, "source": "one-click"})],
    }
    again = client.post(path(token), data=ONE_CLICK)
    assert again.status_code == 200 and "You are unsubscribed" in again.text
    assert state() == after
    page = client.get(path(token))
    assert page.status_code == 200 and "already unsubscribed" in page.text and "<form" not in page.text


def test_the_confirm_form_posts_an_empty_body(client):
    ann = contacts.create_contact("ann@example.org")
    response = client.post(path(make_token(ann["id"], None)))
    assert response.status_code == 200
    assert state()["events"] == [("unsubscribed", ann["id"], {"campaign_id": None, "source": "page"})]
    assert contacts.get_contact("ann@example.org")["status"] == "unsubscribed"


def test_one_click_as_multipart_form_data(client):
    ann = contacts.create_contact("ann@example.org")
    response = client.post(path(make_token(ann["id"], 3)), files={"List-Unsubscribe": (None, "One-Click")})
    assert response.status_code == 200
    assert state()["events"] == [("unsubscribed", ann["id"], {"campaign_id": 3, "source": "one-click"})]


def test_the_link_in_the_headers_is_the_one_click_endpoint(client):
    ann = contacts.create_contact("ann@example.org")
    value = list_unsubscribe_headers(ann["id"], 5)["List-Unsubscribe"]
    url = re.match(r"<(http[^>]+)>, <mailto:", value).group(1)
    assert url.startswith("http://127.0.0.1:8000/unsubscribe/")  # the default SMARTMAIL_PUBLIC_URL
    response = client.post(url.removeprefix("http://127.0.0.1:8000"), data=ONE_CLICK)
    assert response.status_code == 200
    assert state()["suppressions"] == {"ann@example.org": "unsubscribed"}


def test_forged_tokens_get_400_and_change_nothing(client):
    ann = contacts.create_contact("ann@example.org")
    bob = contacts.create_contact("bob@example.org")
    signature = make_token(ann["id"], 7).rsplit(".", 1)[1]
    forged = [
        f"{bob['id']}.7.{signature}",  # Ann's signature on Bob's id
        make_token(ann["id"], 7)[:-1],  # truncated
        f"{ann['id']}.7.{'A' * 43}",
        "garbage",
    ]
    before = state()
    for token in forged:
        for response in (client.get(path(token)), client.post(path(token), data=ONE_CLICK)):
            assert response.status_code == 400, token
            assert_html_security_headers(response)
            assert "This unsubscribe link is invalid" in response.text
    assert state() == before


def test_bounced_contact_stays_bounced_and_suppressed(client):
    bob = contacts.create_contact("bob@example.org", status="bounced")
    before = state()
    assert before["suppressions"] == {"bob@example.org": "hard_bounce"}
    response = client.post(path(make_token(bob["id"], 7)), data=ONE_CLICK)
    assert response.status_code == 200
    assert state() == before, "nothing to change: the hard bounce already keeps the address out"


def test_bounced_contact_missing_from_the_suppression_list_gets_on_it(client):
    bob = contacts.create_contact("bob@example.org", status="bounced")
    with session_scope() as session:
        session.execute(delete(Suppression))
    assert unsubscribe(bob["id"], 7, source="test") is True
    assert state() == {
        "contacts": {"bob@example.org": "bounced"},
        "suppressions": {"bob@example.org": "unsubscribed"},
        "events": [("unsubscribed", bob["id"], {"campaign_id": 7, "source": "test"})],
    }
    assert unsubscribe(bob["id"], 7, source="test") is False


def test_erased_contact(client):
    ann = contacts.create_contact("ann@example.org")
    token = make_token(ann["id"], 7)
    assert contacts.delete_contact("ann@example.org")
    before = state()
    assert before["suppressions"] == {"ann@example.org": "erased"}
    page = client.get(path(token))
    assert page.status_code == 200 and "your address" in page.text
    response = client.post(path(token), data=ONE_CLICK)
    assert response.status_code == 200 and "You are unsubscribed" in response.text
    assert unsubscribe(ann["id"], 7, source="test") is False
    assert state() == before


def test_html_injection_is_escaped(client):
    attack = "<img src=x onerror=alert(1)>"
    for response in (
        client.get(path(attack)),
        client.post(path(attack)),
        client.get(path(attack) + "/x"),
        client.put(path(attack)),
    ):
        assert response.status_code in (400, 404, 405)
        assert "<img" not in response.text and "onerror" not in response.text
        assert_html_security_headers(response)
    # An address may hold characters that mean something in HTML; the page shows them escaped.
    odd = contacts.create_contact("o'brien&co@example.org")
    page = client.get(path(make_token(odd["id"], None)))
    assert "o&#x27;brien&amp;co@example.org" in page.text and "o'brien&co" not in page.text


def test_oversized_body_is_refused(client):
    ann = contacts.create_contact("ann@example.org")
    before = state()
    response = client.post(
        path(make_token(ann["id"], 7)),
        content=b"x" * 100_000,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 413
    assert state() == before


def test_concurrent_unsubscribes_record_one_event(env):
    ann = contacts.create_contact("ann@example.org")
    barrier = threading.Barrier(4)
    results: list[bool] = []

    def run():
        barrier.wait()
        results.append(unsubscribe(ann["id"], 7, source="test"))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == [False, False, False, True]
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Event)) == 1


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["x-content-type-options"] == "nosniff"


def test_healthz_without_a_database(client, env, monkeypatch, tmp_path):
    monkeypatch.setenv("SMARTMAIL_DATABASE_URL", f"sqlite:///{tmp_path}/missing-dir/smartmail.db")
    reset_caches()
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json() == {
        "type": "about:blank",
        "title": "Service Unavailable",
        "status": 503,
        "detail": "The database is not reachable.",
    }


def test_unknown_api_path_is_a_problem_json_404(client):
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.json() == {
        "type": "about:blank",
        "title": "Not Found",
        "status": 404,
        "detail": "There is nothing at this URL.",
    }


def test_wrong_method_on_an_api_path_is_a_problem_json_405(client):
    response = client.post("/healthz")
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["allow"] == "GET"
    assert response.json()["title"] == "Method Not Allowed"
