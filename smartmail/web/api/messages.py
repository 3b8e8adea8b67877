"""/v1/messages: send one or a batch of transactional emails, read one and its events, list them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, HTTPException, Path, Query, Response, Security
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from smartmail.access.keys import Principal
from smartmail.audience import event_stream
from smartmail.errors import InvalidMessage
from smartmail.producer import sending, status
from smartmail.store.models import MessageState
from smartmail.web.api.auth import authorize
from smartmail.web.api.events import StreamEvent
from smartmail.web.api.fields import UtcDateTime
from smartmail.web.api.pagination import Cursor, Limit, Page, decode_cursor, page
from smartmail.web.problems import json_pointer, pointer

router = APIRouter(prefix="/messages", tags=["messages"])

MAX_BATCH = 1000


class MessageIn(BaseModel):
    """A transactional email: a stored template (`name` or `name@version`) with a context, or
    inline subject/html/text (Jinja2, rendered in the sandbox)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    to: str = Field(max_length=998, description="`addr@example.com` or `Name <addr@example.com>`.")
    template: str | None = Field(None, max_length=220)
    subject: str | None = Field(None, max_length=998)
    html: str | None = None
    text: str | None = None
    context: dict[str, Any] = Field(default_factory=dict)
    from_: str | None = Field(None, alias="from", max_length=998, description="Default: SMARTMAIL_DEFAULT_SENDER.")
    reply_to: str | None = Field(None, max_length=998)
    headers: dict[str, str] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list, max_length=20)
    send_at: datetime | None = Field(None, description="Send later (ISO 8601; without an offset, UTC).")
    track: bool | None = Field(
        None, description="Track opens and clicks (links rewritten, a pixel). Default: SMARTMAIL_TRACK_TRANSACTIONAL."
    )

    def spec(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=False)


class Accepted(BaseModel):
    id: str
    state: Literal["queued", "scheduled", "suppressed"] | str
    reason: str | None = None
    duplicate: bool = Field(False, description="The idempotency key was seen before: this is the earlier message.")


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Items are checked one by one (below), so a bad one is reported in its place.
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_BATCH)


class ItemError(BaseModel):
    pointer: str
    detail: str


class BatchResult(BaseModel):
    index: int
    id: str | None = None
    state: str | None = None
    reason: str | None = None
    duplicate: bool = False
    errors: list[ItemError] | None = None


class BatchOut(BaseModel):
    accepted: int
    rejected: int
    results: list[BatchResult]


class MessageOut(BaseModel):
    id: str
    state: str
    recipient: str
    sender: str
    subject: str
    attempts: int
    created_at: UtcDateTime
    enqueued_at: UtcDateTime | None = None
    claimed_at: UtcDateTime | None = None
    next_attempt_at: UtcDateTime | None = None
    finished_at: UtcDateTime | None = None
    smtp_code: int | None = None
    smtp_reply: str | None = None
    reason: str | None = None
    template_name: str | None = None
    template_version: int | None = None
    message_id_header: str
    tags: list[str]
    campaign_id: int | None = None
    contact_id: int | None = None


_message = TypeAdapter(MessageIn)
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Makes a retried request safe: the first response is replayed (24 h).",
    ),
]


def _message_key(principal: Principal, header: str | None) -> str | None:
    # The header also keys the message in the database, per API key: a retry cannot send twice
    # even when the Redis record of the first response is gone.
    return f"api:{principal.key_id}:{header}" if header else None


@router.post("", status_code=202, response_model=Accepted)
def send_message(
    body: MessageIn,
    response: Response,
    principal: Annotated[Principal, Security(authorize, scopes=["messages:send"])],
    idempotency_key: IdempotencyKey = None,
) -> Accepted:
    """Queue one email; 202 with its id at once, delivery follows (`GET /v1/messages/{id}`)."""
    spec = body.spec()
    spec["idempotency_key"] = _message_key(principal, idempotency_key)
    result = sending.send_many([spec])[0]
    response.headers["Location"] = f"/v1/messages/{result.id}"
    return Accepted(id=result.id, state=result.state, reason=result.reason, duplicate=result.duplicate)


