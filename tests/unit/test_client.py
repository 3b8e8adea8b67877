"""smartmail.client against httpx.MockTransport: each method's request, paging, retries on a fake clock, errors."""

from __future__ import annotations

import email
import email.policy
import functools
import json
import logging
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from smartmail.client import (
    ApiError,
    BadRequest,
    Client,
    Conflict,
    ConnectionFailed,
    Forbidden,
    NotFound,
    RateLimited,
    ServerError,
    Unauthorized,
    ValidationFailed,
)

KEY = "sm_0123456789abcdef_" + "s" * 43
INBOUND_ID = "01JABCDEFGHJKMNPQRSTVWXYZ0"
JOB = "01J9ZQ3V7X8K2M4N6P8R0T2V4W"  # an import job's id
Answer = httpx.Response | Exception


class FakeClock:
    """The client's sleep: records each wait instead of waiting."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)


class Server:
    """A MockTransport handler: records every request and gives the next scripted answer (the last one repeats)."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers) or [httpx.Response(200, json={})]
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def make_client(server: Server, clock: FakeClock | None = None, jitter: float = 0.0, **options: Any) -> Client:
    return Client(
        "http://smartmail.test/",
        KEY,
        transport=httpx.MockTransport(server),
        sleep=clock or FakeClock(),
        jitter=lambda: jitter,
        **options,
    )


def problem(status: int, detail: str = "it went wrong", headers: dict[str, str] | None = None, **extra: Any):
    body = {"type": "about:blank", "title": "Title", "status": status, "detail": detail, **extra}
    return httpx.Response(
        status, content=json.dumps(body), headers={"Content-Type": "application/problem+json", **(headers or {})}
    )


def body_of(request: httpx.Request) -> Any:
    return json.loads(request.content) if request.content else None


# --- Each method → its request ------------------------------------------------------------------

