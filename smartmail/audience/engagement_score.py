"""Engagement score: human opens and clicks as a decaying sum per contact, kept up to date from the event stream."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Double, column, select, update, values
from sqlalchemy.engine import Connection

from smartmail.audience import event_stream
from smartmail.audience.engagement_decay import Decay, add_keys
from smartmail.audience.event_stream import Position
from smartmail.store import checkpoints
from smartmail.store.engine import get_engine, utcnow
from smartmail.store.models import Contact, EventType

CHECKPOINT = "engagement_score"  # the stream_checkpoints row: the stream position read up to
SCORE_TASK = "smartmail.engagement.score"
PAGE = event_stream.MAX_LIMIT  # events read, and their contacts updated, per transaction
TYPES = (EventType.OPENED.value, EventType.CLICKED.value)


@dataclass(frozen=True)
class Tally:
    """One contact's key and the time of its latest open or click counted in it."""

    key: float
    at: datetime

    def plus(self, other: Tally) -> Tally:
        return Tally(add_keys(self.key, other.key), max(self.at, other.at))


def _stored_time(iso: str) -> datetime:
    return datetime.fromisoformat(iso).astimezone(UTC).replace(tzinfo=None)


def tally(events: Iterable[dict[str, Any]], decay: Decay) -> dict[int, Tally]:
    """Stream events (as event_stream.read gives them) summed per contact: human opens and clicks
    of contacts still stored, each worth its points at its own time."""
    totals: dict[int, Tally] = {}
    for event in events:
        contact_id, points = event["contact_id"], decay.points(event["type"])
        if contact_id is None or event["machine"] or points <= 0:
            continue
        at = _stored_time(event["occurred_at"])
        added = Tally(decay.key(points, at), at)
        totals[contact_id] = totals[contact_id].plus(added) if contact_id in totals else added
    return totals


def current_score(contact_id: int, now: datetime | None = None) -> float:
    """One contact's score as of `now` (default: now); 0 for a contact with none, or no such contact."""
    with get_engine().connect() as connection:
        row = connection.execute(
            select(Contact.engagement_score, Contact.engagement_scored_at).where(Contact.id == contact_id)
        ).first()
    if row is None:
        return 0.0
    return Decay.from_settings().decayed(row.engagement_score, row.engagement_scored_at, now or utcnow())


# --- The reader: the stream's human opens and clicks into the contacts' scores ---------------------


@dataclass(frozen=True)
class Scored:
    events: int  # human opens and clicks counted
    contacts: int  # contact updates written (a contact counts once per page it appears in)
    more: bool  # time was up with events left


def update_scores(*, max_seconds: float = 10.0) -> Scored:
    """Read the stream after the checkpoint, a page per transaction, writing the page's contacts'
    new scores and the new checkpoint together: a crash repeats nothing and loses nothing."""
    started, events, contacts = time.monotonic(), 0, 0
    decay = Decay.from_settings()
    while True:
        counted, updated, more = _score_page(decay)
        events, contacts = events + counted, contacts + updated
        if not more:
            return Scored(events, contacts, False)
        if time.monotonic() - started >= max_seconds:
            return Scored(events, contacts, True)


def _lock_checkpoint(connection: Connection) -> Position:
    # A new reader starts at the stream's start: scores count every open and click still stored.
    return Position.parse(checkpoints.lock(connection, CHECKPOINT, initial=str(event_stream.START)))


def _score_page(decay: Decay) -> tuple[int, int, bool]:
    with get_engine().begin() as connection:
        position = _lock_checkpoint(connection)
        page = event_stream.read(position, types=TYPES, include_machine=False, limit=PAGE, connection=connection)
        totals = tally(page.events, decay)
        rows = _merged(connection, totals, decay)
        if rows:
            connection.execute(_update_statement(rows))
        checkpoints.move(connection, CHECKPOINT, str(page.next))
    return sum(1 for e in page.events if e["contact_id"] is not None), len(rows), page.more


def _merged(connection: Connection, totals: dict[int, Tally], decay: Decay) -> list[tuple]:
    """(contact id, score, scored_at, key) rows: each page total added to the contact's stored key.
    Read, then written, in the checkpoint's transaction: its lock makes readers take turns, and no
    other code writes these columns. The rows are locked here, in id order, as the tracking drain
    locks the contacts it moves (the UPDATE's join would lock them in its own order: deadlocks)."""
    if not totals:
        return []
    stored = connection.execute(
        select(Contact.id, Contact.engagement_key, Contact.engagement_scored_at)
        .where(Contact.id.in_(sorted(totals)))
        .order_by(Contact.id)
        .with_for_update()
    ).all()
    rows = []
    for contact_id, key, scored_at in stored:  # an erased contact is not there, nor are its events
        total = totals[contact_id]
        if key is not None and scored_at is not None:
            total = total.plus(Tally(key, scored_at))
        rows.append((contact_id, decay.score(total.key, total.at), total.at, total.key))
    return rows


def _update_statement(rows: list[tuple]):
    """One UPDATE of every contact of the page, from a VALUES list (UPDATE … FROM: SQLite 3.33+)."""
    page = (
        values(
            column("contact_id", BigInteger),
            column("score", Double),
            column("scored_at", DateTime),
            column("score_key", Double),
            name="page",
        )
        .data(rows)
        .cte("page")
    )
    return (
        update(Contact)
        .where(Contact.id == page.c.contact_id)
        .values(engagement_score=page.c.score, engagement_scored_at=page.c.scored_at, engagement_key=page.c.score_key)
    )


def rebuild() -> int:
    """Forget every score and read the stream again from its start (after changing the points or the
    half-life, which stored keys were made with): one transaction, under the checkpoint's lock. The
    number of contacts whose score was cleared."""
    with get_engine().begin() as connection:
        _lock_checkpoint(connection)
        cleared = connection.execute(
            update(Contact)
            .where(Contact.engagement_key.is_not(None))
            .values(engagement_score=None, engagement_scored_at=None, engagement_key=None)
        ).rowcount
        checkpoints.move(connection, CHECKPOINT, str(event_stream.START))
    return cleared
