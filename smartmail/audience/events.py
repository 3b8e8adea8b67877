"""Custom events from a CRM or shop, ingested in batches: checked as `track` checks them, idempotent by client id."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from smartmail.audience import contacts
from smartmail.errors import InvalidInput
from smartmail.store import dialect
from smartmail.store.engine import session_scope
from smartmail.store.models import Event

_FIELDS = ("email", "type", "properties", "occurred_at", "id")


@dataclass(frozen=True)
class Ingested:
    """An event taken: `duplicate` when its client id was stored before (or earlier in the batch)."""

    client_id: str | None
    duplicate: bool


def check_client_id(value: Any, *, field: str = "id") -> str | None:
    """The sender's own id for an event (None: not idempotent): 1-200 printable characters."""
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= 200 or not value.isprintable():
        raise InvalidInput("an event id is 1-200 printable characters", field=field)
    return value


def _check(item: Any) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise InvalidInput("must be an object with an email and a type", field="")
    unknown = sorted(set(item) - set(_FIELDS))
    if unknown:
        raise InvalidInput(f"unknown field; known: {', '.join(_FIELDS)}", field=str(unknown[0]))
    return {
        "email": contacts.normalize_email(item.get("email")),
        "type": contacts.check_event_name(item.get("type"), field="type"),
        "properties": contacts.check_event_properties(item.get("properties")),
        "occurred_at": contacts.check_occurred_at(item.get("occurred_at")),
        "client_event_id": check_client_id(item.get("id")),
    }


def ingest(items: Sequence[Any]) -> list[Ingested | InvalidInput]:
    """Store custom events for contacts (created when new, as `track` does) in one transaction and a
    few statements. A result per item, in order: taken (or a duplicate of a stored client id, which
    is not stored again), or the item's error (`field` relative to the item); bad items do not keep
    the good ones out."""
    results: list[Ingested | InvalidInput | None] = [None] * len(items)
    checked: list[tuple[int, dict[str, Any]]] = []
    first_with_id: set[str] = set()
    for index, item in enumerate(items):
        try:
            values = _check(item)
        except InvalidInput as exc:
            results[index] = exc
            continue
        client_id = values["client_event_id"]
        if client_id is not None:
            if client_id in first_with_id:
                results[index] = Ingested(client_id, duplicate=True)
                continue
            first_with_id.add(client_id)
        checked.append((index, values))
    stored: set[str] = set()
    if checked:
        with session_scope() as session:
            ids = contacts.ensure_contacts(session, [values["email"] for _, values in checked], source="track")
            rows = [
                {
                    "type": values["type"],
                    "contact_id": ids[values["email"]],
                    "properties": values["properties"],
                    "occurred_at": values["occurred_at"],
                    "client_event_id": values["client_event_id"],
                }
                for _, values in checked
            ]
            connection = session.connection()
            plain = [row for row in rows if row["client_event_id"] is None]
            # In id order: concurrent calls with the same ids wait for each other rather than deadlock.
            keyed = sorted(
                (row for row in rows if row["client_event_id"] is not None), key=lambda row: row["client_event_id"]
            )
            if plain:
                connection.execute(dialect.insert(connection)(Event), plain)
            if keyed:
                # The unique index on client ids is partial (ids are optional): ON CONFLICT names its predicate.
                statement = (
                    dialect.insert(connection)(Event)
                    .on_conflict_do_nothing(
                        index_elements=["client_event_id"], index_where=Event.client_event_id.isnot(None)
                    )
                    .returning(Event.client_event_id)
                )
                stored = set(connection.execute(statement, keyed).scalars())
    if checked:
        contacts.ask_for_automations()
    for index, values in checked:
        client_id = values["client_event_id"]
        results[index] = Ingested(client_id, duplicate=client_id is not None and client_id not in stored)
    return [result for result in results if result is not None]
