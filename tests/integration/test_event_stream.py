"""Reading the event stream on SQLite and PostgreSQL: order, filters, paging, the horizon, and the CLI's tail."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, event, insert, select
from typer.testing import CliRunner

from smartmail.audience import event_stream
from smartmail.audience.event_stream import Position
from smartmail.cli.main import app as cli
from smartmail.errors import InvalidInput, NotFound
from smartmail.store.engine import get_engine, session_scope, utcnow
from smartmail.store.models import Campaign, Contact, Event, Message
from tests.conftest import ROOT, wait_for


def _contacts(*emails: str) -> dict[str, int]:
    with get_engine().begin() as connection:
        connection.execute(insert(Contact), [{"email": email} for email in emails])
        return dict(connection.execute(select(Contact.email, Contact.id)).all())


def _campaign(name: str) -> int:
    with session_scope() as session:
        row = Campaign(name=name, template_name="promo", sender="news@example.com")
        session.add(row)
        session.flush()
        return row.id


def _events(rows: list[dict]) -> None:
    """Events inserted straight into the table, as the writers will (each row: type and contact_id at least)."""
    now = utcnow()
    values = [
        {
            "message_id": None,
            "campaign_id": None,
            "machine": False,
            "properties": {},
            "occurred_at": now,
            **row,
        }
        for row in rows
    ]
    with get_engine().begin() as connection:
        connection.execute(insert(Event), values)
    settle()


def settle() -> None:
    """Wait until every stored event is readable. The stream stops below the oldest transaction
    running anywhere on the PostgreSQL server, and other test runs may share the server."""
    with get_engine().connect() as connection:
        last = connection.execute(select(Event.xact, Event.id).order_by(Event.xact.desc(), Event.id.desc())).first()
    if last is not None:
        wait_for(lambda: event_stream.end() == Position(*last), timeout=30, message="the stream to reach its end")


def _stored() -> list[dict]:
    """Every event as the reader shows it, in (xact, id) order, straight from the table."""
    with get_engine().connect() as connection:
        rows = connection.execute(
            select(Event.id, Event.xact, Event.type, Event.contact_id, Event.campaign_id, Event.machine).order_by(
                Event.xact, Event.id
            )
        ).all()
    return [row._asdict() for row in rows]


def _read_all(**filters) -> tuple[list[dict], int]:
    """Every event `read` returns, page after page, and how many calls it took."""
    events, position, calls = [], None, 0
    while True:
        page = event_stream.read(position, **filters)
        calls += 1
        events += page.events
        position = page.next
        if not page.more:
            return events, calls


@pytest.fixture
def world(env):
    """Contacts, two campaigns and a mix of events: campaign sends and opens (some by machines),
    custom events, one event with no contact."""
    ids = _contacts("ann@example.org", "bob@example.org")
    spring, autumn = _campaign("spring"), _campaign("autumn")
    rows = []
    for i in range(30):
        contact = ids["ann@example.org"] if i % 2 else ids["bob@example.org"]
        campaign = spring if i % 3 else autumn
        message = f"msg{i:023d}"
        rows.append({"type": "sent", "contact_id": contact, "campaign_id": campaign, "message_id": message})
        if i % 4 == 0:
            rows.append(
                {
                    "type": "opened",
                    "contact_id": contact,
                    "campaign_id": campaign,
                    "message_id": message,
                    "machine": i % 8 == 0,
                    "properties": {"user_agent": "Mozilla/5.0"},
                }
            )
    rows.append({"type": "order_placed", "contact_id": ids["ann@example.org"], "properties": {"total": 12.5}})
    rows.append({"type": "clicked", "contact_id": None, "message_id": "msg" + "9" * 23, "properties": {"link": 2}})
    _events(rows)
    return {"contacts": ids, "spring": spring, "autumn": autumn}


def test_a_page_holds_every_field_and_pages_follow_the_stream_order(world):
    stored = _stored()
    first = event_stream.read(None, limit=7)
    assert len(first.events) == 7 and first.more
    assert first.next == Position(stored[6]["xact"], stored[6]["id"])

    events, _ = _read_all(limit=7)
    assert [event["id"] for event in events] == [row["id"] for row in stored]
    assert [event["position"] for event in events] == [f"{row['xact']}-{row['id']}" for row in stored]
    opened = next(event for event in events if event["type"] == "opened" and event["machine"])
    assert opened["email"] == "bob@example.org" and opened["campaign_id"] == world["autumn"]
    assert opened["properties"] == {"user_agent": "Mozilla/5.0"} and opened["message_id"].startswith("msg")
    assert opened["occurred_at"].endswith("Z") and opened["contact_id"] == world["contacts"]["bob@example.org"]
    order = next(event for event in events if event["type"] == "order_placed")
    assert (order["message_id"], order["campaign_id"], order["machine"]) == (None, None, False)
    orphan = events[-1]
    assert (orphan["type"], orphan["email"], orphan["contact_id"]) == ("clicked", None, None)

    # The last page says so, and reading after it finds nothing until something is written.
    last = event_stream.read(Position.parse(events[-1]["position"]))
    assert (last.events, last.more, last.next) == ([], False, Position.parse(events[-1]["position"]))
    _events([{"type": "signup", "contact_id": world["contacts"]["ann@example.org"]}])
    assert [event["type"] for event in event_stream.read(last.next).events] == ["signup"]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"types": ["opened"]}, lambda row, w: row["type"] == "opened"),
        ({"types": ["opened", "clicked"]}, lambda row, w: row["type"] in ("opened", "clicked")),
        (
            {"types": ["opened"], "include_machine": False},
            lambda row, w: row["type"] == "opened" and not row["machine"],
        ),
        ({"include_machine": False}, lambda row, w: not row["machine"]),
        ("spring", lambda row, w: row["campaign_id"] == w["spring"]),
        ("ann", lambda row, w: row["contact_id"] == w["contacts"]["ann@example.org"]),
        ({"types": ["bounced"]}, lambda row, w: False),
    ],
    ids=["type", "types", "human opens", "human", "campaign", "contact", "none"],
)
def test_filters_select_the_same_events_whatever_the_scan_window(world, monkeypatch, filters, expected):
    if filters == "spring":
        filters = {"campaign_id": world["spring"]}
    elif filters == "ann":
        filters = {"contact_id": world["contacts"]["ann@example.org"]}
    wanted = [row["id"] for row in _stored() if expected(row, world)]
    events, _ = _read_all(limit=3, **filters)
    assert [event["id"] for event in events] == wanted
    # With a window smaller than the stream, a page looks at that many rows at most: some pages hold
    # fewer events than the limit, or none, and the walk still finds exactly the same events.
    monkeypatch.setattr(event_stream, "SCAN_WINDOW", 5)
    events, calls = _read_all(limit=3, **filters)
    assert [event["id"] for event in events] == wanted
    assert calls >= len(_stored()) // 5


def test_a_message_filter_and_a_messages_own_events(world):
    message = "msg" + "0" * 23
    events, _ = _read_all(message_id=message)
    assert [(event["type"], event["machine"]) for event in events] == [("sent", False), ("opened", True)]
    assert [event["type"] for event in event_stream.for_message(message)] == ["sent", "opened"]

    # A message's own events are in the order they happened, whatever order they were written in.
    earlier = utcnow() - timedelta(minutes=5)
    _events([{"type": "deferred", "contact_id": None, "message_id": message, "occurred_at": earlier}])
    assert [event["type"] for event in event_stream.for_message(message)] == ["deferred", "sent", "opened"]

    with pytest.raises(NotFound):
        event_stream.for_message("no-such-message")
    now = utcnow()
    with get_engine().begin() as connection:
        connection.execute(
            insert(Message),
            {
                "id": "quiet" + "0" * 21,
                "state": "queued",
                "sender": "a@example.com",
                "recipient": "b@example.com",
                "subject": "s",
                "text": "t",
                "headers": {},
                "tags": [],
                "message_id_header": "<quiet@example.com>",
                "attempts": 0,
                "created_at": now,
            },
        )
    assert event_stream.for_message("quiet" + "0" * 21) == []


def test_filter_ids_resolve_names_and_an_unknown_one_matches_nothing(world):
    ids = event_stream.filter_ids(contact="Ann@Example.org", campaign="spring")
    assert ids == {"contact_id": world["contacts"]["ann@example.org"], "campaign_id": world["spring"]}
    assert event_stream.filter_ids(campaign=str(world["autumn"]))["campaign_id"] == world["autumn"]
    unknown = event_stream.filter_ids(contact="nobody@example.org", campaign="winter")
    assert unknown == {"contact_id": 0, "campaign_id": 0}
    page = event_stream.read(None, **unknown)
    assert page.events == [] and not page.more and page.next == event_stream.end()
    with pytest.raises(InvalidInput) as caught:
        event_stream.filter_ids(contact="not an address")
    assert caught.value.field == "contact"


def test_bad_arguments_name_their_field(env):
    for value in ("", "1", "1-", "-1-2", "a-b", "1-2-3", "99999999999999999999-1", " 1-2", None, 12):
        with pytest.raises(InvalidInput) as caught:
            Position.parse(value, field="cursor")
        assert caught.value.field == "cursor"
    assert Position.parse("12-345") == Position(12, 345) and str(Position(12, 345)) == "12-345"
    with pytest.raises(InvalidInput) as caught:
        event_stream.read(None, types=["opened", "no spaces"])
    assert caught.value.field == "type[1]"
    with pytest.raises(InvalidInput) as caught:
        event_stream.read(None, limit=0)
    assert caught.value.field == "limit"


def test_a_reader_never_passes_an_event_whose_transaction_is_still_open(env, database_url):
    """Ids are handed out before commit: an event with a lower id can commit after one with a higher
    id. A reader that went by id would return the later one, keep its id as the checkpoint, and
    never see the earlier one. The stream stops below the oldest running transaction instead."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer at a time: its ids are in commit order")
    contact = _contacts("ann@example.org")["ann@example.org"]
    _events([{"type": "signup", "contact_id": contact}])
    start = event_stream.end()
    engine = create_engine(database_url)
    try:
        with engine.connect() as slow, engine.connect() as quick:
            slow.begin()
            low = slow.execute(insert(Event).values(type="sent", contact_id=contact).returning(Event.id)).scalar_one()
            with quick.begin():
                high = quick.execute(
                    insert(Event).values(type="opened", contact_id=contact).returning(Event.id)
                ).scalar_one()
            assert low < high

            # The committed event is there, but behind the open transaction: not read yet.
            page = event_stream.read(start)
            assert (page.events, page.next, page.more) == ([], start, False)
            assert event_stream.end() == start
            filtered = event_stream.read(start, types=["opened"])
            assert filtered.events == [] and filtered.next == start

            slow.commit()
        settle()
        page = event_stream.read(start)
        assert [event["id"] for event in page.events] == [low, high]
        assert event_stream.end() == page.next
    finally:
        engine.dispose()


