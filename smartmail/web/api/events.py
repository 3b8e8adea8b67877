"""/v1/events: custom events from a CRM or shop (such as `order_placed`), 1,000 a call, idempotent by id."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Security
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from smartmail.access.keys import Principal
from smartmail.audience import events
from smartmail.errors import InvalidInput
from smartmail.web.api.auth import authorize
from smartmail.web.api.contacts import RowError
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
