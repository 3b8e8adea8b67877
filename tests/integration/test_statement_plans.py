"""The record-and-claim keeps one generic plan per statement connection (PostgreSQL): that plan must
find its rows by primary key, however few rows `messages` had when it was made."""

from __future__ import annotations

import re

import pytest

import smartmail
from smartmail.store.engine import get_engine, statement_connection, utcnow
from smartmail.workers import claims


def _plan_of_prepared_claim(connection) -> str:
    """Run the record-and-claim until psycopg has prepared it, then EXPLAIN its prepared statement."""
    for _ in range(6):
        claims.record_and_claim_on(connection, [], utcnow(), [], "w1")
    name = connection.exec_driver_sql(
        "SELECT name FROM pg_prepared_statements WHERE position('SKIP LOCKED' in statement) > 0"
    ).scalar_one()
    arguments = ", ".join(["NULL"] * 8 + ["'w1'", "now()::timestamp", "ARRAY['a', 'b']"])  # outcomes, owner, now, ids
    return "\n".join(connection.exec_driver_sql(f"EXPLAIN EXECUTE {name}({arguments})").scalars())


@pytest.mark.parametrize("rows", [0, 3])
def test_the_claims_plan_finds_messages_by_primary_key_even_made_on_a_tiny_table(env, rows):
    if get_engine().dialect.name != "postgresql":
        pytest.skip("plans are kept on PostgreSQL's statement connections only")
    for i in range(rows):
        smartmail.send(f"u{i}@example.com", subject="s", text="t")
    with get_engine().connect() as connection:
        connection.exec_driver_sql("ANALYZE messages")
        connection.commit()

    with statement_connection() as connection:
        plan = _plan_of_prepared_claim(connection)

    # Three scans of messages (the recorded rows, the claim, its locking subquery), each on the key.
    scans = re.findall(r"(\w[\w ]*Scan)(?: using (\w+))? on messages\b.*\n\s*(?:Index|Recheck) Cond: (.*)", plan)
    assert len(scans) == 3, plan
    assert all("messages_pkey" in (index or "") or kind.startswith("Bitmap Heap") for kind, index, _ in scans), plan
    assert all("id)::text = ANY" in condition for _, _, condition in scans), plan
    assert "Seq Scan" not in plan, plan
    assert "contacts_pkey" in plan and "suppressions_pkey" in plan, plan  # each claimed row's contact, by key
