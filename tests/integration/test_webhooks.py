"""Webhook delivery on real processes and an HTTPS receiver: signatures, retries, 410, timeouts, kill -9, batches."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
import trustme
from sqlalchemy import func, insert, select
from standardwebhooks.webhooks import Webhook

from smartmail import webhooks
from smartmail.audience import event_stream
from smartmail.audience.contacts import add_members, create_contact, create_list, track
from smartmail.campaigns import lifecycle as campaigns
from smartmail.content.template_store import save_template
from smartmail.store.engine import get_engine, session_scope, utcnow
from smartmail.store.models import Event, WebhookAttempt, WebhookDelivery
from smartmail.webhooks import deliveries, drain, endpoints
from tests.conftest import reset_caches, wait_for
from tests.webhook_receiver import HANG, ReceivedRequest, WebhookReceiver, events_of, write_authority

pytestmark = pytest.mark.integration

TIMEOUT = 2.0  # SMARTMAIL_WEBHOOK_TIMEOUT here


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def hooks_env(env, monkeypatch, tmp_path, authority):
    """`env` plus webhook settings: the receiver's CA trusted, loopback allowed, fast polls and retries."""
    values = {
        "SMARTMAIL_WEBHOOK_CA_FILE": str(write_authority(authority, tmp_path)),
        "SMARTMAIL_WEBHOOK_ALLOW_NETWORKS": '["127.0.0.0/8"]',
        "SMARTMAIL_WEBHOOK_POLL_INTERVAL": "0.3",
        "SMARTMAIL_WEBHOOK_RETRY_SCHEDULE": "[0, 0.5, 0.5, 0.5, 1, 1]",
        "SMARTMAIL_WEBHOOK_RETRY_JITTER": "0.1",
        "SMARTMAIL_WEBHOOK_TIMEOUT": str(TIMEOUT),
        "SMARTMAIL_WEBHOOK_CONNECT_TIMEOUT": "1",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    reset_caches()
    return {**env, **values}


@pytest.fixture
def receiver(authority):
    with WebhookReceiver(authority) as running:
        yield running


@pytest.fixture
def start_webhook_workers(hooks_env, start_worker, start_beat):
    """Beat (the tick every 0.3 s), a worker on `default` (where the tick runs; `bulk` too when a test
    sends a campaign) and the webhooks worker as the Procfile runs it; returns the webhooks worker."""

    def start(default_queues: str = "default"):
        start_beat()
        start_worker(concurrency=2, queues=default_queues)
        return start_worker(concurrency=8, pool="threads", queues="webhooks")

    return start


# --- Reading what was stored and received ------------------------------------------------------


def deliveries_of(endpoint_id: int) -> list[Any]:
    with get_engine().connect() as connection:
        return list(
            connection.execute(
                select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id).order_by(WebhookDelivery.id)
            )
        )


def attempts_of(endpoint_id: int) -> list[Any]:
    with get_engine().connect() as connection:
        return list(
            connection.execute(
                select(WebhookAttempt).where(WebhookAttempt.endpoint_id == endpoint_id).order_by(WebhookAttempt.id)
            )
        )


def wait_succeeded(endpoint_id: int, count: int, timeout: float = 30) -> None:
    wait_for(
        lambda: deliveries.counts(endpoint_id)[deliveries.SUCCEEDED] == count,
        timeout,
        message=lambda: f"{count} deliveries succeeded; have {deliveries.counts(endpoint_id)}",
    )


def verified(request: ReceivedRequest, *secrets: str) -> Any:
    """The body, after checking its signature with standardwebhooks and with smartmail.webhooks.verify
    for every secret given."""
    body = None
    for secret in secrets:
        body = Webhook(secret).verify(request.body, request.headers)
        assert webhooks.verify(request.body, request.headers, secret) == body
    return body


