"""/v1/suppressions through a real `smartmail web` process, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from smartmail.audience import contacts
from smartmail.store.engine import session_scope
from smartmail.store.models import Contact, Suppression


def stored() -> dict[str, str]:
    with session_scope() as session:
        return {s.email: s.reason for s in session.scalars(select(Suppression))}


def status(email: str) -> str | None:
    with session_scope() as session:
        return session.scalar(select(Contact.status).where(Contact.email == email))


def errors(response) -> list[tuple[str, str]]:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    return [(e.get("pointer", e.get("parameter")), e["detail"]) for e in response.json()["errors"]]


def test_add_read_and_add_again(api):
    client = api.client("suppressions:read", "suppressions:write")
    contacts.create_contact("ann@example.org")
    response = client.post("/v1/suppressions", json={"email": " Ann@Example.ORG ", "detail": "asked by phone"})
    assert response.status_code == 201, response.text
    assert response.headers["location"] == "/v1/suppressions/ann@example.org"
    body = response.json()
    assert (body["email"], body["reason"], body["detail"]) == ("ann@example.org", "manual", "asked by phone")
    assert body["created_at"].endswith("Z")
    assert status("ann@example.org") == "blocked"  # the contact follows the suppression

    again = client.post("/v1/suppressions", json={"email": "ann@example.org", "reason": "complaint"})
    assert again.status_code == 200 and again.json() == body  # the first reason stands
    assert client.get("/v1/suppressions/ANN@example.org").json() == body
    bounce = client.post("/v1/suppressions", json={"email": "bob@example.org", "reason": "hard_bounce"})
    assert bounce.status_code == 201 and status("bob@example.org") is None  # no contact is created
    tagged = client.post("/v1/suppressions", json={"email": "cy+news@example.org"})
    assert client.get(tagged.headers["location"]).json()["email"] == "cy+news@example.org"
    assert stored() == {"ann@example.org": "manual", "bob@example.org": "hard_bounce", "cy+news@example.org": "manual"}


def test_list_pages_by_address_and_filters_by_reason(api):
    client = api.client("suppressions:read", "suppressions:write")
    for email, reason in [
        ("d@x.org", "manual"),
        ("a@x.org", "hard_bounce"),
        ("c@x.org", "manual"),
        ("b@x.org", "complaint"),
    ]:
        assert client.post("/v1/suppressions", json={"email": email, "reason": reason}).status_code == 201
    first = client.get("/v1/suppressions", params={"limit": 3}).json()
    assert [s["email"] for s in first["data"]] == ["a@x.org", "b@x.org", "c@x.org"]
    rest = client.get("/v1/suppressions", params={"limit": 3, "cursor": first["next_cursor"]}).json()
    assert [s["email"] for s in rest["data"]] == ["d@x.org"] and rest["next_cursor"] is None
    manual = client.get("/v1/suppressions", params={"reason": "manual"}).json()
    assert [s["email"] for s in manual["data"]] == ["c@x.org", "d@x.org"]
    assert errors(client.get("/v1/suppressions", params={"reason": "spam"}))[0][0] == "reason"
    assert client.get("/v1/suppressions", params={"cursor": "x"}).status_code == 422


@pytest.mark.parametrize(
    "body,pointer",
    [
        ({"email": "not an address"}, "/email"),
        ({"email": "a@b@c"}, "/email"),
        ({}, "/email"),
        ({"email": "a@example.org", "reason": "erased"}, "/reason"),
        ({"email": "a@example.org", "detail": "x" * 2001}, "/detail"),
        ({"email": "a@example.org", "detail": "a\x00b"}, "/detail"),
        ({"email": "a@example.org", "colour": "red"}, "/colour"),
    ],
    ids=["address", "two-ats", "missing", "reason", "long-detail", "nul", "extra"],
)
def test_bad_input_is_a_422_naming_the_field_and_stores_nothing(api, body, pointer):
    response = api.client("suppressions:write").post("/v1/suppressions", json=body)
    assert errors(response)[0][0] == pointer
    assert stored() == {}


def test_missing_ones_are_404_and_bad_addresses_422(api):
    client = api.client("suppressions:read", "suppressions:write")
    for response in (
        client.get("/v1/suppressions/nobody@example.org"),
        client.delete("/v1/suppressions/x@example.org"),
    ):
        assert response.status_code == 404, response.text
        assert response.headers["content-type"] == "application/problem+json"
    assert errors(client.get("/v1/suppressions/not-an-address"))[0][0] == "/email"
    assert errors(client.delete("/v1/suppressions/a%00b@example.org"))[0][0] == "/email"


def test_removal_resubscribes_bounced_and_blocked_but_not_withdrawn_consent(api):
    client = api.client("suppressions:read", "suppressions:write", "messages:send")
    for email, state in [
        ("bounced@example.org", "bounced"),
        ("blocked@example.org", "blocked"),
        ("unsub@example.org", "unsubscribed"),
        ("complained@example.org", "complained"),
    ]:
        contacts.create_contact(email, status=state)
    assert len(stored()) == 4

    def send(to: str) -> str:
        return client.post("/v1/messages", json={"to": to, "subject": "s", "text": "t"}).json()["state"]

    assert send("unsub@example.org") == "suppressed"
    for email in ("bounced@example.org", "blocked@example.org", "unsub@example.org", "complained@example.org"):
        response = client.delete(f"/v1/suppressions/{email.upper()}")
        assert response.status_code == 204 and response.content == b"", response.text
    assert stored() == {}
    assert [status(e) for e in ("bounced@example.org", "blocked@example.org")] == ["subscribed", "subscribed"]
    assert [status(e) for e in ("unsub@example.org", "complained@example.org")] == ["unsubscribed", "complained"]
    assert send("unsub@example.org") == "queued"  # transactional mail reaches it again
    assert client.get("/v1/suppressions/unsub@example.org").status_code == 404


def test_writes_need_the_write_scope(api):
    reader = api.client("suppressions:read")
    assert reader.post("/v1/suppressions", json={"email": "a@example.org"}).status_code == 403
    assert api.client("contacts:write").get("/v1/suppressions").status_code == 403
    assert stored() == {}
