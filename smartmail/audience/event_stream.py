"""Reading the one event stream: pages in (xact, id) order after a position, and a message's own events."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, func, select, tuple_
from sqlalchemy.engine import Connection

from smartmail.audience.contacts import normalize_email
from smartmail.errors import InvalidInput, NotFound
from smartmail.store.engine import get_engine
from smartmail.store.models import Campaign, Contact, Event, Message
from smartmail.store.sql.event_stream import stream_horizon

MAX_LIMIT = 1000
# Rows looked at per page when filters may skip most of them: a filtered read walks the stream's
# index in windows this long, so a page costs the same whether one row in ten matches or none does.
SCAN_WINDOW = 10_000

_BIGINT = 2**63
_POSITION = re.compile(r"([0-9]{1,19})-([0-9]{1,19})")
_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}")


class Position(NamedTuple):
    """A place in the stream: just after the event (xact, id). Written `"<xact>-<id>"`."""

    xact: int
    id: int

    def __str__(self) -> str:
        return f"{self.xact}-{self.id}"

    @classmethod
    def parse(cls, value: Any, *, field: str = "after") -> Position:
        """`"<xact>-<id>"` as a stream position returned it; InvalidInput naming `field` otherwise."""
        match = _POSITION.fullmatch(value) if isinstance(value, str) else None
        if match is None or not all(int(part) < _BIGINT for part in match.groups()):
            raise InvalidInput(f"{value!r} is not a stream position (<xact>-<id>, as a page returned it)", field=field)
        return cls(int(match.group(1)), int(match.group(2)))


START = Position(0, 0)  # before every event: ids start at 1, xact at 0


@dataclass(frozen=True)
class Page:
    """Events in stream order; `next` is where the following read starts (the last event, or further
    when filters skipped rows); `more` says the stream held more than this page when it was read."""

    events: list[dict[str, Any]]
    next: Position
    more: bool


def check_types(types: Collection[str] | None, *, field: str = "type") -> list[str] | None:
    """Event type names to filter on (SmartMail's own or custom ones); None or empty: every type."""
    if not types:
        return None
    for i, value in enumerate(types):
        if not isinstance(value, str) or not _TYPE.fullmatch(value):
            raise InvalidInput(f"{value!r} is not an event type", field=f"{field}[{i}]" if len(types) > 1 else field)
    return sorted(set(types))


def check_limit(limit: Any, *, field: str = "limit") -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"must be 1-{MAX_LIMIT}", field=field)
    return limit


COLUMNS = (
    Event.id,
    Event.xact,
    Event.type,
    Event.occurred_at,
    Event.message_id,
    Event.contact_id,
    Contact.email,
    Event.campaign_id,
    Event.machine,
    Event.properties,
)
_ORDER = (Event.xact, Event.id)


def as_dict(row: Any) -> dict[str, Any]:
    occurred_at: datetime = row.occurred_at
    aware = occurred_at.replace(tzinfo=UTC) if occurred_at.tzinfo is None else occurred_at.astimezone(UTC)
    return {
        "id": row.id,
        "position": str(Position(row.xact, row.id)),
        "type": row.type,
        "occurred_at": aware.isoformat().replace("+00:00", "Z"),
        "message_id": row.message_id,
        "contact_id": row.contact_id,
        "email": row.email,
        "campaign_id": row.campaign_id,
        "machine": bool(row.machine),
        "properties": row.properties or {},
    }


@contextmanager
def _connected(connection: Connection | None) -> Iterator[Connection]:
    if connection is not None:
        yield connection
        return
    with get_engine().connect() as connection:
        yield connection


def _after(position: Position) -> ColumnElement[bool]:
    return tuple_(Event.xact, Event.id) > tuple_(position.xact, position.id)


