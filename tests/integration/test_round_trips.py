"""send_many does bulk I/O (a constant number of SQL statements and two Redis round trips, whatever
the batch size); send() is one SQL statement."""

from __future__ import annotations

import psycopg
import pytest
import redis.connection
from sqlalchemy import event

import smartmail
from smartmail.content.template_store import save_template
from smartmail.store.engine import get_engine, session_scope, statement_connection
from smartmail.store.models import Suppression


@pytest.fixture
def io(env, monkeypatch):
    """The SQL statements and Redis packets sent from now on (statements as the driver gets them)."""
    smartmail.send("warm-up@example.com", subject="s", text="t")  # connects and declares the queues once
    assert smartmail.flush()
    statements: list[str] = []
    if get_engine().dialect.name == "postgresql":  # send() runs its INSERT on the psycopg cursor itself
        for method in ("execute", "executemany"):
            real = getattr(psycopg.Cursor, method)

            def spy_statement(self, query, *args, _real=real, **kwargs):
                statements.append(str(query))
                return _real(self, query, *args, **kwargs)

            monkeypatch.setattr(psycopg.Cursor, method, spy_statement)
    else:
        event.listen(
            get_engine(),
            "before_cursor_execute",
            lambda conn, cursor, sql, params, context, many: statements.append(sql),
        )
    packets = []
    real = redis.connection.Connection.send_packed_command

    def spy(self, command, check_health=True):
        packets.append(command)
        return real(self, command, check_health)

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", spy)
    return statements, packets


@pytest.mark.parametrize("size", [10, 1000])
def test_send_many_uses_constant_statements_and_one_redis_round_trip(io, size):
    statements, packets = io
    with session_scope() as session:
        save_template(session, "receipt", subject="Receipt {{ n }}", html="<p>{{ n }}</p>")
    statements.clear()
    specs = [
        {
            "to": f"u{i}@example.com",
            "template": "receipt" if i % 2 else "password-reset",
            "context": {"n": i, "email": f"u{i}@example.com", "reset_url": "https://example.com/r"},
        }
        for i in range(size)
    ]
    results = smartmail.send_many(specs)
    assert smartmail.flush()  # the ids' push, made by a background thread

    assert len(results) == size and {r.state for r in results} == {"queued"}
    data_statements = [s for s in statements if not s.startswith(("BEGIN", "COMMIT", "ROLLBACK"))]
    # per distinct template: one look-up, plus one source read per part the first time this process
    # compiles it (the database template here has subject and html) and one more of the html, to
    # derive the text part it lacks; then the suppression check and one multi-row INSERT. None of
    # it grows with the batch.
    assert len(data_statements) <= 2 + 3 + 1 + 1, data_statements
    # the outbox script (ids and drain leases), then any drain tasks it started, in one pipeline
    assert len(packets) <= 2, packets


def test_send_is_one_statement_that_checks_suppression_itself(io):
    statements, packets = io
    with session_scope() as session:
        session.add(Suppression(email="gone@example.com", reason="unsubscribed"))
    statements.clear()

    sent = smartmail.send("here@example.com", subject="Hi {{ n }}", text="t", context={"n": 1})
    suppressed = smartmail.send("Gone@Example.com", subject="Hi {{ n }}", text="t", context={"n": 2})
    assert smartmail.flush()

    assert (sent.state, suppressed.state, suppressed.reason) == (
        "queued",
        "suppressed",
        "recipient suppressed: unsubscribed",
    )
    assert [s.split()[0] for s in statements] == ["INSERT", "INSERT"], statements  # no BEGIN, no COMMIT
    assert len(packets) <= 2, packets  # the queued one's outbox script, then the drain task it started


def test_send_after_the_database_dropped_its_connection_fails_once_then_works(env):
    """send()'s INSERT runs on the driver's cursor: a lost connection still raises SQLAlchemy's
    error and leaves the pool, as it would through SQLAlchemy."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    engine = get_engine()
    smartmail.send("first@example.com", subject="s", text="t")  # the pool now holds a connection
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite's send() runs through SQLAlchemy, and has no server to drop it")
    with statement_connection() as connection:  # the pool send() takes its connection from
        own = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    admin = create_engine(engine.url, isolation_level="AUTOCOMMIT")  # not a connection of the pool's
    with admin.connect() as killer:
        killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": own})
    admin.dispose()

    with pytest.raises(OperationalError):
        smartmail.send("second@example.com", subject="s", text="t")
    third = smartmail.send("third@example.com", subject="s", text="t")
    assert third.state == "queued"
