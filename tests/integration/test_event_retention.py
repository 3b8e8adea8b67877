"""Event retention on SQLite and PostgreSQL: old events and first-engagement marks go, in bounded
batches found through an index, back-dated rows too; recent ones stay; a second run changes nothing."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

import pytest
from sqlalchemy import event, insert, select, text

from smartmail.feedback import retention
from smartmail.store.engine import get_engine, utcnow
from smartmail.store.models import EngagementFirst, Event
from tests.conftest import reset_caches

DAYS = 30


@pytest.fixture
def store(env, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_EVENT_RETENTION_DAYS", str(DAYS))
    reset_caches()
    with get_engine().begin() as connection:
        connection.execute(text("DELETE FROM engagement_firsts"))  # not among the tables env clears
    yield
    with get_engine().begin() as connection:
        connection.execute(text("DELETE FROM engagement_firsts"))


def _add_events(rows: list[dict]) -> None:
    with get_engine().begin() as connection:
        connection.execute(insert(Event), rows)


def _event(type_: str, at: datetime, machine: bool = False, **properties) -> dict:
    return {
        "type": type_,
        "occurred_at": at,
        "machine": machine,
        "properties": properties,
        "contact_id": None,
        "message_id": None,
    }


def _message_id(created: datetime, serial: int) -> str:
    """A message id as store/ids.py makes it at `created`."""
    return retention.id_time_prefix(created) + f"{serial:016d}"


def _events() -> dict[int, tuple[str, bool, datetime, dict]]:
    with get_engine().connect() as connection:
        rows = connection.execute(select(Event.id, Event.type, Event.machine, Event.occurred_at, Event.properties))
        return {row[0]: tuple(row[1:]) for row in rows}


def _marks() -> set[tuple[str, int, bool]]:
    with get_engine().connect() as connection:
        rows = connection.execute(select(EngagementFirst.message_id, EngagementFirst.link, EngagementFirst.machine))
        return {tuple(row) for row in rows}


def _count_deletes(statements: list[str]):
    def capture(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("DELETE FROM EVENTS"):
            statements.append(statement)

    return capture


def test_old_events_go_in_bounded_batches_and_recent_ones_stay(store):
    now = utcnow()
    cutoff = now - timedelta(days=DAYS)
    # A recent event first (the lowest id), then old and recent ones of several types, human and
    # machine, and last a custom event back-dated far past the cutoff: the highest id of all.
    rows = [_event("sent", now - timedelta(days=1), keep=True)]
    for day in range(0, 80):
        at = now - timedelta(days=day, hours=1)
        rows.append(_event("sent", at, keep=at >= cutoff))
        rows.append(_event("opened", at, machine=day % 3 == 0, keep=at >= cutoff))
        if day % 4 == 0:
            rows.append(_event("clicked", at, machine=day % 8 == 0, keep=at >= cutoff))
    # Many at one instant, more than a batch: the walk must not stop at the tie.
    rows += [_event("order_placed", now - timedelta(days=45), keep=False) for _ in range(12)]
    rows.append(_event("order_placed", cutoff, keep=True))  # exactly the retention period: kept
    rows.append(_event("order_placed", cutoff + timedelta(seconds=1), keep=True))
    rows.append(_event("order_placed", now - timedelta(days=500), keep=False, back_dated=True))
    _add_events(rows)
    highest = max(_events())

    old_message, recent_message = now - timedelta(days=100), now - timedelta(days=3)
    marks = [
        (_message_id(old_message, 1), 0, True, old_message + timedelta(minutes=1)),  # Apple's prefetch: goes
        (_message_id(old_message, 1), 0, False, old_message + timedelta(days=2)),  # the reader's open: goes
        (_message_id(old_message, 1), 2, False, now - timedelta(days=5)),  # an old message clicked lately: stays
        (_message_id(old_message, 2), 1, False, cutoff),  # exactly the retention period: stays
        (_message_id(recent_message, 3), 0, False, recent_message + timedelta(hours=1)),
    ]
    with get_engine().begin() as connection:
        connection.execute(
            insert(EngagementFirst),
            [{"message_id": m, "link": link, "machine": machine, "occurred_at": at} for m, link, machine, at in marks],
        )

    before = _events()
    old = Counter((type_, machine) for type_, machine, at, props in before.values() if not props["keep"])
    assert sum(old.values()) > 100

    statements: list[str] = []
    capture = _count_deletes(statements)
    event.listen(get_engine(), "before_cursor_execute", capture)
    try:
        deleted = retention.delete_old_events(now=now, batch=7)
    finally:
        event.remove(get_engine(), "before_cursor_execute", capture)

    after = _events()
    assert {i for i, (*_, props) in after.items() if not props["keep"]} == set(), "an old event survived"
    assert set(after) == {i for i, (*_, props) in before.items() if props["keep"]}
    assert highest not in after  # the back-dated custom event, whatever its id
    assert _marks() == {(m, link, machine) for m, link, machine, at in marks if at >= cutoff}
    assert deleted == sum(old.values()) + 2

    # Each (type, machine) pair is walked in batches of at most 7: full ones, then one short (maybe
    # empty) batch that ends the walk. Unbounded deletes would take one statement per pair.
    types = {type_ for type_, *_ in before.values()}
    expected = sum(old[(type_, machine)] // 7 + 1 for type_ in types for machine in (False, True))
    assert len(statements) == expected
    assert max(old.values()) > 7  # so some pair did take several batches

    # A second run finds nothing and changes nothing.
    assert retention.delete_old_events(now=now, batch=7) == 0
    assert _events() == after
    assert len(_marks()) == 3


def test_nothing_is_deleted_inside_the_retention_period(store):
    now = utcnow()
    _add_events([_event(t, now - timedelta(days=d)) for t in ("sent", "opened", "custom") for d in range(DAYS)])
    assert retention.delete_old_events(now=now) == 0
    assert len(_events()) == 3 * DAYS


def test_an_aware_now_is_read_as_utc(store):
    from datetime import UTC, timezone

    now = utcnow()
    _add_events([_event("sent", now - timedelta(days=DAYS, hours=2)), _event("sent", now - timedelta(days=DAYS - 1))])
    in_new_york = now.replace(tzinfo=UTC).astimezone(timezone(timedelta(hours=-5)))
    assert retention.delete_old_events(now=in_new_york) == 1


def test_the_batches_find_old_rows_through_the_type_and_time_index(store):
    """The batch's SELECT reads the index range of one (type, machine) pair below the cutoff, not the
    table, even when recent rows outnumber the old ones a hundred to one."""
    now = utcnow()
    _add_events(
        [_event("opened", now - timedelta(minutes=m)) for m in range(3000)]
        + [_event("opened", now - timedelta(days=DAYS + 1, minutes=m)) for m in range(30)]
    )
    with get_engine().begin() as connection:
        connection.exec_driver_sql("ANALYZE events")
    cutoff = now - timedelta(days=DAYS)
    page = (
        select(Event.id)
        .where(Event.type == "opened", Event.machine == False, Event.occurred_at < cutoff)  # noqa: E712
        .order_by(Event.occurred_at)
        .limit(100)
    )
    with get_engine().connect() as connection:
        compiled = page.compile(connection)
        explain = "EXPLAIN " if connection.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN "
        plan = "\n".join(
            str(row[-1])
            for row in connection.exec_driver_sql(
                explain + str(compiled),
                tuple(compiled.params[k] for k in compiled.positiontup) if compiled.positional else compiled.params,
            )
        )
    assert "ix_events_type_machine_occurred_at_contact_id" in plan, plan
    assert retention.delete_old_events(now=now) == 30


def test_beat_runs_the_task_hourly_on_the_default_queue(store):
    from smartmail.config import get_settings
    from smartmail.config.celery import celery_config
    from smartmail.tasks import retention as task
    from smartmail.workers.app import app

    name = "smartmail.maintenance.delete_old_events"
    entries = [e for e in celery_config(get_settings())["beat_schedule"].values() if e["task"] == name]
    assert [e["schedule"] for e in entries] == [3600.0]
    app.loader.import_default_modules()  # what a worker imports: the app's `include` list
    assert name in app.tasks
    assert app.amqp.router.route({}, name)["queue"].name == "default"

    now = utcnow()
    _add_events([_event("sent", now - timedelta(days=DAYS + 1)), _event("sent", now)])
    task.delete_old_events()  # the task's body, in this process
    assert [t for t, *_ in _events().values()] == ["sent"]
