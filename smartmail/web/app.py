"""The FastAPI app: the HTTP API (/v1, /docs), tracking links, unsubscribe pages, hooks, health, metrics, dashboard."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html import escape
from http import HTTPStatus
from urllib.parse import parse_qs

import anyio.to_thread
import structlog
from fastapi import FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from smartmail import __version__
from smartmail.audience.unsubscribe import unsubscribe
from smartmail.config import get_settings
from smartmail.content.unsubscribe_links import read_token
from smartmail.errors import InvalidToken, SettingsError
from smartmail.store.engine import reader, serve_threads
from smartmail.store.models import Contact, ContactStatus
from smartmail.web import docs, hooks, metrics, openapi, problems, tracking
from smartmail.web.api import routes as api_routes
from smartmail.web.api.idempotency import ApiWrites
from smartmail.web.dashboard import routes as dashboard
from smartmail.web.problems import COMMON_HEADERS
from smartmail.web.request_context import RequestContext

log = structlog.get_logger("smartmail.web")

API_DESCRIPTION = """SmartMail's HTTP API, version 1. Authenticate with `Authorization: Bearer <API key>`;
each operation names the scope its key needs. Errors are RFC 9457 problem+json documents; lists are
paginated with `limit` and `cursor` (`next_cursor`); POSTs accept an `Idempotency-Key` header."""
# A one-click POST body is `List-Unsubscribe=One-Click` (RFC 8058 section 3.2); nothing legitimate
# is anywhere near this size.
MAX_FORM_BYTES = 8192

# The pages' only style, allowed by its hash so the policy needs neither 'unsafe-inline' nor a
# stylesheet route. No scripts, images, frames or plugins; forms may only post back to us.
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:34rem;margin:4rem auto;padding:0 1rem;"
    "line-height:1.5;color:#222}button{font:inherit;padding:.5rem 1.25rem;cursor:pointer}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
HTML_CSP = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# Unsubscribe pages name a person: never cached by a browser or proxy, never framed (clickjacking).
HTML_HEADERS = {
    **COMMON_HEADERS,
    "Content-Security-Policy": HTML_CSP,
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

_HTML_PATHS = re.compile(r"/(unsubscribe|dashboard)(/|$)")
# A multipart/form-data part named List-Unsubscribe whose value is One-Click (RFC 7578).
_ONE_CLICK_PART = re.compile(rb'name="List-Unsubscribe"\r?\n(?:[^\r\n]+\r?\n)*\r?\nOne-Click\r?\n')


class SecurityHeaders:
    """ASGI middleware: the common headers on every response, the HTML ones on every text/html one
    (error pages included). A header a route set itself is kept."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", []))
                headers = MutableHeaders(scope=message)
                html = headers.get("content-type", "").startswith("text/html")
                for name, value in (HTML_HEADERS if html else COMMON_HEADERS).items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --- HTML pages -------------------------------------------------------------------------------------


