"""One grep follows a message from the API call to the SMTP reply through the web and worker JSON logs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import wait_for


@pytest.fixture
def json_logs(env, smtp_server, monkeypatch):
    monkeypatch.setenv("SMARTMAIL_SMTP_URL", f"smtp://127.0.0.1:{smtp_server.port}?tls=none")
    monkeypatch.setenv("SMARTMAIL_LOG_FORMAT", "json")
    monkeypatch.setenv("SMARTMAIL_LOG_LEVEL", "INFO")
    return smtp_server


def _lines_naming(text: str, message_id: str) -> list[dict]:
    """Every log line that names the message, parsed: each one must be a JSON object."""
    return [json.loads(line) for line in text.splitlines() if message_id in line]


def test_one_grep_follows_a_message_from_api_call_to_smtp_reply(json_logs, api, _module_web, start_worker):
    worker = start_worker(concurrency=1)
    client = api.client("messages:send")
    response = client.post(
        "/v1/messages",
        json={"to": "ann@example.org", "subject": "Hi", "text": "Hello"},
        headers={"X-Request-Id": "trail-42"},
    )
    assert response.status_code == 202, response.text
    assert response.headers["x-request-id"] == "trail-42"
    message_id = response.json()["id"]
    wait_for(lambda: len(json_logs.messages) == 1, 30, message="the message at the SMTP server")
    wait_for(lambda: f'"message_id": "{message_id}"' in worker.output(), 10, message="the outcome logged")

    web_lines = _lines_naming(_module_web.process.output(), message_id)
    created = [line for line in web_lines if line["event"] == "message.created"]
    assert created and created[0]["state"] == "queued" and created[0]["request_id"] == "trail-42"

    requests = [
        line for line in _lines_naming(_module_web.process.output(), "trail-42") if line["event"] == "web.request"
    ]
    assert [(r["method"], r["path"], r["status"]) for r in requests] == [("POST", "/v1/messages", 202)]
    assert requests[0]["key_id"] and requests[0]["ms"] >= 0

    worker_lines = _lines_naming(worker.output(), message_id)
    claimed = [line for line in worker_lines if line["event"] == "message.claimed"]
    assert claimed and claimed[0]["state"] == "sending" and message_id in claimed[0]["message_ids"]
    outcome = [line for line in worker_lines if line["event"] == "message.outcome"]
    assert len(outcome) == 1
    assert outcome[0]["state"] == "sent" and outcome[0]["smtp_code"] == 250
    assert {"campaign_id", "contact_id"} <= outcome[0].keys()

    # Every line that names the message is JSON with a level and a time; no key secret anywhere.
    for line in web_lines + worker_lines:
        assert {"event", "level", "timestamp"} <= line.keys()
    secret = client.headers["authorization"].split()[-1]
    assert secret not in _module_web.process.output() and secret not in worker.output()