# (call, method, raw path with query, JSON body or None)
MAPPING: list[tuple[Callable[[Client], Any], str, str, Any]] = [
    (
        lambda c: c.messages.send("a@example.org", subject="Hi", text="t", from_="me@example.org", tags=["x"]),
        "POST",
        "/v1/messages",
        {"to": "a@example.org", "subject": "Hi", "text": "t", "from": "me@example.org", "tags": ["x"]},
    ),
    (
        lambda c: c.messages.send_batch([{"to": "a@example.org"}]),
        "POST",
        "/v1/messages/batch",
        {"messages": [{"to": "a@example.org"}]},
    ),
    (lambda c: c.messages.get("01HX"), "GET", "/v1/messages/01HX", None),
    (
        lambda c: list(c.messages.list(state="sent", to="a+b@example.org", page_size=50)),
        "GET",
        "/v1/messages?state=sent&to=a%2Bb%40example.org&limit=50",
        None,
    ),
    (
        lambda c: c.contacts.upsert("a@example.org", attributes={"plan": "pro"}, timezone=None),
        "POST",
        "/v1/contacts",
        {"email": "a@example.org", "attributes": {"plan": "pro"}, "timezone": None},
    ),
    (lambda c: c.contacts.get("a+b@example.org"), "GET", "/v1/contacts/a%2Bb%40example.org", None),
    (
        lambda c: c.contacts.update("a@example.org", attributes={"plan": None}),
        "PATCH",
        "/v1/contacts/a%40example.org",
        {"attributes": {"plan": None}},
    ),
    (lambda c: c.contacts.delete("a@example.org"), "DELETE", "/v1/contacts/a%40example.org", None),
    (
        lambda c: c.contacts.batch([{"email": "a@example.org"}]),
        "POST",
        "/v1/contacts/batch",
        {"contacts": [{"email": "a@example.org"}]},
    ),
    (
        lambda c: list(c.contacts.list(status="subscribed", list="news")),
        "GET",
        "/v1/contacts?status=subscribed&list=news",
        None,
    ),
    (lambda c: list(c.lists.list()), "GET", "/v1/lists", None),
    (
        lambda c: c.lists.create("news", "Weekly"),
        "POST",
        "/v1/lists",
        {"name": "news", "description": "Weekly"},
    ),
    (lambda c: c.lists.get("news letter"), "GET", "/v1/lists/news%20letter", None),
    (lambda c: c.lists.delete("news"), "DELETE", "/v1/lists/news", None),
    (lambda c: list(c.lists.members("news", page_size=10)), "GET", "/v1/lists/news/members?limit=10", None),
    (
        lambda c: c.lists.add_members("news", ("a@example.org",)),
        "POST",
        "/v1/lists/news/members",
        {"emails": ["a@example.org"]},
    ),
    (
        lambda c: c.lists.remove_member("news", "a@example.org"),
        "DELETE",
        "/v1/lists/news/members/a%40example.org",
        None,
    ),
    (lambda c: c.imports.get(JOB), "GET", f"/v1/imports/{JOB}", None),
    (lambda c: list(c.imports.list(state="done")), "GET", "/v1/imports?state=done", None),
    (lambda c: c.imports.errors(JOB), "GET", f"/v1/imports/{JOB}/errors", None),
    (
        lambda c: c.templates.create("welcome", "Hi {{ name }}", "<p>Hi</p>"),
        "POST",
        "/v1/templates",
        {"name": "welcome", "subject": "Hi {{ name }}", "html": "<p>Hi</p>"},
    ),
    (lambda c: list(c.templates.list()), "GET", "/v1/templates", None),
    (lambda c: c.templates.get("welcome"), "GET", "/v1/templates/welcome", None),
    (lambda c: c.templates.get("welcome", version=3), "GET", "/v1/templates/welcome/versions/3", None),
    (
        lambda c: c.templates.preview("welcome", {"name": "Ann"}, version=2),
        "POST",
        "/v1/templates/welcome/preview",
        {"context": {"name": "Ann"}, "version": 2},
    ),
    (lambda c: c.templates.delete("welcome"), "DELETE", "/v1/templates/welcome", None),
    (
        lambda c: c.segments.save("vip", {"attr": "plan", "op": "eq", "value": "pro"}),
        "PUT",
        "/v1/segments/vip",
        {"rules": {"attr": "plan", "op": "eq", "value": "pro"}},
    ),
    (lambda c: list(c.segments.list()), "GET", "/v1/segments", None),
    (lambda c: c.segments.get("vip"), "GET", "/v1/segments/vip", None),
    (lambda c: c.segments.delete("vip"), "DELETE", "/v1/segments/vip", None),
    (lambda c: c.segments.count("vip"), "GET", "/v1/segments/vip/count", None),
    (lambda c: c.segments.preview("vip", limit=5), "GET", "/v1/segments/vip/preview?limit=5", None),
    (
        lambda c: c.events.send([{"email": "a@example.org", "type": "signup", "id": "e1"}]),
        "POST",
        "/v1/events",
        {"events": [{"email": "a@example.org", "type": "signup", "id": "e1"}]},
    ),
    (
        lambda c: list(c.events.list(type=["opened", "clicked"], include_machine=False)),
        "GET",
        "/v1/events?type=opened&type=clicked&include_machine=false",
        None,
    ),
    (
        lambda c: c.events.page("0-12", limit=10, campaign="spring"),
        "GET",
        "/v1/events?campaign=spring&after=0-12&limit=10",
        None,
    ),
    (lambda c: c.events.of_message("01ABC"), "GET", "/v1/messages/01ABC/events", None),
    (lambda c: list(c.suppressions.list(reason="manual")), "GET", "/v1/suppressions?reason=manual", None),
    (
        lambda c: c.suppressions.add("a@example.org", reason="manual"),
        "POST",
        "/v1/suppressions",
        {"email": "a@example.org", "reason": "manual"},
    ),
    (lambda c: c.suppressions.get("a@example.org"), "GET", "/v1/suppressions/a%40example.org", None),
    (lambda c: c.suppressions.delete("a@example.org"), "DELETE", "/v1/suppressions/a%40example.org", None),
    (
        lambda c: c.campaigns.create("spring", "promo", lists=["news"], from_="me@example.org", rate_cap=5),
        "POST",
        "/v1/campaigns",
        {"name": "spring", "template": "promo", "lists": ["news"], "from": "me@example.org", "rate_cap": 5},
    ),
    (lambda c: list(c.campaigns.list(state="draft")), "GET", "/v1/campaigns?state=draft", None),
    (lambda c: list(c.inbound.list(verdict="bounce")), "GET", "/v1/inbound?verdict=bounce", None),
    (lambda c: c.inbound.get(INBOUND_ID), "GET", f"/v1/inbound/{INBOUND_ID}", None),
    (lambda c: c.inbound.raw(INBOUND_ID), "GET", f"/v1/inbound/{INBOUND_ID}/raw", None),
    (lambda c: c.inbound.retry(INBOUND_ID), "POST", f"/v1/inbound/{INBOUND_ID}/retry", None),
    (lambda c: c.campaigns.get("spring/2026"), "GET", "/v1/campaigns/spring%2F2026", None),
    (
        lambda c: c.campaigns.update("spring", window="08:00-20:00"),
        "PATCH",
        "/v1/campaigns/spring",
        {"window": "08:00-20:00"},
    ),
    (
        lambda c: c.campaigns.schedule("spring", datetime(2030, 1, 2, 3, 4, tzinfo=UTC)),
        "POST",
        "/v1/campaigns/spring/schedule",
        {"send_at": "2030-01-02T03:04:00+00:00"},
    ),
    (lambda c: c.campaigns.launch("spring"), "POST", "/v1/campaigns/spring/launch", None),
    (lambda c: c.campaigns.pause("spring"), "POST", "/v1/campaigns/spring/pause", None),
    (lambda c: c.campaigns.resume("spring"), "POST", "/v1/campaigns/spring/resume", None),
    (lambda c: c.campaigns.cancel("spring"), "POST", "/v1/campaigns/spring/cancel", None),
    (lambda c: c.campaigns.progress("spring"), "GET", "/v1/campaigns/spring/progress", None),
    (lambda c: c.campaigns.engagement("spring"), "GET", "/v1/campaigns/spring/engagement", None),
    (lambda c: c.campaigns.ab_report("spring"), "GET", "/v1/campaigns/spring/ab-report", None),
    (lambda c: c.campaigns.ab_winner("spring", "B"), "POST", "/v1/campaigns/spring/ab-winner", {"variant": "B"}),
    (
        lambda c: c.keys.create("app", ["messages:send"], rate_limit=5),
        "POST",
        "/v1/keys",
        {"name": "app", "scopes": ["messages:send"], "rate_limit": 5},
    ),
    (lambda c: list(c.keys.list(active=True)), "GET", "/v1/keys?active=true", None),
    (lambda c: c.keys.get("0123456789abcdef"), "GET", "/v1/keys/0123456789abcdef", None),
    (lambda c: c.keys.revoke("0123456789abcdef"), "DELETE", "/v1/keys/0123456789abcdef", None),
    (
        lambda c: c.webhooks.create("https://hooks.example.org/in", event_types=["bounced"], batch_size=10),
        "POST",
        "/v1/webhooks",
        {"url": "https://hooks.example.org/in", "event_types": ["bounced"], "batch_size": 10},
    ),
    (lambda c: list(c.webhooks.list(page_size=20)), "GET", "/v1/webhooks?limit=20", None),
    (lambda c: c.webhooks.get(7), "GET", "/v1/webhooks/7", None),
    (
        lambda c: c.webhooks.update(7, enabled=False, disabled_reason="maintenance"),
        "PATCH",
        "/v1/webhooks/7",
        {"enabled": False, "disabled_reason": "maintenance"},
    ),
    (lambda c: c.webhooks.delete(7), "DELETE", "/v1/webhooks/7", None),
    (lambda c: c.webhooks.secret(7), "GET", "/v1/webhooks/7/secret", None),
    (lambda c: c.webhooks.rotate_secret(7), "POST", "/v1/webhooks/7/rotate-secret", None),
    (
        lambda c: c.webhooks.rotate_secret(7, overlap_seconds=3600),
        "POST",
        "/v1/webhooks/7/rotate-secret",
        {"overlap_seconds": 3600},
    ),
    (lambda c: c.webhooks.test(7), "POST", "/v1/webhooks/7/test", None),
    (
        lambda c: list(c.webhooks.deliveries(7, state="failed", page_size=5)),
        "GET",
        "/v1/webhooks/7/deliveries?state=failed&limit=5",
        None,
    ),
    (lambda c: c.webhooks.delivery(7, 42), "GET", "/v1/webhooks/7/deliveries/42", None),
    (lambda c: c.webhooks.replay(7, 42), "POST", "/v1/webhooks/7/deliveries/42/replay", None),
    (
        lambda c: c.webhooks.replay_range(7, datetime(2030, 1, 2, 3, 4, tzinfo=UTC), state="any"),
        "POST",
        "/v1/webhooks/7/replay",
        {"since": "2030-01-02T03:04:00+00:00", "state": "any"},
    ),
    (
        lambda c: c.workflows.save("welcome", {"trigger": {"event": "signup"}, "steps": []}),
        "PUT",
        "/v1/workflows/welcome",
        {"trigger": {"event": "signup"}, "steps": []},
    ),
    (lambda c: c.workflows.get("welcome"), "GET", "/v1/workflows/welcome", None),
    (lambda c: c.workflows.get("welcome", version=2), "GET", "/v1/workflows/welcome?version=2", None),
    (lambda c: list(c.workflows.list(page_size=20)), "GET", "/v1/workflows?limit=20", None),
    (lambda c: c.workflows.pause("welcome"), "POST", "/v1/workflows/welcome/pause", None),
    (lambda c: c.workflows.resume("welcome"), "POST", "/v1/workflows/welcome/resume", None),
    (lambda c: c.workflows.move("welcome"), "POST", "/v1/workflows/welcome/move", None),
    (lambda c: c.workflows.move("welcome", from_version=1), "POST", "/v1/workflows/welcome/move", {"from_version": 1}),
    (
        lambda c: c.workflows.enrol("welcome", "ann@example.org", {"plan": "pro"}),
        "POST",
        "/v1/workflows/welcome/enrolments",
        {"email": "ann@example.org", "properties": {"plan": "pro"}},
    ),
    (lambda c: c.workflows.status("welcome"), "GET", "/v1/workflows/welcome/status", None),
    (
        lambda c: c.workflows.simulate("welcome", "ann@example.org", assume=["opened"]),
        "POST",
        "/v1/workflows/welcome/simulate",
        {"email": "ann@example.org", "assume": ["opened"]},
    ),
    (lambda c: c.analytics.campaign("spring sale"), "GET", "/v1/analytics/campaigns/spring%20sale", None),
    (
        lambda c: c.analytics.trends(since=datetime(2026, 11, 1), granularity="hour", campaign="spring"),
        "GET",
        "/v1/analytics/trends?since=2026-11-01T00%3A00%3A00&granularity=hour&campaign=spring",
        None,
    ),
]


