"""Sending deliveries: one drain per endpoint under a lease, rounds of concurrent requests, retries held in the rows."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import structlog
from sqlalchemy import bindparam, delete, exists, func, insert, or_, select, update
from sqlalchemy.engine import Connection

from smartmail.config import get_settings
from smartmail.errors import InvalidInput, NotFound
from smartmail.store.engine import get_engine, session_scope, utcnow
from smartmail.store.ids import new_id
from smartmail.store.models import (
    Event,
    EventType,
    WebhookAttempt,
    WebhookDelivery,
    WebhookDeliveryState,
    WebhookEndpoint,
)
from smartmail.webhooks import endpoints, sending
from smartmail.webhooks.endpoints import Target

log = structlog.get_logger("smartmail.webhooks")

SEND_TASK = "smartmail.webhooks.send"
TICK_TASK = "smartmail.webhooks.tick"
ROUND_REQUESTS = 500  # requests claimed per round at most
RECORD_EVERY = 100  # outcomes recorded per transaction, as they complete
PACED_ROUND_SECONDS = 5  # a rate-limited endpoint's round holds this many seconds' worth of requests
MAX_CIRCUIT_SECONDS = 600.0
PENDING, SUCCEEDED, FAILED = (state.value for state in WebhookDeliveryState)
_PENDING_ROWS = WebhookDelivery.state == PENDING


def drain(endpoint_id: int, *, max_seconds: float = 20.0) -> bool:
    """Send the endpoint's due deliveries, round after round, until none is due, its circuit opens, it
    is disabled, or `max_seconds` have passed (True: some are left for another task). Does nothing
    while another drain holds the endpoint's lease."""
    owner = new_id()
    if not _take_lease(endpoint_id, owner):
        return False
    try:
        return asyncio.run(_Drain(endpoint_id, owner).run(max_seconds))
    except endpoints.SecretUnreadable as exc:
        endpoints.set_enabled(endpoint_id, False, reason=f"{exc}, then enable it")
        return False
    finally:
        _release_lease(endpoint_id, owner)


def lease() -> timedelta:
    """How long a drain's claim on its endpoint lasts without renewal (every round renews it): a
    round takes at most about two request timeouts (send_all stops a failing round) and a pacing."""
    return timedelta(seconds=2 * get_settings().webhook_timeout + PACED_ROUND_SECONDS + 10)


def _take_lease(endpoint_id: int, owner: str) -> bool:
    now = utcnow()
    with get_engine().begin() as connection:
        taken = connection.execute(
            update(WebhookEndpoint)
            .where(
                WebhookEndpoint.id == endpoint_id,
                or_(WebhookEndpoint.drain_until.is_(None), WebhookEndpoint.drain_until < now),
            )
            .values(drain_until=now + lease(), drain_owner=owner)
        ).rowcount
    return taken == 1


def _release_lease(endpoint_id: int, owner: str) -> None:
    with get_engine().begin() as connection:
        connection.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.drain_owner == owner)
            .values(drain_until=None, drain_owner=None)
        )


@dataclass(frozen=True)
class _Claimed:
    """A round's requests, and each delivery's attempts so far (for its next wait)."""

    requests: list[sending.Request]
    attempts: dict[int, int]


class _Drain:
    """One endpoint's sender for the life of a task: claim due deliveries, POST them, record outcomes."""

    def __init__(self, endpoint_id: int, owner: str) -> None:
        self.endpoint_id, self.owner = endpoint_id, owner
        self.settings = get_settings()

    async def run(self, max_seconds: float) -> bool:
        started = time.monotonic()
        settings = self.settings
        async with sending.client(settings, endpoints.allowed_networks(), endpoints.MAX_IN_FLIGHT) as http:
            pacer: sending.Pacer | None = None
            while True:
                target = endpoints.target(self.endpoint_id)
                if target is None or not target.enabled:
                    return False
                if target.circuit_open_until is not None and target.circuit_open_until > utcnow():
                    return False
                pacer = pacer or sending.Pacer(target.rate_limit)
                # A circuit that was open lets one request through (half-open): its answer decides.
                limit = 1 if target.circuit_open_until is not None else round_size(target)
                claimed = claim(target, limit)
                if not claimed.requests:
                    return False
                sender = sending.Round(
                    http,
                    target.url,
                    target.secrets,
                    max_in_flight=target.max_in_flight,
                    pacer=pacer,
                    total_timeout=settings.webhook_timeout,
                    max_response_bytes=settings.webhook_max_response_bytes,
                    give_up_after=settings.webhook_circuit_failures,
                )
                if not await self._send_round(target, claimed, sender):
                    return False
                if time.monotonic() - started >= max_seconds:
                    return True

    async def _send_round(self, target: Target, claimed: _Claimed, sender: sending.Round) -> bool:
        """Send a round, recording outcomes RECORD_EVERY at a time as they complete, in a thread while
        the next requests go on: a crash repeats only what was not recorded yet. False when the drain
        must stop (the endpoint disabled, its circuit opened, the lease lost)."""
        keep_going, completed = True, []
        async for request, outcome in sender.completed(claimed.requests):
            completed.append((request, outcome))
            if len(completed) >= RECORD_EVERY:
                recorded = await asyncio.to_thread(record, target, completed, claimed.attempts, lease_owner=self.owner)
                keep_going, completed = keep_going and recorded, []
                if not keep_going:
                    sender.stop()
        if completed:
            recorded = await asyncio.to_thread(record, target, completed, claimed.attempts, lease_owner=self.owner)
            keep_going = keep_going and recorded
        return keep_going


