"""`smartmail workflows …` on the real database (SQLite and PostgreSQL): save from YAML, JSON and stdin,
bad files refused naming the step, show, list, pause, resume, move, enrol, the status table, simulate."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from smartmail.audience.contacts import create_contact
from smartmail.automations import engine
from smartmail.cli.main import app as cli
from tests.conftest import reset_caches

WELCOME_YAML = """\
description: welcome series
trigger: {event: signup}
goal: {event: order_placed}
steps:
  - {id: hello, type: send, template: welcome}
  - {id: pause, type: wait, duration: 2d}
  - {id: opened, type: branch, if: {previous_email: opened}, then: done}
  - {id: nudge, type: send, template: welcome}
  - {id: done, type: exit}
"""
WELCOME = yaml.safe_load(WELCOME_YAML)


@pytest.fixture
def runner(env, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # tables as wide as their rows
    reset_caches()
    return CliRunner()


def run(runner: CliRunner, *argv: str, code: int = 0, input: str | None = None) -> str:
    result = runner.invoke(cli, ["workflows", *argv], input=input)
    assert result.exit_code == code, result.output
    return result.output


def said(output: str) -> str:
    return " ".join(output.split())


def rows(output: str) -> list[list[str]]:
    """A rich table's rows, its header first, as lists of cells."""
    found = []
    for line in output.splitlines():
        for bar in "┃│":
            if line.startswith(bar):
                found.append([cell.strip() for cell in line.strip(bar).split(bar)])
    return found


def table(output: str) -> dict[str, list[str]]:
    """A rich table's rows by their first cell."""
    return {row[0]: row[1:] for row in rows(output)}


def test_save_from_yaml_json_and_stdin_then_show_and_list(runner, tmp_path):
    source = tmp_path / "welcome.yaml"
    source.write_text(WELCOME_YAML)
    assert said(run(runner, "save", "welcome", str(source))) == "workflow welcome created (version 1)"
    assert said(run(runner, "save", "welcome", str(source))) == "workflow welcome unchanged (version 1)"
    as_json = tmp_path / "welcome.json"
    as_json.write_text(json.dumps({**WELCOME, "description": "welcome series, v2"}))
    assert said(run(runner, "save", "welcome", str(as_json))) == "workflow welcome: new version 2"
    shorter = json.dumps({**WELCOME, "steps": WELCOME["steps"][:2]})
    assert said(run(runner, "save", "welcome", "-", input=shorter)) == "workflow welcome: new version 3"
    assert said(run(runner, "save", "cart", "-", input=WELCOME_YAML)) == "workflow cart created (version 1)"

    shown = run(runner, "show", "welcome", "--version", "1")
    assert "workflow welcome: active, version 1 of 3" in said(shown)
    assert yaml.safe_load(shown.split("UTC\n", 1)[1]) == WELCOME  # the definition, which save takes back
    current = json.loads(run(runner, "show", "welcome", "--json"))
    assert (current["version"], current["current_version"], len(current["definition"]["steps"])) == (3, 3, 2)
    assert "No workflow named 'nothing'" in said(run(runner, "show", "nothing", code=1))
    assert "has no version 9" in said(run(runner, "show", "welcome", "--version", "9", code=1))

    rows = table(run(runner, "list"))
    assert rows["name"][:5] == ["state", "version", "trigger", "steps", "goal"]
    assert rows["cart"][:5] == ["active", "1", "event signup", "5", "order_placed"]
    assert rows["welcome"][:5] == ["active", "3", "event signup", "2", "order_placed"]
    assert [w["name"] for w in json.loads(run(runner, "list", "--json"))] == ["cart", "welcome"]


@pytest.mark.parametrize(
    "document,message",
    [
        (
            WELCOME_YAML.replace("template: welcome}", "template: nope}", 1),
            "steps.hello.template: no template named 'nope'",
        ),
        (WELCOME_YAML.replace("then: done", "then: nowhere"), "steps.opened.then: leads to 'nowhere'"),
        (WELCOME_YAML.replace("duration: 2d", "duration: soon"), "steps.pause.duration: 'soon' is not a duration"),
        (
            WELCOME_YAML.replace(
                "- {id: pause, type: wait, duration: 2d}", "- {id: pause, type: score, points: 1, next: hello}"
            ),
            "form a cycle without a wait",
        ),
        (
            WELCOME_YAML.replace("trigger: {event: signup}", "trigger: {event: signup"),
            "definition: neither JSON nor YAML (line",
        ),
        ("", "definition: must be an object"),
    ],
    ids=["unknown-template", "branch-to-nowhere", "bad-duration", "cycle", "yaml-syntax", "empty"],
)
def test_a_bad_file_is_refused_naming_the_step(runner, tmp_path, document, message):
    source = tmp_path / "bad.yaml"
    source.write_text(document)
    assert message in said(run(runner, "save", "welcome", str(source), code=2))
    assert "No workflow named 'welcome'" in said(run(runner, "show", "welcome", code=1))