def read(
    after: Position | None,
    *,
    types: Collection[str] | None = None,
    message_id: str | None = None,
    contact_id: int | None = None,
    campaign_id: int | None = None,
    include_machine: bool = True,
    limit: int = 100,
    connection: Connection | None = None,
) -> Page:
    """Up to `limit` events after `after` (None: from the start), oldest first, that match the filters.

    Only events of transactions that have all ended are read (see `stream_horizon`), so a consumer
    that keeps `next` as its checkpoint never skips an event committed later than a newer one.
    With filters, one call looks at up to SCAN_WINDOW rows of the stream: a page may then hold
    fewer events than `limit`, or none, with `more` set and `next` past the rows looked at. A reader
    that writes what it read passes its own `connection` (SQLite has one writer, even to read)."""
    limit = check_limit(limit)
    kinds = check_types(types)
    position = after or START
    filters: list[ColumnElement[bool]] = []
    if kinds is not None:
        filters.append(Event.type.in_(kinds))
    if message_id is not None:
        filters.append(Event.message_id == message_id)
    if contact_id is not None:
        filters.append(Event.contact_id == contact_id)
    if campaign_id is not None:
        filters.append(Event.campaign_id == campaign_id)
    if not include_machine:
        filters.append(Event.machine.is_(False))
    window = SCAN_WINDOW if filters else limit + 1
    with _connected(connection) as connection:
        # The window's last row, from the stream index alone: everything up to it is final (its
        # transaction and every earlier one have ended), so the second statement, with a later
        # snapshot, reads exactly the same rows.
        scanned = (
            select(Event.xact, Event.id)
            .where(_after(position), Event.xact < stream_horizon())
            .order_by(*_ORDER)
            .limit(window)
            .subquery()
        )
        edge = connection.execute(
            select(scanned.c.xact, scanned.c.id, func.count().over().label("seen"))
            .order_by(scanned.c.xact.desc(), scanned.c.id.desc())
            .limit(1)
        ).first()
        if edge is None:
            return Page([], position, more=False)
        end = Position(edge.xact, edge.id)
        rows = connection.execute(
            select(*COLUMNS)
            .outerjoin(Contact, Contact.id == Event.contact_id)
            .where(_after(position), tuple_(Event.xact, Event.id) <= tuple_(end.xact, end.id), *filters)
            .order_by(*_ORDER)
            .limit(limit + 1)
        ).all()
    events = [as_dict(row) for row in rows[:limit]]
    if len(rows) > limit:
        last = rows[limit - 1]
        return Page(events, Position(last.xact, last.id), more=True)
    return Page(events, end, more=edge.seen >= window)


def filter_ids(*, contact: str | None = None, campaign: str | None = None) -> dict[str, int | None]:
    """`read`'s contact_id and campaign_id for a contact's address and a campaign's name or id; one
    that names nothing stored becomes 0, an id no row has, so the read finds nothing but still
    moves through the stream."""
    ids: dict[str, int | None] = {"contact_id": None, "campaign_id": None}
    with get_engine().connect() as connection:
        if contact is not None:
            email = normalize_email(contact, field="contact")
            ids["contact_id"] = connection.execute(select(Contact.id).where(Contact.email == email)).scalar() or 0
        if campaign is not None:
            if campaign.isascii() and campaign.isdigit():
                ids["campaign_id"] = int(campaign) if int(campaign) < 2**31 else 0  # campaigns.id is an INTEGER
            else:
                found = connection.execute(select(Campaign.id).where(Campaign.name == campaign)).scalar()
                ids["campaign_id"] = found or 0
    return ids


def end(connection: Connection | None = None) -> Position:
    """The stream's current end: reading after it returns only events not readable yet."""
    with _connected(connection) as connection:
        last = connection.execute(
            select(Event.xact, Event.id)
            .where(Event.xact < stream_horizon())
            .order_by(Event.xact.desc(), Event.id.desc())
            .limit(1)
        ).first()
    return Position(last.xact, last.id) if last else START


def for_message(message_id: str) -> list[dict[str, Any]]:
    """Every event of one message, in the order they happened; NotFound when there is no such
    message and no event names it."""
    with get_engine().connect() as connection:
        rows = connection.execute(
            select(*COLUMNS)
            .outerjoin(Contact, Contact.id == Event.contact_id)
            .where(Event.message_id == message_id)
            .order_by(Event.occurred_at, Event.id)
        ).all()
        if not rows and connection.execute(select(Message.id).where(Message.id == message_id)).first() is None:
            raise NotFound(f"No message {message_id!r}.")
    return [as_dict(row) for row in rows]
