"""/v1/webhooks through a real `smartmail web` process, on SQLite and PostgreSQL: endpoints, secrets,
a test delivery to a real receiver, deliveries and replays."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

import smartmail
from smartmail.client import Client
from smartmail.client import NotFound as ClientNotFound
from smartmail.store.engine import get_engine
from smartmail.store.models import WebhookDelivery
from smartmail.webhooks import WebhookVerificationError, fan_out, verify
from tests.conftest import reset_caches
from tests.webhook_receiver import PlainReceiver

URL = "https://hooks.example.org/smartmail"


def errors(response) -> list[str]:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    return [e.get("pointer", e.get("parameter")) for e in response.json()["errors"]]


@pytest.fixture
def local_receivers(env, monkeypatch):
    """http:// and 127.0.0.0/8 allowed, set before `api` starts its process (keyed by these settings)."""
    monkeypatch.setenv("SMARTMAIL_WEBHOOK_ALLOW_HTTP", "true")
    monkeypatch.setenv("SMARTMAIL_WEBHOOK_ALLOW_NETWORKS", '["127.0.0.0/8"]')
    reset_caches()


@pytest.fixture
def receiver(local_receivers):
    server = PlainReceiver()
    yield server
    server.close()


def deliveries_for(*emails: str) -> None:
    """One custom event per address, fanned out to the endpoints (no worker: nothing is sent)."""
    for email in emails:
        smartmail.track(email, "order_placed", {"total": 12})
    fan_out.fan_out()


# --- Endpoints: the default settings (https only, no private networks) -----------------------------


