"""/v1/inbound and `smartmail inbound-mail` on what the inbound spool holds: listing by verdict,
one mail, its bytes, a retry of a failed one; through a real `smartmail web`, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from smartmail.cli.main import app as cli
from smartmail.feedback import inbound
from smartmail.store.engine import session_scope
from smartmail.store.models import InboundMessage

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "inbound"


@pytest.fixture
def spooled(env, monkeypatch):
    """An auto-reply, a human reply and a mail that failed, processed as the events worker does."""
    out_of_office = (FIXTURES / "out_of_office.eml").read_bytes()
    human = (FIXTURES / "human_reply.eml").read_bytes()
    ids = {
        "auto": inbound.spool("someone@example.org", ["bounce@bounces.example.com"], out_of_office, "192.0.2.7"),
        "human": inbound.spool("someone@example.org", ["bounce@bounces.example.com"], human, "192.0.2.7"),
    }
    inbound.process_pending()
    ids["failed"] = inbound.spool("", ["bounce@bounces.example.com"], b"Subject: x\r\n\r\nbody\xff\r\n", None)
    with session_scope() as session:  # as processing leaves a mail that raised on every attempt
        session.execute(
            update(InboundMessage)
            .where(InboundMessage.id == ids["failed"])
            .values(state="failed", attempts=5, outcome={"error": "RuntimeError('boom')"})
        )
    return ids


def test_list_filter_read_raw_and_retry(api, spooled):
    client = api.client("inbound:read", "inbound:write")
    listed = client.get("/v1/inbound").json()
    assert [m["id"] for m in listed["data"]] == [spooled["failed"], spooled["human"], spooled["auto"]]
    auto = client.get("/v1/inbound", params={"verdict": "auto_reply"}).json()["data"]
    assert [m["id"] for m in auto] == [spooled["auto"]]
    assert auto[0]["state"] == "processed" and auto[0]["peer"] == "192.0.2.7"
    assert auto[0]["received_at"].endswith("Z") and auto[0]["outcome"]["findings"] == 0
    paged = client.get("/v1/inbound", params={"limit": 2}).json()
    rest = client.get("/v1/inbound", params={"limit": 2, "cursor": paged["next_cursor"]}).json()
    assert [m["id"] for m in paged["data"] + rest["data"]] == [m["id"] for m in listed["data"]]

    raw = client.get(f"/v1/inbound/{spooled['failed']}/raw")
    assert raw.headers["content-type"] == "message/rfc822"
    assert raw.content == b"Subject: x\r\n\r\nbody\xff\r\n"  # the bytes as received, 8-bit included

    conflict = client.post(f"/v1/inbound/{spooled['auto']}/retry")
    assert conflict.status_code == 409, conflict.text
    retried = client.post(f"/v1/inbound/{spooled['failed']}/retry")
    assert retried.status_code == 202 and retried.json()["state"] == "pending" and retried.json()["attempts"] == 0


def test_scopes_and_missing_mail(api, spooled):
    reader = api.client("inbound:read")
    assert reader.post(f"/v1/inbound/{spooled['failed']}/retry").status_code == 403
    assert api.client("events:read").get("/v1/inbound").status_code == 403
    assert reader.get("/v1/inbound/01JABCDEFGHJKMNPQRSTVWXYZ0").status_code == 404
    bad = reader.get("/v1/inbound", params={"verdict": "spam"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["parameter"] == "verdict"


def test_the_cli_lists_shows_and_retries(spooled):
    runner = CliRunner()
    listed = runner.invoke(cli, ["inbound-mail", "list", "--verdict", "unrecognised", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [row["id"] for row in json.loads(listed.output)] == [spooled["human"]]
    shown = runner.invoke(cli, ["inbound-mail", "show", spooled["auto"]])
    assert json.loads(shown.output)["verdict"] == "auto_reply"
    assert runner.invoke(cli, ["inbound-mail", "list", "--state", "lost"]).exit_code == 2
    assert runner.invoke(cli, ["inbound-mail", "retry", spooled["auto"]]).exit_code == 2  # not failed
    assert runner.invoke(cli, ["inbound-mail", "show", "nope"]).exit_code == 1
    retried = runner.invoke(cli, ["inbound-mail", "retry", spooled["failed"]])
    assert retried.exit_code == 0 and "processed again" in retried.output
    assert inbound.get_inbound(spooled["failed"])["state"] == "pending"
