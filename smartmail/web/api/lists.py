"""/v1/lists: create, read and delete lists, and page, add and remove their members."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Path, Response, Security
from pydantic import BaseModel, ConfigDict, Field

from smartmail.access.keys import Principal
from smartmail.audience import contacts
from smartmail.web.api.auth import authorize
from smartmail.web.api.contacts import ContactKey, ContactOut
from smartmail.web.api.fields import UtcDateTime
from smartmail.web.api.pagination import Cursor, Limit, Page, decode_cursor, page

router = APIRouter(prefix="/lists", tags=["lists"])

MAX_MEMBERS = 1000

ListName = Annotated[str, Path(max_length=200, description="The list's name (URL-encoded).")]


class ListIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=200)
    description: str | None = Field(None, max_length=2000)


class ListOut(BaseModel):
    id: int
    name: str
    description: str | None = None
    created_at: UtcDateTime
    members: int = Field(description="Subscribed members.")


class MembersIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    emails: list[str] = Field(min_length=1, max_length=MAX_MEMBERS)


class Added(BaseModel):
    added: int = Field(description="How many joined (those already subscribed are not counted).")


@router.get("", response_model=Page[ListOut])
def list_lists(
    principal: Annotated[Principal, Security(authorize, scopes=["contacts:read"])],
    limit: Limit = 100,
    cursor: Cursor = None,
) -> Page[dict[str, Any]]:
    """Lists in name order, each with its number of subscribed members."""
    position = decode_cursor(cursor, (str,))
    rows = contacts.list_lists(limit + 1, position[0] if position else None)
    return page(rows, limit, lambda row: [row["name"]])


@router.post("", status_code=201, response_model=ListOut)
def create_list(
    body: ListIn,
    response: Response,
    principal: Annotated[Principal, Security(authorize, scopes=["contacts:write"])],
) -> dict[str, Any]:
    """Create a list; 409 when the name is taken."""
    created = contacts.create_list(body.name, body.description)
    response.headers["Location"] = f"/v1/lists/{quote(created['name'], safe='')}"
    return created


@router.get("/{name}", response_model=ListOut)
def get_list(
    name: ListName,
    principal: Annotated[Principal, Security(authorize, scopes=["contacts:read"])],
) -> dict[str, Any]:
    """One list with its number of subscribed members."""
    return contacts.get_list(name)


@router.delete("/{name}", status_code=204)
def delete_list(
    name: ListName,
    principal: Annotated[Principal, Security(authorize, scopes=["contacts:write"])],
) -> Response:
    """Delete a list and its memberships (the contacts stay)."""
    if not contacts.delete_list(name):
        raise HTTPException(404, f"No list named {name!r}.")
    return Response(status_code=204)


@router.get("/{name}/members", response_model=Page[ContactOut])
def list_members(
    name: ListName,
    principal: Annotated[Principal, Security(authorize, scopes=["contacts:read"])],
    limit: Limit = 100,
    cursor: Cursor = None,
) -> Page[dict[str, Any]]:
    """The list's subscribed contacts, oldest first."""
    position = decode_cursor(cursor, (int,))
    rows = contacts.list_members(name, limit + 1, position[0] if position else None)
    return page(rows, limit, lambda row: [row["id"]])


@router.post("/{name}/members", response_model=Added)
def add_members(
    name: ListName,
    body: MembersIn,
    principal: Annotated[Principal, Security(authorize, scopes=["contacts:write"])],
) -> Added:
    """Subscribe up to 1,000 addresses, creating the contacts not known yet; one bad address: 422
    naming it, and nobody is added."""
    contacts.get_list(name)  # an unknown list is a 404 (the URL), not a bad field
    return Added(added=contacts.add_members(name, body.emails))


@router.delete("/{name}/members/{key:path}", status_code=204)
def remove_member(
    name: ListName,
    key: ContactKey,
    principal: Annotated[Principal, Security(authorize, scopes=["contacts:write"])],
) -> Response:
    """Take a contact off the list (the contact stays)."""
    contacts.get_list(name)
    email = contacts.contact_email(key)
    if not contacts.remove_members(name, [email]):
        raise HTTPException(404, f"{email} is not a member of {name!r}.")
    return Response(status_code=204)
