"""Sending an endpoint's due deliveries: one drain at a time under a lease, outcomes recorded as they complete."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import defaultdict
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import orjson
import structlog
from sqlalchemy import bindparam, exists, insert, or_, select, update
from sqlalchemy.engine import Connection, Row

from smartmail import runtime
from smartmail.config import get_settings
from smartmail.store.engine import get_engine, utcnow
from smartmail.store.ids import new_id
from smartmail.store.models import Event, EventType, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from smartmail.webhooks import endpoints, sending
from smartmail.webhooks.endpoints import Target
from smartmail.workers import metrics

log = structlog.get_logger("smartmail.webhooks")

SEND_TASK = "smartmail.webhooks.send"
TICK_TASK = "smartmail.webhooks.tick"
PENDING, SUCCEEDED, FAILED = "pending", "succeeded", "failed"  # WebhookDeliveryState's values
ROUND_REQUESTS = 500  # requests claimed per round at most
ROUND_ROWS = 5000  # deliveries claimed per round at most (a batched endpoint's requests carry many)
RECORD_EVERY = 100  # outcomes recorded per transaction, as they complete …
RECORD_SECONDS = 5.0  # … or after this long, which also renews the lease while answers are slow
PACED_ROUND_SECONDS = 5  # a rate-limited endpoint's round holds this many seconds' worth of requests
MAX_CIRCUIT_SECONDS = 600.0
_PENDING_ROWS = WebhookDelivery.state == PENDING
T = TypeVar("T")


def drain(endpoint_id: int, *, max_seconds: float = 20.0) -> bool:
    """Send the endpoint's due deliveries until none is due, its circuit opens, it is disabled, or
    `max_seconds` have passed (True: some are left for another task; requests not started by then
    wait for it, so a slow endpoint holds a worker thread about `max_seconds` plus a timeout). Does
    nothing while another drain holds the endpoint's lease."""
    owner = new_id()
    if not _take_lease(endpoint_id, owner):
        return False
    sender = _Drain(endpoint_id, owner, time.monotonic() + max_seconds)
    try:
        return _shared_loop().run(sender.run(), timeout=max_seconds + 2 * lease().total_seconds())
    except endpoints.SecretUnreadable as exc:
        _disable(endpoint_id, f"{exc}, then enable it")
        return False
    finally:
        _release_lease(endpoint_id, owner, sender.paced_until)


class _LoopThread:
    """The process's one event loop for every drain, in a thread of its own: the drains of several
    endpoints (one Celery thread each, waiting) share it, rather than each running a loop of its own
    and contending for the GIL. uvloop where installed (uvicorn[standard] brings it)."""

    def __init__(self) -> None:
        try:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="smartmail-webhooks", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], *, timeout: float) -> T:
        if not self.thread.is_alive() or self.loop.is_closed():
            coroutine.close()
            raise RuntimeError("the webhooks event loop has stopped")
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()  # (cannot happen while leases and deadlines hold: a safety net)
            raise

    def stop(self, close: bool) -> None:
        """Cancel what runs on the loop (a waiting run() raises CancelledError), then close it; after
        a fork (close=False) the thread is gone with the parent's loop."""
        if not close or not self.thread.is_alive():
            return

        async def cancel_everything() -> None:
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()
            await self.loop.shutdown_default_executor()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel_everything(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


@runtime.per_process(close=lambda loop_thread, close: loop_thread.stop(close))
def _shared_loop() -> _LoopThread:
    return _LoopThread()


def lease() -> timedelta:
    """How long a drain's hold on its endpoint lasts unrenewed. Outcomes renew it at least every
    RECORD_SECONDS while answers come; a wave of requests that all hang ends at the timeout."""
    return timedelta(seconds=2 * get_settings().webhook_timeout + RECORD_SECONDS + 10)


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


def _release_lease(endpoint_id: int, owner: str, paced_until: datetime | None) -> None:
    """End the drain's lease, keeping when a rate-limited endpoint may be sent to next."""
    with get_engine().begin() as connection:
        connection.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.drain_owner == owner)
            .values(drain_until=None, drain_owner=None, paced_until=paced_until)
        )


@dataclass(frozen=True)
class Claimed:
    """A round's requests, and each delivery's attempts before them (for its next wait)."""

    requests: list[sending.Request]
    attempts_before: dict[int, int]


