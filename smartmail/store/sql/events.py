"""Event-row SQL that differs by dialect: loading a batch of events (COPY on PostgreSQL)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import insert

from smartmail.store import dialect
from smartmail.store.models import Event

# The columns a batch of events is loaded with; the others take their defaults (id, xact).
COLUMNS = ("type", "contact_id", "message_id", "campaign_id", "properties", "occurred_at", "machine")


class Events:
    """A dialect's statements on event rows."""

    def load(self, connection, rows: list[dict[str, Any]]) -> None:
        """Insert `rows` (dicts of COLUMNS) in the connection's transaction."""
        raise NotImplementedError


class SqliteEvents(Events):
    """See `Events`."""

    def load(self, connection, rows: list[dict[str, Any]]) -> None:
        if rows:
            connection.execute(insert(Event), rows)


class PostgresEvents(Events):
    """See `Events`: COPY, several times faster than a multi-row INSERT for a batch of events."""

    def load(self, connection, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        driver = connection.connection.driver_connection
        with driver.cursor() as cursor, cursor.copy(f"COPY events ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([json.dumps(row[c]) if c == "properties" else row[c] for c in COLUMNS])


_BY_DIALECT: dict[str, Events] = {dialect.POSTGRESQL: PostgresEvents(), dialect.SQLITE: SqliteEvents()}


def for_bind(bind) -> Events:
    """The event-row SQL of the dialect an Engine, Connection or Session speaks."""
    return _BY_DIALECT[dialect.name_of(bind)]