def stream_events_after(before: int) -> dict[int, dict[str, Any]]:
    """Events with an id above `before`, as GET /v1/events shows them, by id."""
    page = event_stream.read(event_stream.START, limit=event_stream.MAX_LIMIT)
    return {event["id"]: event for event in page.events if event["id"] > before}


def last_event_id() -> int:
    with get_engine().connect() as connection:
        return connection.scalar(select(func.coalesce(func.max(Event.id), 0)))


def custom_events(count: int, name: str = "signup") -> list[int]:
    """`count` custom events of one contact, written in one transaction (as `track` writes each); their ids."""
    first = track("someone@example.com", name, {"n": 0})
    with session_scope() as session:
        contact_id = session.scalar(select(Event.contact_id).where(Event.id == first))
    rows = [
        {"type": name, "contact_id": contact_id, "properties": {"n": n}, "occurred_at": utcnow()}
        for n in range(1, count)
    ]
    with get_engine().begin() as connection:
        if rows:
            connection.execute(insert(Event), rows)
        ids = connection.scalars(select(Event.id).where(Event.id >= first).order_by(Event.id)).all()
    return list(ids)


# --- Tests ---------------------------------------------------------------------------------------


@pytest.fixture
def relay(hooks_env, smtp_server, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_SMTP_URL", f"smtp://127.0.0.1:{smtp_server.port}?tls=none")
    reset_caches()
    with session_scope() as session:
        save_template(session, "news", subject="News", html="<p>Hello {{ email }}</p>", text="Hello {{ email }}")
    return smtp_server


def test_a_campaigns_events_arrive_signed_once_each_and_match_the_event_rows(relay, receiver, start_webhook_workers):
    emails = [f"reader{i}@example.org" for i in range(5)]
    create_list("readers")
    for email in emails:
        create_contact(email)
    add_members("readers", emails)
    endpoint, secret = endpoints.create_endpoint(receiver.url())
    before = last_event_id()
    start_webhook_workers(default_queues="bulk,default")

    campaigns.create_campaign("hello", template="news", lists=["readers"])
    campaigns.launch_campaign("hello")
    track("reader0@example.org", "signup", {"plan": "pro"})
    wait_for(lambda: relay.count >= 5, 60, message="the campaign delivered")

    def with_five_sent() -> dict[int, dict[str, Any]] | None:
        found = stream_events_after(before)
        return found if Counter(event["type"] for event in found.values())["sent"] == 5 else None

    stored = wait_for(with_five_sent, 30, message="5 sent events in the stream")
    wait_succeeded(endpoint["id"], len(stored))
    time.sleep(1)  # a few more ticks: nothing is sent twice
    assert Counter(event["type"] for event in stored.values()) == {"sent": 5, "signup": 1}

    requests = receiver.requests
    assert len(requests) == len(stored)
    rows = {row.event_id: row for row in deliveries_of(endpoint["id"])}
    for request in requests:
        body = verified(request, secret)
        event = stored[body["data"]["id"]]
        # The body is the event as the stream shows it, under its type and time (Standard Webhooks).
        assert body == {"type": event["type"], "timestamp": event["occurred_at"], "data": event}
        assert request.webhook_id == rows[event["id"]].webhook_id
        assert request.headers["content-type"] == "application/json"
    assert set(receiver.webhook_ids().values()) == {1}
    assert {event["email"] for event in events_of(requests) if event["type"] == "sent"} == set(emails)
    assert all(row.state == "succeeded" and row.attempts == 1 and row.last_status == 200 for row in rows.values())
    attempts = attempts_of(endpoint["id"])
    assert sorted(a.delivery_id for a in attempts) == sorted(row.id for row in rows.values())
    assert {a.status for a in attempts} == {200}


def test_503_three_times_then_200_succeeds_on_the_fourth_attempt_with_one_webhook_id(
    hooks_env, receiver, start_webhook_workers
):
    receiver.respond(lambda number, _request: 503 if number <= 3 else 200)
    endpoint, secret = endpoints.create_endpoint(receiver.url())
    start_webhook_workers()
    track("someone@example.com", "signup", {"plan": "free"})

    wait_succeeded(endpoint["id"], 1, timeout=30)
    (delivery,) = deliveries_of(endpoint["id"])
    requests = receiver.requests
    assert [request.webhook_id for request in requests] == [delivery.webhook_id] * 4
    assert len({verified(request, secret)["data"]["id"] for request in requests}) == 1
    assert delivery.attempts == 4 and delivery.last_status == 200
    attempts = attempts_of(endpoint["id"])
    assert [a.status for a in attempts] == [503, 503, 503, 200]
    assert {a.webhook_id for a in attempts} == {delivery.webhook_id}
    # The retries kept the schedule's waits (0.5 s, less 10 % jitter) between arrivals.
    gaps = [later.at - earlier.at for earlier, later in zip(requests, requests[1:])]
    assert all(gap >= 0.44 for gap in gaps), gaps


def test_a_410_disables_the_endpoint_and_nothing_more_is_sent(hooks_env, receiver, start_webhook_workers):
    receiver.respond(lambda _number, _request: 410)
    endpoint, _secret = endpoints.create_endpoint(receiver.url())
    start_webhook_workers()
    track("someone@example.com", "signup")

    wait_for(lambda: not endpoints.get_endpoint(endpoint["id"])["enabled"], 30, message="the endpoint disabled")
    found = endpoints.get_endpoint(endpoint["id"])
    assert "410" in found["disabled_reason"]
    with session_scope() as session:
        disabled = session.scalars(select(Event).where(Event.type == "webhook_endpoint_disabled")).all()
    assert [event.properties["endpoint_id"] for event in disabled] == [endpoint["id"]]
    assert "410" in disabled[0].properties["reason"]
    received = receiver.count
    assert received == 1

    for n in range(3):
        track("someone@example.com", "signup", {"n": n})
    time.sleep(2)  # several ticks
    assert receiver.count == received
    assert len(deliveries_of(endpoint["id"])) == 1  # no delivery is even queued for a disabled endpoint


def test_a_hanging_receiver_is_cut_at_the_timeout_while_a_healthy_one_gets_everything(
    hooks_env, receiver, start_webhook_workers
):
    receiver.respond(lambda _number, request: HANG if request.path == "/hang" else 200)
    hanging, _ = endpoints.create_endpoint(receiver.url("/hang"))
    healthy, secret = endpoints.create_endpoint(receiver.url("/ok"))
    start_webhook_workers()
    custom_events(20)

    wait_succeeded(healthy["id"], 20, timeout=30)
    requests = receiver.requests
    to_healthy = [request for request in requests if request.path == "/ok"]
    to_hanging = [request for request in requests if request.path == "/hang"]
    assert len(to_healthy) == 20 and len({r.webhook_id for r in to_healthy}) == 20
    for request in to_healthy:
        verified(request, secret)
    # All delivered while the first hanging request still waited for its answer.
    assert to_hanging, "the hanging endpoint got no request"
    assert max(r.at for r in to_healthy) < min(r.at for r in to_hanging) + TIMEOUT

    wait_for(lambda: attempts_of(hanging["id"]), 30, message="the hanging endpoint's attempts recorded")
    attempts = attempts_of(hanging["id"])
    assert {a.error for a in attempts} == {f"no answer within {TIMEOUT:g} s"}
    assert all(a.status is None and TIMEOUT * 1000 * 0.95 <= a.latency_ms <= TIMEOUT * 1000 + 1000 for a in attempts)
    assert deliveries.counts(hanging["id"])[deliveries.SUCCEEDED] == 0


def test_kill_9_of_the_webhooks_worker_mid_round_loses_nothing_and_repeats_only_unrecorded_deliveries(
    hooks_env, authority, start_webhook_workers, start_worker
):
    total = 2_000
    with WebhookReceiver(authority, delay=0.01) as slow:  # slowed, so a round lasts long enough to kill into
        endpoint, _ = endpoints.create_endpoint(slow.url())
        worker = start_webhook_workers()
        custom_events(total)

        wait_for(lambda: slow.count >= 700, 60, interval=0.01, message="the second round under way")
        worker.kill9()
        killed_at = time.time()
        received_before_kill = slow.count
        recorded = {row.webhook_id for row in deliveries_of(endpoint["id"]) if row.state == "succeeded"}

        # The drain's lease lapses (no renewal), beat asks again, a new worker sends the rest.
        start_worker(concurrency=8, pool="threads", queues="webhooks")
        wait_succeeded(endpoint["id"], total, timeout=90)
        time.sleep(1)
        requests = slow.requests

    rows = deliveries_of(endpoint["id"])
    received = Counter(request.webhook_id for request in requests)
    assert set(received) == {row.webhook_id for row in rows}  # every event received, at least once
    first_receipt: dict[str, float] = {}
    for request in requests:
        first_receipt.setdefault(request.webhook_id, request.at)
    duplicates = {webhook_id for webhook_id, times in received.items() if times > 1}
    print(
        f"\nkill -9 mid-round: {received_before_kill} requests received before the kill, "
        f"{len(recorded)} successes recorded, {len(duplicates)} duplicates after the restart"
    )
    # A duplicate is a delivery sent before the kill whose success was not yet recorded: outcomes are
    # recorded RECORD_EVERY at a time as they complete (one batch collecting, one being written),
    # besides the requests in flight.
    assert duplicates.isdisjoint(recorded)
    assert all(first_receipt[webhook_id] <= killed_at for webhook_id in duplicates)
    assert len(duplicates) <= 2 * drain.RECORD_EVERY + endpoints.DEFAULT_IN_FLIGHT
    assert max(received.values()) <= 2


def test_a_batched_endpoint_gets_at_most_batch_size_events_per_signed_request(
    hooks_env, receiver, start_webhook_workers
):
    endpoint, secret = endpoints.create_endpoint(receiver.url(), batch_size=50)
    before = last_event_id()
    start_webhook_workers()
    ids = custom_events(120)

    wait_succeeded(endpoint["id"], 120, timeout=30)
    time.sleep(0.5)
    requests = receiver.requests
    rows = {row.event_id: row for row in deliveries_of(endpoint["id"])}
    for request in requests:
        body = verified(request, secret)
        assert body["type"] == "batch" and 1 <= len(body["data"]) <= 50
        # One webhook-id per batch: every delivery in it carries the request's.
        assert all(set(item) == {"type", "timestamp", "data"} for item in body["data"])  # as single deliveries
        assert {rows[item["data"]["id"]].webhook_id for item in body["data"]} == {request.webhook_id}
    assert sorted(len(request.json()["data"]) for request in requests) == [20, 50, 50]  # sent side by side
    received = events_of(requests)
    assert sorted(event["id"] for event in received) == ids  # every event once
    stored = stream_events_after(before)
    assert all(event == stored[event["id"]] for event in received)  # each as GET /v1/events shows it


def test_after_a_rotation_deliveries_carry_two_signatures_each_verifying_with_its_secret(
    hooks_env, receiver, start_webhook_workers
):
    endpoint, old_secret = endpoints.create_endpoint(receiver.url())
    _, new_secret = endpoints.rotate_secret(endpoint["id"])
    start_webhook_workers()
    custom_events(3)

    wait_succeeded(endpoint["id"], 3, timeout=30)
    requests = receiver.requests
    assert len(requests) == 3
    for request in requests:
        signatures = request.headers["webhook-signature"].split(" ")
        assert len(signatures) == 2 and all(signature.startswith("v1,") for signature in signatures)
        verified(request, old_secret)
        verified(request, new_secret)
        # The current secret signs first.
        timestamp = datetime.fromtimestamp(int(request.headers["webhook-timestamp"]), UTC)
        assert signatures[0] == Webhook(new_secret).sign(request.webhook_id, timestamp, request.body)
