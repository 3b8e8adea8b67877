"""/v1/inbound: mail `smartmail inbound` received (bounces, complaints, unsubscribes): verdicts, bytes, a retry."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response, Security
from pydantic import BaseModel, Field

from smartmail.access.keys import Principal
from smartmail.feedback import inbound
from smartmail.web.api.auth import authorize
from smartmail.web.api.fields import UtcDateTime
from smartmail.web.api.pagination import Cursor, Limit, Page, decode_cursor, page

router = APIRouter(prefix="/inbound", tags=["inbound"])

InboundId = Annotated[str, Path(min_length=26, max_length=26, description="The inbound mail's id.")]
Read = Annotated[Principal, Security(authorize, scopes=["inbound:read"])]
Write = Annotated[Principal, Security(authorize, scopes=["inbound:write"])]
State = Literal["pending", "processed", "failed"]
Verdict = Literal["bounce", "delayed", "complaint", "unsubscribe", "auto_reply", "unrecognised"]


class InboundOut(BaseModel):
    id: str
    state: State = Field(description="pending until the events worker processed it; failed after 5 errors.")
    verdict: Verdict | None = Field(description="What the mail was found to be (docs/deliverability.md).")
    received_at: UtcDateTime
    processed_at: UtcDateTime | None
    peer: str | None = Field(description="The sending server's address.")
    mail_from: str = Field(description="The envelope sender; empty for a DSN.")
    recipients: list[str]
    size: int = Field(description="Bytes.")
    attempts: int
    outcome: dict[str, Any] | None = Field(description="What processing found (findings, detail) or the error.")


@router.get("", response_model=Page[InboundOut])
def list_inbound(
    principal: Read,
    limit: Limit = 100,
    cursor: Cursor = None,
    state: Annotated[State | None, Query(description="Only mail in this state.")] = None,
    verdict: Annotated[Verdict | None, Query(description="Only mail with this verdict.")] = None,
) -> Page[dict[str, Any]]:
    """Inbound mail, newest first."""
    position = decode_cursor(cursor, (str,))
    rows = inbound.list_inbound(limit=limit + 1, before=position[0] if position else None, state=state, verdict=verdict)
    return page(rows, limit, lambda row: [row["id"]])


@router.get("/{inbound_id}", response_model=InboundOut)
def get_inbound(inbound_id: InboundId, principal: Read) -> dict[str, Any]:
    return inbound.get_inbound(inbound_id)


@router.get(
    "/{inbound_id}/raw",
    response_class=Response,
    responses={200: {"content": {"message/rfc822": {}}, "description": "The mail's bytes as received."}},
)
def get_inbound_raw(inbound_id: InboundId, principal: Read) -> Response:
    return Response(inbound.raw_of(inbound_id), media_type="message/rfc822")


@router.post("/{inbound_id}/retry", status_code=202, response_model=InboundOut)
def retry_inbound(inbound_id: InboundId, principal: Write) -> dict[str, Any]:
    """Process a `failed` mail again (once the cause is fixed); 409 for mail in another state."""
    inbound.retry(inbound_id)
    return inbound.get_inbound(inbound_id)
