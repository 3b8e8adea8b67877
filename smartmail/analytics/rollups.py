"""The analytics reader of the event stream: hourly and daily counters per dimension, with their own checkpoint."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select, tuple_
from sqlalchemy.engine import Connection

from smartmail.audience import event_stream
from smartmail.audience.event_stream import START, Position
from smartmail.store import checkpoints, dialect
from smartmail.store.engine import get_engine
from smartmail.store.models import Event, EventType, Message, Rollup

CHECKPOINT = "analytics"  # the stream_checkpoints row: the stream position rolled up to
ROLL_UP_TASK = "smartmail.analytics.roll_up"
PAGE = event_stream.MAX_LIMIT  # events read, and their counters added, per transaction

HOUR, DAY = "hour", "day"
GRANULARITIES = (HOUR, DAY)
CAMPAIGN, DOMAIN, ALL = "campaign", "domain", "all"
DIMENSIONS = (CAMPAIGN, DOMAIN, ALL)

# Metrics counted once per event of their type, as the type names them.
_PLAIN = {
    EventType.SENT.value: "sent",
    EventType.DEFERRED.value: "deferred",
    EventType.FAILED.value: "failed",
    EventType.UNSUBSCRIBED.value: "unsubscribed",
    EventType.COMPLAINED.value: "complained",
}
METRICS = (
    "sent",
    "deferred",
    "failed",
    "bounced_hard",
    "bounced_soft",
    "opened_human",
    "opened_machine",
    "opened_unique_human",  # a message's first human open (the event's `unique`, from engagement_firsts)
    "clicked_human",
    "clicked_machine",
    "clicked_unique_human",  # a message's first human click of each link (the event's `unique`)
    "clicked_messages_human",  # a message's first human click of any link, in stream order: CTR's numerator
    "unsubscribed",
    "complained",
)

Key = tuple[str, str, str, datetime, str]  # (dimension, value, granularity, bucket_start, metric)


def bucket_start(moment: datetime, granularity: str) -> datetime:
    """The start (naive UTC, as the database stores times) of the hour or day holding `moment`."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    if granularity == HOUR:
        return moment.replace(minute=0, second=0, microsecond=0)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def domain_of(address: str | None) -> str | None:
    if not address or "@" not in address:
        return None
    return address.rsplit("@", 1)[1].strip().lower() or None


def metrics_of(event: dict[str, Any], first_click: bool) -> list[str]:
    """The counters one event adds to; `first_click`: it is its message's first human click."""
    kind = event["type"]
    if kind in _PLAIN:
        return [_PLAIN[kind]]
    properties = event.get("properties") or {}
    if kind == EventType.BOUNCED.value:
        return ["bounced_hard" if properties.get("kind") == "hard" else "bounced_soft"]
    if kind in (EventType.OPENED.value, EventType.CLICKED.value):
        if event["machine"]:
            return [f"{kind}_machine"]  # proxies and scanners: kept apart, never unique
        found = [f"{kind}_human"]
        if properties.get("unique") is True:
            found.append(f"{kind}_unique_human")
        if first_click:
            found.append("clicked_messages_human")
        return found
    return []  # custom events and SmartMail's operational ones are not rolled up (yet)


def is_human_click(event: dict[str, Any]) -> bool:
    return event["type"] == EventType.CLICKED.value and not event["machine"] and bool(event["message_id"])


def count(
    events: Iterable[dict[str, Any]],
    domains: dict[str, str],
    clicked_before: set[str],
    *,
    since: datetime | None = None,
) -> Counter[Key]:
    """The counters a page of events adds, each in the buckets of its own `occurred_at` (a late event
    lands in its old bucket). `domains`: recipient domains by message id; `clicked_before`: messages
    with a human click earlier in the stream (updated in place); `since`: events before it are left out."""
    counts: Counter[Key] = Counter()
    for event in events:
        first_click = False
        if is_human_click(event) and event["message_id"] not in clicked_before:
            clicked_before.add(event["message_id"])
            first_click = True
        metrics = metrics_of(event, first_click)
        if not metrics:
            continue
        occurred_at = datetime.fromisoformat(event["occurred_at"])
        if since is not None and bucket_start(occurred_at, DAY) < since:
            continue
        values = [(ALL, "")]
        if event["campaign_id"] is not None:
            values.append((CAMPAIGN, str(event["campaign_id"])))
        domain = domains.get(event["message_id"] or "") or domain_of(event.get("email"))
        if domain is not None:
            values.append((DOMAIN, domain))
        for granularity in GRANULARITIES:
            start = bucket_start(occurred_at, granularity)
            for dimension, value in values:
                for metric in metrics:
                    counts[(dimension, value, granularity, start, metric)] += 1
    return counts