@pytest.mark.parametrize(("call", "method", "path", "body"), MAPPING, ids=[m[1] + " " + m[2] for m in MAPPING])
def test_each_method_sends_its_request(call, method, path, body):
    # One answer that every method can read: a page, a count, an `added`, a secret, a `replayed`.
    answer = {"data": [], "next_cursor": None, "count": 0, "added": 0, "secret": "", "replayed": 0, "enrolled": False}
    server = Server(httpx.Response(200, json=answer))
    with make_client(server) as client:
        call(client)
    [request] = server.requests
    assert (request.method, request.url.raw_path.decode()) == (method, path)
    assert body_of(request) == body
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert ("idempotency-key" in request.headers) == (method == "POST")
    # …and it is one the API declares: its operation, query parameters and body keys.
    declared = operation(method, path)
    queries = {p["name"] for p in declared.get("parameters", []) if p["in"] == "query"}
    assert set(request.url.params) <= queries
    if body is None:
        assert not declared.get("requestBody", {}).get("required")
    else:
        schema = resolved(declared["requestBody"]["content"]["application/json"]["schema"])
        assert set(body) <= set(schema["properties"]) and set(schema.get("required", [])) <= set(body)


@functools.cache
def openapi() -> dict[str, Any]:
    """The API's OpenAPI document, as the web app serves it at /v1/openapi.json."""
    from smartmail.web.app import create_app

    return create_app().openapi()