class _Drain:
    """One endpoint's sender for the life of a task: claim due deliveries, POST them, record outcomes."""

    def __init__(self, endpoint_id: int, owner: str, deadline: float) -> None:
        self.endpoint_id, self.owner, self.deadline = endpoint_id, owner, deadline
        self.settings = get_settings()
        self.pacer: sending.Pacer | None = None

    @property
    def paced_until(self) -> datetime | None:
        """When a rate-limited endpoint may get its next request (the pacer's next start)."""
        if self.pacer is None or not self.pacer.interval:
            return None
        return utcnow() + timedelta(seconds=max(0.0, self.pacer.next_start - time.monotonic()))

    def _pacer_for(self, target: Target) -> sending.Pacer:
        if self.pacer is None:
            wait = (target.paced_until - utcnow()).total_seconds() if target.paced_until else 0.0
            self.pacer = sending.Pacer(target.rate_limit, time.monotonic() + max(0.0, wait))
        return self.pacer

    async def run(self) -> bool:
        settings = self.settings
        async with sending.client(settings, endpoints.allowed_networks(), endpoints.MAX_IN_FLIGHT) as http:
            while True:
                # Database calls run in threads: the loop serves every endpoint's requests meanwhile.
                target = await asyncio.to_thread(endpoints.target, self.endpoint_id)
                if target is None or not target.enabled:
                    return False
                if target.circuit_open_until is not None and target.circuit_open_until > utcnow():
                    return False
                if target.url.startswith("http://") and not settings.webhook_allow_http:
                    reason = "http:// URLs are no longer allowed (SMARTMAIL_WEBHOOK_ALLOW_HTTP)"
                    await asyncio.to_thread(_disable, target.id, reason)
                    return False
                pacer = self._pacer_for(target)
                if pacer.next_start > self.deadline:
                    return False  # beat asks again once `paced_until` has passed
                # A circuit that was open lets one request through (half-open): its answer decides.
                size = 1 if target.circuit_open_until is not None else round_size(target)
                claimed = await asyncio.to_thread(claim, target, size)
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
                    deadline=self.deadline,
                )
                if not await self._send_round(target, claimed, sender):
                    return False
                if time.monotonic() >= self.deadline:
                    return True

    async def _send_round(self, target: Target, claimed: Claimed, sender: sending.Round) -> bool:
        """Send a round, recording outcomes as they complete (RECORD_EVERY at a time, or every
        RECORD_SECONDS), in a thread while the next requests go on: a crash repeats only what was not
        recorded yet. False when the drain must stop (disabled, circuit opened, lease lost)."""
        keep_going, last_recorded = True, time.monotonic()
        completed: list[tuple[sending.Request, sending.Outcome]] = []

        async def flush() -> None:
            nonlocal keep_going, completed, last_recorded
            recorded = await asyncio.to_thread(record, target, completed, claimed.attempts_before, self.owner)
            keep_going, completed, last_recorded = keep_going and recorded, [], time.monotonic()
            if not keep_going:
                sender.stop()

        async with contextlib.aclosing(sender.completed(claimed.requests)) as outcomes:
            async for request, outcome in outcomes:
                completed.append((request, outcome))
                if len(completed) >= RECORD_EVERY or time.monotonic() - last_recorded >= RECORD_SECONDS:
                    await flush()
        if completed:
            await flush()
        return keep_going


