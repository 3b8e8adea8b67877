"""/v1/workflows through a real `smartmail web` process, on SQLite and PostgreSQL: scopes, definitions
refused naming the step, versions, pause and resume, enrolments, status, simulate, and Client.workflows."""

from __future__ import annotations

import copy

import pytest

from smartmail.audience.contacts import create_contact
from smartmail.automations import engine
from smartmail.client import Client, ValidationFailed
from smartmail.client import NotFound as ClientNotFound

PROBLEM = "application/problem+json"
WELCOME = {
    "description": "welcome series",
    "trigger": {"event": "signup"},
    "goal": {"event": "order_placed"},
    "steps": [
        {"id": "hello", "type": "send", "template": "welcome"},
        {"id": "pause", "type": "wait", "duration": "2d"},
        {"id": "opened", "type": "branch", "if": {"previous_email": "opened"}, "then": "done"},
        {"id": "nudge", "type": "send", "template": "welcome"},
        {"id": "done", "type": "exit"},
    ],
}


def welcome(**changes) -> dict:
    document = copy.deepcopy(WELCOME)
    document.update(changes)
    return document


def pointers(response) -> list[str]:
    assert response.status_code == 422 and response.headers["content-type"] == PROBLEM, response.text
    return [error.get("pointer", error.get("parameter")) for error in response.json()["errors"]]


def test_scopes_are_enforced(api):
    writer = api.client("workflows:write")
    reader = api.client("workflows:read")
    assert writer.put("/v1/workflows/welcome", json=WELCOME).status_code == 201
    create_contact("ann@example.org", attributes={"first_name": "Ann"})

    for method, path, body in [
        ("PUT", "/v1/workflows/welcome", WELCOME),
        ("POST", "/v1/workflows/welcome/pause", None),
        ("POST", "/v1/workflows/welcome/resume", None),
        ("POST", "/v1/workflows/welcome/move", None),
        ("POST", "/v1/workflows/welcome/enrolments", {"email": "ann@example.org"}),
    ]:
        refused = reader.request(method, path, json=body)
        assert refused.status_code == 403 and "workflows:write" in refused.json()["detail"], (method, path)
    for method, path, body in [
        ("GET", "/v1/workflows", None),
        ("GET", "/v1/workflows/welcome", None),
        ("GET", "/v1/workflows/welcome/status", None),
        ("POST", "/v1/workflows/welcome/simulate", {"email": "ann@example.org"}),
    ]:
        refused = writer.request(method, path, json=body)
        assert refused.status_code == 403 and "workflows:read" in refused.json()["detail"], (method, path)
        assert reader.request(method, path, json=body).status_code == 200, (method, path)
    other = api.client("campaigns:read", "campaigns:write")
    assert other.get("/v1/workflows").status_code == 403


@pytest.mark.parametrize(
    "steps,pointer",
    [
        ([{"id": "hello", "type": "send", "template": "no-such-template"}], "/steps/hello/template"),
        (
            [
                {"id": "b", "type": "branch", "if": {"previous_email": "opened"}, "then": "nowhere"},
                {"id": "x", "type": "exit"},
            ],
            "/steps/b/then",
        ),
        (
            [
                {"id": "a", "type": "score", "points": 1, "next": "b"},
                {"id": "b", "type": "score", "points": 1, "next": "a"},
            ],
            "/steps/b",
        ),
        ([{"id": "w", "type": "wait", "duration": "soon"}], "/steps/w/duration"),
        ([{"id": "x", "type": "teleport"}], "/steps/x/type"),
        ([{"id": "hello", "type": "send", "template": "welcome", "colour": "red"}], "/steps/hello/colour"),
        ([], "/steps"),
    ],
    ids=[
        "unknown-template",
        "branch-to-nowhere",
        "cycle-without-wait",
        "bad-duration",
        "unknown-type",
        "unknown-field",
        "no-steps",
    ],
)
def test_a_bad_definition_is_a_422_naming_the_step_and_stores_nothing(api, steps, pointer):
    client = api.client("workflows:read", "workflows:write")
    response = client.put("/v1/workflows/bad", json=welcome(steps=steps))
    assert pointers(response) == [pointer]
    field = pointer.strip("/").replace("/", ".")
    assert response.json()["detail"].startswith(f"{field}: ") or field == "steps", response.text
    assert client.get("/v1/workflows/bad").status_code == 404