def resolved(schema: dict[str, Any]) -> dict[str, Any]:
    options = [option for option in schema.get("anyOf", []) if option.get("type") != "null"]
    if len(options) == 1:  # an optional body: `X | None`
        schema = options[0]
    ref = schema.get("$ref")
    return openapi()["components"]["schemas"][ref.rsplit("/", 1)[-1]] if ref else schema


def path_template(method: str, raw_path: str) -> str:
    """The API path a request reaches: of the templates matching it, the most literal, as routing picks."""
    path = raw_path.partition("?")[0]
    matching = [
        template
        for template, operations in openapi()["paths"].items()
        if method.lower() in operations and re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path)
    ]
    assert matching, f"{method} {path} is no operation of the API"
    return min(matching, key=lambda template: template.count("{"))


def operation(method: str, raw_path: str) -> dict[str, Any]:
    return openapi()["paths"][path_template(method, raw_path)][method.lower()]


def test_every_operation_of_the_api_has_a_client_method():
    covered = {(method, path_template(method, path)) for _, method, path, _ in MAPPING}
    covered.add(("POST", "/v1/imports"))  # multipart: test_an_import_uploads_the_file_with_its_options
    declared = {
        (method.upper(), template)
        for template, operations in openapi()["paths"].items()
        if template.startswith("/v1/")
        for method in operations
    }
    assert declared - covered == set()


