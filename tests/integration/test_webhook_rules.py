"""Webhook rules in-process, on both databases and a real local HTTP receiver: filters, exactly one delivery
per (endpoint, event), the circuit breaker, disabling, batches retried whole, replays, rate limits, retention."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from datetime import timedelta

import pytest
import trustme
from sqlalchemy import func, select, update

import smartmail
from smartmail.audience import event_stream
from smartmail.errors import InvalidInput
from smartmail.store.engine import get_engine, session_scope, utcnow
from smartmail.store.models import Event, Message, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from smartmail.webhooks import deliveries, drain, endpoints, fan_out, verify
from tests.conftest import reset_caches, wait_for
from tests.integration.conftest import free_port, sent_message
from tests.webhook_receiver import PlainReceiver


@pytest.fixture
def receiver(env, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_WEBHOOK_ALLOW_HTTP", "true")
    monkeypatch.setenv("SMARTMAIL_WEBHOOK_ALLOW_NETWORKS", '["127.0.0.0/8"]')
    monkeypatch.setenv("SMARTMAIL_WEBHOOK_RETRY_SCHEDULE", "[0, 0, 0, 0]")
    monkeypatch.setenv("SMARTMAIL_WEBHOOK_CIRCUIT_FAILURES", "3")
    reset_caches()
    found = PlainReceiver(answer=b"x" * 5000)
    yield found
    found.close()


def _deliveries(endpoint_id: int) -> list:
    with session_scope() as session:
        return list(
            session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id).order_by(WebhookDelivery.id)
            )
        )


def _event(type_: str, *, message_id: str | None = None, campaign_id: int | None = None) -> None:
    with session_scope() as session:
        session.add(Event(type=type_, message_id=message_id, campaign_id=campaign_id, properties={}))


def _fan_out(expected: int) -> set[int]:
    """Fan out until `expected` deliveries were written: on PostgreSQL an event is read once every
    transaction older than its own has ended, anywhere on the server; the endpoints given any."""
    written, endpoint_ids = 0, set()

    def done() -> bool:
        nonlocal written
        fanned = fan_out.fan_out()
        written += fanned.deliveries
        endpoint_ids.update(fanned.endpoint_ids)
        return written >= expected

    wait_for(done, 10, message=f"{expected} deliveries")
    assert written == expected
    return endpoint_ids


def test_each_endpoint_gets_the_events_its_filters_match_and_only_those_written_after_it(receiver):
    smartmail.track("before@example.com", "signup")  # before every endpoint: nobody's
    # An endpoint starts at the stream's readable end: on PostgreSQL an event becomes readable once
    # every older transaction on the server has ended.
    wait_for(lambda: len(event_stream.read(None).events) == 1, 10, message="the first event readable")
    every, _ = endpoints.create_endpoint(receiver.url)
    signups, _ = endpoints.create_endpoint(receiver.url, event_types=["signup"])
    campaign, _ = endpoints.create_endpoint(receiver.url, campaign_ids=[7])
    tagged, _ = endpoints.create_endpoint(receiver.url, tags=["welcome"])
    smartmail.track("a@example.com", "signup")
    smartmail.track("a@example.com", "order_placed")
    message = sent_message("b@example.com", campaign_id=7)
    with session_scope() as session:
        session.execute(update(Message).where(Message.id == message).values(tags=["welcome", "news"]))
    _event("sent", message_id=message, campaign_id=7)
    wait_for(lambda: len(event_stream.read(None).events) == 4, 10, message="4 readable events")
    late, _ = endpoints.create_endpoint(receiver.url)
    smartmail.track("c@example.com", "signup")

    endpoint_ids = _fan_out(9)

    assert [d.event_type for d in _deliveries(every["id"])] == ["signup", "order_placed", "sent", "signup"]
    assert [d.event_type for d in _deliveries(signups["id"])] == ["signup", "signup"]
    assert [d.event_type for d in _deliveries(campaign["id"])] == ["sent"]
    assert [d.event_type for d in _deliveries(tagged["id"])] == ["sent"]
    assert [d.event_type for d in _deliveries(late["id"])] == ["signup"]
    assert endpoint_ids == {e["id"] for e in (every, signups, campaign, tagged, late)}


def test_fan_outs_running_at_once_write_each_delivery_once(receiver):
    endpoint, _ = endpoints.create_endpoint(receiver.url)
    for i in range(300):
        smartmail.track(f"c{i}@example.com", "signup")
    threads = [threading.Thread(target=fan_out.fan_out) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_for(lambda: fan_out.fan_out() and len(_deliveries(endpoint["id"])) >= 300, 10, message="300 deliveries")
    rows = _deliveries(endpoint["id"])
    assert len(rows) == 300 == len({row.event_id for row in rows}) == len({row.webhook_id for row in rows})


def test_deliveries_are_signed_sent_once_and_recorded_with_capped_answers(receiver, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_WEBHOOK_MAX_RESPONSE_BYTES", "1500")
    reset_caches()
    endpoint, secret = endpoints.create_endpoint(receiver.url)
    smartmail.track("a@example.com", "signup", {"plan": "pro"})
    _fan_out(1)
    assert drain.drain(endpoint["id"]) is False
    ((headers, body, _),) = receiver.requests
    payload = verify(body, headers, secret)
    assert payload["type"] == "signup" and payload["data"]["properties"] == {"plan": "pro"}
    (row,) = _deliveries(endpoint["id"])
    assert (row.state, row.attempts, row.last_status, row.webhook_id) == ("succeeded", 1, 200, headers["webhook-id"])
    shown = deliveries.get_delivery(row.id)
    (attempt,) = shown["attempt_log"]
    assert attempt["status"] == 200 and len(attempt["response"]) == 1024  # the excerpt kept of 1,500 bytes read
    assert drain.drain(endpoint["id"]) is False and len(receiver.requests) == 1


def test_a_failing_endpoint_opens_its_circuit_then_lets_one_request_through(receiver):
    receiver.status = lambda n: 500
    endpoint, _ = endpoints.create_endpoint(receiver.url, max_in_flight=1)
    for i in range(10):
        smartmail.track(f"f{i}@example.com", "signup")
    _fan_out(10)
    drain.drain(endpoint["id"])
    assert len(receiver.requests) == 3  # SMARTMAIL_WEBHOOK_CIRCUIT_FAILURES in a row: the round stops
    shown = endpoints.get_endpoint(endpoint["id"])
    assert shown["circuit_open_until"] > utcnow() and shown["failing_since"] is not None
    assert drain.due_endpoints() == []
    drain.drain(endpoint["id"])
    assert len(receiver.requests) == 3  # open: nothing sent
    expire = update(WebhookEndpoint).values(circuit_open_until=utcnow() - timedelta(seconds=1))
    with get_engine().begin() as connection:
        connection.execute(expire)
    assert drain.due_endpoints() == [endpoint["id"]]
    drain.drain(endpoint["id"])  # half-open: one probe, which fails: the pause doubles
    assert len(receiver.requests) == 4
    with session_scope() as session:
        assert session.get(WebhookEndpoint, endpoint["id"]).circuit_pause == 60
        session.execute(expire)
    receiver.status = lambda n: 200
    drain.drain(endpoint["id"])
    shown = endpoints.get_endpoint(endpoint["id"])
    assert shown["circuit_open_until"] is None and shown["failing_since"] is None
    assert all(row.state == "succeeded" for row in _deliveries(endpoint["id"]))
    assert len(receiver.requests) == 4 + 10


def test_an_endpoint_failing_for_longer_than_the_setting_is_disabled_with_an_event(receiver):
    receiver.status = lambda n: 503
    endpoint, _ = endpoints.create_endpoint(receiver.url)
    smartmail.track("a@example.com", "signup")
    _fan_out(1)
    with get_engine().begin() as connection:
        connection.execute(update(WebhookEndpoint).values(failing_since=utcnow() - timedelta(days=6)))
    drain.drain(endpoint["id"])
    shown = endpoints.get_endpoint(endpoint["id"])
    assert shown["enabled"] is False and "every attempt failed since" in shown["disabled_reason"]
    with session_scope() as session:
        event = session.scalars(select(Event).where(Event.type == "webhook_endpoint_disabled")).one()
        assert event.properties["endpoint_id"] == endpoint["id"]
    smartmail.track("b@example.com", "signup")
    assert fan_out.fan_out().deliveries == 0  # a disabled endpoint is not given new events


def test_a_batch_is_retried_whole_under_its_webhook_id(receiver):
    receiver.status = lambda n: 503 if n <= 2 else 200
    endpoint, secret = endpoints.create_endpoint(receiver.url, batch_size=3)
    for i in range(5):
        smartmail.track(f"b{i}@example.com", "signup")
    _fan_out(5)
    drain.drain(endpoint["id"])
    drain.drain(endpoint["id"])  # the retry schedule here is all zeroes
    first, second, *retries = receiver.requests
    assert len(retries) == 2
    for headers, body, _ in receiver.requests:
        assert verify(body, headers, secret)["type"] == "batch"
    events_in = lambda request: [event["data"]["id"] for event in json.loads(request[1])["data"]]  # noqa: E731
    by_id = {first[0]["webhook-id"]: events_in(first), second[0]["webhook-id"]: events_in(second)}
    assert sorted(len(ids) for ids in by_id.values()) == [2, 3]
    assert {r[0]["webhook-id"]: events_in(r) for r in retries} == by_id
    assert all(row.state == "succeeded" and row.attempts == 2 for row in _deliveries(endpoint["id"]))


def test_410_disables_the_endpoint_and_replays_send_deliveries_again(receiver):
    receiver.status = lambda n: 410
    endpoint, _ = endpoints.create_endpoint(receiver.url, max_in_flight=1)
    smartmail.track("a@example.com", "signup")
    smartmail.track("b@example.com", "signup")
    _fan_out(2)
    drain.drain(endpoint["id"])
    assert len(receiver.requests) == 1
    assert endpoints.get_endpoint(endpoint["id"])["disabled_reason"] == "the endpoint answered 410 Gone"
    receiver.status = lambda n: 200
    endpoints.set_enabled(endpoint["id"], True)
    drain.drain(endpoint["id"])
    rows = _deliveries(endpoint["id"])
    assert [row.state for row in rows] == ["succeeded", "succeeded"]
    replayed = deliveries.replay(rows[0].id)
    assert (replayed["state"], replayed["attempts"]) == ("pending", 0)
    assert deliveries.replay_range(endpoint["id"], utcnow() - timedelta(hours=1), state=None) == 1  # the other one
    drain.drain(endpoint["id"])
    ids = [headers["webhook-id"] for headers, _, _ in receiver.requests]
    assert sorted(ids[-2:]) == sorted(row.webhook_id for row in rows)  # a replay keeps the delivery's webhook-id
    with pytest.raises(InvalidInput) as error:
        deliveries.replay_range(endpoint["id"], utcnow(), utcnow() - timedelta(hours=1))
    assert error.value.field == "until"


def test_a_rate_limited_endpoint_gets_requests_spaced_out(receiver):
    endpoint, _ = endpoints.create_endpoint(receiver.url, rate_limit=20)
    for i in range(11):
        smartmail.track(f"r{i}@example.com", "signup")
    _fan_out(11)
    drain.drain(endpoint["id"])
    arrivals = [at for _, _, at in receiver.requests]
    assert len(arrivals) == 11 and arrivals[-1] - arrivals[0] >= 0.45  # 10 intervals of 50 ms


def test_a_slow_rate_limit_holds_across_drains_and_ends_each_at_its_deadline(receiver):
    endpoint, _ = endpoints.create_endpoint(receiver.url, rate_limit=0.5)  # one request every 2 s
    smartmail.track("a@example.com", "signup")
    smartmail.track("b@example.com", "signup")
    _fan_out(2)
    started = time.monotonic()
    assert drain.drain(endpoint["id"], max_seconds=1) is False  # the second start is past the deadline
    assert time.monotonic() - started < 1.5 and len(receiver.requests) == 1
    assert drain.due_endpoints() == []  # paced until the next request's time
    wait_for(lambda: drain.due_endpoints() == [endpoint["id"]], 5, message="the next request's time")
    drain.drain(endpoint["id"], max_seconds=1)
    (_, _, first), (_, _, second) = receiver.requests
    assert second - first >= 1.9


def test_a_reset_cancels_a_running_drain_instead_of_hanging_it(receiver):
    receiver.status = lambda n: time.sleep(20) or 200  # never answers within the test
    endpoint, _ = endpoints.create_endpoint(receiver.url)
    smartmail.track("a@example.com", "signup")
    _fan_out(1)
    outcome: list = []
    draining = threading.Thread(target=lambda: outcome.append(_drain_catching(endpoint["id"])))
    draining.start()
    wait_for(lambda: receiver.requests, 10, message="the request sent")
    reset_caches()
    draining.join(10)
    assert not draining.is_alive() and outcome == ["CancelledError"]
    (row,) = _deliveries(endpoint["id"])
    assert row.state == "pending"  # sent again by the next drain: its answer was never recorded
    with session_scope() as session:
        assert session.get(WebhookEndpoint, endpoint["id"]).drain_owner is None  # the lease released


def _drain_catching(endpoint_id: int) -> str:
    try:
        drain.drain(endpoint_id)
    except BaseException as exc:  # noqa: BLE001 - the test asserts which
        return type(exc).__name__
    return "returned"


def test_retention_deletes_finished_deliveries_and_attempts_but_keeps_pending_ones(receiver, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_WEBHOOK_RETRY_SCHEDULE", "[0, 3600]")
    reset_caches()
    receiver.status = lambda n: 200 if n == 1 else 500
    endpoint, _ = endpoints.create_endpoint(receiver.url, max_in_flight=1)
    smartmail.track("a@example.com", "signup")
    smartmail.track("b@example.com", "signup")
    _fan_out(2)
    drain.drain(endpoint["id"])
    old = utcnow() - timedelta(days=31)
    with get_engine().begin() as connection:
        connection.execute(update(WebhookDelivery).values(created_at=old))
        connection.execute(update(WebhookAttempt).values(attempted_at=old))
    assert deliveries.delete_old() == 2 + 1  # both attempts, the succeeded delivery
    assert [row.state for row in _deliveries(endpoint["id"])] == ["pending"]
    with get_engine().connect() as connection:
        assert connection.execute(select(func.count()).select_from(WebhookAttempt)).scalar() == 0


class Http2Receiver:
    """hypercorn over TLS (a trustme CA) on loopback, offering HTTP/2 by ALPN; records each request's
    HTTP version and client port (one port: one connection)."""

    def __init__(self, tmp_path) -> None:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        authority = trustme.CA()
        self.ca_file = tmp_path / "ca.pem"
        authority.cert_pem.write_to_path(str(self.ca_file))
        authority.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
        self.port = free_port()
        config = Config()
        config.bind = [f"127.0.0.1:{self.port}"]
        config.certfile = config.keyfile = str(tmp_path / "server.pem")
        config.alpn_protocols = ["h2", "http/1.1"]
        self.seen: list[tuple[str, int]] = []

        async def app(scope, receive, send) -> None:
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
                return
            while (await receive()).get("more_body"):
                pass
            self.seen.append((scope["http_version"], scope["client"][1]))
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

        self.loop = asyncio.new_event_loop()
        self.stopping = asyncio.Event()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(serve(app, config, shutdown_trigger=self.stopping.wait),)
        )
        self.thread.start()
        wait_for(self._listening, 10, message="hypercorn listening")

    def _listening(self) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(10)


def test_an_endpoint_offering_http2_gets_its_deliveries_over_one_http2_connection(receiver, monkeypatch, tmp_path):
    server = Http2Receiver(tmp_path)
    try:
        monkeypatch.setenv("SMARTMAIL_WEBHOOK_CA_FILE", str(server.ca_file))
        monkeypatch.setenv("SMARTMAIL_WEBHOOK_HTTP2", "true")
        reset_caches()
        endpoint, _ = endpoints.create_endpoint(f"https://127.0.0.1:{server.port}/hook")
        for i in range(20):
            smartmail.track(f"h{i}@example.com", "signup")
        _fan_out(20)
        drain.drain(endpoint["id"])
        assert deliveries.counts(endpoint["id"])["succeeded"] == 20
        assert {version for version, _ in server.seen} == {"2"} and len(server.seen) == 20
        assert len({port for _, port in server.seen}) == 1  # multiplexed: ten in flight on one connection
    finally:
        server.stop()