def round_size(target: Target) -> int:
    """Requests per round: a rate-limited endpoint's round lasts about PACED_ROUND_SECONDS."""
    size = min(ROUND_REQUESTS, max(1, ROUND_ROWS // target.batch_size))
    if target.rate_limit is None:
        return size
    return max(1, min(size, int(target.rate_limit * PACED_ROUND_SECONDS)))


_CLAIMED = (
    WebhookDelivery.id,
    WebhookDelivery.webhook_id,
    WebhookDelivery.payload,
    WebhookDelivery.attempts,
    WebhookDelivery.created_at,
)


def claim(target: Target, limit: int) -> Claimed:
    """The endpoint's due deliveries as up to `limit` requests, oldest first: one per delivery, or
    for a batched endpoint, batches of up to its batch size; a batch retried is the same batch (same
    webhook-id, events and timestamp), and new batches get their webhook-id here, before their first
    attempt."""
    with get_engine().begin() as connection:
        rows = connection.execute(
            select(*_CLAIMED)
            .where(WebhookDelivery.endpoint_id == target.id, _PENDING_ROWS, WebhookDelivery.next_attempt_at <= utcnow())
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
            .limit(limit * target.batch_size)
        ).all()
        if target.batch_size == 1:
            requests = [sending.Request(row.webhook_id, (row.id,), row.payload.encode()) for row in rows]
            return Claimed(requests, {row.id: row.attempts for row in rows})
        return _claim_batches(connection, target, rows, limit)


def _claim_batches(connection: Connection, target: Target, rows: Sequence[Row], limit: int) -> Claimed:
    retried = sorted({row.webhook_id for row in rows if row.webhook_id})
    fresh = [row for row in rows if not row.webhook_id]
    groups: dict[str, list[Row]] = defaultdict(list)
    if retried:  # every event of a batch being retried, even those past this page's limit
        for row in connection.execute(
            select(*_CLAIMED)
            .where(WebhookDelivery.webhook_id.in_(retried), WebhookDelivery.endpoint_id == target.id, _PENDING_ROWS)
            .order_by(WebhookDelivery.id)
        ):
            groups[row.webhook_id].append(row)
    for start in range(0, len(fresh), target.batch_size):
        chunk = fresh[start : start + target.batch_size]
        webhook_id = f"msg_{new_id()}"
        # Only the rows this claim named: another drain (after a lapsed lease) may have batched some.
        named = set(
            connection.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_([row.id for row in chunk]), WebhookDelivery.webhook_id.is_(None))
                .values(webhook_id=webhook_id)
                .returning(WebhookDelivery.id)
            ).scalars()
        )
        if named:
            groups[webhook_id] = [row for row in chunk if row.id in named]
    requests = []
    for webhook_id, group in list(groups.items())[:limit]:
        group.sort(key=lambda row: row.id)
        # Each item is the body a single delivery would have; the batch's time is its first event's.
        body = b'{"type":"batch","timestamp":%s,"data":[%s]}' % (
            orjson.dumps(min(row.created_at for row in group).isoformat() + "Z"),
            b",".join(row.payload.encode() for row in group),
        )
        requests.append(sending.Request(webhook_id, tuple(row.id for row in group), body))
    rows_sent = [row for group in groups.values() for row in group]
    return Claimed(requests, {row.id: row.attempts for row in rows_sent})


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
_HEALTH = (
    WebhookEndpoint.enabled,
    WebhookEndpoint.drain_owner,
    WebhookEndpoint.consecutive_failures,
    WebhookEndpoint.failing_since,
    WebhookEndpoint.circuit_open_until,
    WebhookEndpoint.circuit_pause,
)


def record(
    target: Target,
    sent: Sequence[tuple[sending.Request, sending.Outcome]],
    attempts_before: Mapping[int, int],
    lease_owner: str | None,
) -> bool:
    """Store outcomes in one transaction: the deliveries' new states, an attempt row per delivery,
    the endpoint's health and (for a drain, `lease_owner`) its renewed lease. False when the drain
    must stop: the endpoint is disabled, its circuit opened, or another drain holds the lease."""
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
            wait = next_wait(attempts_before[delivery_id] + 1)
            failed.append(
                {
                    "b_id": delivery_id,
                    "b_state": PENDING if wait is not None else FAILED,
                    "b_next": now + timedelta(seconds=wait or 0),
                    "b_status": outcome.status,
                    "b_error": outcome.error or f"HTTP {outcome.status}",
                }
            )
    with get_engine().begin() as connection:
        if done:
            connection.execute(_succeeded, done)
        if failed:
            connection.execute(_failed, failed)
        if attempts:
            connection.execute(insert(WebhookAttempt), attempts)
        health = _update_health(connection, target, sent, lease_owner, now)
    retrying = sum(1 for row in failed if row["b_state"] == PENDING)
    metrics.count_webhook_deliveries(len(done), retrying, len(failed) - retrying)
    if health is None:
        return False
    endpoint, changes, reason = health
    if reason:
        log.warning("webhooks.endpoint_disabled", endpoint_id=target.id, reason=reason)
    if changes.get("circuit_open_until"):
        log.info("webhooks.circuit_opened", endpoint_id=target.id, seconds=changes["circuit_pause"])
    return endpoint.enabled and not reason and not changes.get("circuit_open_until")


