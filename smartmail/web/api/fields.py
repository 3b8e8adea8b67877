"""Field types shared by the /v1 schemas."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import PlainSerializer


def _utc(value: datetime) -> str:
    # The database may hand back naive datetimes (SQLite); every stored time is UTC.
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return aware.isoformat().replace("+00:00", "Z")


UtcDateTime = Annotated[datetime, PlainSerializer(_utc, return_type=str, when_used="json")]
"""A time in responses: ISO 8601 in UTC with a `Z`, whatever the database returned."""
