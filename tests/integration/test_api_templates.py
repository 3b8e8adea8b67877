"""/v1/templates through a real `smartmail web` process, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from smartmail.audience import contacts
from smartmail.campaigns import lifecycle
from smartmail.store.engine import session_scope
from smartmail.store.models import Template
from tests.integration.conftest import Api


def stored_versions() -> list[tuple[str, int]]:
    with session_scope() as session:
        return [tuple(row) for row in session.execute(select(Template.name, Template.version).order_by(Template.id))]


def create(client, name: str, **parts):
    body = {"name": name, "subject": "Hello", "html": "<p>Hi</p>", **parts}
    response = client.post("/v1/templates", json=body)
    assert response.status_code == 201, response.text
    return response


def errors(response) -> list[tuple[str, str]]:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    return [(e.get("pointer", e.get("parameter")), e["detail"]) for e in response.json()["errors"]]


def test_versions_are_created_listed_and_read(api):
    client = api.client("templates:read", "templates:write")
    first = create(client, "welcome", subject="Welcome {{ name }}", html="<p>v1</p>", text="v1")
    assert first.headers["location"] == "/v1/templates/welcome/versions/1"
    body = first.json()
    assert {k: body[k] for k in ("name", "version", "subject", "html", "text")} == {
        "name": "welcome",
        "version": 1,
        "subject": "Welcome {{ name }}",
        "html": "<p>v1</p>",
        "text": "v1",
    }
    assert body["created_at"].endswith("Z")
    second = create(client, "welcome", html="<p>v2</p>").json()
    assert (second["version"], second["text"]) == (2, None)
    create(client, "receipt")
    create(client, "alert")

    assert client.get("/v1/templates/welcome").json()["html"] == "<p>v2</p>"
    assert client.get("/v1/templates/welcome/versions/1").json()["html"] == "<p>v1</p>"
    first_page = client.get("/v1/templates", params={"limit": 2}).json()
    assert [(t["name"], t["version"]) for t in first_page["data"]] == [("alert", 1), ("receipt", 1)]
    rest = client.get("/v1/templates", params={"limit": 2, "cursor": first_page["next_cursor"]}).json()
    assert [(t["name"], t["version"]) for t in rest["data"]] == [("welcome", 2)] and rest["next_cursor"] is None
    assert stored_versions() == [("welcome", 1), ("welcome", 2), ("receipt", 1), ("alert", 1)]


@pytest.mark.parametrize(
    "body,pointer",
    [
        ({"name": "a/b"}, "/name"),
        ({"name": "my template"}, "/name"),
        ({"name": "../etc"}, "/name"),
        ({"name": "x@2"}, "/name"),
        ({"name": "a%2Fb"}, "/name"),
        ({"html": "<p>{{ name </p>"}, "/html"),
        ({"subject": "{% if %}"}, "/subject"),
        ({"text": "{% for x in y %}"}, "/text"),
        ({"html": "{% include 'db/x@1/html' %}"}, "/html"),
        ({"html": "a\x00b"}, "/html"),
        ({"subject": ""}, "/subject"),
        ({"colour": "red"}, "/colour"),
        ({"preheader": "{% if %}"}, "/preheader"),
        ({"preheader": "x" * 1001}, "/preheader"),
        ({"preheader": "a\x00b"}, "/preheader"),
    ],
    ids=[
        "slash",
        "space",
        "dots",
        "at",
        "percent",
        "html",
        "subject",
        "text",
        "include",
        "nul",
        "empty",
        "extra",
        "preheader-syntax",
        "preheader-long",
        "preheader-nul",
    ],
)
def test_bad_input_is_a_422_naming_the_field_and_stores_nothing(api, body, pointer):
    client = api.client("templates:write")
    response = client.post("/v1/templates", json={"name": "ok", "subject": "s", "html": "<p>h</p>", **body})
    assert errors(response)[0][0] == pointer
    assert stored_versions() == []


def test_missing_ones_are_404(api):
    client = api.client("templates:read", "templates:write")
    create(client, "welcome")
    for response in (
        client.get("/v1/templates/nope"),
        client.get("/v1/templates/welcome/versions/2"),
        client.get("/v1/templates/a%00b"),
        client.post("/v1/templates/nope/preview", json={}),
        client.post("/v1/templates/welcome/preview", json={"version": 7}),
        client.delete("/v1/templates/nope"),
    ):
        assert response.status_code == 404, response.text
        assert response.headers["content-type"] == "application/problem+json"
    assert errors(client.get("/v1/templates/welcome/versions/0"))[0][0] == "version"
    assert client.get("/v1/templates", params={"cursor": "bm90IGEgY3Vyc29y"}).status_code == 422


def test_preview_renders_with_the_context_and_escapes_html(api):
    client = api.client("templates:read", "templates:write")
    create(client, "welcome", subject="Hi {{ name }}", html="<p>Hello {{ name }}, {{ items | length }} items</p>")
    create(client, "welcome", subject="v2 {{ name }}", html="<p>{{ name | upper }}</p>", text="Text {{ name }}")
    context = {"name": "<b>Ann</b> & co", "items": [1, 2, 3]}

    first = client.post("/v1/templates/welcome/preview", json={"context": context, "version": 1})
    assert first.status_code == 200, first.text
    assert first.json() == {
        "subject": "Hi <b>Ann</b> & co",  # plain text: not escaped
        "html": "<p>Hello &lt;b&gt;Ann&lt;/b&gt; &amp; co, 3 items</p>",
        "text": "Hello <b>Ann</b> & co, 3 items\n",
    }
    latest = client.post("/v1/templates/welcome/preview", json={"context": context}).json()
    assert latest == {
        "subject": "v2 <b>Ann</b> & co",
        "html": "<p>&lt;B&gt;ANN&lt;/B&gt; &amp; CO</p>",
        "text": "Text <b>Ann</b> & co",
    }


def test_a_preheader_and_style_block_are_stored_as_written_and_previewed_email_ready(api):
    client = api.client("templates:read", "templates:write")
    html = (
        "<html><head><style>p { color: #333; } @media (max-width: 600px) { p { color: #000; } }</style></head>"
        "<body><table><tr>{% for i in items %}<td><p>{{ i }}</p></td>{% endfor %}</tr></table></body></html>"
    )
    # With a text part: the one derived from this HTML would move the loop away from `{{ i }}`
    # (inscriptis lays the table out), which is text_source_from_html's matter, not the preheader's.
    text = "{% for i in items %}{{ i }} {% endfor %}"
    created = create(client, "digest", html=html, text=text, preheader="Your {{ items | length }} picks & more").json()
    assert (created["html"], created["preheader"]) == (html, "Your {{ items | length }} picks & more")
    assert client.get("/v1/templates/digest").json()["preheader"] == "Your {{ items | length }} picks & more"
    assert create(client, "digest", html=html).json()["preheader"] is None  # a version's own setting
    preview = client.post("/v1/templates/digest/preview", json={"context": {"items": ["a", "b"]}, "version": 1})
    assert preview.status_code == 200, preview.text
    rendered = preview.json()["html"]
    hidden = '<div style="display:none;max-height:0;overflow:hidden;mso-hide:all">Your 2 picks &amp; more</div>'
    assert f"<body>{hidden}<table>" in rendered
    assert '<td><p style="color: #333;">a</p></td><td><p style="color: #333;">b</p></td>' in rendered
    assert "<style>@media (max-width: 600px)" in rendered
    assert preview.json()["text"] == "a b "


@pytest.mark.parametrize(
    "html,pointer,detail",
    [
        ("<p>{{ missing }}</p>", "/context", "'missing' is undefined"),
        ("<p>{{ ''.__class__.__mro__[1].__subclasses__() }}</p>", "/template", "not allowed by the sandbox"),
        ("{{ cycler.__init__.__globals__ }}", "/template", "not allowed by the sandbox"),
        ("{{ {}.update(a=1) }}", "/template", "not allowed by the sandbox"),
        ("{{ 'x' * 10000000 }}", "/template", "result longer than"),
        ("{{ 1 / 0 }}", "/template", "ZeroDivisionError"),
    ],
    ids=["undefined", "mro", "globals", "mutate", "huge", "zero"],
)
def test_a_template_that_cannot_render_is_a_422(api, html, pointer, detail):
    client = api.client("templates:read", "templates:write")
    create(client, "bad", html=html)
    response = client.post("/v1/templates/bad/preview", json={"context": {"name": "Ann"}})
    [(where, reason)] = errors(response)
    assert where == pointer and detail in reason, response.text


def test_preview_checks_its_body(api):
    client = api.client("templates:read", "templates:write")
    create(client, "welcome")
    assert errors(client.post("/v1/templates/welcome/preview", json={"context": []}))[0][0] == "/context"
    assert errors(client.post("/v1/templates/welcome/preview", json={"version": 2**40}))[0][0] == "/version"
    assert errors(client.post("/v1/templates/welcome/preview", json={"contxt": {}}))[0][0] == "/contxt"


def test_delete_removes_every_version_and_a_new_one_renders_afresh(api):
    client = api.client("templates:read", "templates:write")
    create(client, "promo", html="<p>old {{ n }}</p>")
    create(client, "promo", html="<p>older {{ n }}</p>")
    # Compiled now; versions restart at 1 after a delete, and v1 must not be the cached old one.
    assert client.post("/v1/templates/promo/preview", json={"context": {"n": 1}, "version": 1}).json()["html"] == (
        "<p>old 1</p>"
    )
    response = client.delete("/v1/templates/promo")
    assert response.status_code == 204 and response.content == b""
    assert stored_versions() == []
    assert client.get("/v1/templates/promo").status_code == 404
    assert create(client, "promo", html="<p>new {{ n }}</p>").json()["version"] == 1
    assert client.post("/v1/templates/promo/preview", json={"context": {"n": 2}}).json()["html"] == "<p>new 2</p>"


def test_delete_is_refused_while_a_campaign_waits_for_the_template(api):
    client = api.client("templates:read", "templates:write")
    create(client, "promo")
    contacts.create_list("news")
    lifecycle.create_campaign("spring", template="promo", lists=["news"])
    response = client.delete("/v1/templates/promo")
    assert response.status_code == 409 and "spring" in response.json()["detail"]
    assert stored_versions() == [("promo", 1)]


def test_writes_need_the_write_scope(api):
    reader = api.client("templates:read")
    assert reader.post("/v1/templates", json={"name": "a", "subject": "s", "html": "h"}).status_code == 403
    assert api.client("messages:send").get("/v1/templates").status_code == 403
    assert stored_versions() == []


def test_a_new_version_or_a_delete_is_used_by_the_next_send_despite_the_cache(api, monkeypatch, _module_web):
    # Real deployments cache resolved template names; the API's own writes must not wait for it.
    monkeypatch.setenv("SMARTMAIL_TEMPLATE_CACHE_SECONDS", "3600")
    cached = Api(_module_web.start())
    client = cached.client("templates:write", "messages:send", "messages:read")
    create(client, "note", subject="first")

    def send():
        return client.post("/v1/messages", json={"to": "ann@example.org", "template": "note"})

    sent = send()
    assert client.get(f"/v1/messages/{sent.json()['id']}").json()["subject"] == "first"
    create(client, "note", subject="second")
    sent = send()
    message = client.get(f"/v1/messages/{sent.json()['id']}").json()
    assert (message["subject"], message["template_version"]) == ("second", 2)
    assert client.delete("/v1/templates/note").status_code == 204
    refused = send()
    assert refused.status_code == 422 and refused.json()["errors"][0]["pointer"] == "/template", refused.text
    create(client, "note", subject="third")
    assert client.get(f"/v1/messages/{send().json()['id']}").json()["subject"] == "third"
    for c in cached.clients:
        c.close()
