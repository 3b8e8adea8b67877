"""GET /v1/events and GET /v1/messages/{id}/events through a real `smartmail web`, and the client's methods."""

from __future__ import annotations

from sqlalchemy import insert, select

from smartmail.audience import event_stream
from smartmail.client import Client
from smartmail.store.engine import get_engine, session_scope, utcnow
from smartmail.store.models import Campaign, Contact, Event
from tests.conftest import wait_for


def _world() -> dict:
    """Two contacts, a campaign, its sends and opens (every third open by a machine), a custom event."""
    with get_engine().begin() as connection:
        connection.execute(insert(Contact), [{"email": "ann@example.org"}, {"email": "bob@example.org"}])
        ids = dict(connection.execute(select(Contact.email, Contact.id)).all())
    with session_scope() as session:
        campaign = Campaign(name="spring", template_name="promo", sender="news@example.com")
        session.add(campaign)
        session.flush()
        campaign_id = campaign.id
    now = utcnow()
    rows = []
    for i in range(12):
        contact = ids["ann@example.org" if i % 2 else "bob@example.org"]
        message = f"msg{i:023d}"
        base = {"contact_id": contact, "campaign_id": campaign_id, "message_id": message, "occurred_at": now}
        rows.append({**base, "type": "sent", "machine": False, "properties": {}})
        rows.append({**base, "type": "opened", "machine": i % 3 == 0, "properties": {"ip": "192.0.2.0"}})
    rows.append(
        {
            "type": "order_placed",
            "contact_id": ids["ann@example.org"],
            "campaign_id": None,
            "message_id": None,
            "machine": False,
            "properties": {"total": 3},
            "occurred_at": now,
        }
    )
    with get_engine().begin() as connection:
        connection.execute(insert(Event), rows)
    settle()
    return {"contacts": ids, "campaign": campaign_id, "stored": _stored()}


def _pages(client, **params) -> list[dict]:
    pages, cursor = [], None
    while True:
        response = client.get("/v1/events", params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body)
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


def test_the_stream_pages_with_a_cursor_and_a_position_resumes_it(api):
    world = _world()
    client = api.client("events:read")
    pages = _pages(client, limit=5)
    events = [event for page in pages for event in page["data"]]
    assert [event["id"] for event in events] == [row["id"] for row in world["stored"]]
    assert [len(page["data"]) for page in pages] == [5, 5, 5, 5, 5]  # 25 events
    opened = events[1]
    assert opened == {
        "id": opened["id"],
        "position": opened["position"],
        "type": "opened",
        "occurred_at": opened["occurred_at"],
        "message_id": "msg" + "0" * 23,
        "contact_id": world["contacts"]["bob@example.org"],
        "email": "bob@example.org",
        "campaign_id": world["campaign"],
        "machine": True,
        "properties": {"ip": "192.0.2.0"},
    }
    assert opened["occurred_at"].endswith("Z")
    assert pages[-1]["position"] == events[-1]["position"]

    # A consumer keeps `position`; after it, only what was written since.
    with get_engine().begin() as connection:
        connection.execute(insert(Event).values(type="signup", contact_id=world["contacts"]["ann@example.org"]))
    settle()
    later = client.get("/v1/events", params={"after": pages[-1]["position"]}).json()
    assert [event["type"] for event in later["data"]] == ["signup"] and later["next_cursor"] is None


def test_filters(api):
    world = _world()
    client = api.client("events:read")

    def ids(**params) -> list[int]:
        return [event["id"] for page in _pages(client, limit=4, **params) for event in page["data"]]

    def rows(test) -> list[int]:
        return [row["id"] for row in _stored() if test(row)]

    assert ids(type="opened") == rows(lambda row: row["type"] == "opened")
    assert ids(type=["opened", "order_placed"]) == rows(lambda row: row["type"] in ("opened", "order_placed"))
    human = rows(lambda row: row["type"] == "opened" and not row["machine"])
    assert ids(type="opened", include_machine="false") == human
    assert ids(contact="ANN@example.org") == rows(lambda row: row["contact_id"] == world["contacts"]["ann@example.org"])
    assert ids(campaign="spring") == ids(campaign=str(world["campaign"])) == rows(lambda row: row["campaign_id"])
    assert ids(message="msg" + "0" * 23) == rows(lambda row: row["message_id"] == "msg" + "0" * 23)
    assert ids(contact="nobody@example.org") == [] and ids(campaign="winter") == []


def settle() -> None:
    """Wait until every stored event is readable: the stream stops below the oldest transaction
    running anywhere on the PostgreSQL server, and other test runs may share the server."""
    with get_engine().connect() as connection:
        last = connection.execute(select(Event.xact, Event.id).order_by(Event.xact.desc(), Event.id.desc())).first()
    if last is not None:
        wait_for(lambda: event_stream.end() == event_stream.Position(*last), timeout=30, message="the stream's end")


def _stored() -> list[dict]:
    with get_engine().connect() as connection:
        query = select(Event.id, Event.type, Event.contact_id, Event.campaign_id, Event.message_id, Event.machine)
        return [row._asdict() for row in connection.execute(query.order_by(Event.xact, Event.id)).all()]


def test_a_messages_events(api):
    _world()
    client = api.client("events:read")
    response = client.get(f"/v1/messages/msg{'0' * 23}/events")
    assert response.status_code == 200, response.text
    assert [(e["type"], e["machine"]) for e in response.json()["data"]] == [("sent", False), ("opened", True)]
    missing = client.get("/v1/messages/nothing-here/events")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"


def test_bad_parameters_are_422_naming_them(api):
    client = api.client("events:read")
    for params, named in [
        ({"after": "12"}, "after"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"after": "1-2-3"}, "after"),
        ({"type": "two words"}, "type"),
        ({"limit": "0"}, "limit"),
        ({"contact": "not an address"}, "contact"),
        ({"include_machine": "perhaps"}, "include_machine"),
    ]:
        response = client.get("/v1/events", params=params)
        assert response.status_code == 422, (params, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert named in response.text, (params, response.text)


def test_reading_needs_events_read_and_writing_does_not_grant_it(api):
    writer = api.client("events:write")
    assert writer.get("/v1/events").status_code == 403
    assert writer.get("/v1/messages/x/events").status_code == 403
    assert api.client("events:read").get("/v1/events").status_code == 200


def test_the_client_reads_the_stream(api):
    world = _world()
    with Client(api.url, api_key=api.key("events:read")) as client:
        listed = list(client.events.list(page_size=4, type=["opened"], include_machine=False))
        assert [event["id"] for event in listed] == [
            row["id"] for row in _stored() if row["type"] == "opened" and not row["machine"]
        ]
        first = client.events.page(limit=10)
        assert len(first["data"]) == 10 and first["next_cursor"] == first["position"]
        rest = client.events.page(first["position"], limit=100)
        assert len(first["data"]) + len(rest["data"]) == len(world["stored"]) and rest["next_cursor"] is None
        assert [e["type"] for e in client.events.of_message("msg" + "0" * 23)] == ["sent", "opened"]
