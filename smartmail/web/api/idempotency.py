"""ASGI middleware for /v1: no NUL in a query (422); for writes the body-size limit (413) and `Idempotency-Key`.

The first response to a key is stored in Redis per API key, with a fingerprint of the request, and
replayed for a retry (`Idempotent-Replayed: true`); the same key with another request → 422; a retry
while the first is still running → 409. Records expire after `api_idempotency_seconds` (24 h). A
send through POST /v1/messages is also keyed in the database (the message-level idempotency key),
so a retry after a Redis loss still cannot send twice.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

import redis
import structlog
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from smartmail.access.rate_limits import async_redis
from smartmail.config import get_settings
from smartmail.errors import Unauthenticated
from smartmail.web.api.auth import authenticate
from smartmail.web.problems import problem

log = structlog.get_logger("smartmail.web")

_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Routes that stream their own body (to disk) and check its size themselves.
STREAMED_PATHS = frozenset({"/v1/imports"})
IN_FLIGHT_MS = 10 * 60 * 1000  # a first request still unanswered after this is taken as dead
_NUL = "must not contain NUL characters"
IN_FLIGHT_RETRY_SECONDS = 1  # what a 409 for a request still in flight tells the client to wait
# Responses that say nothing about the request itself, or changed nothing (a malformed body, a
# client gone mid-upload): a retry runs it again.
_NOT_STORED = frozenset({400, 401, 403, 408, 429})
# Answers holding a secret (a new API key, a webhook endpoint's signing secret) are never stored,
# not even in Redis for a day.
SECRET_PATHS = re.compile(r"/v1/keys|/v1/webhooks(/\d+/rotate-secret)?")
# Headers a replay repeats; per-request ones (request id, rate limits) are the retry's own.
_REPLAYED = frozenset({b"content-type", b"location"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


async def _authenticated_key_id(scope: Scope) -> str | None:
    """The id of the request's key once its secret checks out: records are per key, and a replay must
    never answer someone who only knows a key's id."""
    value = _header(scope, b"authorization")
    if not value or value[:7].lower() != "bearer ":
        return None
    try:
        key_id = (await authenticate(value[7:].strip())).key_id
    except Unauthenticated:
        return None
    scope.setdefault("state", {})["key_id"] = key_id
    return key_id


