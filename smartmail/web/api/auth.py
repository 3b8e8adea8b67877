"""The API's one security dependency: a bearer key, its per-key rate limit, then the operation's scope."""

from __future__ import annotations

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from starlette.concurrency import run_in_threadpool

from smartmail.access import keys, rate_limits
from smartmail.access.keys import Principal
from smartmail.errors import Unauthenticated
from smartmail.web.request_context import add_response_headers

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    bearerFormat="sm_<key id>_<secret>",
    description="An API key (`smartmail keys create`). Each operation lists the scope it needs.",
)


async def authenticate(token: str | None) -> Principal:
    """keys.authenticate, in a worker thread when it has to go to the database: a slow database
    (SQLite's writer lock) must not stall every request of the process's event loop."""
    if keys.needs_database(token):
        return await run_in_threadpool(keys.authenticate, token)
    return keys.authenticate(token)


async def authorize(
    request: Request,
    security_scopes: SecurityScopes,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
) -> Principal:
    """401 without a usable key, 429 past the key's rate (counted before the scope check: every
    authenticated request costs), 403 naming the scope the key lacks."""
    principal = await authenticate(credentials.credentials if credentials else None)
    state = request.scope.setdefault("state", {})
    state["key_id"] = principal.key_id
    decision = await rate_limits.take(principal)
    if decision.revoked:
        keys.forget(principal.key_id)
        raise Unauthenticated("revoked")
    add_response_headers(state, decision.headers())
    if not decision.allowed:
        raise HTTPException(
            429, f"This key is limited to {decision.limit} requests per {decision.window:g} s; retry later."
        )
    missing = [scope for scope in security_scopes.scopes if scope not in principal.scopes]
    if missing:
        raise HTTPException(
            403,
            f"This API key lacks the scope {missing[0]}.",
            headers={"WWW-Authenticate": f'Bearer realm="smartmail", error="insufficient_scope", scope="{missing[0]}"'},
        )
    return principal
