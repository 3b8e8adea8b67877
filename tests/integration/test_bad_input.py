"""Bad input gets an error naming the field, and nothing is stored or queued."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import redis
from sqlalchemy import func, select
from typer.testing import CliRunner

import smartmail
from smartmail.cli.main import app as cli
from smartmail.store.engine import session_scope
from smartmail.store.models import Message, Template
from tests.conftest import RUN_PREFIX


def nothing_stored_or_queued(redis_url: str) -> None:
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Message)) == 0
    assert redis.Redis.from_url(redis_url).llen(f"{RUN_PREFIX}transactional") == 0


def send_template(name: str, **context):
    return {"to": "ann@example.org", "template": name, "context": context}


BAD_SENDS = [
    ({"to": "not-an-address", "subject": "s", "text": "t"}, "to"),
    ({"to": "ann@example.org, bob@example.org", "subject": "s", "text": "t"}, "to"),
    ({"to": "ann@example.org\r\nBcc: victim@example.com", "subject": "s", "text": "t"}, "to"),
    ({"to": "ann@example.org", "from_": "nobody", "subject": "s", "text": "t"}, "from_"),
    (
        {"to": "ann@example.org", "reply_to": "x@example.com\nBcc: y@example.com", "subject": "s", "text": "t"},
        "reply_to",
    ),
    ({"to": "ann@example.org", "subject": "Hi\r\nBcc: victim@example.com", "text": "t"}, "subject"),
    (
        {
            "to": "ann@example.org",
            "subject": "Hi {{ name }}",
            "text": "t",
            "context": {"name": "x\r\nBcc: v@example.com"},
        },
        "subject",
    ),
    (
        {"to": "ann@example.org", "subject": "s", "text": "t", "headers": {"X-Ok": "a\r\nBcc: v@example.com"}},
        "headers.X-Ok",
    ),
    ({"to": "ann@example.org", "subject": "s", "text": "t", "headers": {"Bcc": "v@example.com"}}, "headers.Bcc"),
    ({"to": "ann@example.org", "subject": "s", "text": "t", "headers": {"Bad Name": "x"}}, "headers"),
    ({"to": "ann@example.org", "template": "no-such-template"}, "template"),
    ({"to": "ann@example.org", "template": "welcome", "subject": "also inline"}, "template"),
    ({"to": "ann@example.org", "subject": "{% if %}", "text": "t"}, "template"),
    ({"to": "ann@example.org", "subject": "s", "text": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}, "template"),
    ({"to": "ann@example.org", "subject": "s", "html": "{{ cycler.__init__.__globals__ }}"}, "template"),
    ({"to": "ann@example.org", "template": "welcome", "context": {}}, "template"),  # first_name is undefined
    ({"to": "ann@example.org", "subject": "s", "text": "t", "tags": ["x" * 65]}, "tags"),
    ({"to": "ann@example.org", "subject": "s", "text": "t", "surprise": 1}, "send"),
]


@pytest.mark.parametrize("spec,field", BAD_SENDS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_SENDS)])
def test_bad_send_names_the_field_and_queues_nothing(env, spec, field):
    with pytest.raises(smartmail.InvalidMessage) as error:
        smartmail.send_many([spec])
    assert error.value.field == field, str(error.value)
    assert str(error.value).startswith(f"{field}: ")
    nothing_stored_or_queued(env["SMARTMAIL_REDIS_URL"])


def test_template_errors_name_template_and_line(env, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "subject.txt").write_text("Hello")
    (broken / "body.html").write_text("<p>line one</p>\n<p>{{ user.name }</p>\n")
    escape = tmp_path / "escape"
    escape.mkdir()
    (escape / "subject.txt").write_text("Hello")
    (escape / "body.html").write_text("<p>ok</p>\n\n{{ ''.__class__.__base__.__subclasses__() }}\n")
    monkeypatch.setenv("SMARTMAIL_TEMPLATES_DIR", str(tmp_path))
    from tests.conftest import reset_caches

    reset_caches()
    with pytest.raises(smartmail.InvalidMessage, match=r"broken/body.html, line 2: unexpected '}'"):
        smartmail.send("ann@example.org", template="broken")
    with pytest.raises(smartmail.InvalidMessage, match=r"escape/body.html, line 3: not allowed by the sandbox"):
        smartmail.send("ann@example.org", template="escape")
    nothing_stored_or_queued(env["SMARTMAIL_REDIS_URL"])


def test_one_bad_message_in_a_batch_stores_none_of_them(env):
    specs = [{"to": f"user{i}@example.com", "subject": "s", "text": "t"} for i in range(5)]
    specs[3]["to"] = "broken@"
    with pytest.raises(smartmail.InvalidMessage) as error:
        smartmail.send_many(specs)
    assert error.value.field == "messages[3].to"
    nothing_stored_or_queued(env["SMARTMAIL_REDIS_URL"])


runner = CliRunner()


def test_cli_send_reports_bad_input_with_exit_code_2(env):
    result = runner.invoke(cli, ["send", "--to", "nobody", "--subject", "s", "--text", "t"])
    assert result.exit_code == 2
    assert "to: " in result.output and "@-sign" in result.output
    result = runner.invoke(
        cli,
        ["send", "--to", "ann@example.org", "--subject", "s", "--text", "t", "--header", "X-A:b\r\nBcc: v@example.com"],
    )
    assert result.exit_code == 2 and "headers.X-A" in result.output
    nothing_stored_or_queued(env["SMARTMAIL_REDIS_URL"])


def test_cli_send_file_reports_which_message_is_bad(env, tmp_path):
    path = tmp_path / "batch.json"
    path.write_text(
        json.dumps([{"to": "a@example.com", "subject": "s", "text": "t"}, {"to": "b@example.com", "template": "nope"}])
    )
    result = runner.invoke(cli, ["send", "--file", str(path)])
    assert result.exit_code == 2 and "messages[1].template" in result.output
    path.write_text("{not json")
    result = runner.invoke(cli, ["send", "--file", str(path)])
    assert result.exit_code == 2 and "not valid JSON" in result.output
    nothing_stored_or_queued(env["SMARTMAIL_REDIS_URL"])


def test_cli_send_and_status(env):
    result = runner.invoke(
        cli,
        [
            "send",
            "--to",
            "Ann <ann@example.org>",
            "--template",
            "welcome",
            "--context",
            json.dumps({"first_name": "Ann", "email": "ann@example.org"}),
            "--tag",
            "signup",
        ],
    )
    assert result.exit_code == 0, result.output
    message_id, state = result.output.split()[:2]
    assert state == "queued"
    shown = runner.invoke(cli, ["status", message_id, "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)["subject"] == "Welcome to SmartMail, Ann!"
    missing = runner.invoke(cli, ["status", "01NOSUCHMESSAGE000000000000"])
    assert missing.exit_code == 1 and "no message" in missing.output


def test_cli_refuses_a_template_with_a_syntax_error(env, tmp_path):
    html = tmp_path / "body.html"
    html.write_text("<p>{% for x in %}</p>")
    result = runner.invoke(cli, ["templates", "save", "promo", "--subject", "Hi", "--html-file", str(html)])
    assert result.exit_code == 2 and "line 1" in result.output
    html.write_text("<p>Hi {{ name }}</p>")
    assert (
        runner.invoke(cli, ["templates", "save", "promo", "--subject", "Hi", "--html-file", str(html)]).exit_code == 0
    )
    with session_scope() as session:
        assert [(t.name, t.version) for t in session.scalars(select(Template))] == [("promo", 1)]


def test_missing_settings_fail_at_start_naming_the_variable(tmp_path):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SMARTMAIL_")}
    clean["SMARTMAIL_SMTP_URL"] = "http://relay.example.com"
    result = subprocess.run(
        [sys.executable, "-m", "smartmail.cli.main", "send", "--to", "a@example.com"],
        env=clean,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    for variable in ("SMARTMAIL_DEFAULT_SENDER", "SMARTMAIL_SECRET_KEY", "SMARTMAIL_SMTP_URL"):
        assert variable in result.stderr, result.stderr


SANDBOX_LIMITS = [
    ("{% include 'db/welcome@1/html' %}", "include, import and extends are not allowed"),
    ("{% extends 'file/templates/welcome/body.html' %}", "include, import and extends are not allowed"),
    ("{{ 'x' * 10000000 }}", "result longer than"),
    ("{{ 10 ** 100000 }}", "exponent too large"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursion"),
]


@pytest.mark.parametrize("html,message", SANDBOX_LIMITS, ids=["include", "extends", "repeat", "power", "recursion"])
def test_templates_cannot_include_others_or_exhaust_the_producer(env, html, message):
    with pytest.raises(smartmail.InvalidMessage, match=message) as error:
        smartmail.send("ann@example.org", subject="s", html=html)
    assert error.value.field == "template"
    nothing_stored_or_queued(env["SMARTMAIL_REDIS_URL"])
