"""The statements on messages run per window or beat tick use the index meant for them, whatever the statistics."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import event, select, update

from smartmail.store.engine import get_engine, refresh_statistics, statement_connection, utcnow
from smartmail.store.models import Contact, Message, MessageState
from smartmail.store.sql.claims import for_bind
from smartmail.workers import maintenance
from smartmail.workers.claims import record_and_claim_on
from smartmail.workers.delivery import _Result
from smartmail.workers.outcomes import Reply


def _queue(count: int, state: str = "queued") -> list[str]:
    now = utcnow()
    rows = [
        {
            "id": f"{state[:4]}{i:022d}",
            "state": state,
            "sender": "a@example.com",
            "recipient": f"u{i}@example.com",
            "subject": "s",
            "text": "t",
            "headers": {},
            "tags": [],
            "message_id_header": f"<{i}@example.com>",
            "attempts": 0,
            "created_at": now,
            "enqueued_at": now,
            "next_attempt_at": now - timedelta(seconds=1),
            "claimed_by": "w1" if state == "sending" else None,
        }
        for i in range(count)
    ]
    with get_engine().begin() as connection:
        connection.execute(Message.__table__.insert(), rows)
    return [r["id"] for r in rows]


def _plan(connection, run, containing: str = "") -> str:
    """The plan of the last statement containing `containing` that `run` executes on `connection`
    (inside a transaction rolled back)."""
    seen: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        seen.append((statement, parameters))

    event.listen(connection, "before_cursor_execute", capture)
    try:
        run(connection)
    finally:
        event.remove(connection, "before_cursor_execute", capture)
    statement, parameters = [(sql, params) for sql, params in seen if containing in sql][-1]
    explain = "EXPLAIN " if connection.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN "
    return "\n".join(str(row[-1]) for row in connection.exec_driver_sql(explain + statement, parameters))


@pytest.mark.parametrize("path", ["alone", "in a transaction"])
def test_the_claim_looks_its_ids_up_by_primary_key_even_when_statistics_say_nothing_is_queued(env, path):
    engine = get_engine()
    with engine.begin() as connection:  # statistics of a table with nothing in it, not even pages
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("TRUNCATE messages CASCADE")
        connection.exec_driver_sql("ANALYZE messages")
    ids = _queue(3000)  # then a backlog the statistics know nothing of
    sent = _queue(50, "sending")  # and the window before, whose outcomes the claim records
    outcomes = [_Result(i, "u@example.com", MessageState.SENT, Reply(250, "2.0.0 ok")) for i in sent]

    # The connections delivery._record_and_claim uses: one statement alone, or with deferrals and bounces.
    with statement_connection() if path == "alone" else for_bind(engine).transaction(engine) as connection:
        plan = _plan(
            connection, lambda c: record_and_claim_on(c, outcomes, utcnow(), ids[:50], "w1"), containing="claimed_at"
        )  # the claim (SQLite reads the claimed rows after it)

    # The state indexes would have the claim read every queued entry to find its 50 rows.
    assert "ix_messages" not in plan, plan
    assert ("messages_pkey" in plan) if engine.dialect.name == "postgresql" else ("autoindex_messages" in plan), plan


def test_beat_finds_due_stale_and_stuck_rows_through_the_partial_indexes(env):
    _queue(200, "deferred")
    now = utcnow()
    queries = {
        "ix_messages_waiting_next_attempt_at": select(Message.id).where(
            maintenance.WAITING, Message.next_attempt_at <= now
        ),
        "ix_messages_queued_enqueued_at": select(Message.id).where(maintenance.QUEUED, Message.enqueued_at < now),
        "ix_messages_sending_claimed_at": update(Message)
        .where(maintenance.SENDING, Message.claimed_at < now)
        .values(state="unknown"),
    }
    with get_engine().connect() as connection, connection.begin():
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("SET LOCAL enable_seqscan = off")  # a small table: ask what can serve
        for index, query in queries.items():
            plan = _plan(connection, lambda c, query=query: c.execute(query))
            assert index in plan, plan
        connection.rollback()


def test_tables_changed_much_since_their_last_analyze_are_analyzed_before_a_fan_out(env):
    engine = get_engine()
    tables = ["contacts", "list_memberships", "suppressions", "events"]
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":  # an empty table file: earlier tests' rows left free pages
            connection.exec_driver_sql("TRUNCATE contacts CASCADE")
        connection.exec_driver_sql("ANALYZE")  # everything fresh: nothing to do
        assert refresh_statistics(connection, tables) == []
        now = utcnow()
        connection.execute(
            Contact.__table__.insert(),
            [
                {
                    "email": f"u{i}@example.com",
                    "status": "subscribed",
                    "attributes": {},
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(3000)
            ],
        )
    with engine.begin() as connection:
        analyzed = refresh_statistics(connection, tables)
        again = refresh_statistics(connection, tables)

    if engine.dialect.name == "postgresql":  # SQLite has no autovacuum to wait for, and no statistics by default
        assert (analyzed, again) == (["contacts"], [])
    else:
        assert (analyzed, again) == ([], [])