@router.post("/batch", response_model=BatchOut)
def send_batch(
    body: BatchIn,
    principal: Annotated[Principal, Security(authorize, scopes=["messages:send"])],
    idempotency_key: IdempotencyKey = None,
) -> BatchOut:
    """Queue up to 1,000 emails: a result per item, in order, with its id or its errors (as JSON
    pointers into this request); a bad item does not keep the others out."""
    results: list[BatchResult | None] = [None] * len(body.messages)
    specs: list[tuple[int, dict[str, Any]]] = []
    for i, item in enumerate(body.messages):
        try:
            spec = _message.validate_python(item).spec()
        except ValidationError as exc:
            errors = [
                ItemError(pointer=json_pointer(["messages", i, *e["loc"]]), detail=e["msg"]) for e in exc.errors()
            ]
            results[i] = BatchResult(index=i, errors=errors)
            continue
        if idempotency_key:
            # A space joins them: a header key holds none, so no single send can take an item's key.
            spec["idempotency_key"] = _message_key(principal, f"{idempotency_key} {i}")
        specs.append((i, spec))
    outcomes = sending.send_each([spec for _, spec in specs])
    for (i, _), outcome in zip(specs, outcomes):
        if isinstance(outcome, InvalidMessage):
            # send_each names fields by the position among the specs it was given; ours is i.
            field = outcome.field.split(".", 1)[1] if "." in outcome.field else ""
            where = f"/messages/{i}" + (pointer(field) if field else "")
            results[i] = BatchResult(index=i, errors=[ItemError(pointer=where, detail=outcome.reason)])
        else:
            results[i] = BatchResult(
                index=i, id=outcome.id, state=outcome.state, reason=outcome.reason, duplicate=outcome.duplicate
            )
    done = [r for r in results if r is not None]
    rejected = sum(1 for r in done if r.errors)
    return BatchOut(accepted=len(done) - rejected, rejected=rejected, results=done)


@router.get("/{message_id}", response_model=MessageOut)
def get_message(
    message_id: Annotated[str, Path(max_length=26)],
    principal: Annotated[Principal, Security(authorize, scopes=["messages:read"])],
) -> dict[str, Any]:
    """One message: its state, attempts and the last SMTP reply."""
    found = status.status(message_id)
    if found is None:
        raise HTTPException(404, f"No message {message_id!r}.")
    return found


class MessageEvents(BaseModel):
    data: list[StreamEvent]


@router.get("/{message_id}/events", response_model=MessageEvents)
def get_message_events(
    message_id: Annotated[str, Path(max_length=26)],
    principal: Annotated[Principal, Security(authorize, scopes=["events:read"])],
) -> MessageEvents:
    """One message's events (sent, deferred, opened, clicked, …), in the order they happened."""
    return MessageEvents(data=[StreamEvent(**event) for event in event_stream.for_message(message_id)])


@router.get("", response_model=Page[MessageOut])
def list_messages(
    principal: Annotated[Principal, Security(authorize, scopes=["messages:read"])],
    limit: Limit = 100,
    cursor: Cursor = None,
    state: Annotated[MessageState | None, Query(description="Only messages in this state.")] = None,
    tag: Annotated[str | None, Query(max_length=64)] = None,
    campaign: Annotated[str | None, Query(max_length=200, description="A campaign's name or id.")] = None,
    to: Annotated[str | None, Query(max_length=320, description="The recipient's address.")] = None,
) -> Page[dict[str, Any]]:
    """Messages, newest first."""
    position = decode_cursor(cursor, (str,))
    rows = status.list_messages(
        limit=limit + 1,
        after=position[0] if position else None,
        state=state.value if state else None,
        tag=tag,
        campaign=campaign,
        to=to,
    )
    return page(rows, limit, lambda row: [row["id"]])
