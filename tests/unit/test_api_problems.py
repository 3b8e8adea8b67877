"""The foundation's parts without a server: problem responses and links in the OpenAPI document, API
keys redacted, authentication's database use."""

from __future__ import annotations

import json
import os

import pytest

from smartmail import runtime
from smartmail.access import keys
from smartmail.access.keys import redact
from smartmail.store import migrate
from smartmail.web.app import app


def test_every_v1_operation_declares_its_problem_responses():
    document = app.openapi()
    operations = [
        (path, method, operation)
        for path, methods in document["paths"].items()
        if path.startswith("/v1/")
        for method, operation in methods.items()
    ]
    assert operations
    for path, method, operation in operations:
        declared = operation["responses"]
        expected = {"401", "403", "422", "429"}
        expected |= {"404"} if "{" in path else set()
        expected |= {"400", "409", "413"} if method in ("post", "put", "patch", "delete") else set()
        assert expected <= set(declared), (method, path, sorted(declared))
        for status in expected:
            content = declared[status]["content"]
            assert content == {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    assert "HTTPValidationError" not in json.dumps(document)
    assert document["components"]["schemas"]["Problem"]["required"] == ["type", "title", "status", "detail"]


def test_redact_keeps_the_key_id_only():
    token = "sm_0123456789abcdef_" + "A" * 42 + "-"
    assert redact(f"/v1/x/{token}/y") == "/v1/x/sm_0123456789abcdef_[redacted]/y"
    assert redact("sm_0123456789abcdef_short") == "sm_0123456789abcdef_short"


@pytest.fixture
def key_database(tmp_path, monkeypatch):
    """A migrated SQLite database and settings for keys: rows cached 60 s, last use written every 60 s."""
    for name in list(os.environ):
        if name.upper().startswith("SMARTMAIL_"):
            monkeypatch.delenv(name)
    url = f"sqlite:///{tmp_path / 'smartmail.db'}"
    for name, value in {
        "SMARTMAIL_DATABASE_URL": url,
        "SMARTMAIL_DEFAULT_SENDER": "SmartMail <noreply@example.com>",
        "SMARTMAIL_SECRET_KEY": "unit-test-secret-key-0123456789",
        "SMARTMAIL_API_KEY_CACHE_SECONDS": "60",
        "SMARTMAIL_API_KEY_TOUCH_SECONDS": "60",
    }.items():
        monkeypatch.setenv(name, value)
    runtime.reset()
    migrate.upgrade(url)
    yield
    runtime.reset()


def test_authentication_goes_to_the_database_only_when_its_cache_cannot_answer(key_database):
    token = keys.create_key("k", ["messages:read"])[1]
    assert keys.needs_database(token)  # never read
    keys.authenticate(token)
    assert not keys.needs_database(token)  # cached, last use just written
    assert not keys.needs_database("sm_not-a-key") and not keys.needs_database(None)  # refused without I/O
    keys.forget(keys.key_id_of(token) or "")
    assert keys.needs_database(token)


def test_creates_link_to_the_operations_on_what_they_made():
    document = app.openapi()
    by_id = {op["operationId"]: (path, op) for path, ops in document["paths"].items() for op in ops.values()}
    links = [
        (path, method, link)
        for path, ops in document["paths"].items()
        for method, op in ops.items()
        for response in op["responses"].values()
        for link in response.get("links", {}).values()
    ]
    sent = [link for path, method, link in links if (path, method) == ("/v1/messages", "post")]
    get_message = next(i for i, (path, _) in by_id.items() if path == "/v1/messages/{message_id}")
    assert {"operationId": get_message, "parameters": {"message_id": "$response.body#/id"}} in sent
    for _, _, link in links:  # each names an operation and a path parameter of it
        target_path, _ = by_id[link["operationId"]]
        assert all(f"{{{name}}}" in target_path for name in link["parameters"]), link
