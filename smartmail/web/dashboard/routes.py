"""The dashboard's routes: sign-in with an API key, campaigns, one campaign, sites; read-only, server-rendered."""

from __future__ import annotations

import base64
import hashlib
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qs

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader
from starlette.concurrency import run_in_threadpool

from smartmail.access import keys
from smartmail.analytics import report_html
from smartmail.errors import NotFound, Unauthenticated
from smartmail.web.dashboard import pages, sessions
from smartmail.web.dashboard.sessions import LOGIN_CSRF_COOKIE, SESSION_COOKIE, Session

log = structlog.get_logger("smartmail.dashboard")

MAX_FORM_BYTES = 4096  # a key and a token
# Our own templates (not user-authored): autoescaped; the SVG charts come in as Markup from report_html.
_templates = Environment(loader=PackageLoader("smartmail.web.dashboard"), autoescape=True, auto_reload=False)
_STYLESHEET = files("smartmail.web.dashboard").joinpath("static/dashboard.css").read_bytes()


def _style_hash(style: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(style.encode()).digest()).decode() + "'"


# No scripts at all; styles from our stylesheet plus the trend legend's colour swatches (style
# attributes, allowed one by one through their hashes); forms post only to us.
CSP = (
    "default-src 'none'; style-src 'self' 'unsafe-hashes' "
    + " ".join(_style_hash(f"background:{colour}") for _, colour in report_html.LINES)
    + "; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {"Content-Security-Policy": CSP, "Cache-Control": "no-store", "Referrer-Policy": "same-origin"}

router = APIRouter(prefix="/dashboard", include_in_schema=False)


def _render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = _templates.get_template(name).render(**context)
    return HTMLResponse(html, status_code=status, headers=_HEADERS)


def _message(title: str, text: str, status: int, session: Session | None = None, **link: str) -> HTMLResponse:
    return _render("message.html", status, title=title, text=text, session=session, **link)


def _forbidden(why: str) -> HTMLResponse:
    log.warning("dashboard.csrf_refused", reason=why)
    return _message(
        "Forbidden",
        "The form was not accepted: it expired or did not come from this site. Go back, reload the page and try again.",
        403,
        link="/dashboard/login",
        link_text="Sign in",
    )


def _to_login(request: Request) -> RedirectResponse:
    response = RedirectResponse("/dashboard/login", status_code=303, headers={"Cache-Control": "no-store"})
    if SESSION_COOKIE in request.cookies:  # expired, revoked, or signed with another secret
        sessions.clear_cookie(response, SESSION_COOKIE)
    return response


async def _form(request: Request) -> dict[str, str] | None:
    """The urlencoded form's first value of each field, or None when the body is too large."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


@router.get("/static/dashboard.css")
def stylesheet() -> Response:
    return Response(_STYLESHEET, media_type="text/css", headers={"Cache-Control": "public, max-age=3600"})


@router.get("", response_class=RedirectResponse)
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard/", status_code=308)


def _login_form(error: str | None = None, status: int = 200) -> HTMLResponse:
    token = sessions.new_login_token()
    response = _render("login.html", status, title="Sign in", session=None, csrf=token, error=error)
    sessions.set_cookie(response, LOGIN_CSRF_COOKIE, token, sessions.LOGIN_CSRF_SECONDS)
    return response


@router.get("/login")
def login_page(request: Request) -> Response:
    if sessions.signed_in(request) is not None:
        return RedirectResponse("/dashboard/", status_code=303)
    return _login_form()


@router.post("/login")
async def login(request: Request) -> Response:
    if not sessions.origin_allowed(request):
        return _forbidden("origin")
    form = await _form(request)
    if form is None:
        return _message("Request too large", "The form is too large.", 413)
    if not sessions.login_token_matches(request.cookies.get(LOGIN_CSRF_COOKIE), form.get("csrf")):
        return _forbidden("login token")
    token = form.get("key", "").strip()
    try:
        principal = await run_in_threadpool(keys.authenticate, token)
    except Unauthenticated as exc:
        # The key is never logged: its id only, when it is shaped like one.
        log.info("dashboard.login_refused", reason=str(exc), key_id=keys.key_id_of(token))
        return _login_form("That API key is not valid: it is unknown, revoked or expired.", 401)
    if sessions.SCOPE not in principal.scopes:
        log.info("dashboard.login_refused", reason="scope", key_id=principal.key_id)
        return _login_form(f"That API key does not have the {sessions.SCOPE} scope the dashboard needs.", 403)
    session, cookie = sessions.new_session(principal.key_id)
    log.info("dashboard.login", key_id=principal.key_id, key_name=principal.name)
    response = RedirectResponse("/dashboard/", status_code=303, headers={"Cache-Control": "no-store"})
    sessions.set_cookie(response, SESSION_COOKIE, cookie, sessions.SESSION_SECONDS)
    sessions.clear_cookie(response, LOGIN_CSRF_COOKIE)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    if not sessions.origin_allowed(request):
        return _forbidden("origin")
    form = await _form(request)
    session = sessions.read_session(request.cookies.get(SESSION_COOKIE))
    if form is None or not sessions.logout_token_matches(session, form.get("csrf")):
        return _forbidden("logout token")
    assert session is not None  # the token matched one
    log.info("dashboard.logout", key_id=session.key_id)
    response = RedirectResponse("/dashboard/login", status_code=303, headers={"Cache-Control": "no-store"})
    sessions.clear_cookie(response, SESSION_COOKIE)
    return response


@router.get("/")
def campaigns(request: Request) -> Response:
    session = sessions.signed_in(request)
    if session is None:
        return _to_login(request)
    return _render("index.html", title="Campaigns", session=session, **pages.campaign_list())


@router.get("/campaigns/{name:path}")
def campaign(name: str, request: Request) -> Response:
    session = sessions.signed_in(request)
    if session is None:
        return _to_login(request)
    try:
        page = pages.campaign_page(name)
    except NotFound:
        return _message(
            "Not found", f"No campaign named {name!r}.", 404, session, link="/dashboard/", link_text="All campaigns"
        )
    return _render("campaign.html", title=f"Campaign {page['campaign']['name']}", session=session, **page)


@router.get("/sites")
def sites(request: Request) -> Response:
    session = sessions.signed_in(request)
    if session is None:
        return _to_login(request)
    return _render("sites.html", title="Sites", session=session, **pages.sites_page())