def test_answers_are_decoded_by_kind():
    server = Server(
        httpx.Response(201, json={"email": "a@example.org"}),
        httpx.Response(200, json={"email": "a@example.org"}),
        httpx.Response(204),
        httpx.Response(200, text="line,email,error\n2,x,bad\n", headers={"Content-Type": "text/csv"}),
        httpx.Response(200, headers={"Content-Type": "text/csv"}),
        httpx.Response(200, json={"count": 12}),
        httpx.Response(200, json={"data": [{"email": "a@example.org"}]}),
    )
    with make_client(server) as client:
        assert client.contacts.upsert("a@example.org") == ({"email": "a@example.org"}, True)
        assert client.contacts.upsert("a@example.org") == ({"email": "a@example.org"}, False)
        assert client.contacts.delete("a@example.org") is None
        assert client.imports.errors(JOB) == "line,email,error\n2,x,bad\n"
        assert client.imports.errors(JOB) == ""  # no rows rejected (yet): still text
        assert client.segments.count("vip") == 12
        assert client.segments.preview("vip") == [{"email": "a@example.org"}]


def test_a_datetime_is_sent_as_iso_8601():
    server = Server(httpx.Response(202, json={"id": "m1", "state": "scheduled"}))
    with make_client(server) as client:
        client.messages.send("a@example.org", template="welcome", send_at=datetime(2030, 5, 6, 7, 8, 9))
    assert body_of(server.requests[0])["send_at"] == "2030-05-06T07:08:09"


