"""Contacts, lists and custom events on SQLite and PostgreSQL: the Python API and the CLI, good and bad input."""

from __future__ import annotations

import csv
import io
import json

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

import smartmail
from smartmail.audience import contacts
from smartmail.audience.contacts import InvalidInput, NotFound
from smartmail.cli.main import app as cli
from smartmail.store.engine import session_scope
from smartmail.store.models import Contact, ContactList, Event, ImportJob, ListMembership, Message, Segment, Suppression

runner = CliRunner()
TABLES = (Contact, ContactList, ListMembership, Event, Suppression, Segment, ImportJob, Message)


def snapshot() -> dict[str, int]:
    with session_scope() as session:
        return {m.__tablename__: session.scalar(select(func.count()).select_from(m)) for m in TABLES}


def suppressions() -> dict[str, str]:
    with session_scope() as session:
        return dict(session.execute(select(Suppression.email, Suppression.reason)).all())


def test_contact_lifecycle(env):
    created = contacts.create_contact(
        " Ann@Example.ORG ", attributes={"plan": "pro", "age": 31, "vip": True}, timezone="Europe/Paris", locale="fr-FR"
    )
    assert created["email"] == "ann@example.org" and created["status"] == "subscribed"
    with pytest.raises(InvalidInput) as error:
        contacts.create_contact("ANN@example.org")
    assert error.value.field == "email"

    merged, was_created = contacts.upsert_contact("ann@example.org", attributes={"age": 32, "city": "Lyon"})
    assert not was_created and merged["attributes"] == {"plan": "pro", "age": 32, "vip": True, "city": "Lyon"}
    assert merged["timezone"] == "Europe/Paris"
    updated = contacts.update_contact("ann@example.org", attributes={"vip": None}, locale="fr")
    assert updated["attributes"] == {"plan": "pro", "age": 32, "city": "Lyon"} and updated["locale"] == "fr"
    replaced = contacts.update_contact("ann@example.org", attributes={"only": 1}, replace_attributes=True)
    assert replaced["attributes"] == {"only": 1}
    assert contacts.get_contact("ANN@EXAMPLE.ORG")["id"] == created["id"]
    with pytest.raises(NotFound):
        contacts.update_contact("nobody@example.org", locale="en")

    # Status and the suppression list move together, and the send path honours it.
    contacts.update_contact("ann@example.org", status="unsubscribed")
    assert suppressions() == {"ann@example.org": "unsubscribed"}
    assert smartmail.send("Ann <ANN@example.org>", subject="Hi", text="x").state == "suppressed"
    contacts.update_contact("ann@example.org", status="subscribed")
    assert suppressions() == {}


def test_delete_erases_personal_data_and_keeps_the_address_suppressed(env):
    contacts.create_list("news")
    contacts.create_contact("bob@example.org", attributes={"name": "Bob"})
    contacts.add_members("news", ["bob@example.org"])
    smartmail.track("bob@example.org", "order_placed", {"total": 42})
    assert contacts.delete_contact("bob@example.org") is True
    assert contacts.get_contact("bob@example.org") is None
    counts = snapshot()
    assert counts["contacts"] == counts["list_memberships"] == counts["events"] == 0
    assert suppressions() == {"bob@example.org": "erased"}
    assert smartmail.send("bob@example.org", subject="Hi", text="x").state == "suppressed"
    # Re-creating the address does not make it mailable again.
    assert contacts.create_contact("bob@example.org")["status"] == "blocked"
    assert contacts.delete_contact("nobody@example.org") is False
    assert suppressions()["nobody@example.org"] == "erased"


def test_a_suppressed_address_starts_with_the_matching_status(env):
    with session_scope() as session:
        session.add(Suppression(email="bounced@example.org", reason="hard_bounce"))
    assert contacts.create_contact("bounced@example.org")["status"] == "bounced"
    assert contacts.upsert_contact("complained@example.org", status="complained")[0]["status"] == "complained"
    assert suppressions()["complained@example.org"] == "complaint"


