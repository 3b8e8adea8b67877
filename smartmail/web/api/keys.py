"""/v1/keys: create (the key is shown once), list, read and revoke API keys."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Response, Security
from pydantic import BaseModel, ConfigDict, Field

from smartmail.access import keys
from smartmail.access.keys import Principal
from smartmail.access.scopes import SCOPES
from smartmail.config import get_settings
from smartmail.store.engine import as_stored
from smartmail.web.api.auth import authorize
from smartmail.web.api.fields import UtcDateTime
from smartmail.web.api.pagination import Cursor, Limit, Page, decode_cursor, page

router = APIRouter(prefix="/keys", tags=["keys"])

Manager = Annotated[Principal, Security(authorize, scopes=["keys:manage"])]
KeyId = Annotated[str, Path(max_length=32, description="The key's id (the part after `sm_`).")]


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=200, description="What the key is for.")
    scopes: list[str] = Field(max_length=50, description="Scopes it holds (`smartmail keys scopes` lists them).")
    expires_at: datetime | None = Field(None, description="ISO 8601 (without an offset, UTC); default: never.")
    rate_limit: float | None = Field(
        None, allow_inf_nan=False, description="Requests per second; default: SMARTMAIL_API_RATE_LIMIT."
    )
    burst: int | None = Field(None, le=1_000_000, description="Requests back to back; default: 2 s worth.")


class KeyOut(BaseModel):
    id: str
    name: str
    scopes: list[str]
    rate_limit: float | None
    burst: int | None
    created_at: UtcDateTime
    last_used_at: UtcDateTime | None
    expires_at: UtcDateTime | None
    revoked: bool
    revoked_at: UtcDateTime | None


class CreatedKeyOut(KeyOut):
    key: str = Field(description="`sm_<id>_<secret>`: shown this once; only its hash is stored.")


@router.post("", status_code=201, response_model=CreatedKeyOut)
def create_key(body: KeyIn, response: Response, principal: Manager) -> dict[str, Any]:
    """Create a key and return it with its secret, which is never shown again. A key grants no more
    than it holds (least privilege: a leaked `keys:manage` key cannot mint more power): only its
    own scopes, a rate no higher than its own, and an expiry no later than its own (its own when
    none is given). Not kept for `Idempotency-Key` replays: the answer holds the secret."""
    lacking = [scope for scope in body.scopes if scope in SCOPES and scope not in principal.scopes]
    if lacking:
        raise HTTPException(403, f"This API key lacks the scope {lacking[0]}, so it cannot grant it.")
    own_rate = principal.rate_limit or get_settings().api_rate_limit
    if body.rate_limit is not None and body.rate_limit > own_rate:
        raise HTTPException(403, f"This API key's own rate is {own_rate:g}/s: it cannot grant more.")
    expires_at = body.expires_at
    own_expiry = keys.get_key(principal.key_id)["expires_at"]  # naive UTC, as stored
    if own_expiry is not None:
        if expires_at is None:
            expires_at = own_expiry
        elif as_stored(expires_at) > own_expiry:
            raise HTTPException(403, f"This API key expires at {own_expiry:%Y-%m-%d %H:%M} UTC: it cannot grant later.")
    record, token = keys.create_key(
        body.name,
        body.scopes,
        expires_at=expires_at,
        rate_limit=body.rate_limit if body.rate_limit is not None else principal.rate_limit,
        burst=body.burst,
    )
    response.headers["Location"] = f"/v1/keys/{record['id']}"
    return {**record, "key": token}


@router.get("", response_model=Page[KeyOut])
def list_keys(
    principal: Manager,
    limit: Limit = 100,
    cursor: Cursor = None,
    active: Annotated[bool, Query(description="Leave out revoked keys.")] = False,
) -> Page[dict[str, Any]]:
    """Keys, oldest first, with their scopes and when they were last used; never their secrets."""
    position = decode_cursor(cursor, (str, str))
    records = keys.list_keys(include_revoked=not active)
    if position:
        try:
            after = (datetime.fromisoformat(position[0]), position[1])
            if after[0].tzinfo is not None:  # ours are naive UTC; an aware one cannot be compared
                raise ValueError
        except ValueError:
            raise HTTPException(422, "cursor: is not a cursor this API returned") from None
        # Keys are few (one per application or so): the page is cut from the whole list, in its order.
        records = [record for record in records if (record["created_at"], record["id"]) > after]
    return page(records[: limit + 1], limit, lambda record: [record["created_at"].isoformat(), record["id"]])


@router.get("/{key_id}", response_model=KeyOut)
def get_key(key_id: KeyId, principal: Manager) -> dict[str, Any]:
    """One key (never its secret)."""
    return keys.get_key(key_id)


@router.delete("/{key_id}", response_model=KeyOut)
def revoke_key(key_id: KeyId, principal: Manager) -> dict[str, Any]:
    """Revoke a key: every web process refuses it from the next request on (401). Revoking a
    revoked key changes nothing and answers the same."""
    return keys.revoke_key(key_id)