def test_create_read_list_change_and_delete(api):
    client = api.client("webhooks:manage")
    response = client.post(
        "/v1/webhooks",
        json={"url": URL, "description": "shop", "event_types": ["bounced", "complained"], "batch_size": 10},
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert response.headers["location"] == f"/v1/webhooks/{created['id']}"
    assert created["secret"].startswith("whsec_") and len(created["secret"]) > 40
    assert (created["url"], created["event_types"], created["batch_size"]) == (URL, ["bounced", "complained"], 10)
    assert created["enabled"] and created["max_in_flight"] == 10 and created["created_at"].endswith("Z")

    fetched = client.get(response.headers["location"]).json()
    assert "secret" not in fetched and fetched["deliveries"] == {"pending": 0, "succeeded": 0, "failed": 0}
    assert client.get(f"/v1/webhooks/{created['id']}/secret").json() == {"secret": created["secret"]}

    others = [client.post("/v1/webhooks", json={"url": f"{URL}/{n}"}).json()["id"] for n in range(3)]
    first = client.get("/v1/webhooks", params={"limit": 2}).json()
    assert [e["id"] for e in first["data"]] == [created["id"], others[0]]
    assert all("secret" not in e for e in first["data"])
    rest = client.get("/v1/webhooks", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [e["id"] for e in rest["data"]] == others[1:] and rest["next_cursor"] is None

    changed = client.patch(f"/v1/webhooks/{created['id']}", json={"event_types": None, "rate_limit": 5})
    assert changed.status_code == 200, changed.text
    assert (changed.json()["event_types"], changed.json()["rate_limit"], changed.json()["description"]) == (
        None,
        5.0,
        "shop",
    )
    disabled = client.patch(f"/v1/webhooks/{created['id']}", json={"enabled": False, "disabled_reason": "moving"})
    assert (disabled.json()["enabled"], disabled.json()["disabled_reason"]) == (False, "moving")
    enabled = client.patch(f"/v1/webhooks/{created['id']}", json={"enabled": True})
    assert (enabled.json()["enabled"], enabled.json()["disabled_reason"]) == (True, None)

    assert client.delete(f"/v1/webhooks/{created['id']}").status_code == 204
    for method, path in [
        ("GET", ""),
        ("PATCH", ""),
        ("DELETE", ""),
        ("GET", "/secret"),
        ("POST", "/rotate-secret"),
        ("POST", "/test"),
        ("GET", "/deliveries"),
    ]:
        gone = client.request(method, f"/v1/webhooks/{created['id']}{path}", json={} if method == "PATCH" else None)
        assert gone.status_code == 404 and gone.headers["content-type"] == "application/problem+json", (method, path)


@pytest.mark.parametrize(
    "body,pointer",
    [
        ({"url": "not a url"}, "/url"),
        ({"url": "ftp://hooks.example.org/"}, "/url"),
        ({"url": "http://hooks.example.org/"}, "/url"),  # http without SMARTMAIL_WEBHOOK_ALLOW_HTTP
        ({"url": "https://127.0.0.1/"}, "/url"),  # loopback: the SSRF guard
        ({"url": "https://10.1.2.3/hooks"}, "/url"),
        ({"url": "https://user:pass@hooks.example.org/"}, "/url"),
        ({}, "/url"),
        ({"url": URL, "event_types": ["not a type!"]}, "/event_types"),
        ({"url": URL, "batch_size": 0}, "/batch_size"),
        ({"url": URL, "max_in_flight": 1000}, "/max_in_flight"),
        ({"url": URL, "rate_limit": 0}, "/rate_limit"),
        ({"url": URL, "campaign_ids": [0]}, "/campaign_ids/0"),
        ({"url": URL, "tags": [""]}, "/tags/0"),
        ({"url": URL, "secret": "whsec_mine"}, "/secret"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_input_is_a_422_naming_the_field(api, body, pointer):
    client = api.client("webhooks:manage")
    assert pointer in errors(client.post("/v1/webhooks", json=body))
    assert client.get("/v1/webhooks").json()["data"] == []


def test_bad_changes_and_parameters_are_422s(api):
    client = api.client("webhooks:manage")
    endpoint = client.post("/v1/webhooks", json={"url": URL}).json()
    path = f"/v1/webhooks/{endpoint['id']}"
    assert "/url" in errors(client.patch(path, json={"url": "https://[::1]/"}))
    assert "/max_in_flight" in errors(client.patch(path, json={"max_in_flight": None}))
    assert "/enabled" in errors(client.patch(path, json={"enabled": "perhaps"}))
    assert "/disabled_reason" in errors(client.patch(path, json={"disabled_reason": "no enabled: false"}))
    assert "/overlap_seconds" in errors(client.post(f"{path}/rotate-secret", json={"overlap_seconds": -1}))
    assert "state" in errors(client.get(f"{path}/deliveries", params={"state": "lost"}))
    assert client.get(f"{path}/deliveries", params={"cursor": "nope"}).status_code == 422
    assert "/since" in errors(client.post(f"{path}/replay", json={}))
    assert "/until" in errors(
        client.post(f"{path}/replay", json={"since": "2030-01-02T00:00:00Z", "until": "2030-01-01T00:00:00Z"})
    )
    assert "/state" in errors(client.post(f"{path}/replay", json={"since": "2030-01-01T00:00:00", "state": "x"}))
    assert client.get("/v1/webhooks/abc").status_code == 422
    assert client.get(path).json()["url"] == URL  # nothing changed


def test_every_operation_needs_the_scope(api):
    manager = api.client("webhooks:manage")
    endpoint = manager.post("/v1/webhooks", json={"url": URL}).json()
    outsider = api.client("events:read", "keys:manage")
    base = f"/v1/webhooks/{endpoint['id']}"
    for method, path, body in [
        ("POST", "/v1/webhooks", {"url": URL}),
        ("GET", "/v1/webhooks", None),
        ("GET", base, None),
        ("PATCH", base, {"enabled": False}),
        ("DELETE", base, None),
        ("GET", f"{base}/secret", None),
        ("POST", f"{base}/rotate-secret", None),
        ("POST", f"{base}/test", None),
        ("GET", f"{base}/deliveries", None),
        ("GET", f"{base}/deliveries/1", None),
        ("POST", f"{base}/deliveries/1/replay", None),
        ("POST", f"{base}/replay", {"since": "2030-01-01T00:00:00"}),
    ]:
        response = outsider.request(method, path, json=body)
        assert response.status_code == 403, (method, path, response.text)
        assert "webhooks:manage" in response.json()["detail"]
        assert "whsec_" not in response.text
    assert manager.get(base).json()["enabled"]


def test_rotation_returns_a_new_secret_and_the_overlap(api):
    client = api.client("webhooks:manage")
    endpoint = client.post("/v1/webhooks", json={"url": URL}).json()
    before = datetime.now(UTC)
    rotated = client.post(f"/v1/webhooks/{endpoint['id']}/rotate-secret")
    assert rotated.status_code == 200, rotated.text
    body = rotated.json()
    assert body["secret"].startswith("whsec_") and body["secret"] != endpoint["secret"]
    until = datetime.fromisoformat(body["endpoint"]["previous_secret_until"])
    assert before + timedelta(hours=23, minutes=59) < until < before + timedelta(hours=24, minutes=1)
    assert client.get(f"/v1/webhooks/{endpoint['id']}/secret").json() == {"secret": body["secret"]}

    again = client.post(f"/v1/webhooks/{endpoint['id']}/rotate-secret", json={"overlap_seconds": 0}).json()
    assert again["secret"] not in (endpoint["secret"], body["secret"])
    assert again["endpoint"]["previous_secret_until"] is None


def test_answers_holding_a_secret_are_not_kept_for_idempotent_replays(api):
    client = api.client("webhooks:manage")
    headers = {"Idempotency-Key": "create-hook-1"}
    first = client.post("/v1/webhooks", json={"url": URL}, headers=headers)
    second = client.post("/v1/webhooks", json={"url": URL}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert "idempotent-replayed" not in second.headers and second.json()["secret"] != first.json()["secret"]


# --- Deliveries and replays (fanned out in this process: nothing is sent) ----------------------------


def test_deliveries_listed_newest_first_read_and_replayed(api):
    client = api.client("webhooks:manage")
    endpoint = client.post("/v1/webhooks", json={"url": URL, "event_types": ["order_placed"]}).json()
    other = client.post("/v1/webhooks", json={"url": f"{URL}/other"}).json()
    deliveries_for("a@example.org", "b@example.org", "c@example.org")
    base = f"/v1/webhooks/{endpoint['id']}"

    first = client.get(f"{base}/deliveries", params={"limit": 2}).json()
    rest = client.get(f"{base}/deliveries", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    listed = first["data"] + rest["data"]
    assert rest["next_cursor"] is None and len(listed) == 3
    assert [d["id"] for d in listed] == sorted((d["id"] for d in listed), reverse=True)
    assert {(d["event_type"], d["state"], d["attempts"]) for d in listed} == {("order_placed", "pending", 0)}
    assert client.get(base).json()["deliveries"] == {"pending": 3, "succeeded": 0, "failed": 0}
    assert client.get(f"{base}/deliveries", params={"state": "failed"}).json()["data"] == []

    oldest = listed[-1]
    detail = client.get(f"{base}/deliveries/{oldest['id']}").json()
    assert detail["payload"]["type"] == "order_placed" and detail["attempt_log"] == []
    assert detail["payload"]["data"]["email"] == "a@example.org"
    assert detail["webhook_id"].startswith("msg_")
    # Another endpoint's delivery is not found under this one.
    other_delivery = client.get(f"/v1/webhooks/{other['id']}/deliveries").json()["data"][0]
    assert client.get(f"{base}/deliveries/{other_delivery['id']}").status_code == 404
    assert client.post(f"{base}/deliveries/{other_delivery['id']}/replay").status_code == 404
    assert client.get(f"{base}/deliveries/999999999").status_code == 404

    # Every attempt failed: a replay sends it again with a fresh schedule and the same webhook-id.
    with get_engine().begin() as connection:
        connection.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == oldest["id"])
            .values(state="failed", attempts=8, last_status=503, last_error="HTTP 503")
        )
    assert client.get(base).json()["deliveries"] == {"pending": 2, "succeeded": 0, "failed": 1}
    assert [d["id"] for d in client.get(f"{base}/deliveries", params={"state": "failed"}).json()["data"]] == [
        oldest["id"]
    ]
    replayed = client.post(f"{base}/deliveries/{oldest['id']}/replay")
    assert replayed.status_code == 202, replayed.text
    assert (replayed.json()["state"], replayed.json()["attempts"]) == ("pending", 0)
    assert replayed.json()["webhook_id"] == detail["webhook_id"]

    # A time range: failed ones by default, `any` for every one not pending.
    with get_engine().begin() as connection:
        connection.execute(
            update(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint["id"]).values(state="failed")
        )
        connection.execute(
            update(WebhookDelivery).where(WebhookDelivery.id == listed[0]["id"]).values(state="succeeded")
        )
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert client.post(f"{base}/replay", json={"since": future}).json() == {"replayed": 0}
    response = client.post(f"{base}/replay", json={"since": since})
    assert response.status_code == 202 and response.json() == {"replayed": 2}
    assert client.post(f"{base}/replay", json={"since": since, "state": "any"}).json() == {"replayed": 1}
    assert client.get(base).json()["deliveries"] == {"pending": 3, "succeeded": 0, "failed": 0}


def test_the_python_client(api):
    with Client(api.url, api.key("webhooks:manage"), max_retries=0) as client:
        created = client.webhooks.create(URL, description="crm", max_in_flight=4)
        endpoint_id = created["id"]
        assert (created["description"], created["max_in_flight"]) == ("crm", 4)
        assert created["secret"].startswith("whsec_") and client.webhooks.secret(endpoint_id) == created["secret"]
        assert [e["id"] for e in client.webhooks.list(page_size=1)] == [endpoint_id]
        assert client.webhooks.update(endpoint_id, enabled=False)["enabled"] is False
        assert client.webhooks.get(endpoint_id)["deliveries"]["pending"] == 0
        rotated = client.webhooks.rotate_secret(endpoint_id, overlap_seconds=60)
        assert rotated["secret"] != created["secret"] and rotated["endpoint"]["previous_secret_until"]
        client.webhooks.update(endpoint_id, enabled=True)
        deliveries_for("a@example.org", "b@example.org")
        listed = list(client.webhooks.deliveries(endpoint_id, page_size=1))
        assert len(listed) == 2
        assert client.webhooks.delivery(endpoint_id, listed[0]["id"])["payload"]["type"] == "order_placed"
        assert client.webhooks.replay(endpoint_id, listed[0]["id"])["state"] == "pending"
        since = datetime.now(UTC) - timedelta(minutes=5)
        assert client.webhooks.replay_range(endpoint_id, since, state="any") == 0  # all pending
        client.webhooks.delete(endpoint_id)
        with pytest.raises(ClientNotFound):
            client.webhooks.get(endpoint_id)


# --- A test delivery to a real receiver (http:// and 127.0.0.0/8 allowed) ----------------------------


def test_a_test_delivery_reaches_the_receiver_signed(receiver, api):
    client = api.client("webhooks:manage")
    endpoint = client.post("/v1/webhooks", json={"url": receiver.url}).json()
    response = client.post(f"/v1/webhooks/{endpoint['id']}/test")
    assert response.status_code == 200, response.text
    delivery = response.json()
    assert (delivery["state"], delivery["event_type"], delivery["last_status"]) == ("succeeded", "webhook.test", 200)
    [attempt] = delivery["attempt_log"]
    assert attempt["status"] == 200 and attempt["response"] == '{"ok": true}' and attempt["latency_ms"] >= 0

    [(headers, body, _)] = receiver.requests
    assert headers["webhook-id"] == delivery["webhook_id"]
    event = verify(body, headers, endpoint["secret"])
    assert event["type"] == "webhook.test" and event["data"]["endpoint_id"] == endpoint["id"]
    assert client.get(f"/v1/webhooks/{endpoint['id']}").json()["last_success_at"] is not None

    # During a rotation each request is signed by both secrets, so either verifies it.
    new = client.post(f"/v1/webhooks/{endpoint['id']}/rotate-secret").json()["secret"]
    assert client.post(f"/v1/webhooks/{endpoint['id']}/test").json()["state"] == "succeeded"
    headers, body, _ = receiver.requests[-1]
    assert len(headers["webhook-signature"].split()) == 2
    assert verify(body, headers, endpoint["secret"]) == verify(body, headers, new)
    with pytest.raises(WebhookVerificationError):
        verify(body, headers, client.post(f"/v1/webhooks/{endpoint['id']}/rotate-secret").json()["secret"])


def test_a_failed_test_delivery_reports_the_answer(receiver, api):
    client = api.client("webhooks:manage")
    receiver.status = 503
    endpoint = client.post("/v1/webhooks", json={"url": receiver.url}).json()
    delivery = client.post(f"/v1/webhooks/{endpoint['id']}/test").json()
    assert (delivery["state"], delivery["last_status"], delivery["attempts"]) == ("pending", 503, 1)
    assert delivery["attempt_log"][0]["response"] == "receiver is down"
    assert delivery["next_attempt_at"] is not None
    listed = client.get(f"/v1/webhooks/{endpoint['id']}/deliveries").json()["data"]
    assert [d["id"] for d in listed] == [delivery["id"]]
    assert json.loads(receiver.requests[0][1])["type"] == "webhook.test"
