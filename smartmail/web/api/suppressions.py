"""/v1/suppressions: the addresses never mailed — list, add, read, remove."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Response, Security
from pydantic import BaseModel, ConfigDict, Field

from smartmail.access.keys import Principal
from smartmail.audience import suppressions
from smartmail.audience.suppressions import AddReason, Reason
from smartmail.web.api.auth import authorize
from smartmail.web.api.fields import UtcDateTime
from smartmail.web.api.pagination import Cursor, Limit, Page, decode_cursor, page

router = APIRouter(prefix="/suppressions", tags=["suppressions"])

Email = Annotated[str, Path(max_length=320, description="The address (any case; IDN domains as Unicode or A-label).")]
Read = Annotated[Principal, Security(authorize, scopes=["suppressions:read"])]
Write = Annotated[Principal, Security(authorize, scopes=["suppressions:write"])]


class SuppressionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(max_length=320)
    reason: AddReason = "manual"
    detail: str | None = Field(None, max_length=suppressions.MAX_DETAIL, description="A note for people.")


class SuppressionOut(BaseModel):
    email: str
    reason: str
    detail: str | None = None
    source_message_id: str | None = Field(None, description="The message whose bounce put the address here.")
    created_at: UtcDateTime


@router.get("", response_model=Page[SuppressionOut])
def list_suppressions(
    principal: Read,
    limit: Limit = 100,
    cursor: Cursor = None,
    reason: Annotated[Reason | None, Query(description="Only entries of this reason.")] = None,
) -> Page[dict[str, Any]]:
    """Suppressed addresses, by address."""
    position = decode_cursor(cursor, (str,))
    rows = suppressions.list_suppressions(limit=limit + 1, after=position[0] if position else None, reason=reason)
    return page(rows, limit, lambda row: [row["email"]])


@router.post(
    "",
    status_code=201,
    response_model=SuppressionOut,
    responses={200: {"model": SuppressionOut, "description": "Suppressed already: the entry as it was."}},
)
def add_suppression(body: SuppressionIn, response: Response, principal: Write) -> dict[str, Any]:
    """Suppress an address: 201 when new; 200 with the existing entry, unchanged, when it was
    already suppressed (its first reason stands). A `subscribed` contact of that address takes the
    matching status (`manual` → `blocked`, `hard_bounce` → `bounced`, …)."""
    entry, created = suppressions.add_suppression(body.email, body.reason, body.detail)
    if not created:
        response.status_code = 200
    response.headers["Location"] = f"/v1/suppressions/{quote(entry['email'], safe='@')}"
    return entry


@router.get("/{email:path}", response_model=SuppressionOut)
def get_suppression(email: Email, principal: Read) -> dict[str, Any]:
    return suppressions.get_suppression(email)


@router.delete("/{email:path}", status_code=204)
def remove_suppression(email: Email, principal: Write) -> Response:
    """Take the address off the list. A `bounced` or `blocked` contact is `subscribed` again; an
    `unsubscribed` or `complained` one keeps its status (consent is the recipient's to give), so
    campaigns still skip it while transactional mail reaches it."""
    suppressions.remove_suppression(email)
    return Response(status_code=204)
