"""/v1/messages through a real `smartmail web` process, on SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import func, select

from smartmail.store.engine import session_scope
from smartmail.store.models import Message


def stored() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Message)) or 0


def test_send_then_read(api):
    client = api.client("messages:send", "messages:read")
    response = client.post("/v1/messages", json={"to": "Ann <ann@example.org>", "subject": "Hi", "text": "Hello"})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["state"] == "queued" and response.headers["location"] == f"/v1/messages/{body['id']}"
    message = client.get(f"/v1/messages/{body['id']}").json()
    assert message["recipient"] == "Ann <ann@example.org>" and message["subject"] == "Hi"
    listed = client.get("/v1/messages", params={"to": "ANN@example.org"}).json()
    assert [m["id"] for m in listed["data"]] == [body["id"]]


def test_a_batch_with_bad_items_queues_the_good_ones(api):
    client = api.client("messages:send")
    items = [
        {"to": "a@example.org", "subject": "s", "text": "t"},
        {"to": "not an address", "subject": "s", "text": "t"},
        {"to": "b@example.org", "subject": "s", "text": "t", "colour": "red"},
        {"to": "c@example.org", "template": "no-such-template"},
        {"to": "d@example.org", "subject": "s", "text": "t"},
    ]
    response = client.post("/v1/messages/batch", json={"messages": items})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["accepted"], body["rejected"]) == (2, 3)
    results = body["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    assert results[1]["errors"][0]["pointer"] == "/messages/1/to"
    assert results[2]["errors"][0]["pointer"] == "/messages/2/colour"
    assert results[3]["errors"][0]["pointer"] == "/messages/3/template"
    assert results[0]["state"] == results[4]["state"] == "queued"
    assert stored() == 2


def test_idempotent_retry_replays_and_a_changed_body_is_refused(api):
    client = api.client("messages:send")
    first = client.post(
        "/v1/messages", json={"to": "a@example.org", "subject": "s", "text": "t"}, headers={"Idempotency-Key": "k-1"}
    )
    again = client.post(
        "/v1/messages", json={"to": "a@example.org", "subject": "s", "text": "t"}, headers={"Idempotency-Key": "k-1"}
    )
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    changed = client.post(
        "/v1/messages", json={"to": "b@example.org", "subject": "s", "text": "t"}, headers={"Idempotency-Key": "k-1"}
    )
    assert changed.status_code == 422 and changed.headers["content-type"] == "application/problem+json"
    assert stored() == 1


def test_a_batch_items_key_is_not_a_single_sends_key(api):
    client = api.client("messages:send")
    item = {"to": "a@example.org", "subject": "s", "text": "t"}
    batch = client.post("/v1/messages/batch", json={"messages": [item]}, headers={"Idempotency-Key": "abc"}).json()
    single = client.post("/v1/messages", json=item, headers={"Idempotency-Key": "abc:0"}).json()
    assert not single["duplicate"] and single["id"] != batch["results"][0]["id"]
    assert stored() == 2