def _update_health(
    connection: Connection,
    target: Target,
    sent: Sequence[tuple[sending.Request, sending.Outcome]],
    lease_owner: str | None,
    now: datetime,
) -> tuple[Any, dict[str, Any], str] | None:
    """The endpoint's health after `sent`, written; None when the drain must stop at once."""
    endpoint = connection.execute(select(*_HEALTH).where(WebhookEndpoint.id == target.id).with_for_update()).first()
    if endpoint is None:
        return None
    if lease_owner is not None and endpoint.drain_owner != lease_owner:
        return None  # the lease lapsed and another drain took the endpoint: it goes on
    changes, reason = health_changes(endpoint, [outcome for _, outcome in sent], now)
    if lease_owner is not None:
        changes["drain_until"] = now + lease()
    if reason:
        _disabled_event(connection, target.id, reason, now)
    connection.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == target.id).values(**changes))
    return endpoint, changes, reason


def health_changes(endpoint: Any, outcomes: Sequence[sending.Outcome], now: datetime) -> tuple[dict[str, Any], str]:
    """The endpoint's columns after these outcomes, and why it is now disabled ("" if it is not):
    a success clears the failure streak; failures lengthen it, and past the setting open the circuit
    (its first pause, then twice the last while the half-open probes keep failing); a 410, or failing
    everything for SMARTMAIL_WEBHOOK_DISABLE_AFTER_DAYS, disables it (once)."""
    settings = get_settings()
    changes: dict[str, Any] = {}
    failing_since = endpoint.failing_since
    if any(outcome.ok for outcome in outcomes):
        changes.update(last_success_at=now, **endpoints.HEALTHY)
        failing_since = None
    elif outcomes:
        streak = endpoint.consecutive_failures + len(outcomes)
        failing_since = failing_since or now
        changes.update(consecutive_failures=streak, failing_since=failing_since)
        already_open = endpoint.circuit_open_until is not None and endpoint.circuit_open_until > now
        if streak >= settings.webhook_circuit_failures and not already_open:
            last = endpoint.circuit_pause
            pause = min(2 * last if last else settings.webhook_circuit_seconds, MAX_CIRCUIT_SECONDS)
            changes.update(circuit_open_until=now + timedelta(seconds=pause), circuit_pause=pause)
    reason = ""
    if not endpoint.enabled:
        pass  # disabled already (by an earlier batch of this round, or an operator)
    elif any(outcome.status == 410 for outcome in outcomes):
        reason = "the endpoint answered 410 Gone"
    elif failing_since and now - failing_since >= timedelta(days=settings.webhook_disable_after_days):
        reason = f"every attempt failed since {failing_since:%Y-%m-%d %H:%M} UTC"
    if reason:
        changes.update(enabled=False, disabled_reason=reason, updated_at=now)
    return changes, reason


def _disabled_event(connection: Connection, endpoint_id: int, reason: str, now: datetime) -> None:
    # Events written from now on are not queued for it (docs/webhooks.md): the event says so.
    connection.execute(
        insert(Event).values(
            type=EventType.WEBHOOK_ENDPOINT_DISABLED.value,
            properties={"endpoint_id": endpoint_id, "reason": reason},
            occurred_at=now,
        )
    )


def _disable(endpoint_id: int, reason: str) -> None:
    """Disable an endpoint the drain cannot send to (its secret unreadable, its scheme not allowed)."""
    now = utcnow()
    with get_engine().begin() as connection:
        disabled = connection.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.enabled.is_(True))
            .values(enabled=False, disabled_reason=reason, updated_at=now)
        ).rowcount
        if disabled:
            _disabled_event(connection, endpoint_id, reason, now)
    if disabled:
        log.warning("webhooks.endpoint_disabled", endpoint_id=endpoint_id, reason=reason)


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
                    or_(WebhookEndpoint.paced_until.is_(None), WebhookEndpoint.paced_until <= now),
                    due,
                )
            ).scalars()
        )