def _page(
    title: str,
    paragraphs: list[str],
    *,
    status: int = 200,
    form: str | None = None,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    """A small page. `title`, `paragraphs` and `form` (a button label) are plain text: all escaped here."""
    body = "".join(f"<p>{escape(p)}</p>" for p in paragraphs)
    if form is not None:
        # No action attribute: the form posts to this page's own URL, so nothing is reflected.
        body += f'<form method="post"><button type="submit">{escape(form)}</button></form>'
    document = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<meta name="robots" content="noindex"><title>{escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><main><h1>{escape(title)}</h1>{body}</main></body></html>"
    )
    return HTMLResponse(document, status_code=status, headers={**HTML_HEADERS, **(headers or {})})


def _invalid_link() -> HTMLResponse:
    return _page(
        "This unsubscribe link is invalid",
        [
            (
                "It may have been cut short or changed on the way. Use the unsubscribe link in the most "
                "recent email you received from us, or reply to that email and ask to be unsubscribed."
            )
        ],
        status=400,
    )


def _contact(contact_id: int) -> tuple[str, str] | None:
    """(email, status), or None for an unknown (erased) contact. A read without the write lock."""
    with reader() as connection:
        row = connection.execute(select(Contact.email, Contact.status).where(Contact.id == contact_id)).first()
    return None if row is None else (row.email, row.status)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None past `limit` bytes (read no further than that)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _source(body: bytes, content_type: str) -> str:
    """`one-click` for an RFC 8058 POST from a mailbox provider, `page` for our own form (or
    anything else: the signed token in the URL is what authorizes the unsubscribe, not the body)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/x-www-form-urlencoded":
        form = parse_qs(body.decode("latin-1"), keep_blank_values=True)
        if form.get("List-Unsubscribe") == ["One-Click"]:
            return "one-click"
    elif media_type == "multipart/form-data" and _ONE_CLICK_PART.search(body):  # RFC 8058 allows it too
        return "one-click"
    return "page"


# --- Errors: problem+json, HTML on the pages ------------------------------------------------------


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if _HTML_PATHS.match(request.url.path):
        status = exc.status_code
        detail = exc.detail if exc.detail != HTTPStatus(status).phrase else "There is nothing at this URL."
        return _page(HTTPStatus(status).phrase, [str(detail)], status=status, headers=dict(exc.headers or {}))
    return await problems.http_error(request, exc)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    if _HTML_PATHS.match(request.url.path):
        request_id = problems.log_unexpected(request)
        headers = {"X-Request-Id": request_id} if request_id else None
        return _page("Something went wrong", ["Please try again in a few minutes."], status=500, headers=headers)
    return await problems.unexpected_error(request, exc)


# --- The app -------------------------------------------------------------------------------------------


def _cors_origins() -> list[str]:
    # Importing the module must not need a configuration (tests and tools import `app` first).
    try:
        return get_settings().api_cors_origins
    except SettingsError:
        return []


@asynccontextmanager
async def _lifespan(_app: FastAPI) -> AsyncIterator[None]:
    # Sync routes run on anyio's thread pool (40 threads by default), each holding a database
    # connection while it works: as many threads as connections, so the pools never overflow.
    threads = get_settings().web_threads
    anyio.to_thread.current_default_thread_limiter().total_tokens = threads
    serve_threads(threads)
    yield
    await tracking.flush_on_shutdown()


def create_app() -> FastAPI:
    app = FastAPI(
        lifespan=_lifespan,
        title="SmartMail",
        version=__version__,
        description=API_DESCRIPTION,
        openapi_url="/v1/openapi.json",
        docs_url=None,  # served by smartmail.web.docs from our own origin, not a CDN
        redoc_url=None,
    )
    problems.install(app)
    openapi.complete(app)
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)
    # Outermost last: the request id wraps everything, the security headers every response; the
    # tracking links are answered before all of it.
    app.add_middleware(ApiWrites)
    app.add_middleware(SecurityHeaders)
    if origins := _cors_origins():  # off by default: API keys belong on servers, not in browsers
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PATCH", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-Id"],
            expose_headers=["RateLimit", "RateLimit-Policy", "Retry-After", "X-Request-Id", "Location"],
        )
    app.add_middleware(RequestContext)
    app.add_middleware(tracking.TrackingFront)
    app.include_router(api_routes.router)
    app.include_router(hooks.router)
    app.include_router(metrics.router)
    app.include_router(dashboard.router)  # HTML pages, not in the OpenAPI schema
    docs.install(app)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """200 when the database answers `select 1`, else a 503 problem."""
        try:
            with reader() as connection:
                connection.execute(text("select 1"))
        except SQLAlchemyError as exc:
            log.warning("web.healthz_failed", error=str(exc))
            raise HTTPException(503, "The database is not reachable.") from None
        return {"status": "ok"}

    # GET never unsubscribes: link scanners and mail previews fetch links (RFC 8058 section 1).
    @app.get("/unsubscribe/{token}", response_class=HTMLResponse, include_in_schema=False)
    def unsubscribe_page(token: str) -> HTMLResponse:
        try:
            contact_id, _campaign_id = read_token(token)
        except InvalidToken:
            return _invalid_link()
        contact = _contact(contact_id)
        if contact is not None and contact[1] == ContactStatus.UNSUBSCRIBED.value:
            return _page(
                "You are unsubscribed",
                [f"{contact[0]} is already unsubscribed; you will not receive these emails any more."],
            )
        whom = contact[0] if contact is not None else "your address"
        return _page("Unsubscribe", [f"Stop sending emails to {whom}?"], form="Unsubscribe")

    # Our form's target and the RFC 8058 one-click endpoint: providers POST
    # `List-Unsubscribe=One-Click` without cookies, so the signed token in the URL is the authority.
    # Synchronous: the contact is suppressed before the response says so.
    @app.post("/unsubscribe/{token}", response_class=HTMLResponse, include_in_schema=False)
    async def unsubscribe_submit(token: str, request: Request) -> HTMLResponse:
        try:
            contact_id, campaign_id = read_token(token)
        except InvalidToken:
            return _invalid_link()
        body = await _read_body(request, MAX_FORM_BYTES)
        if body is None:
            return _page("Request too large", ["The request body is too large."], status=413)
        source = _source(body, request.headers.get("content-type", ""))
        await run_in_threadpool(unsubscribe, contact_id, campaign_id, source=source)
        return _page("You are unsubscribed", ["You will not receive these emails any more."])

    return app


app = create_app()
