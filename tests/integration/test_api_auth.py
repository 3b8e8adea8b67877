"""The auth matrix: every /v1 route of the app × every kind of bad key, against a real `smartmail web`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

import pytest
from fastapi.routing import iter_route_contexts
from sqlalchemy import update

from smartmail.access import keys
from smartmail.access.scopes import SCOPES
from smartmail.store.engine import session_scope, utcnow
from smartmail.store.models import ApiKey
from smartmail.web.app import app

# Generous enough that the matrix's requests never meet the key's rate limit.
RATE = {"rate_limit": 10_000.0}


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # with each path parameter filled in
    scopes: tuple[str, ...]


def operations() -> list[Operation]:
    """Every /v1 route the app serves, from app.routes, with the scopes its OpenAPI operation names:
    a router added later is covered as soon as it is mounted."""
    documented = app.openapi()["paths"]
    found = []
    for route in iter_route_contexts(app.routes):
        path = route.path_format or ""  # `{name}` for `{name:path}`, as the document has it
        if not path.startswith("/v1/") or path == app.openapi_url:
            continue
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue
            operation = documented.get(path, {}).get(method.lower())
            assert operation is not None, f"{method} {path} is not in the OpenAPI document"
            requirements = operation.get("security") or []
            scopes = tuple(scope for requirement in requirements for scope in requirement.get("apiKey", []))
            assert scopes, f"{method} {path} names no scope: every /v1 operation needs a key with one"
            found.append(Operation(method, re.sub(r"\{[^}]+\}", "1", path), scopes))
    return found


def _expired_key() -> str:
    token = keys.create_key("expired", list(SCOPES), expires_at=utcnow() + timedelta(hours=1), **RATE)[1]
    with session_scope() as session:  # create_key refuses a past expiry, as it should
        key_id = keys.key_id_of(token)
        session.execute(update(ApiKey).where(ApiKey.id == key_id).values(expires_at=utcnow() - timedelta(seconds=1)))
    return token


def _revoked_key() -> str:
    token = keys.create_key("revoked", list(SCOPES), **RATE)[1]
    keys.revoke_key(keys.key_id_of(token) or "")
    return token


def test_every_route_refuses_every_bad_key_and_names_the_missing_scope(api):
    ops = operations()
    assert any(op.path == "/v1/messages" and op.method == "POST" for op in ops)  # the generator finds routes
    issued = api.key(**RATE)
    unknown = issued[:-1] + ("A" if issued[-1] != "A" else "B")  # a key's id with a wrong secret
    unauthenticated = {
        "missing": None,
        "malformed": "sm_not-a-key",
        "unknown": unknown,
        "never issued": "sm_0123456789abcdef_" + "A" * 43,
        "revoked": _revoked_key(),
        "expired": _expired_key(),
    }
    expected_reason = {"never issued": "unknown"}
    clients = {name: api.client_for(token) for name, token in unauthenticated.items()}
    failures = []
    for op in ops:
        for name, client in clients.items():
            response = client.request(op.method, op.path)
            reason = expected_reason.get(name, name)
            challenge = response.headers.get("www-authenticate", "")
            ok = (
                response.status_code == 401
                and response.headers.get("content-type") == "application/problem+json"
                and response.json().get("reason") == reason
                and challenge.startswith('Bearer realm="smartmail"')
                and (("error=" not in challenge) if name == "missing" else 'error="invalid_token"' in challenge)
            )
            if not ok:
                failures.append(
                    f"{op.method} {op.path}, {name} key: {response.status_code} {challenge!r} {response.text[:200]}"
                )

        others = [scope for scope in SCOPES if scope not in op.scopes]
        lacking = api.client_for(api.key(*others, **RATE)) if others else None
        if lacking is not None:
            response = lacking.request(op.method, op.path)
            detail = response.json().get("detail", "") if response.status_code == 403 else ""
            if not (
                response.status_code == 403
                and any(scope in detail for scope in op.scopes)
                and 'error="insufficient_scope"' in response.headers.get("www-authenticate", "")
            ):
                failures.append(
                    f"{op.method} {op.path} without {op.scopes}: {response.status_code} {response.text[:200]}"
                )

        # The control: a key with exactly these scopes gets past authorization.
        allowed = api.client_for(api.key(*op.scopes, **RATE)).request(op.method, op.path)
        if allowed.status_code in (401, 403):
            failures.append(f"{op.method} {op.path} with {op.scopes}: {allowed.status_code} {allowed.text[:200]}")
    assert not failures, "\n".join(failures)


@pytest.fixture
def cached_keys_api(api, monkeypatch, _module_web):
    """`api` with keys cached for a minute, as in production (the fixture's server re-reads them always)."""
    monkeypatch.setenv("SMARTMAIL_API_KEY_CACHE_SECONDS", "60")
    api.url = _module_web.start()
    return api


def test_a_key_revoked_while_cached_is_refused_at_once(cached_keys_api):
    """Revocation reaches a process that still holds the key in its cache (the Redis mark)."""
    api = cached_keys_api
    client = api.client("messages:read", **RATE)
    assert client.get("/v1/messages").status_code == 200
    token = client.headers["authorization"].split()[1]
    keys.revoke_key(keys.key_id_of(token) or "")
    response = client.get("/v1/messages")
    assert response.status_code == 401 and response.json()["reason"] == "revoked"
