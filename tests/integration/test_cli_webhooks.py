"""`smartmail webhooks …` on the real database (SQLite and PostgreSQL), with a real receiver on 127.0.0.1."""

from __future__ import annotations

import json
import re

import pytest
from sqlalchemy import update
from typer.testing import CliRunner

import smartmail
from smartmail.cli.main import app as cli
from smartmail.store.engine import get_engine
from smartmail.store.models import WebhookDelivery
from smartmail.webhooks import endpoints, fan_out, verify
from tests.conftest import reset_caches, wait_for
from tests.webhook_receiver import PlainReceiver

SECRET = re.compile(r"whsec_[A-Za-z0-9+/=]{40,}")


@pytest.fixture
def runner(env, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_WEBHOOK_ALLOW_HTTP", "true")
    monkeypatch.setenv("SMARTMAIL_WEBHOOK_ALLOW_NETWORKS", '["127.0.0.0/8"]')
    monkeypatch.setenv("COLUMNS", "200")  # tables as wide as their rows
    reset_caches()
    return CliRunner()


@pytest.fixture
def receiver(runner):
    server = PlainReceiver()
    yield server
    server.close()


def run(runner: CliRunner, *argv: str, code: int = 0) -> str:
    result = runner.invoke(cli, ["webhooks", *argv])
    assert result.exit_code == code, result.output
    return " ".join(result.output.split())


def listed(runner: CliRunner) -> dict[int, dict]:
    return {row["id"]: row for row in json.loads(run(runner, "list", "--json"))}


def test_add_list_disable_enable_rotate_and_remove(runner):
    output = run(
        runner,
        "add",
        "https://hooks.example.org/in",
        "--description",
        "crm",
        "--event",
        "bounced",
        "--event",
        "complained",
        "--batch-size",
        "20",
        "--rate-limit",
        "5",
    )
    endpoint_id = int(re.search(r"added webhook endpoint (\d+)", output).group(1))
    secret = SECRET.search(output).group(0)
    assert "Store this secret" in output
    assert run(runner, "secret", str(endpoint_id)) == secret
    row = listed(runner)[endpoint_id]
    assert (row["event_types"], row["batch_size"], row["rate_limit"], row["enabled"]) == (
        ["bounced", "complained"],
        20,
        5.0,
        True,
    )
    assert "https://hooks.example.org/in" in run(runner, "list") and "bounced" in run(runner, "list")

    run(runner, "disable", str(endpoint_id), "--reason", "moving the CRM")
    assert (listed(runner)[endpoint_id]["enabled"], listed(runner)[endpoint_id]["disabled_reason"]) == (
        False,
        "moving the CRM",
    )
    assert "disabled: moving the CRM" in run(runner, "list")
    run(runner, "enable", str(endpoint_id))
    assert listed(runner)[endpoint_id]["enabled"]

    rotated = run(runner, "rotate-secret", str(endpoint_id), "--overlap", "2h")
    new = SECRET.search(rotated).group(0)
    assert new != secret and "the previous one also signs until" in rotated
    assert endpoints.reveal_secret(endpoint_id) == new
    assert "also signs" not in run(runner, "rotate-secret", str(endpoint_id), "--overlap", "0")

    run(runner, "remove", str(endpoint_id))
    assert listed(runner) == {}


def test_test_sends_now_and_fails_with_the_answer(runner, receiver):
    output = run(runner, "add", receiver.url)
    endpoint_id = re.search(r"endpoint (\d+)", output).group(1)
    secret = SECRET.search(output).group(0)
    sent = run(runner, "test", endpoint_id)
    assert re.search(r"HTTP 200 in \d+ ms: \{\"ok\": true\}", sent), sent
    headers, body, _ = receiver.requests[0]
    assert verify(body, headers, secret)["type"] == "webhook.test"

    receiver.status = 500
    failed = run(runner, "test", endpoint_id, code=1)
    assert "HTTP 500" in failed and "receiver is down" in failed and "failed" in failed


def test_deliveries_listed_shown_and_replayed(runner):
    endpoint_id = re.search(r"endpoint (\d+)", run(runner, "add", "https://hooks.example.org/in")).group(1)
    for email in ("a@example.org", "b@example.org", "c@example.org"):
        smartmail.track(email, "order_placed")
    # On PostgreSQL an event is readable once every older transaction on the server has ended.
    fanned: list[int] = []
    wait_for(lambda: fanned.append(fan_out.fan_out().deliveries) or sum(fanned) >= 3, 30, message="the fan-out")
    rows = json.loads(run(runner, "deliveries", endpoint_id, "--json"))
    assert [row["state"] for row in rows] == ["pending"] * 3
    assert [row["id"] for row in rows] == sorted((row["id"] for row in rows), reverse=True)
    assert len(json.loads(run(runner, "deliveries", endpoint_id, "--json", "--limit", "2"))) == 2
    table = run(runner, "deliveries", endpoint_id)
    assert "order_placed" in table and "pending" in table
    shown = json.loads(run(runner, "deliveries", endpoint_id, "--show", str(rows[0]["id"])))
    assert shown["payload"]["type"] == "order_placed" and shown["attempt_log"] == []

    with get_engine().begin() as connection:
        connection.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == int(endpoint_id))
            .values(state="failed", attempts=8, last_status=503, last_error="HTTP 503")
        )
    assert "HTTP 503" in run(runner, "deliveries", endpoint_id, "--state", "failed")
    assert "delivery" in run(runner, "replay", endpoint_id, str(rows[0]["id"]))
    assert run(runner, "replay", endpoint_id, "--since", "2h") == "2 deliveries will be sent again"
    assert run(runner, "replay", endpoint_id, "--since", "2h", "--state", "any") == "0 deliveries will be sent again"
    assert {row["state"] for row in json.loads(run(runner, "deliveries", endpoint_id, "--json"))} == {"pending"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["add", "http://10.0.0.1/hooks"], "url:"),
        (["add", "ftp://hooks.example.org/"], "url: must be an https URL"),
        (["add", "https://hooks.example.org/", "--event", "not a type!"], "event_types:"),
        (["add", "https://hooks.example.org/", "--batch-size", "0"], "batch_size: must be a whole number from 1"),
        (["disable", "999"], "No webhook endpoint 999"),
        (["enable", "999"], "No webhook endpoint 999"),
        (["remove", "999"], "No webhook endpoint 999"),
        (["secret", "999"], "No webhook endpoint 999"),
        (["test", "999"], "No webhook endpoint 999"),
        (["deliveries", "999"], "No webhook endpoint 999"),
        (["rotate-secret", "999"], "No webhook endpoint 999"),
        (["replay", "999"], "give a DELIVERY_ID or --since"),
        (["replay", "999", "--since", "yesterday"], "--since: 'yesterday' is neither"),
        (["replay", "999", "5"], "No webhook delivery 5"),
    ],
)
def test_bad_input_is_a_message_and_a_non_zero_exit(runner, argv, message):
    result = runner.invoke(cli, ["webhooks", *argv])
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())
    assert listed(runner) == {}


def test_bad_input_about_an_endpoint_that_exists(runner):
    endpoint_id = re.search(r"endpoint (\d+)", run(runner, "add", "https://hooks.example.org/in")).group(1)
    assert "--overlap: 'soon' is not a duration" in run(
        runner, "rotate-secret", endpoint_id, "--overlap", "soon", code=2
    )
    assert "overlap_seconds: must be 0 to 30 days" in run(
        runner, "rotate-secret", endpoint_id, "--overlap", "60d", code=2
    )
    assert "state: must be one of" in run(runner, "deliveries", endpoint_id, "--state", "lost", code=2)
    assert "until: must be after since" in run(runner, "replay", endpoint_id, "--since", "1h", "--until", "2h", code=2)
    assert "state: must be one of" in run(runner, "replay", endpoint_id, "--since", "1h", "--state", "lost", code=2)
