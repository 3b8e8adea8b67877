"""The API's cross-cutting conventions against a real `smartmail web`: problem+json, limits on input,
request ids in the logs, no key in the logs, CORS off, Idempotency-Key replay/mismatch/in flight/expiry."""

from __future__ import annotations

import json
import re
import threading
import time
from urllib.parse import quote

import httpx
import pytest
import redis
from sqlalchemy import func, select

from smartmail.store.engine import session_scope
from smartmail.store.models import Message
from smartmail.web.app import app
from tests.conftest import RUN_PREFIX, wait_for

MAX_BODY = 1024 * 1024
IDEMPOTENCY_SECONDS = 2
PROBLEM = "application/problem+json"
UNKNOWN = "surely_not_a_field"


@pytest.fixture(autouse=True)
def _settings(env, monkeypatch):
    """One server per database for the module: JSON log lines at INFO (so each request's line is
    there to read), a small body limit and short-lived idempotency records."""
    monkeypatch.setenv("SMARTMAIL_LOG_LEVEL", "INFO")
    monkeypatch.setenv("SMARTMAIL_LOG_FORMAT", "json")
    monkeypatch.setenv("SMARTMAIL_API_MAX_BODY_BYTES", str(MAX_BODY))
    monkeypatch.setenv("SMARTMAIL_API_IDEMPOTENCY_SECONDS", str(IDEMPOTENCY_SECONDS))


@pytest.fixture
def server_log(_module_web):
    """The server's log lines (JSON) written from now on."""
    process = _module_web.process
    start = len(process.output()) if process else 0

    def lines() -> list[dict]:
        text = _module_web.process.output()[start:]
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    return lines


def stored() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Message)) or 0


def is_problem(response: httpx.Response, status: int) -> bool:
    if response.status_code != status or response.headers.get("content-type") != PROBLEM:
        return False
    body = response.json()
    return body.get("status") == status and bool(body.get("title")) and bool(body.get("detail"))


MESSAGE = {"to": "a@example.org", "subject": "s", "text": "t"}


# --- problem+json everywhere ---------------------------------------------------------------------


def test_unknown_paths_and_methods_are_problems(api):
    client = api.client()
    for path in ("/v1/nothing-here", "/nothing-here", "/v1/messages/1/nope", "/v2/messages"):
        response = client.get(path)
        assert is_problem(response, 404), (path, response.status_code, response.text)
    response = client.delete("/v1/messages")
    assert is_problem(response, 405), response.text
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}


