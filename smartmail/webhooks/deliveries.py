"""Looking at deliveries and their attempts, replaying them, test deliveries, and deleting old ones."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import delete, func, insert, select, update

from smartmail.config import get_settings
from smartmail.errors import InvalidInput, NotFound
from smartmail.store.engine import as_stored, get_engine, session_scope, utcnow
from smartmail.store.ids import new_id
from smartmail.store.models import WebhookAttempt, WebhookDelivery
from smartmail.webhooks import endpoints, sending
from smartmail.webhooks.drain import FAILED, PENDING, SUCCEEDED, record
from smartmail.webhooks.endpoints import Target

STATES = (PENDING, SUCCEEDED, FAILED)


def _delivery_dict(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "endpoint_id": row.endpoint_id,
        "event_id": row.event_id,
        "event_type": row.event_type,
        "webhook_id": row.webhook_id,
        "state": row.state,
        "attempts": row.attempts,
        "next_attempt_at": row.next_attempt_at if row.state == PENDING else None,
        "created_at": row.created_at,
        "delivered_at": row.delivered_at,
        "last_status": row.last_status,
        "last_error": row.last_error,
    }


def _attempt_dict(row: WebhookAttempt) -> dict[str, Any]:
    return {
        "id": row.id,
        "webhook_id": row.webhook_id,
        "attempted_at": row.attempted_at,
        "status": row.status,
        "error": row.error,
        "latency_ms": row.latency_ms,
        "response": row.response,
    }


def _check_state(state: str | None) -> str | None:
    if state is not None and state not in STATES:
        raise InvalidInput(f"must be one of {', '.join(STATES)}", field="state")
    return state


def list_deliveries(
    endpoint_id: int, *, limit: int = 100, before: int | None = None, state: str | None = None
) -> list[dict[str, Any]]:
    """An endpoint's deliveries, newest first (keyset paging on the id)."""
    endpoints.get_endpoint(endpoint_id)  # NotFound for an unknown endpoint
    query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    if before is not None:
        query = query.where(WebhookDelivery.id < before)
    if _check_state(state) is not None:
        query = query.where(WebhookDelivery.state == state)
    with session_scope() as session:
        rows = session.scalars(query.order_by(WebhookDelivery.id.desc()).limit(limit))
        return [_delivery_dict(row) for row in rows]


def get_delivery(delivery_id: int, *, endpoint_id: int | None = None) -> dict[str, Any]:
    """A delivery with its payload and every attempt, oldest first; NotFound also when it is not
    `endpoint_id`'s."""
    with session_scope() as session:
        row = session.get(WebhookDelivery, delivery_id)
        if row is None or endpoint_id is not None and row.endpoint_id != endpoint_id:
            raise NotFound(
                f"No webhook delivery {delivery_id}" + (f" for endpoint {endpoint_id}." if endpoint_id else ".")
            )
        found = _delivery_dict(row)
        found["payload"] = orjson.loads(row.payload)
        attempts = session.scalars(
            select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id).order_by(WebhookAttempt.id)
        )
        found["attempt_log"] = [_attempt_dict(attempt) for attempt in attempts]
        return found


def _replayed(where: list, *, batched: bool) -> int:
    values: dict[str, Any] = {"state": PENDING, "attempts": 0, "next_attempt_at": utcnow(), "delivered_at": None}
    if batched:  # part of an old batch under its webhook-id would be dropped as a duplicate: a new batch
        values["webhook_id"] = None
    with get_engine().begin() as connection:
        return connection.execute(update(WebhookDelivery).where(*where).values(**values)).rowcount


def replay(delivery_id: int, *, endpoint_id: int | None = None) -> dict[str, Any]:
    """Send a delivery again, whatever its state, with a fresh retry schedule. It keeps its
    webhook-id (a receiver that processed it sees a duplicate), unless its endpoint takes batches.
    NotFound also when it is not `endpoint_id`'s."""
    delivery = get_delivery(delivery_id, endpoint_id=endpoint_id)
    batched = endpoints.get_endpoint(delivery["endpoint_id"])["batch_size"] > 1
    _replayed([WebhookDelivery.id == delivery_id], batched=batched)
    return get_delivery(delivery_id)