@pytest.mark.parametrize(
    "body,pointer",
    [
        (welcome(surely_not_a_field=1), "/surely_not_a_field"),
        (welcome(trigger={"event": "signup", "list": "news"}), "/trigger"),
        (welcome(trigger={"list": "no-such-list"}), "/trigger/list"),
        (welcome(entry="sometimes"), "/entry"),
        (welcome(name="another"), "/name"),
        ({"steps": WELCOME["steps"]}, "/trigger"),
    ],
)
def test_a_bad_document_is_a_422_naming_the_field(api, body, pointer):
    client = api.client("workflows:write")
    assert pointers(client.put("/v1/workflows/bad", json=body)) == [pointer]


def test_a_bad_name_is_a_422_and_an_unknown_one_a_404(api):
    client = api.client("workflows:read", "workflows:write")
    assert pointers(client.put("/v1/workflows/-dash-first", json=WELCOME)) == ["/name"]
    for method, path, body in [
        ("GET", "", None),
        ("GET", "/status", None),
        ("POST", "/pause", None),
        ("POST", "/resume", None),
        ("POST", "/move", None),
        ("POST", "/enrolments", {"email": "ann@example.org"}),
        ("POST", "/simulate", {"email": "ann@example.org"}),
    ]:
        missing = client.request(method, f"/v1/workflows/nothing{path}", json=body)
        assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM, (method, path)
        assert "nothing" in missing.json()["detail"]


