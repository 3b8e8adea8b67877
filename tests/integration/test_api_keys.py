"""/v1/keys through a real `smartmail web` process, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import func, select

from smartmail.access import keys
from smartmail.errors import InvalidInput
from smartmail.store.engine import session_scope
from smartmail.store.models import ApiKey

PROBLEM = "application/problem+json"


def stored_keys() -> dict[str, ApiKey]:
    with session_scope() as session:
        rows = list(session.scalars(select(ApiKey)))
        session.expunge_all()
    return {row.id: row for row in rows}


def test_create_shows_the_key_once_and_stores_only_its_hash(api):
    admin = api.client()
    expires = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    response = admin.post(
        "/v1/keys",
        json={
            "name": "shop",
            "scopes": ["messages:send", "campaigns:read", "messages:send"],
            "expires_at": expires.isoformat(),  # with an offset: stored as naive UTC
            "rate_limit": 20,
        },
    )
    assert response.status_code == 201, response.text
    created = response.json()
    token = created["key"]
    assert response.headers["location"] == f"/v1/keys/{created['id']}"
    assert token.startswith(f"sm_{created['id']}_") and created["scopes"] == ["messages:send", "campaigns:read"]
    assert created["expires_at"] == expires.isoformat().replace("+00:00", "Z") and created["revoked"] is False

    row = stored_keys()[created["id"]]
    secret = token.split("_", 2)[2]
    assert row.secret_hash == hashlib.sha256(secret.encode()).hexdigest() and token not in repr(vars(row))
    assert row.expires_at == expires.replace(tzinfo=None) and row.rate_limit == 20

    shop = api.client_for(token)
    assert shop.get("/v1/campaigns").status_code == 200
    refused = shop.get("/v1/keys")
    assert refused.status_code == 403 and "keys:manage" in refused.json()["detail"]

    for reading in (admin.get(f"/v1/keys/{created['id']}"), admin.get("/v1/keys")):
        assert reading.status_code == 200 and secret not in reading.text and '"key"' not in reading.text
    read = admin.get(f"/v1/keys/{created['id']}").json()
    assert read["last_used_at"] and created["last_used_at"] is None  # the shop used it since
    assert read == {**{k: v for k, v in created.items() if k != "key"}, "last_used_at": read["last_used_at"]}


def test_a_manager_key_grants_only_scopes_it_holds(api):
    refused = api.client("keys:manage").post("/v1/keys", json={"name": "c", "scopes": ["campaigns:write"]})
    assert refused.status_code == 403 and "campaigns:write" in refused.json()["detail"]
    admin = api.client("keys:manage", "campaigns:write")
    response = admin.post("/v1/keys", json={"name": "campaigner", "scopes": ["campaigns:write"]})
    assert response.status_code == 201, response.text
    campaigner = api.client_for(response.json()["key"])
    assert campaigner.get("/v1/campaigns").status_code == 403  # write, not read
    assert campaigner.post("/v1/campaigns/none/launch").status_code == 404


def test_revoked_key_is_refused_on_its_next_request(api):
    admin = api.client()
    created = admin.post("/v1/keys", json={"name": "temp", "scopes": ["campaigns:read"]}).json()
    temp = api.client_for(created["key"])
    assert temp.get("/v1/campaigns").status_code == 200

    revoked = admin.delete(f"/v1/keys/{created['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True and revoked.json()["revoked_at"]
    refused = temp.get("/v1/campaigns")
    assert refused.status_code == 401 and refused.json()["reason"] == "revoked"
    assert refused.headers["content-type"] == PROBLEM and "invalid_token" in refused.headers["www-authenticate"]
    assert stored_keys()[created["id"]].revoked_at is not None

    again = admin.delete(f"/v1/keys/{created['id']}")
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert admin.delete("/v1/keys/0123456789abcdef").status_code == 404
    assert admin.get("/v1/keys/0123456789abcdef").status_code == 404
    assert admin.get("/v1/keys/a%00b").status_code == 404


def test_list_pages_in_creation_order_and_leaves_revoked_keys_out_on_request(api):
    admin = api.client()  # the first key (all scopes)
    ids = [admin.post("/v1/keys", json={"name": f"k{i}", "scopes": ["events:write"]}).json()["id"] for i in range(4)]
    admin.delete(f"/v1/keys/{ids[1]}")

    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = admin.get("/v1/keys", params=params).json()
        seen += [key["name"] for key in body["data"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == ["test", "k0", "k1", "k2", "k3"]
    active = admin.get("/v1/keys", params={"active": "true"}).json()["data"]
    assert [key["name"] for key in active] == ["test", "k0", "k2", "k3"]
    assert admin.get("/v1/keys", params={"cursor": "WyJub3BlIiwieCJd"}).status_code == 422  # ["nope","x"]


def test_bad_input_names_the_key_and_stores_nothing(api):
    admin = api.client()
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    cases = [
        ({"name": "x", "scopes": ["messages:send", "everything"]}, "/scopes/1"),
        ({"name": "x", "scopes": []}, "/scopes"),
        ({"name": "", "scopes": ["messages:send"]}, "/name"),
        ({"name": "x", "scopes": ["messages:send"], "expires_at": past}, "/expires_at"),
        ({"name": "x", "scopes": ["messages:send"], "rate_limit": -1}, "/rate_limit"),
        ({"name": "x", "scopes": ["messages:send"], "burst": 0}, "/burst"),
        ({"name": "x", "scopes": ["messages:send"], "burst": 2**40}, "/burst"),
        ({"name": "x", "scopes": ["messages:send"], "secret": "mine"}, "/secret"),
        ({"scopes": ["messages:send"]}, "/name"),
        ({"name": "a\x00b", "scopes": ["messages:send"]}, "/name"),  # PostgreSQL text cannot hold a NUL
        ({"name": "x", "scopes": ["messages:send"], "expires_at": "9999-12-31T23:59:59-05:00"}, "/expires_at"),
    ]
    for body, where in cases:
        response = admin.post("/v1/keys", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["errors"][0]["pointer"] == where, (body, response.json())
    unknown = admin.post("/v1/keys", json={"name": "x", "scopes": ["everything"]}).json()
    assert "everything" in unknown["detail"]
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(ApiKey)) == 1  # the admin's own
    assert api.client_for(None).get("/v1/keys").status_code == 401


def test_a_key_grants_no_later_expiry_and_no_higher_rate_than_its_own(api):
    expires = datetime.now(UTC) + timedelta(hours=1)
    admin = api.client("keys:manage", "messages:send", expires_at=expires, rate_limit=20)
    later = admin.post(
        "/v1/keys",
        json={"name": "x", "scopes": ["messages:send"], "expires_at": (expires + timedelta(days=1)).isoformat()},
    )
    faster = admin.post("/v1/keys", json={"name": "x", "scopes": ["messages:send"], "rate_limit": 21})
    assert later.status_code == faster.status_code == 403, (later.text, faster.text)
    inherited = admin.post("/v1/keys", json={"name": "x", "scopes": ["messages:send"]})
    assert inherited.status_code == 201, inherited.text
    row = stored_keys()[inherited.json()["id"]]
    assert row.expires_at == expires.replace(tzinfo=None, microsecond=row.expires_at.microsecond)
    assert row.rate_limit == 20
    with pytest.raises(InvalidInput, match="at most"):  # the CLI's way in: a rate the limiter can compute
        keys.create_key("x", ["messages:send"], rate_limit=1.7e308)


def test_a_new_key_is_never_kept_for_idempotent_replay(api, redis_url):
    admin = api.client()
    first, again = (
        admin.post("/v1/keys", json={"name": "x", "scopes": ["messages:send"]}, headers={"Idempotency-Key": "k"})
        for _ in range(2)
    )
    assert first.status_code == again.status_code == 201 and first.json()["key"] != again.json()["key"]
    client = redis.Redis.from_url(redis_url)
    assert not [name for name in client.scan_iter("*idempotency*") if b"sm_" in (client.get(name) or b"")]