def round_size(target: Target) -> int:
    if target.rate_limit is None:
        return ROUND_REQUESTS
    return max(1, min(ROUND_REQUESTS, int(target.rate_limit * PACED_ROUND_SECONDS)))


def claim(target: Target, limit: int) -> _Claimed:
    """The endpoint's due deliveries as requests, oldest first: one per delivery, or for a batched
    endpoint, batches of up to its batch size; a batch retried is the same batch (same webhook-id,
    same events), and new batches get their webhook-id here, before their first attempt."""
    now = utcnow()
    rows_per_request = target.batch_size
    with get_engine().begin() as connection:
        rows = connection.execute(
            select(WebhookDelivery.id, WebhookDelivery.webhook_id, WebhookDelivery.payload, WebhookDelivery.attempts)
            .where(
                WebhookDelivery.endpoint_id == target.id,
                _PENDING_ROWS,
                WebhookDelivery.next_attempt_at <= now,
            )
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
            .limit(limit * rows_per_request)
        ).all()
        if rows_per_request == 1:
            requests = [sending.Request(row.webhook_id, (row.id,), row.payload.encode()) for row in rows]
            return _Claimed(requests, {row.id: row.attempts for row in rows})
        return _claim_batches(connection, target, rows, limit)


def _claim_batches(connection: Connection, target: Target, rows: Sequence[Any], limit: int) -> _Claimed:
    retried = sorted({row.webhook_id for row in rows if row.webhook_id})
    if retried:  # every event of a batch being retried, even those past this page's limit
        rows = [row for row in rows if not row.webhook_id] + list(
            connection.execute(
                select(
                    WebhookDelivery.id, WebhookDelivery.webhook_id, WebhookDelivery.payload, WebhookDelivery.attempts
                )
                .where(WebhookDelivery.webhook_id.in_(retried), WebhookDelivery.endpoint_id == target.id, _PENDING_ROWS)
                .order_by(WebhookDelivery.id)
            )
        )
    groups: dict[str, list] = defaultdict(list)
    fresh = [row for row in rows if not row.webhook_id]
    for row in rows:
        if row.webhook_id:
            groups[row.webhook_id].append(row)
    for start in range(0, len(fresh), target.batch_size):
        chunk = fresh[start : start + target.batch_size]
        webhook_id = f"msg_{new_id()}"
        connection.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_([row.id for row in chunk]), WebhookDelivery.webhook_id.is_(None))
            .values(webhook_id=webhook_id)
        )
        groups[webhook_id] = chunk
    requests = []
    for webhook_id, group in list(groups.items())[:limit]:
        group.sort(key=lambda row: row.id)
        body = b'{"type":"batch","timestamp":%s,"data":[%s]}' % (
            orjson.dumps(utcnow().isoformat() + "Z"),
            b",".join(row.payload.encode() for row in group),
        )
        requests.append(sending.Request(webhook_id, tuple(row.id for row in group), body))
    return _Claimed(requests, {row.id: row.attempts for row in rows})


def next_wait(attempts_made: int) -> float | None:
    """Seconds until the next attempt after `attempts_made` attempts, with jitter; None: no more."""
    settings = get_settings()
    schedule = settings.webhook_retry_schedule
    if attempts_made >= len(schedule):
        return None
    jitter = settings.webhook_retry_jitter
    return schedule[attempts_made] * random.uniform(1 - jitter, 1 + jitter)


