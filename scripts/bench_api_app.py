"""Bench-only ASGI app: the product app plus POST /v1/bench-open/messages, the same handler without the key check.

Served by scripts/bench_api.py (`uvicorn bench_api_app:app --app-dir scripts`) to price the auth +
rate-limit layer; it is never part of the product.
"""

from __future__ import annotations

from fastapi import Response

from smartmail.access.keys import Principal
from smartmail.web.api import messages
from smartmail.web.app import create_app

OPEN_PATH = "/v1/bench-open/messages"
# What authorize() would have returned for a key holding messages:send.
BENCH_PRINCIPAL = Principal("benchopen0000000", "bench", frozenset({"messages:send"}), None, None)

app = create_app()


@app.post(OPEN_PATH, status_code=202, response_model=messages.Accepted, include_in_schema=False)
def send_unauthenticated(
    body: messages.MessageIn, response: Response, idempotency_key: messages.IdempotencyKey = None
) -> messages.Accepted:
    return messages.send_message(body, response, BENCH_PRINCIPAL, idempotency_key)
