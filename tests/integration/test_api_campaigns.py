"""/v1/campaigns through a real `smartmail web` process, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from urllib.parse import quote

import pytest
from sqlalchemy import func, select

from smartmail.audience.contacts import add_members, create_list, upsert_contact
from smartmail.campaigns import lifecycle
from smartmail.content.template_store import save_template
from smartmail.store.engine import session_scope
from smartmail.store.models import Campaign, Message
from tests.conftest import wait_for

PROBLEM = "application/problem+json"


@pytest.fixture
def audience(env):
    """A stored template and a list of three subscribers."""
    with session_scope() as session:
        save_template(session, "newsletter", subject="News for {{ first_name }}", html="<p>Hello</p>")
    create_list("news")
    create_list("vip")
    for name in ("a", "b", "c"):
        upsert_contact(f"{name}@example.org", attributes={"first_name": name.upper()})
    add_members("news", ["a@example.org", "b@example.org", "c@example.org"])


def stored(name: str) -> Campaign:
    with session_scope() as session:
        campaign = session.scalar(select(Campaign).where(Campaign.name == name))
        assert campaign is not None
        session.expunge(campaign)
        return campaign


def campaigns_stored() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Campaign)) or 0


def test_create_read_list_and_progress(api, audience):
    client = api.client("campaigns:read", "campaigns:write")
    body = {
        "name": "spring",
        "template": "newsletter",
        "lists": ["news"],
        "from": "Shop <shop@example.org>",
        "reply_to": "help@example.org",
        "window": "08:00-20:00",
        "window_timezone": "Europe/Paris",
        "rate_cap": 5,
        "tags": ["spring"],
    }
    response = client.post("/v1/campaigns", json=body)
    assert response.status_code == 201, response.text
    created = response.json()
    assert response.headers["location"] == "/v1/campaigns/spring"
    assert created["state"] == "draft" and created["from"] == "Shop <shop@example.org>"
    assert created["window"] == "08:00-20:00" and created["created_at"].endswith("Z")
    row = stored("spring")
    assert (row.sender, row.reply_to, row.lists, row.tags) == (
        "Shop <shop@example.org>",
        "help@example.org",
        ["news"],
        ["spring"],
    )
    assert (row.window_start, row.window_end, row.window_timezone, row.rate_cap) == (
        "08:00",
        "20:00",
        "Europe/Paris",
        5,
    )

    assert client.get("/v1/campaigns/spring").json() == created
    assert client.get(f"/v1/campaigns/{created['id']}").json() == created  # by id too

    scheduled = client.post(
        "/v1/campaigns",
        json={
            "name": "later",
            "template": "newsletter",
            "segment": None,
            "lists": ["vip"],
            "send_at": "2030-01-02T03:04:05+01:00",
        },
    )
    assert scheduled.status_code == 201, scheduled.text
    assert scheduled.json()["state"] == "scheduled" and scheduled.json()["send_at"] == "2030-01-02T02:04:05Z"
    client.post("/v1/campaigns", json={"name": "third", "template": "newsletter", "lists": ["news"]})

    first = client.get("/v1/campaigns", params={"limit": 2}).json()
    assert [c["name"] for c in first["data"]] == ["third", "later"] and first["next_cursor"]
    second = client.get("/v1/campaigns", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [c["name"] for c in second["data"]] == ["spring"] and second["next_cursor"] is None
    drafts = client.get("/v1/campaigns", params={"state": "scheduled"}).json()
    assert [c["name"] for c in drafts["data"]] == ["later"]

    progress = client.get("/v1/campaigns/spring/progress").json()
    assert progress == {
        "name": "spring",
        "state": "draft",
        "counts": {},
        "total": 0,
        "rate": 0.0,
        "eta_seconds": None,
        "fanned_out": False,
        "feedback": {"hard_bounces": 0, "soft_bounces": 0, "complaints": 0},
        "paused_reason": None,
    }


def test_bad_input_points_at_the_key_and_stores_nothing(api, audience):
    client = api.client("campaigns:write")
    base = {"name": "x", "template": "newsletter", "lists": ["news"]}
    cases = [
        ({**base, "lists": ["news", "missing"]}, "/lists/1"),
        ({**base, "lists": ["missing"]}, "/lists/0"),
        ({**base, "template": "nope"}, "/template"),
        ({**base, "from": "not an address"}, "/from"),
        ({**base, "window": "8-20"}, "/window"),
        ({**base, "window_timezone": "Mars/Base"}, "/window_timezone"),
        ({**base, "rate_cap": 0}, "/rate_cap"),
        ({**base, "segment": "nobody"}, "/segment"),
        ({**base, "colour": "red"}, "/colour"),
        ({"name": "x", "template": "newsletter"}, "/lists"),
        ({**base, "name": ""}, "/name"),
        ({**base, "send_at": "soon"}, "/send_at"),
        ({**base, "send_at": "9999-12-31T23:59:59-05:00"}, "/send_at"),  # past year 9999 in UTC
        ({**base, "name": "a\x00b"}, "/name"),  # PostgreSQL text cannot hold a NUL
        ({**base, "lists": ["ne\x00ws"]}, "/lists/0"),
    ]
    for body, where in cases:
        response = client.post("/v1/campaigns", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["errors"][0]["pointer"] == where, (body, response.json())
    assert campaigns_stored() == 0

    assert client.post("/v1/campaigns", json=base).status_code == 201
    taken = client.post("/v1/campaigns", json=base)
    assert taken.status_code == 409 and "exists already" in taken.json()["detail"]
    assert campaigns_stored() == 1
    assert client.get("/v1/campaigns/nope").status_code == 403  # a write-only key
    reader = api.client("campaigns:read")
    assert reader.get("/v1/campaigns/nope").status_code == 404
    assert reader.get("/v1/campaigns/a%00b/progress").status_code == 404
    assert reader.post("/v1/campaigns/x/launch").status_code == 403
    assert reader.get("/v1/campaigns", params={"cursor": "bm9wZQ"}).status_code == 422


def test_tracking_utm_and_preheader_are_set_read_and_changed(api, audience):
    client = api.client("campaigns:read", "campaigns:write")
    plain = client.post("/v1/campaigns", json={"name": "plain", "template": "newsletter", "lists": ["news"]}).json()
    assert (plain["tracking"], plain["utm"], plain["preheader"]) == (True, None, None)
    body = {
        "name": "tracked",
        "template": "newsletter",
        "lists": ["news"],
        "tracking": False,
        "utm": {"utm_source": "newsletter", "utm_campaign": "spring sale"},
        "preheader": "Hi {{ first_name }}: 20% off",
    }
    created = client.post("/v1/campaigns", json=body)
    assert created.status_code == 201, created.text
    assert {k: created.json()[k] for k in ("tracking", "utm", "preheader")} == {
        "tracking": False,
        "utm": {"utm_source": "newsletter", "utm_campaign": "spring sale"},
        "preheader": "Hi {{ first_name }}: 20% off",
    }
    row = stored("tracked")
    assert (row.tracking, row.utm, row.preheader) == (False, body["utm"], body["preheader"])
    assert client.get("/v1/campaigns/tracked").json() == created.json()

    changed = client.patch("/v1/campaigns/tracked", json={"tracking": True, "utm": {"utm_medium": "email"}})
    assert changed.status_code == 200, changed.text
    assert (changed.json()["tracking"], changed.json()["utm"]) == (True, {"utm_medium": "email"})
    assert changed.json()["preheader"] == body["preheader"]  # left out: kept
    cleared = client.patch("/v1/campaigns/tracked", json={"utm": None, "preheader": None}).json()
    assert (cleared["tracking"], cleared["utm"], cleared["preheader"]) == (True, None, None)

    base = {"name": "bad", "template": "newsletter", "lists": ["news"]}
    cases = [
        ({**base, "utm": {"utm_colour": "red"}}, "/utm/utm_colour"),
        ({**base, "utm": {"utm_source": ""}}, "/utm/utm_source"),
        ({**base, "utm": {"utm_source": "x" * 201}}, "/utm/utm_source"),
        ({**base, "utm": {"utm_term": "a\nb"}}, "/utm/utm_term"),
        ({**base, "utm": {"utm_source": 3}}, "/utm/utm_source"),
        ({**base, "utm": "utm_source=x"}, "/utm"),
        ({**base, "tracking": "maybe"}, "/tracking"),
        ({**base, "preheader": "{{ unclosed"}, "/preheader"),
        ({**base, "preheader": "x" * 1001}, "/preheader"),
    ]
    for body, where in cases:
        response = client.post("/v1/campaigns", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["errors"][0]["pointer"] == where, (body, response.json())
    refused = client.patch("/v1/campaigns/tracked", json={"utm": {"utm_id": "1"}})
    assert refused.status_code == 422 and refused.json()["errors"][0]["pointer"] == "/utm/utm_id"
    assert client.patch("/v1/campaigns/tracked", json={"tracking": None}).status_code == 422
    assert campaigns_stored() == 2


def test_patch_schedule_launch_pause_resume_cancel(api, audience):
    client = api.client("campaigns:read", "campaigns:write")
    assert client.post("/v1/campaigns", json={"name": "c", "template": "newsletter", "lists": ["news"]}).is_success

    changed = client.patch(
        "/v1/campaigns/c", json={"lists": ["vip", "news"], "tags": ["t"], "reply_to": "r@example.org"}
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["lists"] == ["vip", "news"] and changed.json()["state"] == "draft"
    row = stored("c")
    assert (row.lists, row.tags, row.reply_to, row.template_name) == (
        ["vip", "news"],
        ["t"],
        "r@example.org",
        "newsletter",
    )

    bad = client.patch("/v1/campaigns/c", json={"lists": ["gone"]})
    assert bad.status_code == 422 and bad.json()["errors"][0]["pointer"] == "/lists/0"
    emptied = client.patch("/v1/campaigns/c", json={"lists": []})  # no segment either: no audience
    assert emptied.status_code == 422 and emptied.json()["errors"][0]["pointer"] == "/lists"
    assert stored("c").lists == ["vip", "news"]  # nothing half-written

    assert client.patch("/v1/campaigns/c", json={"send_at": "2031-05-01T10:00:00Z"}).json()["state"] == "scheduled"
    assert client.patch("/v1/campaigns/c", json={"send_at": None}).json()["state"] == "draft"
    scheduled = client.post("/v1/campaigns/c/schedule", json={"send_at": "2031-06-01T10:00:00"})
    assert scheduled.status_code == 200 and scheduled.json()["send_at"] == "2031-06-01T10:00:00Z"

    launched = client.post("/v1/campaigns/c/launch")
    assert launched.status_code == 200, launched.text
    assert launched.json()["state"] == "sending" and launched.json()["template_version"] == 1
    row = stored("c")
    assert row.subject == "News for {{ first_name }}" and row.launched_at is not None  # the template, frozen

    running = client.patch("/v1/campaigns/c", json={"tags": ["late"]})
    assert running.status_code == 409 and running.headers["content-type"] == PROBLEM
    assert "sending" in running.json()["detail"] and stored("c").tags == ["t"]
    assert client.post("/v1/campaigns/c/launch").status_code == 409
    assert client.post("/v1/campaigns/c/schedule", json={"send_at": "2031-06-01T10:00:00"}).status_code == 409
    assert client.post("/v1/campaigns/c/resume").status_code == 409

    assert client.post("/v1/campaigns/c/pause").json()["state"] == "paused"
    assert client.post("/v1/campaigns/c/resume").json()["state"] == "sending"
    cancelled = client.post("/v1/campaigns/c/cancel")
    assert cancelled.json()["state"] == "cancelled" and cancelled.json()["finished_at"]
    assert client.post("/v1/campaigns/c/cancel").status_code == 409
    assert client.post("/v1/campaigns/c/pause").status_code == 409
    with session_scope() as session:  # nothing left to send: any fanned-out message was cancelled
        states = set(session.scalars(select(Message.state).where(Message.campaign_id == row.id)))
    assert states <= {"cancelled"}


def test_a_patch_waits_for_a_launch_holding_the_row_and_then_conflicts(api, audience):
    client = api.client("campaigns:write")
    assert client.post("/v1/campaigns", json={"name": "race", "template": "newsletter", "lists": ["news"]}).is_success
    answers = []
    with session_scope() as session:
        campaign = lifecycle._get(session, "race")  # locked, as a launch holds it
        patch = threading.Thread(
            target=lambda: answers.append(client.patch("/v1/campaigns/race", json={"tags": ["x"]}))
        )
        patch.start()
        time.sleep(0.7)
        assert not answers, "the patch did not wait for the row"
        campaign.state = "sending"
    patch.join(20)
    assert answers[0].status_code == 409, answers[0].text
    assert stored("race").tags == []


def test_a_name_with_a_slash_is_refused_and_spaces_are_quoted(api, audience):
    client = api.client("campaigns:read", "campaigns:write")
    refused = client.post("/v1/campaigns", json={"name": "a/progress", "template": "newsletter", "lists": ["news"]})
    assert refused.status_code == 422 and refused.json()["errors"][0]["pointer"] == "/name"
    name = "Spring 2026 50% ~"
    created = client.post("/v1/campaigns", json={"name": name, "template": "newsletter", "lists": ["news"]})
    assert created.status_code == 201 and created.headers["location"] == f"/v1/campaigns/{quote(name, safe='')}"
    assert client.get(created.headers["location"]).json()["name"] == name
    assert client.get(f"{created.headers['location']}/progress").json()["name"] == name
    assert client.post(f"{created.headers['location']}/launch").json()["state"] == "sending"
    assert stored(name).state == "sending"


def test_a_launch_reaches_the_list_and_progress_counts_it(api, audience, smtp_server, shared_worker, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_SMTP_URL", f"smtp://127.0.0.1:{smtp_server.port}?tls=none")
    shared_worker(queues="bulk,default")
    client = api.client("campaigns:read", "campaigns:write")
    assert client.post("/v1/campaigns", json={"name": "live", "template": "newsletter", "lists": ["news"]}).is_success
    assert client.post("/v1/campaigns/live/launch").json()["state"] == "sending"

    def progress():
        return client.get("/v1/campaigns/live/progress").json()

    wait_for(
        lambda: progress()["counts"].get("sent", 0) + progress()["counts"].get("failed", 0) == 3, 60, message=progress
    )
    assert progress()["counts"] == {"sent": 3}
    received = sorted((m.rcpt_tos[0], m.parsed()["Subject"]) for m in smtp_server.messages)
    assert received == [(f"{n}@example.org", f"News for {n.upper()}") for n in "abc"]
    assert progress()["total"] == 3 and progress()["fanned_out"] is True


def test_a_launch_freezes_the_preheader_and_sends_css_inlined(api, audience, smtp_server, shared_worker, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_SMTP_URL", f"smtp://127.0.0.1:{smtp_server.port}?tls=none")
    shared_worker(queues="bulk,default")
    html = "<html><head><style>p { color: #333; }</style></head><body><p>Hi {{ first_name }}</p></body></html>"
    with session_scope() as session:
        save_template(session, "styled", subject="S", html=html, preheader="From the template")
    client = api.client("campaigns:read", "campaigns:write")
    body = {"name": "pre", "template": "styled", "lists": ["news"], "preheader": "Only for {{ first_name }}"}
    assert client.post("/v1/campaigns", json=body).is_success
    assert client.post("/v1/campaigns/pre/launch").is_success
    frozen = stored("pre")
    assert frozen.html is not None and "Only for {{ first_name }}</div><p>" in frozen.html
    assert "From the template" not in frozen.html and "<style>" in frozen.html  # inlined as workers compile it
    wait_for(
        lambda: len(smtp_server.messages) == 3, 60, message=lambda: client.get("/v1/campaigns/pre/progress").json()
    )
    for message in smtp_server.messages:
        part = message.parsed().get_body(("html",))
        assert part is not None
        content = part.get_content()
        name = message.rcpt_tos[0][0].upper()
        hidden = f'<div style="display:none;max-height:0;overflow:hidden;mso-hide:all">Only for {name}</div>'
        assert f'<body>{hidden}<p style="color: #333;">Hi {name}</p>' in content, content
        assert "<style>" not in content
        text = message.parsed().get_body(("plain",))
        assert text is not None and "Only for" not in text.get_content()