class ApiWrites:
    """No NUL in any /v1 request's query; then, for writes, the size limit and `Idempotency-Key`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if (refusal := _nul_in_url(scope)) is not None:
            await refusal(scope, receive, send)
            return
        if scope["method"] not in _WRITES:
            await self.app(scope, receive, send)
            return
        streamed = scope["path"] in STREAMED_PATHS
        body = b""
        if not streamed:
            try:
                read = await _read_body(scope, receive, get_settings().api_max_body_bytes)
            except _ClientGone:
                return
            if read is None:
                limit = get_settings().api_max_body_bytes
                await problem(413, f"The request body is larger than {limit} bytes.", max_bytes=limit)(
                    scope, receive, send
                )
                return
            body = read
            receive = _replay(body, receive)
        idempotency_key = _header(scope, b"idempotency-key")
        key_id = (
            await _authenticated_key_id(scope) if idempotency_key is not None and scope["method"] == "POST" else None
        )
        if idempotency_key is None or key_id is None or SECRET_PATHS.fullmatch(scope["path"]):
            await self.app(scope, receive, send)  # without a valid key the app answers 401
            return
        if not _KEY.fullmatch(idempotency_key):
            await problem(400, "Idempotency-Key: must be 1 to 255 visible ASCII characters.")(scope, receive, send)
            return
        fingerprint = _fingerprint(scope, body, streamed)
        await _idempotent(self.app, scope, receive, send, key_id, idempotency_key, fingerprint)


def _nul_in_url(scope: Scope) -> JSONResponse | None:
    """A 422 naming the query parameter that holds a NUL, which PostgreSQL stores in no text column;
    None when there is none. (Path parameters are the routers' to check: they name the field.)"""
    query = scope.get("query_string", b"")
    if b"%00" not in query and b"\x00" not in query:
        return None
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            error = {"parameter": name.replace("\x00", ""), "in": "query", "detail": _NUL}
            return problem(422, f"{error['parameter']}: {_NUL}", errors=[error])
    return None


class _ClientGone(Exception):
    """The client disconnected before its body ended: there is no one to answer."""


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes `limit` bytes (Content-Length or counted);
    _ClientGone when the client leaves midway (a truncated body must not be run, nor recorded)."""
    length = _header(scope, b"content-length")
    if length is not None and length.isascii() and length.isdigit() and int(length) > limit:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # the disconnect, when the client goes away

    return replayed


def _fingerprint(scope: Scope, body: bytes, streamed: bool) -> str:
    digest = hashlib.sha256(f"{scope['method']} {scope['path']}?{scope.get('query_string', b'').decode()}\n".encode())
    if streamed:  # an upload is not held in memory: its size and media type stand for it
        # Without the multipart boundary, which a client draws afresh for each attempt.
        media_type = (_header(scope, b"content-type") or "").split(";", 1)[0].strip().lower()
        digest.update(f"{_header(scope, b'content-length')} {media_type}".encode())
    else:
        digest.update(body)
    return digest.hexdigest()


def _record_key(key_id: str, idempotency_key: str) -> str:
    hashed = hashlib.sha256(idempotency_key.encode()).hexdigest()[:40]
    return f"{get_settings().redis_key_prefix}smartmail:idempotency:{key_id}:{hashed}"


async def _idempotent(
    app: Callable[[Scope, Receive, Send], Awaitable[None]],
    scope: Scope,
    receive: Receive,
    send: Send,
    key_id: str,
    idempotency_key: str,
    fingerprint: str,
) -> None:
    client = async_redis()
    record_key = _record_key(key_id, idempotency_key)
    try:
        claimed = await client.set(record_key, json.dumps({"fingerprint": fingerprint}), nx=True, px=IN_FLIGHT_MS)
        stored = None if claimed else await client.get(record_key)
    except redis.RedisError as exc:
        # Without Redis the request runs unprotected (sends stay keyed in the database); say so.
        log.warning("api.idempotency_unchecked", error=str(exc))
        await app(scope, receive, send)
        return
    if not claimed:
        await _answer_retry(scope, receive, send, stored, fingerprint)
        return
    status, headers, chunks = 500, [], []

    async def capture(message: Message) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
        await send(message)

    try:
        await app(scope, receive, capture)
    finally:
        await _store(client, record_key, fingerprint, status, headers, b"".join(chunks))


async def _store(client, record_key: str, fingerprint: str, status: int, headers: list, body: bytes) -> None:
    try:
        if status >= 500 or status in _NOT_STORED:
            await client.delete(record_key)
            return
        record = {
            "fingerprint": fingerprint,
            "status": status,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers if k.lower() in _REPLAYED],
            "body": base64.b64encode(body).decode(),
        }
        ttl_ms = int(get_settings().api_idempotency_seconds * 1000)
        await client.set(record_key, json.dumps(record), px=ttl_ms)
    except redis.RedisError as exc:
        log.warning("api.idempotency_not_stored", error=str(exc))


def _in_flight() -> JSONResponse:
    # A machine-readable code and a Retry-After, so a client's retry loop needs no string matching.
    return problem(
        409,
        "A request with this Idempotency-Key is still being processed; retry later.",
        headers={"Retry-After": str(IN_FLIGHT_RETRY_SECONDS)},
        code="idempotency_in_flight",
    )


async def _answer_retry(
    scope: Scope, receive: Receive, send: Send, stored: bytes | str | None, fingerprint: str
) -> None:
    record = json.loads(stored) if stored is not None else None  # None: expired between the two calls
    if record is not None and record["fingerprint"] != fingerprint:
        response = problem(
            422, "Idempotency-Key: was already used for a different request.", code="idempotency_key_reused"
        )
    elif record is None or "status" not in record:
        response = _in_flight()
    else:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in record["headers"]]
        headers.append((b"idempotent-replayed", b"true"))
        await send({"type": "http.response.start", "status": record["status"], "headers": headers})
        await send({"type": "http.response.body", "body": base64.b64decode(record["body"])})
        return
    await response(scope, receive, send)
