"""/v1/segments through a real `smartmail web` process, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from smartmail.audience import contacts
from smartmail.store.engine import session_scope
from smartmail.store.models import Segment

PRO = {"all": [{"list": "news"}, {"attr": "plan", "op": "eq", "value": "pro"}]}


def stored() -> dict[str, dict]:
    with session_scope() as session:
        return {s.name: s.rules for s in session.scalars(select(Segment))}


def errors(response) -> list[tuple[str, str]]:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    return [(e.get("pointer", e.get("parameter")), e["detail"]) for e in response.json()["errors"]]


@pytest.fixture
def audience(env):
    """Six contacts on `news`: ids in order, every second one on the pro plan; one more off the list."""
    contacts.create_list("news")
    emails = [f"c{i}@example.org" for i in range(6)]
    for i, email in enumerate(emails):
        contacts.create_contact(email, attributes={"plan": "pro" if i % 2 == 0 else "free", "age": 20 + i})
    contacts.create_contact("outside@example.org", attributes={"plan": "pro"})
    contacts.add_members("news", emails)
    return emails


def test_save_replace_read_list_delete(api):
    client = api.client("segments:read", "segments:write")
    contacts.create_list("news")
    created = client.put("/v1/segments/pro users", json={"rules": PRO})
    assert created.status_code == 201, created.text
    assert created.headers["location"] == "/v1/segments/pro%20users"
    assert client.get(created.headers["location"]).json()["name"] == "pro users"
    body = created.json()
    assert (body["name"], body["rules"]) == ("pro users", PRO) and body["created_at"].endswith("Z")
    replaced = client.put("/v1/segments/pro users", json={"rules": {"status": "subscribed"}})
    assert replaced.status_code == 200 and "location" not in replaced.headers
    assert replaced.json()["created_at"] == body["created_at"]
    assert client.put("/v1/segments/alpha", json={"rules": PRO}).status_code == 201
    assert client.put("/v1/segments/zeta", json={"rules": PRO}).status_code == 201
    assert stored() == {"pro users": {"status": "subscribed"}, "alpha": PRO, "zeta": PRO}

    assert client.get("/v1/segments/pro users").json()["rules"] == {"status": "subscribed"}
    first = client.get("/v1/segments", params={"limit": 2}).json()
    assert [s["name"] for s in first["data"]] == ["alpha", "pro users"]
    rest = client.get("/v1/segments", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [s["name"] for s in rest["data"]] == ["zeta"] and rest["next_cursor"] is None

    deleted = client.delete("/v1/segments/alpha")
    assert deleted.status_code == 204 and deleted.content == b""
    assert client.get("/v1/segments/alpha").status_code == 404
    assert set(stored()) == {"pro users", "zeta"}


@pytest.mark.parametrize(
    "body,pointer",
    [
        ({"rules": {"all": [{"list": "news"}, {"attr": "plan", "op": "like", "value": "x"}]}}, "/rules/all/1/op"),
        ({"rules": {"any": [{"status": "gone"}]}}, "/rules/any/0/status"),
        ({"rules": {"list": "no such list"}}, "/rules/list"),
        ({"rules": {"attr": "plan", "op": "eq", "value": "a\x00b"}}, "/rules/value"),
        ({"rules": {"not": {"event": "x", "within": 0}}}, "/rules/not/within"),
        ({"rules": {"all": []}}, "/rules/all"),
        ({"rules": [1]}, "/rules"),
        ({}, "/rules"),
        ({"rules": PRO, "colour": "red"}, "/colour"),
    ],
    ids=["op", "status", "missing-list", "nul", "within", "empty", "not-object", "no-rules", "extra"],
)
def test_bad_rules_are_a_422_pointing_at_the_rule_and_store_nothing(api, body, pointer):
    client = api.client("segments:write")
    contacts.create_list("news")
    response = client.put("/v1/segments/s", json=body)
    assert errors(response)[0][0] == pointer
    assert stored() == {}


def test_bad_names_and_missing_segments(api):
    client = api.client("segments:read", "segments:write")
    assert errors(client.put(f"/v1/segments/{'x' * 201}", json={"rules": {"status": "subscribed"}}))[0][0] == "name"
    assert errors(client.put("/v1/segments/a%01b", json={"rules": {"status": "subscribed"}}))[0][0] == "/name"
    for response in (
        client.get("/v1/segments/nope"),
        client.get("/v1/segments/a%00b"),
        client.delete("/v1/segments/nope"),
        client.delete("/v1/segments/a%00b"),
        client.get("/v1/segments/nope/count"),
        client.get("/v1/segments/nope/preview"),
    ):
        assert response.status_code == 404, response.text
        assert response.headers["content-type"] == "application/problem+json"
    assert stored() == {}


def test_count_and_preview(api, audience):
    client = api.client("segments:read", "segments:write")
    client.put("/v1/segments/pro", json={"rules": PRO})
    older = {"all": [{"list": "news"}, {"attr": "age", "op": "gte", "value": 23}]}
    client.put("/v1/segments/older", json={"rules": older})

    assert client.get("/v1/segments/pro/count").json() == {"count": 3}
    assert client.get("/v1/segments/older/count").json() == {"count": 3}
    preview = client.get("/v1/segments/pro/preview", params={"limit": 2})
    assert preview.status_code == 200, preview.text
    rows = preview.json()["data"]
    assert [c["email"] for c in rows] == [audience[0], audience[2]]
    assert rows[0]["attributes"] == {"plan": "pro", "age": 20} and rows[0]["created_at"].endswith("Z")
    everyone = client.get("/v1/segments/pro/preview").json()["data"]
    assert [c["email"] for c in everyone] == audience[0::2]
    assert errors(client.get("/v1/segments/pro/preview", params={"limit": 0}))[0][0] == "limit"
    assert errors(client.get("/v1/segments/pro/preview", params={"limit": 1001}))[0][0] == "limit"


def test_a_saved_rule_naming_a_list_deleted_since_is_a_422(api, audience):
    client = api.client("segments:read", "segments:write")
    client.put("/v1/segments/pro", json={"rules": PRO})
    contacts.delete_list("news")
    assert errors(client.get("/v1/segments/pro/count"))[0][0] == "/rules/all/0/list"


def test_writes_need_the_write_scope(api):
    reader = api.client("segments:read")
    assert reader.put("/v1/segments/s", json={"rules": {"status": "subscribed"}}).status_code == 403
    assert api.client("contacts:read").get("/v1/segments").status_code == 403
    assert stored() == {}
