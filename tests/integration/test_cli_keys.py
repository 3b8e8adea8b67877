"""`smartmail keys create|list|revoke|scopes` on the real database, checked against a real `smartmail web`."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from smartmail.access.scopes import SCOPES
from smartmail.cli.main import app as cli
from smartmail.store.engine import session_scope
from smartmail.store.models import ApiKey
from tests.conftest import ROOT

TOKEN = re.compile(r"sm_([0-9a-f]{16})_[A-Za-z0-9_-]{43}")


@pytest.fixture
def runner(env):
    return CliRunner()


def stored() -> dict[str, ApiKey]:
    with session_scope() as session:
        rows = list(session.scalars(select(ApiKey)))
        session.expunge_all()
    return {row.id: row for row in rows}


def test_create_prints_the_key_once_and_it_works_until_revoked(api, runner):
    # The real entry point, as an operator runs it.
    created = subprocess.run(
        [sys.executable, "-m", "smartmail.cli", "keys", "create", "shop", "--scope", "campaigns:read,messages:send"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ),
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    token = TOKEN.search(created.stdout).group(0)
    key_id = TOKEN.search(created.stdout).group(1)
    assert "not shown again" in created.stderr
    row = stored()[key_id]
    assert row.secret_hash == hashlib.sha256(token.split("_", 2)[2].encode()).hexdigest()
    assert row.scopes == ["messages:send", "campaigns:read"] and row.name == "shop"

    listed = runner.invoke(cli, ["keys", "list"])
    assert listed.exit_code == 0 and key_id in listed.stdout and "shop" in listed.stdout
    as_json = runner.invoke(cli, ["keys", "list", "--json"])
    records = {record["id"]: record for record in json.loads(as_json.stdout)}
    assert records[key_id]["scopes"] == ["messages:send", "campaigns:read"] and not records[key_id]["revoked"]
    secret = token.split("_", 2)[2]
    for output in (listed.output, as_json.output):  # never a secret, nor its hash
        assert secret not in output and row.secret_hash not in output and '"key"' not in output

    client = api.client_for(token)
    assert client.get("/v1/campaigns").status_code == 200
    revoked = runner.invoke(cli, ["keys", "revoke", key_id])
    assert revoked.exit_code == 0 and key_id in revoked.stdout
    refused = client.get("/v1/campaigns")
    assert refused.status_code == 401 and refused.json()["reason"] == "revoked"
    assert stored()[key_id].revoked_at is not None
    active = runner.invoke(cli, ["keys", "list", "--active", "--json"])
    assert key_id not in {record["id"] for record in json.loads(active.stdout)}


def test_create_as_json_carries_the_key_and_its_expiry(runner):
    result = runner.invoke(cli, ["keys", "create", "ci", "--scope", "events:write", "--expires", "12h", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert TOKEN.fullmatch(record["key"]) and record["expires_at"] and record["scopes"] == ["events:write"]
    assert stored()[record["id"]].expires_at is not None


def test_bad_input_names_it_exits_non_zero_and_stores_nothing(runner):
    cases = [
        (["keys", "create", "x", "--scope", "messages:send,everything"], "everything"),
        (["keys", "create", "x"], "at least one scope"),
        (["keys", "create", "x", "--scope", "events:write", "--expires", "soon"], "--expires"),
        (["keys", "create", "x", "--scope", "events:write", "--expires", "2000-01-01"], "expires_at"),
    ]
    for argv, named in cases:
        result = runner.invoke(cli, argv)
        assert result.exit_code == 2, (argv, result.output)
        assert named in result.stderr, (argv, result.stderr)
    assert stored() == {}
    unknown = runner.invoke(cli, ["keys", "revoke", "0123456789abcdef"])
    assert unknown.exit_code == 1 and "0123456789abcdef" in unknown.stderr


def test_scopes_lists_every_scope(runner):
    result = runner.invoke(cli, ["keys", "scopes"])
    assert result.exit_code == 0
    assert all(scope in result.stdout for scope in SCOPES)