def test_an_import_uploads_the_file_with_its_options(tmp_path):
    path = tmp_path / "people.csv"
    path.write_text("email\na@example.org\n")
    server = Server(httpx.Response(202, json={"id": JOB, "state": "pending"}))
    with make_client(server) as client:
        job = client.imports.create(
            path,
            list="news",
            format="csv",
            delimiter=None,
            batch_size=500,
            map={"E-Mail": "email", "Age": "age"},
            type=["age=integer"],
        )
    assert job == {"id": JOB, "state": "pending"}
    [request] = server.requests
    assert request.url.path == "/v1/imports" and request.headers["content-type"].startswith("multipart/form-data")
    fields = form_fields(request)
    assert fields.pop("file") == [("people.csv", "text/csv", "email\na@example.org\n")]
    assert fields == {
        "list": ["news"],
        "format": ["csv"],
        "batch_size": ["500"],
        "map": ["E-Mail=email", "Age=age"],  # a repeated field, as `smartmail contacts import --map` is
        "type": ["age=integer"],
    }
    # Every field is one the API's form declares.
    form = openapi()["paths"]["/v1/imports"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(form["properties"]) >= {"file", *fields}


def form_fields(request: httpx.Request) -> dict[str, list[Any]]:
    """A multipart body's parts by name: a value, or (filename, content type, content) for a file."""
    message = email.message_from_bytes(
        b"Content-Type: " + request.headers["content-type"].encode() + b"\r\n\r\n" + request.content,
        policy=email.policy.HTTP,
    )
    fields: dict[str, list[Any]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        value = part.get_payload(decode=True).decode()
        filename = part.get_filename()
        fields.setdefault(name, []).append((filename, part.get_content_type(), value) if filename else value)
    return fields


# --- Paging ---------------------------------------------------------------------------------------


def test_list_follows_next_cursor_to_the_end():
    server = Server(
        httpx.Response(200, json={"data": [{"id": 1}, {"id": 2}], "next_cursor": "c1"}),
        httpx.Response(200, json={"data": [{"id": 3}], "next_cursor": "c2"}),
        httpx.Response(200, json={"data": [], "next_cursor": None}),
    )
    with make_client(server) as client:
        items = client.contacts.list(status="subscribed", page_size=2)
        assert server.requests == []  # lazy: nothing is asked before the first item
        assert [item["id"] for item in items] == [1, 2, 3]
    assert [dict(r.url.params) for r in server.requests] == [
        {"status": "subscribed", "limit": "2"},
        {"status": "subscribed", "limit": "2", "cursor": "c1"},
        {"status": "subscribed", "limit": "2", "cursor": "c2"},
    ]


# --- Idempotency keys -----------------------------------------------------------------------------


def test_each_post_has_its_own_key_kept_across_its_retries():
    server = Server(
        problem(503),
        httpx.ConnectError("refused"),
        httpx.Response(202, json={"id": "m1"}),
        httpx.Response(202, json={"id": "m2"}),
    )
    with make_client(server) as client:
        assert client.messages.send("a@example.org", subject="s", text="t")["id"] == "m1"
        assert client.messages.send("a@example.org", subject="s", text="t")["id"] == "m2"
    keys = [r.headers["idempotency-key"] for r in server.requests]
    assert keys[0] == keys[1] == keys[2] != keys[3]
    assert uuid.UUID(keys[0]).version == 4 and uuid.UUID(keys[3]).version == 4
    assert len({r.content for r in server.requests}) == 1  # the same body each time


def test_the_callers_idempotency_key_is_sent():
    server = Server(httpx.Response(200, json={"accepted": 1, "rejected": 0, "results": []}))
    with make_client(server) as client:
        client.messages.send_batch([{"to": "a@example.org"}], idempotency_key="order-42")
    assert server.requests[0].headers["idempotency-key"] == "order-42"


def test_a_retried_upload_is_byte_for_byte_the_same(tmp_path):
    # The server fingerprints an upload by its length and content type (the multipart boundary).
    path = tmp_path / "people.csv"
    path.write_text("email\na@example.org\n")
    server = Server(httpx.ReadTimeout("slow"), httpx.Response(202, json={"id": 3}))
    with make_client(server) as client:
        client.imports.create(path)
    first, second = server.requests
    assert first.content == second.content and first.headers == second.headers


# --- Retries and their waits, on a fake clock ---------------------------------------------------


def test_backoff_grows_exponentially_with_jitter():
    server = Server(problem(503), problem(502), problem(504), httpx.Response(200, json={"id": "m"}))
    clock = FakeClock()
    with make_client(server, clock, jitter=0.0, backoff=0.5, max_retries=3) as client:
        client.messages.get("m")
    assert clock.sleeps == [0.25, 0.5, 1.0]  # the lower half of each step: 0.5, 1, 2

    server = Server(problem(503), problem(503), httpx.Response(200, json={"id": "m"}))
    clock = FakeClock()
    with make_client(server, clock, jitter=1.0, backoff=0.5) as client:
        client.messages.get("m")
    assert clock.sleeps == [0.5, 1.0]  # the whole step


def test_backoff_is_capped_by_max_wait():
    server = Server(*[problem(503)] * 6, httpx.Response(200, json={}))
    clock = FakeClock()
    with make_client(server, clock, jitter=1.0, backoff=1.0, max_wait=4.0, max_retries=6) as client:
        client.messages.get("m")
    assert clock.sleeps == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0]


def test_retry_after_is_honoured_on_429_and_503():
    server = Server(
        problem(429, headers={"Retry-After": "3"}),
        problem(503, headers={"Retry-After": "7"}),
        httpx.Response(202, json={"id": "m1"}),
    )
    clock = FakeClock()
    with make_client(server, clock, jitter=0.5, backoff=0.4) as client:
        assert client.messages.send("a@example.org", subject="s", text="t") == {"id": "m1"}
    assert clock.sleeps == pytest.approx([3.2, 7.2])  # never less than asked; jitter on top
    assert len(server.requests) == 3


def test_retry_after_as_an_http_date():
    when = datetime.now(UTC) + timedelta(seconds=20)
    server = Server(problem(503, headers={"Retry-After": format_datetime(when, usegmt=True)}), httpx.Response(200))
    clock = FakeClock()
    with make_client(server, clock) as client:
        client.messages.get("m")
    assert 18 < clock.sleeps[0] <= 20


def test_a_retry_after_past_max_wait_is_the_callers_to_decide():
    server = Server(problem(429, "slow down", headers={"Retry-After": "120"}))
    clock = FakeClock()
    with make_client(server, clock, max_wait=30) as client, pytest.raises(RateLimited) as raised:
        client.messages.get("m")
    assert raised.value.retry_after == 120 and clock.sleeps == [] and len(server.requests) == 1


def test_after_max_retries_the_last_error_is_raised():
    server = Server(problem(503, "down for maintenance"))
    clock = FakeClock()
    with make_client(server, clock, max_retries=2) as client, pytest.raises(ServerError) as raised:
        client.messages.get("m")
    assert raised.value.status == 503 and raised.value.detail == "down for maintenance"
    assert len(server.requests) == 3 and len(clock.sleeps) == 2


def test_max_retries_zero_tries_once():
    server = Server(problem(429, headers={"Retry-After": "1"}))
    with make_client(server, max_retries=0) as client, pytest.raises(RateLimited):
        client.messages.get("m")
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("connect"),
        httpx.ReadTimeout("read"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.ReadError("reset"),
    ],
)
def test_connection_errors_and_timeouts_are_retried(failure):
    server = Server(failure, httpx.Response(202, json={"id": "m1"}))
    clock = FakeClock()
    with make_client(server, clock, backoff=1.0) as client:
        assert client.messages.send("a@example.org", subject="s", text="t") == {"id": "m1"}
    assert clock.sleeps == [0.5] and len(server.requests) == 2