_succeeded = (
    update(WebhookDelivery)
    .where(WebhookDelivery.id == bindparam("b_id"), _PENDING_ROWS)
    .values(
        state=SUCCEEDED,
        attempts=WebhookDelivery.attempts + 1,
        delivered_at=bindparam("b_at"),
        last_status=bindparam("b_status"),
        last_error=None,
    )
)
_failed = (
    update(WebhookDelivery)
    .where(WebhookDelivery.id == bindparam("b_id"), _PENDING_ROWS)
    .values(
        state=bindparam("b_state"),
        attempts=WebhookDelivery.attempts + 1,
        next_attempt_at=bindparam("b_next"),
        last_status=bindparam("b_status"),
        last_error=bindparam("b_error"),
    )
)


def record(
    target: Target,
    sent: Sequence[tuple[sending.Request, sending.Outcome]],
    attempts_made: Mapping[int, int],
    *,
    lease_owner: str | None,
) -> bool:
    """Store outcomes in one transaction: the deliveries' new states (`attempts_made`: each one's
    attempts before these), an attempt row per delivery, the endpoint's health (its circuit, a 410,
    a failure streak past the limit) and lease. False when the drain must stop (the endpoint was
    disabled, its circuit opened, or the lease lost)."""
    settings = get_settings()
    now = utcnow()
    done, failed, attempts = [], [], []
    for request, outcome in sent:
        for delivery_id in request.delivery_ids:
            attempts.append(
                {
                    "delivery_id": delivery_id,
                    "endpoint_id": target.id,
                    "webhook_id": request.webhook_id,
                    "attempted_at": now,
                    "status": outcome.status,
                    "error": outcome.error,
                    "latency_ms": outcome.latency_ms,
                    "response": outcome.response,
                }
            )
            if outcome.ok:
                done.append({"b_id": delivery_id, "b_at": now, "b_status": outcome.status})
                continue
            wait = next_wait(attempts_made[delivery_id] + 1)
            failed.append(
                {
                    "b_id": delivery_id,
                    "b_state": PENDING if wait is not None else FAILED,
                    "b_next": now + timedelta(seconds=wait or 0),
                    "b_status": outcome.status,
                    "b_error": outcome.error or f"HTTP {outcome.status}",
                }
            )
    successes = sum(outcome.ok for _, outcome in sent)
    gone = any(outcome.status == 410 for _, outcome in sent)
    with get_engine().begin() as connection:
        if done:
            connection.execute(_succeeded, done)
        if failed:
            connection.execute(_failed, failed)
        if attempts:
            connection.execute(insert(WebhookAttempt), attempts)
        endpoint = connection.execute(
            select(
                WebhookEndpoint.drain_owner,
                WebhookEndpoint.consecutive_failures,
                WebhookEndpoint.failing_since,
                WebhookEndpoint.circuit_pause,
                WebhookEndpoint.circuit_open_until,
                WebhookEndpoint.enabled,
            )
            .where(WebhookEndpoint.id == target.id)
            .with_for_update()
        ).first()
        if endpoint is None:
            return False
        changes: dict[str, Any] = {}
        if lease_owner is not None:
            if endpoint.drain_owner != lease_owner:
                return False  # the lease lapsed and another drain took the endpoint: it goes on
            changes["drain_until"] = now + lease()
        if successes:
            changes.update(last_success_at=now, **endpoints.HEALTHY)
        elif sent:
            streak = endpoint.consecutive_failures + len(sent)
            changes.update(consecutive_failures=streak, failing_since=endpoint.failing_since or now)
            already_open = endpoint.circuit_open_until is not None and endpoint.circuit_open_until > now
            if streak >= settings.webhook_circuit_failures and not already_open:
                # Open (again): the first pause, then twice the last while the probes keep failing.
                last = endpoint.circuit_pause
                pause = min(2 * last if last else settings.webhook_circuit_seconds, MAX_CIRCUIT_SECONDS)
                changes.update(circuit_open_until=now + timedelta(seconds=pause), circuit_pause=pause)
        failing_since = changes.get("failing_since", endpoint.failing_since)
        reason = None
        if gone:
            reason = "the endpoint answered 410 Gone"
        elif (
            failing_since
            and not successes
            and now - failing_since >= timedelta(days=settings.webhook_disable_after_days)
        ):
            reason = f"every attempt failed since {failing_since:%Y-%m-%d %H:%M} UTC"
        if reason and not endpoint.enabled:
            reason = None  # disabled already (by an earlier batch of this round, or an operator)
        if reason:
            changes.update(enabled=False, disabled_reason=reason, updated_at=now)
            _disabled_event(connection, target.id, reason, now)
        connection.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == target.id).values(**changes))
    if reason:
        log.warning("webhooks.endpoint_disabled", endpoint_id=target.id, reason=reason)
    if "circuit_open_until" in changes and changes["circuit_open_until"] is not None:
        log.info("webhooks.circuit_opened", endpoint_id=target.id, until=str(changes["circuit_open_until"]))
        return False
    return not reason


