"""/v1/events: the event stream read with a cursor, and custom events from a CRM or shop ingested, idempotent by id."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Security
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from smartmail.access.keys import Principal
from smartmail.audience import event_stream, events
from smartmail.errors import InvalidInput
from smartmail.web.api.auth import authorize
from smartmail.web.api.contacts import RowError
from smartmail.web.api.pagination import Cursor, Limit
from smartmail.web.problems import json_pointer, pointer

router = APIRouter(prefix="/events", tags=["events"])

MAX_BATCH = 1000


class EventIn(BaseModel):
    """A custom event for a contact (created when its address is new)."""

    model_config = ConfigDict(extra="forbid")

    email: str = Field(max_length=320)
    type: str = Field(max_length=64, description="A letter, then letters, digits or _ . : - (such as order_placed).")
    properties: dict[str, Any] | None = None
    occurred_at: datetime | None = Field(None, description="ISO 8601; without an offset, UTC. Default: now.")
    id: str | None = Field(
        None, min_length=1, max_length=200, description="Your id for the event: one already stored is a duplicate."
    )


class EventsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Items are checked one by one (below), so a bad one is reported in its place.
    events: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_BATCH)


class EventResult(BaseModel):
    index: int
    id: str | None = None
    duplicate: bool | None = Field(None, description="Its id was stored before: not stored again.")
    errors: list[RowError] | None = None


class EventsOut(BaseModel):
    accepted: int = Field(description="Events stored by this call.")
    duplicates: int
    rejected: int
    results: list[EventResult]


_event = TypeAdapter(EventIn)


@router.post("", status_code=202, response_model=EventsOut, response_model_exclude_none=True)
def ingest_events(
    body: EventsIn,
    principal: Annotated[Principal, Security(authorize, scopes=["events:write"])],
) -> EventsOut:
    """Record up to 1,000 custom events: a result per item, in order. An event whose `id` is already
    stored (or earlier in this call) is a duplicate and not stored again, so a retry is safe; a bad
    item is reported with JSON pointers into this request and does not keep the others out."""
    results: list[EventResult | None] = [None] * len(body.events)
    checked: list[tuple[int, dict[str, Any]]] = []
    for i, item in enumerate(body.events):
        try:
            checked.append((i, _event.validate_python(item).model_dump()))
        except ValidationError as exc:
            errors = [RowError(pointer=json_pointer(["events", i, *e["loc"]]), detail=e["msg"]) for e in exc.errors()]
            results[i] = EventResult(index=i, errors=errors)
    outcomes = events.ingest([item for _, item in checked])
    for (i, _), outcome in zip(checked, outcomes):
        if isinstance(outcome, InvalidInput):
            where = f"/events/{i}" + (pointer(outcome.field) if outcome.field else "")
            results[i] = EventResult(index=i, errors=[RowError(pointer=where, detail=outcome.reason)])
        else:
            results[i] = EventResult(index=i, id=outcome.client_id, duplicate=outcome.duplicate)
    done = [r for r in results if r is not None]
    duplicates = sum(1 for r in done if r.duplicate)
    rejected = sum(1 for r in done if r.errors)
    return EventsOut(accepted=len(done) - duplicates - rejected, duplicates=duplicates, rejected=rejected, results=done)


class StreamEvent(BaseModel):
    """An event of the stream: SmartMail's own (sent, deferred, failed, opened, clicked,
    unsubscribed, bounced, complained) or a custom one."""

    id: int
    position: str = Field(description="Where this event is in the stream: `after` this value reads what follows.")
    type: str
    occurred_at: str = Field(description="ISO 8601, UTC.")
    message_id: str | None = None
    contact_id: int | None = None
    email: str | None = Field(None, description="The contact's address; null when the event has no contact.")
    campaign_id: int | None = None
    machine: bool = Field(description="An open by a privacy proxy or a click by a link scanner.")
    properties: dict[str, Any]


class StreamPage(BaseModel):
    data: list[StreamEvent]
    next_cursor: str | None = Field(None, description="Set while the stream holds more: pass it as `cursor`.")
    position: str = Field(
        description="Where this page ends, set also when the stream has no more yet: pass it as `after` "
        "later to read what was written since (a consumer's checkpoint)."
    )


After = Annotated[
    str | None,
    Query(min_length=1, max_length=64, description="A stream position (`<xact>-<id>`): read the events after it."),
]


@router.get("", response_model=StreamPage)
def read_events(
    principal: Annotated[Principal, Security(authorize, scopes=["events:read"])],
    limit: Limit = 100,
    cursor: Cursor = None,
    after: After = None,
    type: Annotated[list[str] | None, Query(max_length=20, description="Only these types (repeatable).")] = None,
    message: Annotated[str | None, Query(max_length=26, description="Only this message's events.")] = None,
    contact: Annotated[str | None, Query(max_length=320, description="Only this contact's (address).")] = None,
    campaign: Annotated[str | None, Query(max_length=200, description="Only this campaign's (name or id).")] = None,
    include_machine: Annotated[bool, Query(description="false: leave out machine opens and clicks.")] = True,
) -> StreamPage:
    """The event stream, oldest first, from the start or `after` a position; `next_cursor` pages
    through what is there now, `position` is where to come back to for what is written later. Only
    events of transactions that have ended are shown, so a position kept never skips a late commit.
    With filters a page may hold fewer events than `limit` (even none) while `next_cursor` is set."""
    # A cursor continues a listing that `after` began (it is further on), so with both it wins.
    start = event_stream.Position.parse(after, field="after") if after is not None else None
    if cursor is not None:
        start = event_stream.Position.parse(cursor, field="cursor")
    ids = event_stream.filter_ids(contact=contact, campaign=campaign)
    found = event_stream.read(
        start,
        types=event_stream.check_types(type, field="type"),
        message_id=message,
        include_machine=include_machine,
        limit=limit,
        contact_id=ids["contact_id"],
        campaign_id=ids["campaign_id"],
    )
    return StreamPage(
        data=[StreamEvent(**event) for event in found.events],
        next_cursor=str(found.next) if found.more else None,
        position=str(found.next),
    )
