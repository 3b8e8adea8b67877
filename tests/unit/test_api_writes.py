"""The /v1 write guard and cursors, without a server: a body cut short is never run; cursors hold storable values."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from fastapi import HTTPException

from smartmail import runtime
from smartmail.web.api.idempotency import ApiWrites
from smartmail.web.api.pagination import decode_cursor


def _cursor(position) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("position", "types"),
    [(["\ud800"], (str,)), (["a\x00"], (str,)), ([2**63], (int,)), ([-(2**63) - 1], (int,)), ([1.5], (int,))],
)
def test_a_cursor_holding_what_the_database_cannot_compare_is_a_422(position, types):
    with pytest.raises(HTTPException) as refused:
        decode_cursor(_cursor(position), types)
    assert refused.value.status_code == 422


def test_a_cursor_this_api_made_decodes():
    assert decode_cursor(_cursor(["01J", 2**63 - 1]), (str, int)) == ["01J", 2**63 - 1]


def test_a_body_cut_short_by_a_disconnect_is_neither_run_nor_answered(monkeypatch):
    monkeypatch.setenv("SMARTMAIL_DEFAULT_SENDER", "SmartMail <noreply@example.com>")
    monkeypatch.setenv("SMARTMAIL_SECRET_KEY", "unit-test-secret-key-0123456789")
    runtime.reset()
    called, sent = [], []

    async def app(scope, receive, send):
        called.append(scope["path"])

    cut_short = {"type": "http.request", "body": b'{"to": "a@exa', "more_body": True}
    messages = iter([cut_short, {"type": "http.disconnect"}])

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/messages", "headers": [], "query_string": b""}
    asyncio.run(ApiWrites(app)(scope, receive, send))
    assert called == [] and sent == []
    runtime.reset()