def test_a_connection_that_never_comes_back_raises_connection_failed():
    server = Server(httpx.ConnectError("refused"))
    with make_client(server, max_retries=2) as client, pytest.raises(ConnectionFailed) as raised:
        client.messages.get("m")
    assert isinstance(raised.value.__cause__, httpx.ConnectError) and len(server.requests) == 3


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422, 500])
def test_errors_that_a_retry_cannot_fix_are_raised_at_once(status):
    server = Server(problem(status))
    clock = FakeClock()
    with make_client(server, clock) as client, pytest.raises(ApiError):
        client.messages.send("a@example.org", subject="s", text="t")
    assert len(server.requests) == 1 and clock.sleeps == []


def test_a_conflict_with_a_request_in_flight_waits_for_its_outcome():
    in_flight = problem(409, "still being processed", code="idempotency_in_flight", headers={"Retry-After": "1"})
    server = Server(in_flight, httpx.Response(202, json={"id": "m1"}, headers={"Idempotent-Replayed": "true"}))
    clock = FakeClock()
    with make_client(server, clock, jitter=0.0) as client:
        assert client.messages.send("a@example.org", subject="s", text="t") == {"id": "m1"}
    assert clock.sleeps == [1.0]
    assert len({r.headers["idempotency-key"] for r in server.requests}) == 1