def _disabled_event(connection: Connection, endpoint_id: int, reason: str, now: datetime) -> None:
    connection.execute(
        insert(Event).values(
            type=EventType.WEBHOOK_ENDPOINT_DISABLED.value,
            properties={"endpoint_id": endpoint_id, "reason": reason},
            occurred_at=now,
        )
    )


def due_endpoints() -> list[int]:
    """Enabled endpoints with a delivery due, no live drain, and a closed (or half-open) circuit:
    the ones beat asks a drain for."""
    now = utcnow()
    due = exists().where(
        WebhookDelivery.endpoint_id == WebhookEndpoint.id, _PENDING_ROWS, WebhookDelivery.next_attempt_at <= now
    )
    with get_engine().connect() as connection:
        return list(
            connection.execute(
                select(WebhookEndpoint.id).where(
                    WebhookEndpoint.enabled.is_(True),
                    or_(WebhookEndpoint.drain_until.is_(None), WebhookEndpoint.drain_until < now),
                    or_(WebhookEndpoint.circuit_open_until.is_(None), WebhookEndpoint.circuit_open_until <= now),
                    due,
                )
            ).scalars()
        )


# --- Looking at deliveries, replaying them, a test delivery -------------------------------------

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


def get_delivery(delivery_id: int) -> dict[str, Any]:
    """A delivery with its payload and every attempt, oldest first."""
    with session_scope() as session:
        row = session.get(WebhookDelivery, delivery_id)
        if row is None:
            raise NotFound(f"No webhook delivery {delivery_id}.")
        found = _delivery_dict(row)
        found["payload"] = orjson.loads(row.payload)
        attempts = session.scalars(
            select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id).order_by(WebhookAttempt.id)
        )
        found["attempt_log"] = [_attempt_dict(attempt) for attempt in attempts]
        return found


def _replayed(where: list) -> int:
    now = utcnow()
    with get_engine().begin() as connection:
        return connection.execute(
            update(WebhookDelivery)
            .where(*where)
            .values(state=PENDING, attempts=0, next_attempt_at=now, delivered_at=None)
        ).rowcount


def replay(delivery_id: int) -> dict[str, Any]:
    """Send a delivery again, whatever its state, with its own webhook-id (a receiver that kept it
    ignores it as a duplicate) and a fresh retry schedule."""
    if not _replayed([WebhookDelivery.id == delivery_id]):
        raise NotFound(f"No webhook delivery {delivery_id}.")
    return get_delivery(delivery_id)


def replay_range(
    endpoint_id: int, since: datetime, until: datetime | None = None, *, state: str | None = FAILED
) -> int:
    """Send again every delivery of an endpoint created in [since, until) (until: now) in `state`
    (None: any state but pending); returns how many."""
    endpoints.get_endpoint(endpoint_id)
    if until is not None and until <= since:
        raise InvalidInput("must be after since", field="until")
    where = [
        WebhookDelivery.endpoint_id == endpoint_id,
        WebhookDelivery.created_at >= since,
        WebhookDelivery.state == _check_state(state) if state else WebhookDelivery.state != PENDING,
    ]
    if until is not None:
        where.append(WebhookDelivery.created_at < until)
    return _replayed(where)


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
    record(target, [(request, outcome)], {delivery_id: 0}, lease_owner=None)
    return get_delivery(delivery_id)


async def _send_once(target: Target, request: sending.Request) -> sending.Outcome:
    settings = get_settings()
    async with sending.client(settings, endpoints.allowed_networks(), 1) as http:
        return await sending.post(
            http, target.url, request, target.secrets, settings.webhook_timeout, settings.webhook_max_response_bytes
        )


def delete_old(*, batch: int = 10_000) -> int:
    """Finished deliveries and attempts older than SMARTMAIL_WEBHOOK_RETENTION_DAYS (pending ones
    stay, however old); at most `batch` rows of each per call."""
    cutoff = utcnow() - timedelta(days=get_settings().webhook_retention_days)
    with get_engine().begin() as connection:
        old_attempts = select(WebhookAttempt.id).where(WebhookAttempt.attempted_at < cutoff).limit(batch)
        attempts = connection.execute(delete(WebhookAttempt).where(WebhookAttempt.id.in_(old_attempts))).rowcount
        old_deliveries = (
            select(WebhookDelivery.id)
            .where(WebhookDelivery.created_at < cutoff, WebhookDelivery.state != PENDING)
            .limit(batch)
        )
        deliveries = connection.execute(delete(WebhookDelivery).where(WebhookDelivery.id.in_(old_deliveries))).rowcount
    return attempts + deliveries


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
