"""The migrations build the schema the models describe, on SQLite and PostgreSQL, and step back."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlalchemy.exc import IntegrityError

from smartmail.store import migrate
from smartmail.store.models import Base


def _schema_differences(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()


def _uniqueness_of_key(url: str) -> list[str]:
    """How messages.idempotency_key is kept unique: `constraint` (a table constraint, every row) or
    `index` (a unique index, here the partial one)."""
    engine = create_engine(url)
    try:
        found = inspect(engine)
        return sorted(
            [
                f"index {i['name']}"
                for i in found.get_indexes("messages")
                if i["column_names"] == ["idempotency_key"] and i["unique"] and not i.get("duplicates_constraint")
            ]  # PostgreSQL lists a constraint's index too
            + [
                "constraint"
                for c in found.get_unique_constraints("messages")
                if c["column_names"] == ["idempotency_key"]
            ]
        )
    finally:
        engine.dispose()


def test_migrated_schema_matches_the_models(database_url):
    assert _schema_differences(database_url) == []


def test_idempotency_index_steps_down_to_the_full_constraint_and_back(database_url):
    try:
        migrate.downgrade(database_url, "0005")
        assert _uniqueness_of_key(database_url) == ["constraint"]
    finally:
        migrate.upgrade(database_url)
    assert _uniqueness_of_key(database_url) == ["index uq_messages_idempotency_key"]
    assert _schema_differences(database_url) == []


def test_keys_stay_unique_and_keyless_rows_do_not_collide(env):
    from sqlalchemy import text

    import smartmail
    from smartmail.store.engine import get_engine

    first = smartmail.send("a@example.com", subject="s", text="t", idempotency_key="k-1")
    again = smartmail.send("b@example.com", subject="s", text="t", idempotency_key="k-1")
    keyless = [smartmail.send(f"c{i}@example.com", subject="s", text="t") for i in range(3)]
    assert (again.id, again.duplicate) == (first.id, True)
    assert len({r.id for r in keyless}) == 3
    with pytest.raises(IntegrityError), get_engine().begin() as connection:  # the index itself, not only send()
        connection.execute(text("UPDATE messages SET idempotency_key = 'k-1' WHERE id = :id"), {"id": keyless[0].id})