def test_save_version_pause_status_and_simulate(api):
    client = api.client("workflows:read", "workflows:write")
    created = client.put("/v1/workflows/welcome", json=WELCOME)
    assert created.status_code == 201, created.text
    assert created.headers["location"] == "/v1/workflows/welcome"
    body = created.json()
    assert (body["version"], body["changed"], body["state"], body["definition"]) == (1, True, "active", WELCOME)
    assert body["created_at"].endswith("Z")

    same = client.put("/v1/workflows/welcome", json=WELCOME)
    assert same.status_code == 200 and (same.json()["version"], same.json()["changed"]) == (1, False)
    shorter = welcome(steps=WELCOME["steps"][:2])
    changed = client.put("/v1/workflows/welcome", json=shorter)
    assert changed.status_code == 200 and (changed.json()["version"], changed.json()["changed"]) == (2, True)

    current = client.get("/v1/workflows/welcome").json()
    assert (current["version"], current["current_version"], current["definition"]) == (2, 2, shorter)
    first = client.get("/v1/workflows/welcome", params={"version": 1}).json()
    assert (first["version"], first["current_version"], first["definition"]) == (1, 2, WELCOME)
    assert client.get("/v1/workflows/welcome", params={"version": 3}).status_code == 404
    assert client.put("/v1/workflows/welcome", json=WELCOME).json()["version"] == 3  # back to the first, as version 3

    for name in ("abandoned-cart", "birthday"):
        assert client.put(f"/v1/workflows/{name}", json=WELCOME).status_code == 201
    page = client.get("/v1/workflows", params={"limit": 2}).json()
    assert [w["name"] for w in page["data"]] == ["abandoned-cart", "birthday"]
    rest = client.get("/v1/workflows", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [w["name"] for w in rest["data"]] == ["welcome"] and rest["next_cursor"] is None

    # Enrolments: by hand, once (the entry rule), then the first step run in this process (no worker).
    create_contact("ann@example.org", attributes={"first_name": "Ann"})
    create_contact("bob@example.org", attributes={"first_name": "Bob"})
    enrol = "/v1/workflows/welcome/enrolments"
    assert client.post(enrol, json={"email": "ann@example.org", "properties": {"plan": "pro"}}).json() == {
        "enrolled": True
    }
    assert client.post(enrol, json={"email": "Ann@Example.org"}).json() == {"enrolled": False}
    assert client.post(enrol, json={"email": "bob@example.org"}).json() == {"enrolled": True}
    assert pointers(client.post(enrol, json={"email": "nobody@example.org"})) == ["/email"]
    assert pointers(client.post(enrol, json={"email": "not an address"})) == ["/email"]
    assert engine.advance().enrolments == 2

    status = client.get("/v1/workflows/welcome/status").json()
    assert (status["enrolled"], status["running"], status["ended"]) == (2, {"pause": {"active": 2}}, {})
    # Every step of the version, in order; a wait leaves no run.
    assert list(status["steps"])[:2] == ["hello", "pause"] and status["steps"]["pause"] == {"runs": 0, "emails": 0}
    assert {step: counted for step, counted in status["steps"].items() if counted["runs"]} == {
        "hello": {"runs": 2, "emails": 2}
    }
    assert (status["conversions"], status["conversion_rate"]) == (0, 0.0)

    paused = client.post("/v1/workflows/welcome/pause").json()
    assert (paused["state"], paused["enrolments"]) == ("paused", 2)
    assert client.get("/v1/workflows/welcome/status").json()["running"] == {"pause": {"held": 2}}
    resumed = client.post("/v1/workflows/welcome/resume").json()
    assert (resumed["state"], resumed["enrolments"]) == ("active", 2)
    client.put("/v1/workflows/welcome", json=welcome(description="welcome, version 4"))
    moved = client.post("/v1/workflows/welcome/move", json={"from_version": 3}).json()
    assert (moved["version"], moved["enrolments"]) == (4, 2)
    assert client.post("/v1/workflows/welcome/move").json()["enrolments"] == 0
    assert pointers(client.post("/v1/workflows/welcome/move", json={"from_version": 0})) == ["/from_version"]

    simulate = "/v1/workflows/welcome/simulate"
    start = "2026-03-02T08:00:00+01:00"
    path = client.post(simulate, json={"email": "ann@example.org", "start": start}).json()["data"]
    assert [(stop["at"], stop["step"], stop["type"]) for stop in path] == [
        ("2026-03-02T07:00:00Z", "hello", "send"),
        ("2026-03-04T07:00:00Z", "pause", "wait"),
        ("2026-03-04T07:00:00Z", "opened", "branch"),
        ("2026-03-04T07:00:00Z", "nudge", "send"),
        ("2026-03-04T07:00:00Z", "done", "exit"),
    ]
    assert "does not hold" in path[2]["does"] and "welcome" in path[0]["does"]
    opened = client.post(simulate, json={"email": "ann@example.org", "start": start, "assume": ["opened"]}).json()
    assert [stop["step"] for stop in opened["data"]] == ["hello", "pause", "opened", "done"]
    converted = client.post(simulate, json={"email": "ann@example.org", "assume": ["order_placed"]}).json()
    assert [(stop["step"], stop["type"]) for stop in converted["data"]] == [
        ("hello", "send"),
        ("pause", "wait"),
        ("pause", "goal"),
    ]
    assert pointers(client.post(simulate, json={"email": "nobody@example.org"})) == ["/email"]
    assert pointers(client.post(simulate, json={"email": "ann@example.org", "start": "tuesday"})) == ["/start"]
    # Simulating sent and stored nothing.
    assert client.get("/v1/workflows/welcome/status").json()["steps"]["hello"] == {"runs": 2, "emails": 2}


def test_client_methods(api):
    create_contact("ann@example.org", attributes={"first_name": "Ann"})
    with Client(api.url, api.key("workflows:read", "workflows:write")) as client:
        saved = client.workflows.save("welcome", WELCOME)
        assert (saved["version"], saved["changed"]) == (1, True)
        assert client.workflows.save("welcome", WELCOME)["changed"] is False
        assert client.workflows.save("welcome", welcome(description="v2"))["version"] == 2
        assert client.workflows.get("welcome", version=1)["definition"] == WELCOME
        assert client.workflows.get("welcome")["definition"]["description"] == "v2"
        assert [w["name"] for w in client.workflows.list(page_size=1)] == ["welcome"]
        with pytest.raises(ValidationFailed) as refused:
            client.workflows.save("welcome", welcome(steps=[{"id": "hello", "type": "send", "template": "nope"}]))
        assert [e["pointer"] for e in refused.value.errors] == ["/steps/hello/template"]
        assert "steps.hello.template" in refused.value.detail

        assert client.workflows.enrol("welcome", "ann@example.org", {"source": "test"}) is True
        assert client.workflows.enrol("welcome", "ann@example.org") is False
        assert client.workflows.pause("welcome")["enrolments"] == 1
        assert client.workflows.resume("welcome")["enrolments"] == 1
        assert client.workflows.save("welcome", welcome(description="v3"))["version"] == 3
        assert client.workflows.move("welcome", from_version=1)["enrolments"] == 0
        assert client.workflows.move("welcome", from_version=2)["enrolments"] == 1
        status = client.workflows.status("welcome")
        assert (status["enrolled"], status["running"]) == (1, {"hello": {"active": 1}})
        path = client.workflows.simulate("welcome", "ann@example.org", assume=["opened"], start="2026-03-02T08:00:00")
        assert [stop["step"] for stop in path] == ["hello", "pause", "opened", "done"]
        assert path[1]["at"] == "2026-03-04T08:00:00Z"
        with pytest.raises(ClientNotFound):
            client.workflows.status("nothing")