def test_a_rolled_back_event_leaves_no_gap_that_holds_the_stream(env, database_url):
    contact = _contacts("ann@example.org")["ann@example.org"]
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            connection.begin()
            connection.execute(insert(Event).values(type="sent", contact_id=contact))
            connection.rollback()
    finally:
        engine.dispose()
    _events([{"type": "opened", "contact_id": contact}])
    assert [event["type"] for event in event_stream.read(None).events] == ["opened"]


def test_a_typed_read_walks_the_stream_index_a_window_at_a_time(env, database_url):
    """The window is read from ix_events_xact_id alone, and neither statement reads the whole table,
    for a frequent type as for a rare one."""
    if not database_url.startswith("postgresql"):
        pytest.skip("plans: SQLite has no planner statistics to go wrong with")
    contact = _contacts("ann@example.org")["ann@example.org"]
    for _ in range(40):  # 40 transactions: positions spread over many xacts, as writers make them
        types = ["opened" if i % 997 == 0 else "clicked" if i % 5 == 0 else "sent" for i in range(2000)]
        _events([{"type": kind, "contact_id": contact} for kind in types])
    engine = get_engine()
    with engine.connect() as connection:
        connection.exec_driver_sql("ANALYZE events")
        connection.commit()
    middle = event_stream.read(None, limit=1000)
    seen: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        seen.append((statement, parameters))

    for types in (["clicked"], ["opened"], None):
        seen.clear()
        event.listen(engine, "before_cursor_execute", capture)
        try:
            page = event_stream.read(middle.next, types=types, limit=100)
        finally:
            event.remove(engine, "before_cursor_execute", capture)
        assert page.more
        with engine.connect() as connection:
            plans = [
                "\n".join(row[0] for row in connection.exec_driver_sql("EXPLAIN " + statement, parameters))
                for statement, parameters in seen
            ]
        window, rows = plans
        assert "Index Only Scan using ix_events_xact_id" in window, window
        assert "Seq Scan on events" not in window + rows, (types, window, rows)  # contacts may be tiny


