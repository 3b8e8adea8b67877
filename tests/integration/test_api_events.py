"""/v1/events through a real `smartmail web` process, on SQLite and PostgreSQL."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from sqlalchemy import select

from smartmail.store.engine import session_scope
from smartmail.store.models import Contact, Event


def stored_events() -> list[tuple[str, str, dict, datetime, str | None]]:
    """(address, type, properties, occurred_at, client id) of every stored event, in id order."""
    with session_scope() as session:
        rows = session.execute(
            select(Contact.email, Event.type, Event.properties, Event.occurred_at, Event.client_event_id)
            .join(Contact, Contact.id == Event.contact_id)
            .order_by(Event.id)
        )
        return [tuple(row) for row in rows]


def test_events_are_stored_and_a_repeated_id_is_a_duplicate(api):
    client = api.client("events:write")
    events = [
        {"email": "Shop@Example.org", "type": "order_placed", "id": "order-1", "properties": {"total": 12.5}},
        {"email": "lead@example.org", "type": "lead_created", "occurred_at": "2026-03-01T10:00:00+02:00"},
        {"email": "shop@example.org", "type": "order_placed", "id": "order-1", "properties": {"total": 99}},
    ]
    response = client.post("/v1/events", json={"events": events})
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (2, 1, 0)
    assert body["results"] == [
        {"index": 0, "id": "order-1", "duplicate": False},
        {"index": 1, "duplicate": False},
        {"index": 2, "id": "order-1", "duplicate": True},
    ]
    shop, lead = sorted(stored_events(), key=lambda event: event[0], reverse=True)
    assert shop[:3] + shop[4:] == ("shop@example.org", "order_placed", {"total": 12.5}, "order-1")
    assert lead == ("lead@example.org", "lead_created", {}, datetime(2026, 3, 1, 8, 0), None)  # in UTC

    # A retry of the same call stores nothing new, even without an Idempotency-Key.
    again = client.post("/v1/events", json={"events": [events[0]]}).json()
    assert (again["accepted"], again["duplicates"]) == (0, 1) and again["results"][0]["duplicate"] is True
    assert len(stored_events()) == 2


def test_concurrent_calls_with_the_same_ids_store_each_event_once(api):
    client = api.client("events:write")
    # The contacts exist first: the calls then meet on the event ids alone.
    client.post("/v1/events", json={"events": [{"email": f"c{i}@example.org", "type": "seen"} for i in range(50)]})
    events = [{"email": f"c{i % 50}@example.org", "type": "paid", "id": f"pay-{i}"} for i in range(1000)]
    calls = [{"events": events if n % 2 else events[::-1]} for n in range(4)]
    with ThreadPoolExecutor(len(calls)) as pool:
        responses = list(pool.map(lambda body: client.post("/v1/events", json=body), calls))
    assert [r.status_code for r in responses] == [202] * 4, [r.text[:300] for r in responses]
    bodies = [r.json() for r in responses]
    assert sum(b["accepted"] for b in bodies) == 1000 and sum(b["duplicates"] for b in bodies) == 3000
    assert len(stored_events()) == 50 + 1000


def test_bad_items_are_pointed_at_and_the_good_ones_stored(api):
    client = api.client("events:write")
    events = [
        {"email": "a@example.org", "type": "signed_up"},
        {"email": "a@example.org", "type": "open"},
        {"email": "a@example.org", "type": "signed_up", "colour": "red"},
        {"email": "not an address", "type": "signed_up"},
        {"email": "a@example.org", "type": "signed_up", "id": "x" * 201},
        {"email": "a@example.org", "type": "signed_up", "properties": [1, 2]},
        {"email": "a@example.org", "type": "9lives"},
        {"email": "a@example.org", "type": "paid", "occurred_at": "yesterday"},
        {"email": "a@example.org", "type": "paid", "occurred_at": "9999-12-31T23:00:00-12:00"},
        {"email": "b@example.org", "type": "paid", "id": "p-1"},
    ]
    response = client.post("/v1/events", json={"events": events})
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (2, 0, 8)
    where = {r["index"]: [e["pointer"] for e in r.get("errors", [])] for r in body["results"]}
    assert where == {
        0: [],
        1: ["/events/1/type"],
        2: ["/events/2/colour"],
        3: ["/events/3/email"],
        4: ["/events/4/id"],
        5: ["/events/5/properties"],
        6: ["/events/6/type"],
        7: ["/events/7/occurred_at"],
        8: ["/events/8/occurred_at"],
        9: [],
    }
    assert sorted((email, kind) for email, kind, *_ in stored_events()) == [
        ("a@example.org", "signed_up"),
        ("b@example.org", "paid"),
    ]


def test_the_request_itself_is_checked(api):
    client = api.client("events:write")
    for body, where in [
        ({"events": []}, "/events"),
        ({"events": [{"email": "a@example.org", "type": "t"}] * 1001}, "/events"),
        ({"events": [{"email": "a@example.org", "type": "t"}], "extra": 1}, "/extra"),
        ({}, "/events"),
    ]:
        response = client.post("/v1/events", json=body)
        assert response.status_code == 422, response.text
        assert [e["pointer"] for e in response.json()["errors"]] == [where]
    assert stored_events() == []
    assert (
        api.client("contacts:write")
        .post("/v1/events", json={"events": [{"email": "a@x.org", "type": "t"}]})
        .status_code
        == 403
    )
    assert stored_events() == []


def test_properties_a_database_cannot_store_are_refused(api):
    client = api.client("events:write")
    for properties in ['{"k": "\\u0000"}', '{"\\u0000": 1}', '{"k": {"n": "\\ud800"}}']:
        body = f'{{"events": [{{"email": "a@example.org", "type": "t", "properties": {properties}}}]}}'
        response = client.post("/v1/events", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 202, response.text
        assert response.json()["results"][0]["errors"][0]["pointer"].startswith("/events/0/properties"), properties
    bad_address = '{"events": [{"email": "a\\ud800@example.org", "type": "t"}]}'
    response = client.post("/v1/events", content=bad_address, headers={"content-type": "application/json"})
    assert response.json()["results"][0]["errors"][0]["pointer"] == "/events/0/email", response.text
    assert stored_events() == []
