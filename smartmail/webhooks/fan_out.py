"""The webhooks' reader of the event stream: one delivery per (event, matching endpoint), with its own checkpoint."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.engine import Connection

from smartmail.audience import event_stream
from smartmail.audience.event_stream import Position
from smartmail.store import checkpoints, dialect
from smartmail.store.engine import get_engine, utcnow
from smartmail.store.ids import new_ids
from smartmail.store.models import Message, WebhookDelivery, WebhookEndpoint

CHECKPOINT = "webhooks"  # the stream_checkpoints row: the stream position read up to
FAN_OUT_TASK = "smartmail.webhooks.fan_out"
PAGE = event_stream.MAX_LIMIT  # events read, and their deliveries written, per transaction


@dataclass(frozen=True)
class Subscription:
    """An enabled endpoint's filters, as the fan-out matches events against them."""

    endpoint_id: int
    start: Position  # events at or before it were written before the endpoint existed
    types: frozenset[str] | None
    campaign_ids: frozenset[int] | None
    tags: frozenset[str] | None
    batched: bool

    def wants(self, event: dict[str, Any], position: Position, message_tags: dict[str, frozenset[str]]) -> bool:
        if position <= self.start:
            return False
        if self.types is not None and event["type"] not in self.types:
            return False
        if self.campaign_ids is not None and event["campaign_id"] not in self.campaign_ids:
            return False
        return self.tags is None or not self.tags.isdisjoint(message_tags.get(event["message_id"], ()))


def _subscriptions(connection: Connection) -> list[Subscription]:
    columns = (WebhookEndpoint.id, WebhookEndpoint.start_position, WebhookEndpoint.event_types)
    rows = connection.execute(
        select(*columns, WebhookEndpoint.campaign_ids, WebhookEndpoint.tags, WebhookEndpoint.batch_size).where(
            WebhookEndpoint.enabled.is_(True)
        )
    )
    return [
        Subscription(
            endpoint_id=row.id,
            start=Position.parse(row.start_position),
            types=frozenset(row.event_types) if row.event_types else None,
            campaign_ids=frozenset(row.campaign_ids) if row.campaign_ids else None,
            tags=frozenset(row.tags) if row.tags else None,
            batched=row.batch_size > 1,
        )
        for row in rows
    ]


def lock_checkpoint(connection: Connection) -> Position:
    """The position read up to, locked until commit. A new checkpoint starts at the stream's end:
    an endpoint receives only events written after it was created (create_endpoint takes this lock
    too, so no event falls between its start and the checkpoint)."""
    return Position.parse(checkpoints.lock(connection, CHECKPOINT, initial=str(event_stream.end(connection))))


def payload_of(event: dict[str, Any]) -> str:
    """The delivered body of one event, per the Standard Webhooks spec: its type, when it happened,
    and the event as /v1/events shows it."""
    return orjson.dumps({"type": event["type"], "timestamp": event["occurred_at"], "data": event}).decode()


@dataclass(frozen=True)
class FannedOut:
    deliveries: int
    endpoint_ids: frozenset[int]  # the endpoints given new deliveries (their senders are asked to start)
    more: bool  # time was up with events left


def fan_out(*, max_seconds: float = 10.0) -> FannedOut:
    """Read the stream after the checkpoint, a page per transaction, writing the deliveries and the new
    checkpoint together: a crash repeats nothing and loses nothing (and a page read twice, were it
    ever, would write each (endpoint, event) once: the pair is unique)."""
    started, created, endpoint_ids = time.monotonic(), 0, set()
    while True:
        count, endpoints, more = _fan_out_page()
        created += count
        endpoint_ids |= endpoints
        if not more:
            return FannedOut(created, frozenset(endpoint_ids), False)
        if time.monotonic() - started >= max_seconds:
            return FannedOut(created, frozenset(endpoint_ids), True)


def _fan_out_page() -> tuple[int, set[int], bool]:
    with get_engine().begin() as connection:
        position = lock_checkpoint(connection)
        subscriptions = _subscriptions(connection)
        if not subscriptions:
            # Nothing to deliver to: skip to the end rather than read every event for nobody.
            checkpoints.move(connection, CHECKPOINT, str(max(position, event_stream.end(connection))))
            return 0, set(), False
        page = event_stream.read(position, limit=PAGE, connection=connection)
        rows = _deliveries(connection, page.events, subscriptions)
        if rows:
            insert = dialect.insert(connection)(WebhookDelivery).on_conflict_do_nothing(
                index_elements=["endpoint_id", "event_id"]
            )
            connection.execute(insert, rows)
        checkpoints.move(connection, CHECKPOINT, str(page.next))
    return len(rows), {row["endpoint_id"] for row in rows}, page.more


def _deliveries(
    connection: Connection, events: list[dict[str, Any]], subscriptions: list[Subscription]
) -> list[dict[str, Any]]:
    message_tags = _message_tags(connection, events) if any(s.tags for s in subscriptions) else {}
    now = utcnow()
    rows: list[dict[str, Any]] = []
    unbatched: list[dict[str, Any]] = []
    for event in events:
        position = Position.parse(event["position"])
        wanted = [s for s in subscriptions if s.wants(event, position, message_tags)]
        if not wanted:
            continue
        payload = payload_of(event)
        for subscription in wanted:
            row = {
                "endpoint_id": subscription.endpoint_id,
                "event_id": event["id"],
                "event_type": event["type"],
                "payload": payload,
                "webhook_id": None,
                "state": "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
            rows.append(row)
            if not subscription.batched:
                unbatched.append(row)
    # Each unbatched delivery's webhook-id now; a batched one's when its request is formed.
    for row, id_ in zip(unbatched, new_ids(len(unbatched))):
        row["webhook_id"] = f"msg_{id_}"
    return rows


def _message_tags(connection: Connection, events: Iterable[dict[str, Any]]) -> dict[str, frozenset[str]]:
    ids = sorted({event["message_id"] for event in events if event["message_id"]})
    if not ids:
        return {}
    rows = connection.execute(select(Message.id, Message.tags).where(Message.id.in_(ids)))
    return {row.id: frozenset(row.tags or ()) for row in rows}