def test_a_body_over_the_limit_is_413_before_anything_reads_it(api):
    client = api.client("messages:send")
    big = b'{"to": "a@example.org", "subject": "s", "text": "' + b"x" * MAX_BODY + b'"}'
    response = client.post("/v1/messages", content=big, headers={"content-type": "application/json"})
    assert is_problem(response, 413) and response.json()["max_bytes"] == MAX_BODY

    # Without a Content-Length (chunked), the limit is counted as the body arrives.
    def chunks():
        for _ in range(MAX_BODY // 65536 + 2):
            yield b" " * 65536

    response = client.post("/v1/messages", content=chunks(), headers={"content-type": "application/json"})
    assert is_problem(response, 413)
    assert stored() == 0


def json_body_operations() -> list[tuple[str, str]]:
    """(method, path) of every /v1 operation that takes a JSON body, from the app's OpenAPI document."""
    found = []
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            content = operation.get("requestBody", {}).get("content", {})
            if path.startswith("/v1/") and "application/json" in content:
                found.append((method.upper(), re.sub(r"\{[^}]+\}", "1", path)))
    return found


def test_every_json_body_refuses_an_unknown_field_by_its_pointer(api):
    client = api.client()
    operations = json_body_operations()
    assert ("POST", "/v1/messages") in operations
    failures = []
    for method, path in operations:
        response = client.request(method, path, json={UNKNOWN: 1})
        pointers = [e.get("pointer") for e in response.json().get("errors", [])] if response.content else []
        if not (is_problem(response, 422) and f"/{UNKNOWN}" in pointers):
            failures.append(f"{method} {path}: {response.status_code} {response.text[:300]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"to": "a@example.org", "subject": "s", "text": "\xff\xfe"}', id="invalid-utf8"),
        pytest.param(b'{"to": "a@example.org", "subject": "s\x00", "text": "t"}', id="raw-nul"),
        pytest.param(b'{"to": "a@example.org", "subject": "s", "text": "t", "tags": ["\\ud800"]}', id="lone-surrogate"),
        pytest.param(b'{"to": "a@example.org", "context": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001, id="deep"),
        pytest.param(b"[" * 200_000 + b"]" * 200_000, id="deep-array"),
        pytest.param(b'{"to": "a@example.org", "subject": "s", "text": "t"', id="truncated"),
        pytest.param(b"", id="empty"),
        pytest.param(b"null", id="null"),
        pytest.param(b'{"to": 1e999999, "subject": "s", "text": "t"}', id="huge-number"),
    ],
)
def test_hostile_bodies_are_refused_with_a_problem(api, body):
    """Bodies no JSON parser or schema accepts (a NUL a database cannot store: test_api_messages)."""
    client = api.client("messages:send", "messages:read")
    response = client.post("/v1/messages", content=body, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500 and response.headers["content-type"] == PROBLEM, response.text
    assert stored() == 0


def test_a_nul_the_database_cannot_store_is_a_422_not_a_500(api, database_url):
    client = api.client("messages:send")
    response = client.post("/v1/messages", json={**MESSAGE, "text": "t\x00"})
    if database_url.startswith("postgresql"):  # SQLite stores a NUL; PostgreSQL's text columns do not
        assert is_problem(response, 422) and stored() == 0, response.text
    else:
        assert response.status_code == 202, response.text


def test_hostile_parameters_are_never_a_server_error(api):
    """Every path and query parameter of every /v1 operation, given a NUL, a lone surrogate, a
    NUL-only value: PostgreSQL stores no NUL, so each must be refused (or matched to nothing) above it."""
    client = api.client()
    failures = []
    for value in ("a\x00b", "\udcff", "\x00", "%00", "../x"):
        encoded = quote(value.encode("utf-8", "surrogatepass"), safe="")
        for path, operations in app.openapi()["paths"].items():
            if not path.startswith("/v1/"):
                continue
            for method, operation in operations.items():
                names = [p["name"] for p in operation.get("parameters", []) if p["in"] == "query"]
                url = re.sub(r"\{[^}]+\}", encoded, path) + "?" + "&".join(f"{n}={encoded}" for n in names)
                try:
                    response = client.request(method.upper(), url)
                except httpx.HTTPError as exc:
                    failures.append(f"{method.upper()} {url}: {exc!r}")
                    continue
                if (
                    response.status_code >= 500
                    or response.headers.get("content-type") not in (PROBLEM, None)
                    and (response.status_code >= 400)
                ):
                    failures.append(f"{method.upper()} {url}: {response.status_code} {response.text[:200]}")
    assert not failures, "\n".join(failures)


# --- Request ids, logs -----------------------------------------------------------------------------


def test_a_sane_request_id_is_echoed_and_logged_an_insane_one_replaced(api, server_log):
    client = api.client("messages:read")
    sane = "req-42.abc:DEF_x"  # letters, digits, . _ : -
    response = client.get("/v1/messages", headers={"X-Request-Id": sane})
    assert response.status_code == 200 and response.headers["x-request-id"] == sane
    made = []
    for insane in ("with space", "x" * 129, "é", "a\tb", "<script>"):
        response = client.get("/v1/messages", headers={"X-Request-Id": insane.encode()})
        made.append(response.headers["x-request-id"])
        assert re.fullmatch(r"[0-9a-f]{32}", made[-1]), (insane, made[-1])
    made.append(client.get("/v1/nothing").headers["x-request-id"])  # made when none was sent, on a 404 too
    assert len(set(made)) == len(made)

    def logged() -> dict[str, list[dict]]:
        by_id: dict[str, list[dict]] = {}
        for line in server_log():
            by_id.setdefault(line.get("request_id", ""), []).append(line)
        return by_id

    lines = wait_for(lambda: (found := logged()) and all(i in found for i in [sane, *made]) and found, 5)
    assert [line["event"] for line in lines[sane]] == ["web.request"]
    assert lines[sane][0]["path"] == "/v1/messages" and lines[sane][0]["status"] == 200
    assert lines[made[-1]][0]["status"] == 404


def test_no_api_key_or_secret_in_the_logs(api, server_log):
    good = api.key("messages:send")
    wrong_secret = good[:-4] + "AAAA"
    no_scope = api.key("messages:read")
    malformed = "sm_nonsense_secret-looking-token"
    for token in (good, wrong_secret, no_scope, malformed):
        client = api.client_for(token)
        client.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": token[-20:]})
        client.post("/v1/messages", json={**MESSAGE, "to": token})  # a key pasted into the body
        if token != malformed:  # a key pasted where a request id or a path goes
            client.get("/v1/messages", params={"to": token}, headers={"X-Request-Id": token})
            client.get(f"/v1/messages/{token}")
    wait_for(lambda: len([line for line in server_log() if line.get("event") == "web.request"]) >= 14, 5)
    lines = [json.dumps(line) for line in server_log()]
    for token in (good, wrong_secret, no_scope, malformed):
        secret = token.split("_", 2)[2]  # sm_<id>_<secret>; the secret itself may hold "_"
        assert not [line for line in lines if secret[:16] in line], (
            token,
            secret[:16],
            [line for line in lines if secret[:16] in line],
        )


def test_cors_is_off_by_default(api):
    client = api.client("messages:read")
    origin = {"Origin": "https://evil.example"}
    preflight = client.options(
        "/v1/messages",
        headers={**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"},
    )
    assert not any(name.startswith("access-control-") for name in preflight.headers), preflight.headers
    response = client.get("/v1/messages", headers=origin)
    assert response.status_code == 200
    assert not any(name.startswith("access-control-") for name in response.headers), response.headers


# --- Idempotency-Key -------------------------------------------------------------------------------


def test_idempotency_replay_and_mismatch(api):
    client = api.client("messages:send")
    key = {"Idempotency-Key": "replay-1"}
    first = client.post("/v1/messages", json=MESSAGE, headers=key)
    again = client.post("/v1/messages", json=MESSAGE, headers=key)
    assert first.status_code == again.status_code == 202
    assert again.content == first.content and again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert again.headers["x-request-id"] != first.headers["x-request-id"]  # the retry's own

    changed = client.post("/v1/messages", json={**MESSAGE, "subject": "other"}, headers=key)
    assert is_problem(changed, 422) and changed.json()["code"] == "idempotency_key_reused"
    elsewhere = client.post("/v1/messages/batch", json={"messages": [MESSAGE]}, headers=key)
    assert is_problem(elsewhere, 422)  # the same key on another route is another request
    assert stored() == 1

    bad = client.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": "x" * 256})
    assert is_problem(bad, 400) and stored() == 1


def test_idempotency_keys_are_per_api_key_and_expire(api):
    one, other = api.client("messages:send"), api.client("messages:send")
    key = {"Idempotency-Key": "shared"}
    first = one.post("/v1/messages", json=MESSAGE, headers=key)
    second = other.post("/v1/messages", json=MESSAGE, headers=key)
    assert first.status_code == second.status_code == 202 and "idempotent-replayed" not in second.headers
    assert first.json()["id"] != second.json()["id"]
    assert stored() == 2

    time.sleep(IDEMPOTENCY_SECONDS + 0.5)
    later = one.post("/v1/messages", json=MESSAGE, headers=key)
    # The response record expired; the message-level key (in the database) still finds the message.
    assert later.status_code == 202 and "idempotent-replayed" not in later.headers
    assert later.json()["id"] == first.json()["id"] and later.json()["duplicate"] is True
    assert stored() == 2


def test_a_duplicate_while_the_first_is_in_flight_is_409(api, redis_url):
    client = api.client("messages:send")
    batch = {"messages": [{**MESSAGE, "to": f"r{i}@example.org"} for i in range(1000)]}
    key = {"Idempotency-Key": "in-flight"}
    results: list[httpx.Response] = []
    first = threading.Thread(target=lambda: results.append(client.post("/v1/messages/batch", json=batch, headers=key)))
    records = redis.Redis.from_url(redis_url)
    first.start()
    try:
        wait_for(lambda: any(records.scan_iter(match=f"{RUN_PREFIX}smartmail:idempotency:*")), 10, interval=0.002)
        duplicate = api.client_for(client.headers["authorization"].split()[1]).post(
            "/v1/messages/batch", json=batch, headers=key
        )
    finally:
        first.join(30)
    assert results and results[0].status_code == 200, results
    assert is_problem(duplicate, 409), duplicate.text
    assert duplicate.json()["code"] == "idempotency_in_flight" and int(duplicate.headers["retry-after"]) >= 1
    replay = client.post("/v1/messages/batch", json=batch, headers=key)
    assert replay.headers["idempotent-replayed"] == "true" and replay.content == results[0].content
    assert stored() == 1000