def replay_range(
    endpoint_id: int, since: datetime, until: datetime | None = None, *, state: str | None = FAILED
) -> int:
    """Send again every delivery of an endpoint created in [since, until) (until: now; naive times
    are UTC) in `state` (None: any state but pending); returns how many."""
    endpoint = endpoints.get_endpoint(endpoint_id)
    since, until = as_stored(since), as_stored(until) if until is not None else None
    if until is not None and until <= since:
        raise InvalidInput("must be after since", field="until")
    where = [
        WebhookDelivery.endpoint_id == endpoint_id,
        WebhookDelivery.created_at >= since,
        WebhookDelivery.state == _check_state(state) if state else WebhookDelivery.state != PENDING,
    ]
    if until is not None:
        where.append(WebhookDelivery.created_at < until)
    return _replayed(where, batched=endpoint["batch_size"] > 1)


TEST_EVENT = "webhook.test"


def send_test(endpoint_id: int) -> dict[str, Any]:
    """POST a `webhook.test` event to the endpoint now (even a disabled one), and return the
    delivery with its attempt; a failed test is retried on the schedule like any delivery."""
    target = endpoints.target(endpoint_id)
    if target is None:
        raise NotFound(f"No webhook endpoint {endpoint_id}.")
    now = utcnow()
    payload = orjson.dumps(
        {
            "type": TEST_EVENT,
            "timestamp": now.isoformat() + "Z",
            "data": {"endpoint_id": endpoint_id, "message": "A test delivery from SmartMail."},
        }
    ).decode()
    webhook_id = f"msg_{new_id()}"
    with get_engine().begin() as connection:
        delivery_id = connection.execute(
            insert(WebhookDelivery)
            .values(
                endpoint_id=endpoint_id,
                event_type=TEST_EVENT,
                payload=payload,
                webhook_id=webhook_id,
                state=PENDING,
                attempts=0,
                next_attempt_at=now + timedelta(seconds=get_settings().webhook_timeout * 2),
                created_at=now,
            )
            .returning(WebhookDelivery.id)
        ).scalar_one()
    request = sending.Request(webhook_id, (delivery_id,), payload.encode())
    outcome = asyncio.run(_send_once(target, request))
    record(target, [(request, outcome)], {delivery_id: 0}, None)
    return get_delivery(delivery_id)


async def _send_once(target: Target, request: sending.Request) -> sending.Outcome:
    settings = get_settings()
    async with sending.client(settings, endpoints.allowed_networks(), 1) as http:
        return await sending.post(
            http, target.url, request, target.secrets, settings.webhook_timeout, settings.webhook_max_response_bytes
        )


def delete_old(*, batch: int = 10_000) -> int:
    """Delete finished deliveries and attempts older than SMARTMAIL_WEBHOOK_RETENTION_DAYS (pending
    ones stay, however old), `batch` rows a transaction; returns how many."""
    cutoff = utcnow() - timedelta(days=get_settings().webhook_retention_days)
    old_attempts = select(WebhookAttempt.id).where(WebhookAttempt.attempted_at < cutoff).limit(batch)
    old_deliveries = (
        select(WebhookDelivery.id)
        .where(WebhookDelivery.created_at < cutoff, WebhookDelivery.state != PENDING)
        .limit(batch)
    )
    deleted = 0
    for statement in (
        delete(WebhookAttempt).where(WebhookAttempt.id.in_(old_attempts)),
        delete(WebhookDelivery).where(WebhookDelivery.id.in_(old_deliveries)),
    ):
        while True:
            with get_engine().begin() as connection:
                count = connection.execute(statement).rowcount
            deleted += count
            if count < batch:
                break
    return deleted


def counts(endpoint_id: int) -> dict[str, int]:
    """Deliveries per state for one endpoint."""
    with get_engine().connect() as connection:
        rows = connection.execute(
            select(WebhookDelivery.state, func.count())
            .where(WebhookDelivery.endpoint_id == endpoint_id)
            .group_by(WebhookDelivery.state)
        ).all()
    found = {state: 0 for state in STATES}
    found.update({state: count for state, count in rows})
    return found