def test_a_delete_whose_answer_was_lost_is_done_when_the_retry_finds_nothing():
    server = Server(httpx.ReadTimeout("read"), problem(404, "No contact."))
    with make_client(server) as client:
        assert client.contacts.delete("a@example.org") is None
    # Without a lost answer, a 404 means there was nothing to delete.
    server = Server(problem(404, "No contact."))
    with make_client(server) as client, pytest.raises(NotFound):
        client.contacts.delete("a@example.org")


# --- Errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, BadRequest),
        (401, Unauthorized),
        (403, Forbidden),
        (404, NotFound),
        (409, Conflict),
        (422, ValidationFailed),
        (429, RateLimited),
        (500, ServerError),
        (503, ServerError),
        (413, ApiError),
    ],
)
def test_each_status_has_its_exception(status, kind):
    server = Server(problem(status))
    with make_client(server, max_retries=0) as client, pytest.raises(kind) as raised:
        client.messages.get("m")
    assert type(raised.value) is kind and raised.value.status == status


def test_a_problem_document_becomes_the_exceptions_fields():
    errors = [{"pointer": "/to", "detail": "is not a valid address"}]
    answer = problem(422, "/to: is not a valid address", errors=errors, headers={"X-Request-Id": "req-9"})
    server = Server(answer)
    with make_client(server) as client, pytest.raises(ValidationFailed) as raised:
        client.messages.send("nobody", subject="s", text="t")
    error = raised.value
    assert (error.status, error.title, error.detail) == (422, "Title", "/to: is not a valid address")
    assert error.errors == errors and error.request_id == "req-9" and error.problem["errors"] == errors
    assert str(error) == "422 Title: /to: is not a valid address (request req-9)"


def test_a_reused_idempotency_key_is_reported_by_its_code():
    server = Server(problem(422, "Idempotency-Key: was already used", code="idempotency_key_reused"))
    with make_client(server) as client, pytest.raises(ValidationFailed) as raised:
        client.messages.send("a@example.org", subject="s", text="t", idempotency_key="k")
    assert raised.value.code == "idempotency_key_reused"


def test_an_error_page_that_is_not_a_problem_document():
    server = Server(httpx.Response(502, text="<html>Bad Gateway</html>", headers={"Content-Type": "text/html"}))
    with make_client(server, max_retries=0) as client, pytest.raises(ServerError) as raised:
        client.messages.get("m")
    assert raised.value.status == 502 and raised.value.title == "Bad Gateway"
    assert raised.value.detail == "<html>Bad Gateway</html>" and raised.value.errors == []


# --- The key stays secret; the client closes --------------------------------------------------------


def test_the_key_is_never_logged_or_shown(caplog):
    server = Server(httpx.ConnectError("refused"), problem(503), problem(401, "The API key is not valid."))
    caplog.set_level(logging.DEBUG)
    client = make_client(server)
    with pytest.raises(Unauthorized) as raised:
        client.messages.send("a@example.org", subject="s", text="t")
    client.close()
    assert "retry 2/3 of POST /v1/messages after 503" in caplog.text  # retries are logged…
    secret = KEY.split("_", 2)[2]
    for shown in (caplog.text, repr(client), str(raised.value), repr(raised.value)):
        assert secret not in shown  # …without the key


def test_a_missing_key_is_refused_at_once():
    with pytest.raises(ValueError, match="api_key"):
        Client("http://smartmail.test", "")


def test_the_context_manager_closes_the_http_client():
    with make_client(Server()) as client:
        http = client._http
        assert not http.is_closed
    assert http.is_closed


def test_importing_the_client_imports_no_other_smartmail_module():
    code = "import sys, smartmail.client; print(sorted(m for m in sys.modules if m.startswith('smartmail')))"
    loaded = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.replace(
            "'", '"'
        )
    )
    assert [m for m in loaded if m != "smartmail" and not m.startswith("smartmail.client")] == []