def test_a_missing_file_or_bad_name_is_refused(runner, tmp_path):
    assert "FILE: cannot read" in said(run(runner, "save", "welcome", str(tmp_path / "missing.yaml"), code=2))
    source = tmp_path / "welcome.yaml"
    source.write_text(WELCOME_YAML)
    assert "name: 'no spaces' is not a workflow name" in said(run(runner, "save", "no spaces", str(source), code=2))


def test_enrol_status_pause_resume_and_move(runner):
    run(runner, "save", "welcome", "-", input=WELCOME_YAML)
    for name in ("ann", "bob", "cy"):
        create_contact(f"{name}@example.org", attributes={"first_name": name.title()})
    assert said(run(runner, "enrol", "welcome", "--contact", "ann@example.org", "--property", "plan=pro")) == (
        "ann@example.org enrolled in workflow welcome"
    )
    assert "not enrolled" in said(run(runner, "enrol", "welcome", "--contact", "ann@example.org", code=1))
    run(runner, "enrol", "welcome", "--contact", "bob@example.org", "--property", "total=12")
    assert "No contact 'nobody@example.org'" in said(
        run(runner, "enrol", "welcome", "--contact", "nobody@example.org", code=1)
    )
    assert "--property: 'plan' is not KEY=VALUE" in said(
        run(runner, "enrol", "welcome", "--contact", "cy@example.org", "--property", "plan", code=2)
    )
    assert engine.advance().messages == 2

    status = run(runner, "status", "welcome")
    assert "workflow welcome: active, version 1, 2 enrolment(s)" in said(status)
    rows = table(status)
    assert list(rows) == ["step", "hello", "pause", "opened", "nudge", "done"]  # the header, then the steps in order
    assert rows["step"] == ["active", "held", "runs", "emails"]
    assert rows["hello"] == ["0", "0", "2", "2"]
    assert rows["pause"] == ["2", "0", "0", "0"]  # a wait leaves no run
    assert rows["nudge"] == ["0", "0", "0", "0"]
    assert "ended: none" in said(status) and "conversions: 0 (0.0% of enrolments)" in said(status)
    report = json.loads(run(runner, "status", "welcome", "--json"))
    assert (report["enrolled"], report["running"]) == (2, {"pause": {"active": 2}})

    assert said(run(runner, "pause", "welcome")) == "workflow welcome paused; 2 enrolment(s) held"
    assert table(run(runner, "status", "welcome"))["pause"] == ["0", "2", "0", "0"]
    assert said(run(runner, "resume", "welcome")) == "workflow welcome resumed; 2 enrolment(s) going on"
    run(runner, "save", "welcome", "-", input=WELCOME_YAML.replace("welcome series", "welcome series, v2"))
    assert said(run(runner, "move", "welcome", "--from-version", "1")) == (
        "2 enrolment(s) of workflow welcome moved to version 2"
    )
    assert "No workflow named 'nothing'" in said(run(runner, "status", "nothing", code=1))


def test_simulate_prints_the_path_with_dates_and_sends_nothing(runner):
    run(runner, "save", "welcome", "-", input=WELCOME_YAML)
    create_contact("ann@example.org", attributes={"first_name": "Ann"})

    path = run(runner, "simulate", "welcome", "--contact", "ann@example.org", "--start", "2026-03-02T08:00")
    header, *stops = rows(path)
    assert header == ["at (UTC)", "step", "type", "does"]
    assert stops == [
        ["2026-03-02 08:00", "hello", "send", "sends template 'welcome'"],
        ["2026-03-04 08:00", "pause", "wait", "waits until 2026-03-04T08:00Z"],
        ["2026-03-04 08:00", "opened", "branch", "condition does not hold: else"],
        ["2026-03-04 08:00", "nudge", "send", "sends template 'welcome'"],
        ["2026-03-04 08:00", "done", "exit", "exits"],
    ]

    opened = run(
        runner,
        "simulate",
        "welcome",
        "--contact",
        "ann@example.org",
        "--assume",
        "opened",
        "--start",
        "2026-03-02T08:00+02:00",
    )
    # An offset is read as given; times are shown in UTC.
    assert [row[:2] for row in rows(opened)[1:]] == [
        ["2026-03-02 06:00", "hello"],
        ["2026-03-04 06:00", "pause"],
        ["2026-03-04 06:00", "opened"],
        ["2026-03-04 06:00", "done"],
    ]
    converted = json.loads(
        run(runner, "simulate", "welcome", "--contact", "ann@example.org", "--assume", "order_placed", "--json")
    )
    assert [(stop["step"], stop["type"]) for stop in converted] == [
        ("hello", "send"),
        ("pause", "wait"),
        ("pause", "goal"),
    ]

    assert "--start: 'tuesday' is not an ISO time" in said(
        run(runner, "simulate", "welcome", "--contact", "ann@example.org", "--start", "tuesday", code=2)
    )
    assert "No contact 'nobody@example.org'" in said(
        run(runner, "simulate", "welcome", "--contact", "nobody@example.org", code=1)
    )
    report = json.loads(run(runner, "status", "welcome", "--json"))
    assert report["enrolled"] == 0 and not any(counted["runs"] for counted in report["steps"].values())  # nothing ran