# --- smartmail events tail ---------------------------------------------------------------------


def test_tail_prints_the_stream_as_text_or_json_lines(world):
    runner = CliRunner()
    everything = runner.invoke(cli, ["events", "tail", "--since", "all", "--no-follow", "--format", "json"])
    assert everything.exit_code == 0, everything.output
    lines = [json.loads(line) for line in everything.stdout.splitlines()]
    assert [line["id"] for line in lines] == [row["id"] for row in _stored()]

    opens = runner.invoke(cli, ["events", "tail", "--since", "all", "--no-follow", "--type", "opened,clicked"])
    assert opens.exit_code == 0, opens.output
    rows = opens.stdout.splitlines()
    assert len(rows) == sum(1 for row in _stored() if row["type"] in ("opened", "clicked"))
    machine = next(row for row in rows if "machine" in row.split("  "))
    position, occurred_at, kind, email, *rest = machine.split("  ")
    assert Position.parse(position) and occurred_at.endswith("Z") and kind == "opened"
    assert email == "bob@example.org" and f"campaign={world['autumn']}" in rest
    assert rest[-1] == '{"user_agent":"Mozilla/5.0"}'

    middle = lines[10]["position"]
    after = runner.invoke(cli, ["events", "tail", "--since", middle, "--no-follow", "--format", "json"])
    assert [json.loads(line)["id"] for line in after.stdout.splitlines()] == [line["id"] for line in lines[11:]]

    # From now (the default), nothing old is printed.
    now = runner.invoke(cli, ["events", "tail", "--no-follow"])
    assert now.exit_code == 0 and now.stdout == ""


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--since", "yesterday"], "--since"),
        (["--since", "1-2-3"], "--since"),
        (["--type", "no spaces"], "--type"),
        (["--format", "xml"], "--format"),
    ],
)
def test_tail_refuses_bad_input_with_a_message(env, arguments, named):
    result = CliRunner().invoke(cli, ["events", "tail", "--no-follow", *arguments])
    assert result.exit_code != 0
    assert named in result.output


def test_tail_follows_new_events_and_ctrl_c_exits_0(world):
    since = str(event_stream.end())
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "smartmail.cli",
            "events",
            "tail",
            "--since",
            since,
            "--format",
            "json",
            "--interval",
            "0.1",
        ],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready = selectors.DefaultSelector()
        ready.register(process.stdout, selectors.EVENT_READ)
        time.sleep(1)  # a few polls of an unchanged stream print nothing
        assert process.poll() is None and not ready.select(0)
        _events([{"type": "signup", "contact_id": world["contacts"]["ann@example.org"], "properties": {"n": 1}}])
        assert ready.select(30), "nothing printed in 30 s"
        line = json.loads(process.stdout.readline())
        assert (line["type"], line["email"], line["properties"]) == ("signup", "ann@example.org", {"n": 1})
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
        assert process.stderr is not None and "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