def test_lists_and_members(env):
    contacts.create_list("news", "Weekly news")
    with pytest.raises(InvalidInput) as error:
        contacts.create_list("news")
    assert error.value.field == "name"
    contacts.create_contact("a@example.org")
    assert contacts.add_members("news", ["a@example.org", "B@example.org", "b@example.org"]) == 2
    assert contacts.add_members("news", ["a@example.org"]) == 0  # already a member
    assert contacts.get_contact("b@example.org")["lists"] == ["news"]
    assert [(lst["name"], lst["members"]) for lst in contacts.get_lists()] == [("news", 2)]
    assert contacts.remove_members("news", ["a@example.org", "zzz@example.org"]) == 1
    assert contacts.get_contact("a@example.org")["lists"] == []
    assert contacts.delete_list("news") and contacts.get_lists() == []
    assert contacts.get_contact("b@example.org") is not None  # contacts outlive their lists


def test_track_records_custom_events(env):
    first = smartmail.track("new@example.org", "order_placed", {"total": 9.5, "items": ["a"]})
    second = smartmail.track("new@example.org", "order_placed")
    assert second > first
    assert contacts.get_contact("new@example.org")["source"] == "track"
    with session_scope() as session:
        rows = session.execute(select(Event.type, Event.properties).order_by(Event.id)).all()
    assert rows == [("order_placed", {"total": 9.5, "items": ["a"]}), ("order_placed", {})]


BAD_CALLS = [
    (lambda: contacts.create_contact("not-an-address"), "email"),
    (lambda: contacts.create_contact(""), "email"),
    (lambda: contacts.create_contact("a@example.org\r\nBcc: x@example.org"), "email"),
    (lambda: contacts.create_contact("a@example.org", status="happy"), "status"),
    (lambda: contacts.create_contact("a@example.org", timezone="Mars/Olympus"), "timezone"),
    (lambda: contacts.create_contact("a@example.org", locale="english please"), "locale"),
    (lambda: contacts.create_contact("a@example.org", attributes=["x"]), "attributes"),
    (lambda: contacts.create_contact("a@example.org", attributes={'a"b': 1}), "attributes"),
    (lambda: contacts.create_contact("a@example.org", attributes={"when": object()}), "attributes.when"),
    (lambda: contacts.create_contact("a@example.org", attributes={"x": float("nan")}), "attributes.x"),
    (lambda: contacts.create_contact("a@example.org", colour="red"), "contact"),
    (lambda: contacts.upsert_contact("a@example.org", source="x" * 65), "source"),
    (lambda: contacts.update_contact("bad", locale="en"), "email"),
    (lambda: contacts.create_list(""), "name"),
    (lambda: contacts.create_list("ok", description=5), "description"),
    (lambda: contacts.add_members("no-such-list", ["a@example.org"]), "list"),
    (lambda: contacts.add_members("news", ["a@example.org", "oops"]), "emails[1]"),
    (lambda: contacts.remove_members("news", ["oops"]), "emails[0]"),
    (lambda: smartmail.track("a@example.org", "order placed!"), "event"),
    (lambda: smartmail.track("a@example.org", "open"), "event"),
    (lambda: smartmail.track("a@example.org", "order_placed", {"x": {1, 2}}), "properties"),
    (lambda: smartmail.track("a@example.org", "order_placed", ["x"]), "properties"),
    (lambda: smartmail.track("a@example.org", "order_placed", occurred_at="yesterday"), "occurred_at"),
    (lambda: smartmail.track("bad", "order_placed"), "email"),
]


@pytest.mark.parametrize("call,field", BAD_CALLS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_CALLS)])
def test_bad_input_names_the_field_and_changes_nothing(env, call, field):
    contacts.create_list("news")
    before = snapshot()
    with pytest.raises(InvalidInput) as error:
        call()
    assert error.value.field == field, str(error.value)
    assert str(error.value).startswith(f"{field}: ")
    assert snapshot() == before


