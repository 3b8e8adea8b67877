"""/v1/segments: saved segments (JSON rules over contacts) — save, list, read, delete, count, preview."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Response, Security
from pydantic import BaseModel, ConfigDict, Field

from smartmail.access.keys import Principal
from smartmail.audience import segments
from smartmail.errors import NotFound
from smartmail.web.api.auth import authorize
from smartmail.web.api.contacts import ContactOut
from smartmail.web.api.fields import UtcDateTime
from smartmail.web.api.pagination import Cursor, Limit, Page, decode_cursor, page

router = APIRouter(prefix="/segments", tags=["segments"])

SegmentName = Annotated[str, Path(max_length=200, description="The segment's name.")]
Read = Annotated[Principal, Security(authorize, scopes=["segments:read"])]
Write = Annotated[Principal, Security(authorize, scopes=["segments:write"])]


class SegmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Checked by segments.check, which names the bad rule (`/rules/all/2/op`).
    rules: Any = Field(
        description='A rule tree, e.g. `{"all": [{"list": "news"}, {"attr": "plan", "op": "eq", "value": "pro"}]}`.'
    )


class SegmentOut(BaseModel):
    name: str
    rules: Any
    created_at: UtcDateTime
    updated_at: UtcDateTime


class Count(BaseModel):
    count: int


class Contacts(BaseModel):
    data: list[ContactOut]


@router.put("/{name}", response_model=SegmentOut, responses={201: {"model": SegmentOut, "description": "Created."}})
def put_segment(name: SegmentName, body: SegmentIn, response: Response, principal: Write) -> dict[str, Any]:
    """Save the segment: 201 when new (with `Location`), 200 when its rules were replaced. Bad rules
    are a 422 pointing at the rule (`/rules/any/1/value`) and store nothing, as does a rule naming
    a list that does not exist."""
    saved, created = segments.put_segment(name, body.rules)
    if created:
        response.status_code = 201
        response.headers["Location"] = f"/v1/segments/{quote(name, safe='')}"
    return saved


@router.get("", response_model=Page[SegmentOut])
def list_segments(principal: Read, limit: Limit = 100, cursor: Cursor = None) -> Page[dict[str, Any]]:
    """Saved segments, by name."""
    position = decode_cursor(cursor, (str,))
    rows = segments.list_segments(limit=limit + 1, after=position[0] if position else None)
    return page(rows, limit, lambda row: [row["name"]])


@router.get("/{name}", response_model=SegmentOut)
def get_segment(name: SegmentName, principal: Read) -> dict[str, Any]:
    return segments.get_segment(name)


@router.delete("/{name}", status_code=204)
def delete_segment(name: SegmentName, principal: Write) -> Response:
    """Delete the segment (its contacts are untouched)."""
    if not segments.delete_segment(name):
        raise NotFound(f"no segment named {name!r}")
    return Response(status_code=204)


@router.get("/{name}/count", response_model=Count)
def count_segment(name: SegmentName, principal: Read) -> Count:
    """How many contacts the segment selects now (whatever their status). A saved rule naming a
    list deleted since is a 422 pointing at that rule."""
    return Count(count=segments.count(segments.saved_rules(name)))


@router.get("/{name}/preview", response_model=Contacts)
def preview_segment(
    name: SegmentName,
    principal: Read,
    limit: Annotated[int, Query(ge=1, le=1000, description="How many contacts.")] = 10,
) -> dict[str, Any]:
    """The first `limit` contacts (by id) the segment selects."""
    return {"data": segments.preview(segments.saved_rules(name), limit)}