def _recipient_domains(connection: Connection, events: list[dict[str, Any]]) -> dict[str, str]:
    ids = sorted({event["message_id"] for event in events if event["message_id"]})
    if not ids:
        return {}
    rows = connection.execute(select(Message.id, Message.recipient).where(Message.id.in_(ids)))
    return {row.id: domain for row in rows if (domain := domain_of(row.recipient)) is not None}


def _clicked_before(connection: Connection, events: list[dict[str, Any]], position: Position) -> set[str]:
    """The page's clicked messages that had a human click at or before `position` (the page's start)."""
    ids = sorted({event["message_id"] for event in events if is_human_click(event)})
    if not ids:
        return set()
    rows = connection.execute(
        select(Event.message_id)
        .where(
            Event.message_id.in_(ids),
            Event.type == EventType.CLICKED.value,
            Event.machine.is_(False),
            tuple_(Event.xact, Event.id) <= tuple_(position.xact, position.id),
        )
        .distinct()
    )
    return {message_id for message_id in rows.scalars() if message_id is not None}


def _add(connection: Connection, counts: Counter[Key]) -> None:
    """One upsert adding the page's counters to the stored ones (in key order: the same lock order always)."""
    if not counts:
        return
    rows = [
        {"dimension": d, "value": v, "granularity": g, "bucket_start": b, "metric": m, "count": n}
        for (d, v, g, b, m), n in sorted(counts.items())
    ]
    insert = dialect.insert(connection)(Rollup)
    connection.execute(
        insert.on_conflict_do_update(
            index_elements=["dimension", "value", "granularity", "bucket_start", "metric"],
            set_={"count": Rollup.count + insert.excluded.count},
        ),
        rows,
    )


def _roll_up_page(
    connection: Connection, position: Position, limit: int, since: datetime | None = None
) -> event_stream.Page:
    page = event_stream.read(position, limit=limit, connection=connection)
    clicked_before = _clicked_before(connection, page.events, position)
    _add(connection, count(page.events, _recipient_domains(connection, page.events), clicked_before, since=since))
    return page


@dataclass(frozen=True)
class RolledUp:
    events: int
    more: bool  # time was up with events left


def roll_up(*, max_seconds: float = 10.0, page_size: int = PAGE) -> RolledUp:
    """Read the stream after the checkpoint, a page per transaction, adding the page's counters and
    moving the checkpoint together: a crash repeats nothing and loses nothing."""
    started, read = time.monotonic(), 0
    while True:
        with get_engine().begin() as connection:
            position = Position.parse(checkpoints.lock(connection, CHECKPOINT, initial=str(START)))
            page = _roll_up_page(connection, position, page_size)
            checkpoints.move(connection, CHECKPOINT, str(page.next))
        read += len(page.events)
        if not page.more:
            return RolledUp(read, False)
        if time.monotonic() - started >= max_seconds:
            return RolledUp(read, True)


def rebuild(since: datetime | None = None, *, page_size: int = PAGE) -> int:
    """Recompute the roll-ups from the raw events; the events read.

    Without `since`: delete every roll-up and move the checkpoint to the stream's start in one
    transaction, then read the whole stream again (readers see the numbers grow back meanwhile).
    With `since`: in one transaction, delete the buckets from the day holding `since` on and count
    again the events of those buckets read up to the checkpoint (the whole stream is read, as a late
    event may be anywhere in it; the checkpoint stays)."""
    if since is None:
        with get_engine().begin() as connection:
            checkpoints.lock(connection, CHECKPOINT, initial=str(START))
            connection.execute(delete(Rollup))
            checkpoints.move(connection, CHECKPOINT, str(START))
        return roll_up(max_seconds=math.inf, page_size=page_size).events
    start = bucket_start(since, DAY)
    read = 0
    with get_engine().begin() as connection:
        end = Position.parse(checkpoints.lock(connection, CHECKPOINT, initial=str(START)))
        connection.execute(delete(Rollup).where(Rollup.bucket_start >= start))
        position = START
        while position < end:
            page = event_stream.read(position, limit=page_size, connection=connection)
            events = [event for event in page.events if Position.parse(event["position"]) <= end]
            clicked_before = _clicked_before(connection, events, position)
            _add(connection, count(events, _recipient_domains(connection, events), clicked_before, since=start))
            read += len(events)
            if not page.more:
                break
            position = page.next
    return read
