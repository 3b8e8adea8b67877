"""The README's webhook verification snippets (Python, JavaScript: standard libraries) accept what SmartMail signs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import pytest

from smartmail.webhooks.signatures import headers_for, new_secret
from tests.conftest import ROOT

BODY = b'{"type":"sent","timestamp":"2026-12-04T12:00:00Z","data":{"id":1,"email":"\xc3\xa9@example.com"}}'


def _snippet(language: str, marker: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (block,) = [block for block in blocks if marker in block]
    return block


def _cases() -> list[tuple[str, bytes, dict[str, str], str, bool]]:
    old, new, other = new_secret(), new_secret(), new_secret()
    signed = headers_for("msg_1", BODY, [new, old])
    stale = headers_for("msg_2", BODY, [new], at=time.time() - 400)
    return [
        ("signed", BODY, signed, new, True),
        ("the previous secret during a rotation", BODY, signed, old, True),
        ("another secret", BODY, signed, other, False),
        ("an altered body", BODY + b" ", signed, new, False),
        ("a stale timestamp", BODY, stale, new, False),
    ]


def test_the_python_snippet_accepts_signed_deliveries_and_refuses_the_rest():
    namespace: dict = {}
    exec(_snippet("python", "def verify_webhook"), namespace)
    for name, body, headers, secret, expected in _cases():
        assert namespace["verify_webhook"](body, headers, secret) is expected, name


def test_the_javascript_snippet_accepts_signed_deliveries_and_refuses_the_rest():
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed")
    cases = [
        {"name": name, "body": body.decode("latin-1"), "headers": headers, "secret": secret, "expected": expected}
        for name, body, headers, secret, expected in _cases()
    ]
    script = _snippet("js", "function verifyWebhook") + (
        "\nconst cases = JSON.parse(process.argv[1]);\n"
        "console.log(JSON.stringify(cases.map((c) => "
        "verifyWebhook(Buffer.from(c.body, 'latin1'), c.headers, c.secret) === c.expected ? 'ok' : c.name)));\n"
    )
    result = subprocess.run([node, "-e", script, json.dumps(cases)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["ok"] * len(cases)
