"""/v1/contacts and /v1/lists through a real `smartmail web` process, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import func, select

from smartmail.store.engine import session_scope
from smartmail.store.models import Contact, Suppression


def contact_count() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Contact)) or 0


def suppression_reason(email: str) -> str | None:
    with session_scope() as session:
        return session.scalar(select(Suppression.reason).where(Suppression.email == email))


def pointers(response) -> list[str]:
    return [error["pointer"] for error in response.json()["errors"]]


def test_upsert_read_patch_and_erase(api):
    client = api.client("contacts:read", "contacts:write")
    created = client.post("/v1/contacts", json={"email": "Ann+x@Example.org", "attributes": {"plan": "pro", "n": 1}})
    assert created.status_code == 201, created.text
    assert created.headers["location"] == "/v1/contacts/ann%2Bx@example.org"
    contact = created.json()
    assert contact["email"] == "ann+x@example.org" and contact["created_at"].endswith("Z")

    updated = client.post("/v1/contacts", json={"email": "ANN+X@example.org", "attributes": {"n": 2}, "locale": "fr"})
    assert updated.status_code == 200, updated.text
    assert updated.json()["attributes"] == {"plan": "pro", "n": 2} and updated.json()["id"] == contact["id"]

    by_address = client.get(created.headers["location"]).json()
    by_id = client.get(f"/v1/contacts/{contact['id']}").json()
    assert by_address == by_id and by_address["locale"] == "fr"

    patched = client.patch("/v1/contacts/ann%2Bx@example.org", json={"attributes": {"plan": None, "city": "Lyon"}})
    assert patched.status_code == 200, patched.text
    assert patched.json()["attributes"] == {"n": 2, "city": "Lyon"}
    replaced = client.patch(f"/v1/contacts/{contact['id']}", json={"attributes": {"a": 1}, "replace_attributes": True})
    assert replaced.json()["attributes"] == {"a": 1}

    assert client.delete("/v1/contacts/Ann%2BX@example.org").status_code == 204
    assert client.get(created.headers["location"]).status_code == 404
    assert contact_count() == 0 and suppression_reason("ann+x@example.org") == "erased"
    assert client.delete("/v1/contacts/ann%2Bx@example.org").status_code == 404


def test_bad_input_is_422_with_a_pointer_and_unknown_contacts_404(api):
    client = api.client("contacts:read", "contacts:write")
    cases = [
        ({"email": "not an address"}, "/email"),
        ({"email": "a@example.org", "timezone": "Mars/Olympus"}, "/timezone"),
        ({"email": "a@example.org", "colour": "red"}, "/colour"),
        ({"email": "a@example.org", "status": "maybe"}, "/status"),
        ({"email": "a@example.org", "attributes": {'bad"name': 1}}, "/attributes"),
        ({"attributes": {}}, "/email"),
    ]
    for body, where in cases:
        response = client.post("/v1/contacts", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert where in pointers(response), (body, response.json())
    assert contact_count() == 0

    assert client.post("/v1/contacts", json={"email": "a@example.org"}).status_code == 201
    bad_patch = client.patch("/v1/contacts/a@example.org", json={"locale": "not a locale!"})
    assert bad_patch.status_code == 422 and pointers(bad_patch) == ["/locale"]
    for method, path in [
        ("GET", "/v1/contacts/nobody@example.org"),
        ("GET", "/v1/contacts/999999"),
        ("GET", "/v1/contacts/not-an-address"),
        ("PATCH", "/v1/contacts/nobody@example.org"),
        ("DELETE", "/v1/contacts/123456"),
    ]:
        response = client.request(method, path, json={"attributes": {}} if method == "PATCH" else None)
        assert response.status_code == 404, (method, path, response.text)
    assert client.get("/v1/contacts", params={"cursor": "nonsense"}).status_code == 422
    assert client.get("/v1/contacts", params={"status": "maybe"}).status_code == 422


def test_batch_stores_the_good_rows_and_points_at_the_bad_ones(api):
    client = api.client("contacts:read", "contacts:write")
    assert client.post("/v1/contacts", json={"email": "gone@example.org", "status": "unsubscribed"}).status_code == 201
    assert client.post("/v1/contacts", json={"email": "kept@example.org", "attributes": {"a": 1}}).status_code == 201
    rows = [
        {"email": "new@example.org", "attributes": {"x": 1}},
        {"email": "not an address"},
        {"email": "GONE@example.org", "status": "subscribed", "attributes": {"back": True}},
        {"email": "kept@example.org", "attributes": {"b": 2}, "timezone": "Europe/Paris"},
        {"email": "other@example.org", "colour": "red"},
        {"email": "New@Example.org"},
        {"email": "tz@example.org", "timezone": "Nowhere/Special"},
        {"email": "quits@example.org", "status": "unsubscribed"},
        {"email": "QUITS@example.org"},
    ]
    response = client.post("/v1/contacts/batch", json={"contacts": rows})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["created"], body["updated"], body["rejected"]) == (2, 2, 5)
    results = body["results"]
    assert [r["index"] for r in results] == list(range(len(rows)))
    assert results[0]["created"] is True and results[0]["email"] == "new@example.org"
    assert results[3] == {"index": 3, "email": "kept@example.org", "id": results[3]["id"], "created": False}
    assert results[1]["errors"][0]["pointer"] == "/contacts/1/email"
    assert results[4]["errors"][0]["pointer"] == "/contacts/4/colour"
    assert results[5]["errors"] == [{"pointer": "/contacts/5/email", "detail": "new@example.org is also in row 0"}]
    assert results[6]["errors"][0]["pointer"] == "/contacts/6/timezone"
    assert results[8]["errors"] == [{"pointer": "/contacts/8/email", "detail": "quits@example.org is also in row 7"}]
    # A batch never resubscribes; attributes still merge.
    gone = client.get("/v1/contacts/gone@example.org").json()
    assert gone["status"] == "unsubscribed" and gone["attributes"] == {"back": True}
    assert suppression_reason("gone@example.org") == "unsubscribed"
    kept = client.get("/v1/contacts/kept@example.org").json()
    assert kept["attributes"] == {"a": 1, "b": 2} and kept["timezone"] == "Europe/Paris"
    assert client.get("/v1/contacts/quits@example.org").json()["status"] == "unsubscribed"
    assert suppression_reason("quits@example.org") == "unsubscribed"
    assert contact_count() == 4

    not_an_object = client.post("/v1/contacts/batch", json={"contacts": [{"email": "x@example.org"}, "x"]})
    assert not_an_object.status_code == 422 and pointers(not_an_object) == ["/contacts/1"]
    assert contact_count() == 4
    too_many = client.post("/v1/contacts/batch", json={"contacts": [{"email": "a@example.org"}] * 10_001})
    assert too_many.status_code == 422 and pointers(too_many) == ["/contacts"]
    assert client.post("/v1/contacts/batch", json={"contacts": []}).status_code == 422


def test_a_batch_of_ten_thousand(api):
    client = api.client("contacts:write")
    rows = [{"email": f"user{i}@example.org", "attributes": {"i": i}} for i in range(10_000)]
    started = time.monotonic()
    response = client.post("/v1/contacts/batch", json={"contacts": rows})
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    assert (body["created"], body["updated"], body["rejected"]) == (10_000, 0, 0)
    assert len({r["id"] for r in body["results"]}) == 10_000
    assert contact_count() == 10_000
    assert elapsed < 20, elapsed


def test_concurrent_batches_of_the_same_addresses(api):
    # Both see the addresses as new, then one inserts what the other has just inserted: each row
    # is created once and updated by the other, in whichever order; neither call fails.
    client = api.client("contacts:write")
    rows = [{"email": f"both{i}@example.org", "attributes": {"i": i}} for i in range(3000)]
    with ThreadPoolExecutor(2) as pool:
        responses = list(
            pool.map(lambda batch: client.post("/v1/contacts/batch", json={"contacts": batch}), [rows, rows[::-1]])
        )
    assert [r.status_code for r in responses] == [200, 200], [r.text[:300] for r in responses]
    bodies = [r.json() for r in responses]
    assert sum(b["created"] for b in bodies) == 3000 and sum(b["updated"] for b in bodies) == 3000
    assert contact_count() == 3000


def test_list_contacts_pages_and_filters(api):
    client = api.client("contacts:read", "contacts:write")
    emails = [f"p{i}@example.org" for i in range(5)]
    client.post("/v1/contacts/batch", json={"contacts": [{"email": e} for e in emails]})
    client.patch("/v1/contacts/p3@example.org", json={"status": "unsubscribed"})
    assert client.post("/v1/lists", json={"name": "news"}).status_code == 201
    client.post("/v1/lists/news/members", json={"emails": ["p1@example.org", "p4@example.org"]})

    seen, cursor = [], None
    while True:
        page = client.get("/v1/contacts", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        seen += [c["email"] for c in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == emails
    unsubscribed = client.get("/v1/contacts", params={"status": "unsubscribed"}).json()
    assert [c["email"] for c in unsubscribed["data"]] == ["p3@example.org"]
    members = client.get("/v1/contacts", params={"list": "news"}).json()
    assert [c["email"] for c in members["data"]] == ["p1@example.org", "p4@example.org"]
    assert members["data"][0]["lists"] == ["news"]
    unknown = client.get("/v1/contacts", params={"list": "nope"})
    assert unknown.status_code == 422 and pointers(unknown) == ["/list"]


def test_lists_and_members(api):
    client = api.client("contacts:read", "contacts:write")
    created = client.post("/v1/lists", json={"name": "Weekly news", "description": "Fridays"})
    assert created.status_code == 201, created.text
    assert created.headers["location"] == "/v1/lists/Weekly%20news"
    assert created.json()["members"] == 0
    assert client.post("/v1/lists", json={"name": "Weekly news"}).status_code == 409
    bad_name = client.post("/v1/lists", json={"name": "a\x01b"})
    assert bad_name.status_code == 422 and pointers(bad_name) == ["/name"]
    for name in ("b", "c"):
        client.post("/v1/lists", json={"name": name})
    first = client.get("/v1/lists", params={"limit": 2}).json()
    second = client.get("/v1/lists", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [x["name"] for x in first["data"] + second["data"]] == ["Weekly news", "b", "c"]
    assert second["next_cursor"] is None

    added = client.post("/v1/lists/Weekly%20news/members", json={"emails": ["A@example.org", "b@example.org"]})
    assert added.status_code == 200 and added.json() == {"added": 2}
    again = client.post("/v1/lists/Weekly%20news/members", json={"emails": ["a@example.org"]})
    assert again.json() == {"added": 0}
    bad = client.post("/v1/lists/Weekly%20news/members", json={"emails": ["c@example.org", "nope"]})
    assert bad.status_code == 422 and pointers(bad) == ["/emails/1"]
    assert client.get("/v1/contacts/c@example.org").status_code == 404  # nothing half-written

    assert client.get("/v1/lists/Weekly%20news").json()["members"] == 2
    members = client.get("/v1/lists/Weekly%20news/members", params={"limit": 1}).json()
    assert [m["email"] for m in members["data"]] == ["a@example.org"] and members["next_cursor"]
    rest = client.get("/v1/lists/Weekly%20news/members", params={"cursor": members["next_cursor"]}).json()
    assert [m["email"] for m in rest["data"]] == ["b@example.org"]
    assert client.get("/v1/contacts/a@example.org").json()["lists"] == ["Weekly news"]

    assert client.delete("/v1/lists/Weekly%20news/members/A@example.org").status_code == 204
    assert client.delete("/v1/lists/Weekly%20news/members/a@example.org").status_code == 404
    assert client.get("/v1/contacts/a@example.org").json()["lists"] == []

    for method, path, body in [
        ("GET", "/v1/lists/nope", None),
        ("DELETE", "/v1/lists/nope", None),
        ("GET", "/v1/lists/nope/members", None),
        ("POST", "/v1/lists/nope/members", {"emails": ["a@example.org"]}),
        ("DELETE", "/v1/lists/nope/members/a@example.org", None),
    ]:
        assert client.request(method, path, json=body).status_code == 404, (method, path)

    assert client.delete("/v1/lists/Weekly%20news").status_code == 204
    assert client.get("/v1/lists/Weekly%20news").status_code == 404
    assert contact_count() == 2  # the members stay


def test_scopes(api):
    reader = api.client("contacts:read")
    assert reader.post("/v1/contacts", json={"email": "a@example.org"}).status_code == 403
    assert reader.post("/v1/lists", json={"name": "x"}).status_code == 403
    assert reader.get("/v1/contacts").status_code == 200
    writer = api.client("contacts:write")
    assert writer.get("/v1/contacts").status_code == 403
    assert contact_count() == 0


def test_input_a_database_cannot_store_is_refused_not_a_500(api):
    client = api.client("contacts:read", "contacts:write")
    nul, surrogate = "\\u0000", "\\ud800"  # as JSON escapes: a NUL and a lone UTF-16 surrogate
    huge_cursor = "WzEwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDBd"  # [10**30]
    requests = [
        ("POST", "/v1/contacts", f'{{"email": "a@example.org", "attributes": {{"k": "x{nul}"}}}}'),
        ("POST", "/v1/contacts", f'{{"email": "a@example.org", "attributes": {{"k": ["{surrogate}"]}}}}'),
        ("POST", "/v1/contacts", f'{{"email": "a@example.org", "source": "{surrogate}"}}'),
        ("POST", "/v1/lists", f'{{"name": "x{surrogate}"}}'),
        ("POST", "/v1/lists", f'{{"name": "x", "description": "{nul}"}}'),
        ("GET", "/v1/contacts/99999999999999999999999", None),
        ("GET", "/v1/contacts/%C2%B2", None),
        ("GET", f"/v1/contacts?cursor={huge_cursor}", None),
        ("GET", f"/v1/lists/x/members?cursor={huge_cursor}", None),
        ("GET", "/v1/lists/a%00b", None),
        ("GET", "/v1/lists?cursor=WyJcdTAwMDAiXQ", None),  # ["\u0000"]
        ("GET", "/v1/lists/a%ED%A0%80b", None),
        ("GET", "/v1/contacts?list=a%00b", None),
    ]
    for method, path, body in requests:
        response = client.request(method, path, content=body, headers={"content-type": "application/json"})
        expected = response.status_code == 422 if method == "POST" else response.status_code < 500
        assert expected, (method, path, body, response.status_code, response.text)
    batch = f'{{"contacts": [{{"email": "a@example.org", "attributes": {{"k": "{nul}"}}}}]}}'
    response = client.post("/v1/contacts/batch", content=batch, headers={"content-type": "application/json"})
    assert response.json()["results"][0]["errors"][0]["pointer"] == "/contacts/0/attributes/k"
    assert contact_count() == 0
