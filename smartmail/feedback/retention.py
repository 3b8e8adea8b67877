"""Event retention: events and first-engagement marks older than SMARTMAIL_EVENT_RETENTION_DAYS go, in small batches."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy import delete, select, tuple_

from smartmail.config import get_settings
from smartmail.store.engine import get_engine, reader, utcnow
from smartmail.store.models import EngagementFirst, Event, FeedbackMark, InboundMessage, InboundState

log = structlog.get_logger("smartmail.retention")

# How the old rows are found, batch by batch, with an index and without missing any:
#
# Events arrive mostly in id order, but a custom event may be back-dated (`occurred_at` is the
# sender's), so "id below some bound" would both miss old rows above it and could not say where
# the old rows end. `occurred_at` is what decides, and the one index that orders by it is
# ix_events_type_machine_occurred_at_contact_id. So the events are deleted per (type, machine):
# the types are found by a loose index scan of that index (one `type > previous ORDER BY type
# LIMIT 1` probe per type, of which there are a few dozen at most), and within each pair a batch
# is the first `batch` rows of the index range `occurred_at < cutoff`, walked forward from the last
# batch's newest time, so a batch never re-reads the index entries of rows already deleted (on
# PostgreSQL they stay in the index until vacuum). Every old row is in exactly one such range.
#
# Each batch is its own short transaction: locks are held and WAL is written a batch at a time,
# autovacuum can follow, and concurrent writers wait at most for one batch.
#
# engagement_firsts has no index on occurred_at, but message ids are time-ordered (ULIDs) and a
# message is engaged with after it was created: every mark older than the cutoff belongs to a
# message whose id sorts below the id prefix of the cutoff's millisecond, a primary-key range.


def delete_old_events(*, now: datetime | None = None, batch: int = 10_000) -> int:
    """Delete events and engagement_firsts older than event_retention_days before `now` (naive UTC,
    default the current time), `batch` rows per transaction; the number of rows deleted. Safe to
    run again or concurrently: a second run finds nothing, or the rows the first has not reached."""
    if batch < 1:
        raise ValueError("batch: expected a positive number of rows")
    if now is None:
        now = utcnow()
    elif now.tzinfo is not None:
        now = now.astimezone(UTC).replace(tzinfo=None)  # stored times are naive UTC (store/engine.py)
    cutoff = now - timedelta(days=get_settings().event_retention_days)
    events = 0
    for type_ in _event_types():
        for machine in (False, True):
            events += _delete_events(type_, machine, cutoff, batch)
    marks = _delete_engagement_firsts(cutoff, batch)
    if events or marks:
        log.info("retention.deleted", events=events, engagement_firsts=marks, before=cutoff.isoformat())
    return events + marks


def _event_types() -> Iterator[str]:
    """The distinct event types, by a loose index scan (a probe per type, not a scan of the table)."""
    after: str | None = None
    while True:
        query = select(Event.type).order_by(Event.type).limit(1)
        if after is not None:
            query = query.where(Event.type > after)
        with reader() as connection:
            after = connection.execute(query).scalar()
        if after is None:
            return
        yield after


def _delete_events(type_: str, machine: bool, cutoff: datetime, batch: int) -> int:
    deleted = 0
    since: datetime | None = None
    while True:
        old = [Event.type == type_, Event.machine == machine, Event.occurred_at < cutoff]
        if since is not None:
            old.append(Event.occurred_at >= since)  # rows at `since` itself may remain: ties
        page = select(Event.id).where(*old).order_by(Event.occurred_at).limit(batch)
        with get_engine().begin() as connection:
            deleting = delete(Event).where(Event.id.in_(page)).returning(Event.occurred_at)
            times = list(connection.execute(deleting).scalars())
        deleted += len(times)
        if len(times) < batch:
            return deleted
        since = max(times)


def _delete_engagement_firsts(cutoff: datetime, batch: int) -> int:
    below = id_time_prefix(cutoff)
    key = tuple_(EngagementFirst.message_id, EngagementFirst.link, EngagementFirst.machine)
    deleted = 0
    after = ""
    while True:
        page = (
            select(EngagementFirst.message_id, EngagementFirst.link, EngagementFirst.machine)
            .where(
                EngagementFirst.message_id < below,
                EngagementFirst.message_id >= after,
                EngagementFirst.occurred_at < cutoff,
            )
            .order_by(EngagementFirst.message_id)
            .limit(batch)
        )
        with get_engine().begin() as connection:
            ids = list(
                connection.execute(
                    delete(EngagementFirst).where(key.in_(page)).returning(EngagementFirst.message_id)
                ).scalars()
            )
        deleted += len(ids)
        if len(ids) < batch:
            return deleted
        after = max(ids)


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # the alphabet of store/ids.py


def id_time_prefix(naive_utc: datetime) -> str:
    """The first 10 characters of the message ids made at `naive_utc`: 48 bits of milliseconds, 5
    bits a character, as store/ids.py spells them. Every id made before that millisecond sorts below."""
    millis = (naive_utc - datetime(1970, 1, 1)) // timedelta(milliseconds=1)
    return "".join(_CROCKFORD[(millis >> shift) & 31] for shift in range(45, -1, -5))


def delete_old_inbound(*, now: datetime | None = None, batch: int = 1000) -> int:
    """Delete processed (and failed) inbound mail received more than inbound_retention_days before
    `now`, and feedback marks as old, `batch` rows per transaction (inbound ids are time-ordered: a
    primary-key range); pending mail is kept whatever its age. The number of rows deleted."""
    cutoff = (now or utcnow()) - timedelta(days=get_settings().inbound_retention_days)
    below = id_time_prefix(cutoff)
    deleted = 0
    while True:
        page = (
            select(InboundMessage.id)
            .where(InboundMessage.id < below, InboundMessage.state != InboundState.PENDING.value)
            .order_by(InboundMessage.id)
            .limit(batch)
        )
        with get_engine().begin() as connection:
            count = connection.execute(delete(InboundMessage).where(InboundMessage.id.in_(page))).rowcount
        deleted += count
        if count < batch:
            break
    # The marks that make a replayed report change nothing: relays and SNS retry within days.
    marks = 0
    while True:
        page = select(FeedbackMark.key).where(FeedbackMark.created_at < cutoff).limit(batch)
        with get_engine().begin() as connection:
            count = connection.execute(delete(FeedbackMark).where(FeedbackMark.key.in_(page))).rowcount
        marks += count
        if count < batch:
            break
    if deleted or marks:
        log.info("retention.deleted", inbound_messages=deleted, feedback_marks=marks, before=cutoff.isoformat())
    return deleted + marks
