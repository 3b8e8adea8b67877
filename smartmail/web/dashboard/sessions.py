"""The dashboard's signed session cookie and its CSRF tokens: no server-side session store, no secret in a cookie."""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import Response

from smartmail.access import keys
from smartmail.config import get_settings
from smartmail.content import signing
from smartmail.errors import Unauthenticated

SESSION_COOKIE = "smartmail_dashboard"
LOGIN_CSRF_COOKIE = "smartmail_dashboard_csrf"
COOKIE_PATH = "/dashboard"
SESSION_SECONDS = 8 * 3600
LOGIN_CSRF_SECONDS = 3600  # a login form left open longer is simply shown again
SCOPE = "analytics:read"
_SESSION_PURPOSE = "dashboard-session"
_LOGOUT_PURPOSE = "dashboard-logout"  # its own key: a logout token never verifies as a session signature


@dataclass(frozen=True)
class Session:
    """A signed-in operator: the API key's id (never its secret), a random session id, when it ends."""

    key_id: str
    session_id: str
    expires_at: int  # Unix seconds

    @property
    def logout_token(self) -> str:
        return signing.signature(self.session_id, _LOGOUT_PURPOSE)


def _payload(key_id: str, session_id: str, expires_at: int) -> str:
    return f"{key_id}.{session_id}.{expires_at}"


def new_session(key_id: str, *, now: float | None = None) -> tuple[Session, str]:
    """A session for the key and its cookie value `<key id>.<session id>.<expiry>.<signature>`."""
    session = Session(key_id, secrets.token_urlsafe(16), int(now if now is not None else time.time()) + SESSION_SECONDS)
    payload = _payload(session.key_id, session.session_id, session.expires_at)
    return session, f"{payload}.{signing.signature(payload, _SESSION_PURPOSE)}"


def read_session(value: str | None, *, now: float | None = None) -> Session | None:
    """The session a cookie value holds when its signature matches and it has not expired, else None.
    The key itself is checked by `signed_in`."""
    parts = (value or "").split(".")
    if len(parts) != 4 or not parts[2].isascii() or not parts[2].isdigit():
        return None
    key_id, session_id, expires, given = parts
    if not signing.matches(given, _payload(key_id, session_id, int(expires)), _SESSION_PURPOSE):
        return None
    if int(expires) <= (now if now is not None else time.time()):
        return None
    return Session(key_id, session_id, int(expires))


def signed_in(request: Request) -> Session | None:
    """The request's session when its cookie is valid and its key is still active (not revoked or
    expired) and still holds analytics:read; None otherwise. Checked on every request."""
    session = read_session(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return None
    try:
        principal = keys.check_key(session.key_id)
    except Unauthenticated:
        return None
    return session if SCOPE in principal.scopes else None


def _secure() -> bool:
    return urlsplit(get_settings().public_url).scheme == "https"


def set_cookie(response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path=COOKIE_PATH, httponly=True, samesite="lax", secure=_secure())


def clear_cookie(response: Response, name: str) -> None:
    response.delete_cookie(name, path=COOKIE_PATH, httponly=True, samesite="lax", secure=_secure())


def new_login_token() -> str:
    """The double-submit token of a login form: the same random value in a cookie and a hidden field."""
    return secrets.token_urlsafe(32)


def login_token_matches(cookie: str | None, field: str | None) -> bool:
    return bool(cookie) and bool(field) and hmac.compare_digest(str(cookie).encode(), str(field).encode())


def logout_token_matches(session: Session | None, field: str | None) -> bool:
    return session is not None and bool(field) and hmac.compare_digest(session.logout_token, str(field))


def origin_allowed(request: Request) -> bool:
    """No Origin header (older browsers, some tools), or the public URL's origin, or this request's host's."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    public = urlsplit(get_settings().public_url)
    host = request.headers.get("host", "")
    return origin in (f"{public.scheme}://{public.netloc}", f"{request.url.scheme}://{host}")
