"""ASGI middleware: an X-Request-Id on every request and log line, headers left by dependencies, one access line."""

from __future__ import annotations

import re
import time
import uuid

import structlog
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from smartmail.access import keys

log = structlog.get_logger("smartmail.web")

# A caller's own id is kept when it is short and plain (it ends up in log lines and headers):
# UUIDs, hex, W3C traceparent values and base64 fit; spaces, quotes and control characters do not.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}")
_ADDRESS_LOCAL_PART = re.compile(r"[^/@]+@")
# scope["state"] key under which dependencies leave headers for the response, whatever it is (an error too).
RESPONSE_HEADERS = "response_headers"


def request_id_of(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(text) and keys.redact(text) == text:  # a key sent as an id is no id
                return text
    return uuid.uuid4().hex


class RequestContext:
    """Binds `request_id` (taken or made) into structlog's context for the request's log lines,
    echoes it, adds the headers left in scope state (rate limits, deprecation), logs one line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id  # for the 500 handler, which Starlette runs outside this middleware
        started = time.perf_counter()
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-Id"] = request_id
                for name, value in state.get(RESPONSE_HEADERS, {}).items():
                    headers.setdefault(name, value)
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_headers)
            finally:
                log.info(
                    "web.request",
                    method=scope["method"],
                    path=loggable_path(scope["path"]),
                    status=status,
                    ms=round((time.perf_counter() - started) * 1000, 2),
                    key_id=state.get("key_id"),
                )


_TRACKING = ("/t/c/", "/t/o/")


def loggable_path(path: str) -> str:
    """A request path fit for a log line: never a key pasted in it, nor whose address it names
    (`/v1/contacts/*@example.org`). The query string is never logged (a cursor, an address)."""
    if path.startswith(_TRACKING):  # a tracking token holds the URL clicked, which may name someone
        return path[: len(_TRACKING[0]) if path.startswith(_TRACKING[0]) else len(_TRACKING[1])] + "*"
    return _ADDRESS_LOCAL_PART.sub("*@", keys.redact(path))


def add_response_headers(scope_state: dict, headers: dict[str, str]) -> None:
    scope_state.setdefault(RESPONSE_HEADERS, {}).update(headers)
