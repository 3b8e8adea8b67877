"""`smartmail suppressions list|add|remove` on the real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from smartmail.audience.contacts import create_contact, get_contact
from smartmail.cli.main import app as cli

pytestmark = pytest.mark.integration


@pytest.fixture
def runner(env):
    return CliRunner()


def test_add_list_and_remove_keep_the_contact_in_step(runner):
    create_contact("gone@example.org")
    added = runner.invoke(cli, ["suppressions", "add", "Gone@Example.org", "--reason", "hard_bounce"])
    assert added.exit_code == 0, added.output
    assert "gone@example.org suppressed (hard_bounce)" in added.output
    assert get_contact("gone@example.org")["status"] == "bounced"
    again = runner.invoke(cli, ["suppressions", "add", "gone@example.org"])
    assert again.exit_code == 0 and "already suppressed (hard_bounce)" in again.output

    listed = runner.invoke(cli, ["suppressions", "list", "--reason", "hard_bounce", "--json"])
    assert [row["email"] for row in json.loads(listed.output)] == ["gone@example.org"]

    removed = runner.invoke(cli, ["suppressions", "remove", "gone@example.org"])
    assert removed.exit_code == 0, removed.output
    assert get_contact("gone@example.org")["status"] == "subscribed"  # a bounce may have been passing


@pytest.mark.parametrize(
    "argv, message",
    [
        (["suppressions", "add", "not-an-address"], "email: 'not-an-address' is not a valid email address"),
        (["suppressions", "add", "a@example.org", "--reason", "erased"], "reason: 'erased' is not one of"),
        (["suppressions", "list", "--reason", "nope"], "reason: 'nope' is not one of"),
        (["suppressions", "remove", "never@example.org"], "never@example.org is not suppressed"),
    ],
)
def test_bad_input_names_the_field_and_exits_non_zero(runner, argv, message):
    result = runner.invoke(cli, argv)
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())
    assert json.loads(runner.invoke(cli, ["suppressions", "list", "--json"]).output) == []
