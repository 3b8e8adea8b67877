"""Beat's UPDATEs take only rows no other transaction holds, so they never wait on a worker (PostgreSQL)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from smartmail.store.engine import get_engine, utcnow
from smartmail.store.models import Message
from smartmail.workers import maintenance


def _rows(state: str, count: int, old: bool) -> list[str]:
    at = utcnow() - timedelta(hours=1 if old else 0)
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
            "message_id_header": f"<{state}{i}@example.com>",
            "attempts": 1,
            "created_at": at,
            "enqueued_at": at,
            "claimed_at": at,
        }
        for i in range(count)
    ]
    with get_engine().begin() as connection:
        connection.execute(Message.__table__.insert(), rows)
    return [r["id"] for r in rows]


def test_the_reconciler_skips_rows_a_worker_holds_instead_of_waiting_for_them(env, monkeypatch):
    # A wait here could deadlock: READ COMMITTED keeps a lock on every row an UPDATE re-checks, so
    # a reconciler waiting for a worker's statement can hold a row that statement is about to
    # record (seen in CI, kill -9 test).
    if get_engine().dialect.name != "postgresql":
        pytest.skip("row locks: SQLite has one writer at a time")
    monkeypatch.setenv("SMARTMAIL_SENDING_TIMEOUT", "1")
    monkeypatch.setenv("SMARTMAIL_RECONCILE_QUEUED_AFTER", "1")
    from tests.conftest import reset_caches

    reset_caches()
    queued, sending = _rows("queued", 4, old=True), _rows("sending", 4, old=True)
    held = [queued[0], sending[0]]
    with get_engine().connect() as worker, worker.begin():  # a worker's statement, in flight
        worker.execute(select(Message.id).where(Message.id.in_(held)).with_for_update()).all()
        finished = threading.Event()
        reconciler = threading.Thread(target=lambda: (maintenance.reconcile(), finished.set()), daemon=True)
        reconciler.start()
        reconciler.join(10)
        assert finished.is_set(), "the reconciler waited for rows a worker holds"
    with get_engine().connect() as connection:
        rows = {row.id: row for row in connection.execute(select(Message.id, Message.state, Message.enqueued_at))}
    assert rows[sending[0]].state == "sending" and all(rows[i].state == "unknown" for i in sending[1:])
    # the held queued row was left alone, the others were queued again
    assert all(rows[queued[0]].enqueued_at < rows[i].enqueued_at for i in queued[1:])