def test_cli_contacts_lists_segments_import_and_export(env, tmp_path):
    def ok(*args):
        result = runner.invoke(cli, list(args))
        assert result.exit_code == 0, result.output
        return result.output

    ok("lists", "create", "news", "--description", "Weekly")
    assert "created contact" in ok(
        "contacts",
        "add",
        "Zoe@Example.org",
        "--attr",
        "age=31",
        "--attr",
        "name=Zoé",
        "--attr",
        'tags=["a"]',
        "--list",
        "news",
        "--timezone",
        "Europe/Paris",
    )
    zoe = contacts.get_contact("zoe@example.org")
    assert zoe["attributes"] == {"age": 31, "name": "Zoé", "tags": ["a"]} and zoe["lists"] == ["news"]
    assert json.loads(ok("contacts", "get", "zoe@example.org", "--json"))["attributes"]["age"] == 31
    ok("contacts", "update", "zoe@example.org", "--attr", "age=32", "--unset", "tags")
    assert contacts.get_contact("zoe@example.org")["attributes"] == {"age": 32, "name": "Zoé"}
    ok("contacts", "track", "zoe@example.org", "order_placed", "--properties", '{"total": 3}')
    ok("lists", "add", "news", "max@example.org")
    assert "news" in ok("lists", "show")

    path = tmp_path / "people.csv"
    path.write_text("email,plan\nann@example.org,=cmd|' /C calc'!A0\nbroken,x\n", encoding="utf-8")
    output = ok("contacts", "import", str(path), "--list", "news", "--inline")
    assert "1 bad row(s)" in output
    report = (tmp_path / "people.csv.errors.csv").read_text(encoding="utf-8")
    assert "3,email," in report

    ok("segments", "save", "older", "--rules", '{"all": [{"list": "news"}, {"attr": "age", "op": "gt", "value": 30}]}')
    assert ok("segments", "count", "older").startswith("1 contact(s)")
    assert "zoe@example.org" in ok("segments", "preview", "older")
    assert ok("segments", "count", "--rules", '{"event": "order_placed"}').startswith("1 contact(s)")

    out = tmp_path / "export.csv"
    ok("contacts", "export", "--out", str(out), "--list", "news")
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert {r["email"] for r in rows} == {"zoe@example.org", "max@example.org", "ann@example.org"}
    assert next(r for r in rows if r["email"] == "ann@example.org")["plan"] == "'=cmd|' /C calc'!A0"
    ok("contacts", "delete", "zoe@example.org", "--yes")
    assert contacts.get_contact("zoe@example.org") is None and suppressions() == {"zoe@example.org": "erased"}


BAD_CLI = [
    (["contacts", "add", "nobody"], "email: "),
    (["contacts", "add", "a@example.org", "--status", "happy"], "status: "),
    (["contacts", "add", "a@example.org", "--attr", "novalue"], "--attr: "),
    (["contacts", "add", "a@example.org", "--list", "no-such-list"], "list: "),
    (["contacts", "update", "a@example.org", "--timezone", "Nowhere/Land"], "timezone: "),
    (["contacts", "update", "a@example.org"], "nothing to change"),
    (["contacts", "get", "bad"], "email: "),
    (["contacts", "track", "a@example.org", "open"], "event: "),
    (["contacts", "track", "a@example.org", "x", "--properties", "{"], "--properties: "),
    (["contacts", "import", "/no/such/file.csv"], "path: "),
    (["contacts", "import", "FILE", "--mode", "merge"], "mode: "),
    (["contacts", "import", "FILE", "--map", "Nope=email"], "mapping.Nope: "),
    (["contacts", "import", "FILE", "--map", "broken"], "--map: "),
    (["contacts", "import", "FILE", "--type", "age=float128"], "types.age: "),
    (["contacts", "import", "FILE", "--list", "no-such-list"], "list: "),
    (["contacts", "import", "FILE", "--encoding", "klingon"], "encoding: "),
    (["contacts", "import", "FILE", "--delimiter", "::"], "delimiter: "),
    (["contacts", "export", "--list", "no-such-list"], "list: "),
    (["lists", "add", "no-such-list", "a@example.org"], "list: "),
    (["lists", "add", "news", "a@example.org", "bad"], "emails[1]: "),
    (["segments", "save", "s", "--rules", '{"all": [{"attr": "a", "op": "eqq", "value": 1}]}'], "rules.all[0].op: "),
    (["segments", "save", "s", "--rules", "{not json"], "--rules: "),
    (["segments", "count", "--rules", '{"list": "missing"}'], "rules.list: "),
    (["segments", "count"], "NAME or --rules"),
]


@pytest.mark.parametrize("argv,message", BAD_CLI, ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _) in enumerate(BAD_CLI)])
def test_cli_bad_input_exits_2_naming_the_field_and_changes_nothing(env, tmp_path, argv, message):
    contacts.create_list("news")
    path = tmp_path / "ok.csv"
    path.write_text("email,age\na@example.org,3\n", encoding="utf-8")
    before = snapshot()
    result = runner.invoke(cli, [str(path) if a == "FILE" else a for a in argv])
    assert result.exit_code == 2, result.output
    assert message in result.output.replace("\n", ""), result.output
    assert snapshot() == before
