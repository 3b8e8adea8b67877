"""/v1/contacts: upsert, read, change and erase contacts by address (or id), and upsert 10,000 in a batch."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Path, Query, Response, Security
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from smartmail.access.keys import Principal
from smartmail.audience import contacts
from smartmail.errors import InvalidInput
from smartmail.store.models import ContactStatus
from smartmail.web.api.auth import authorize
from smartmail.web.api.fields import UtcDateTime
from smartmail.web.api.pagination import Cursor, Limit, Page, decode_cursor, page
from smartmail.web.problems import json_pointer, pointer

router = APIRouter(prefix="/contacts", tags=["contacts"])

MAX_BATCH = 10_000

ContactKey = Annotated[
    str, Path(max_length=320, description="The contact's address (URL-encoded, any case) or its numeric id.")
]


class ContactFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    attributes: dict[str, Any] | None = Field(
        None, description="Merged into the stored attributes; a null value removes one."
    )
    status: ContactStatus | None = Field(
        None, description="`subscribed` lifts a suppression here; a batch never resubscribes."
    )
    timezone: str | None = Field(None, max_length=64, description="An IANA zone such as Europe/Paris; null clears it.")
    locale: str | None = Field(None, max_length=35, description="Such as en or pt-BR; null clears it.")
    source: str | None = Field(None, max_length=64, description="Where the contact came from.")

    def fields(self) -> dict[str, Any]:
        """The fields the client sent, as the domain takes them (a null status: no change)."""
        given = self.model_dump(mode="json", exclude_unset=True, exclude={"email", "replace_attributes"})
        if given.get("status") is None:
            given.pop("status", None)
        return given


class ContactIn(ContactFields):
    """A contact to create or update, keyed by its address (case-insensitive)."""

    email: str = Field(max_length=320)


class ContactPatch(ContactFields):
    replace_attributes: bool = Field(False, description="Replace the stored attributes instead of merging.")


class ContactOut(BaseModel):
    id: int
    email: str
    status: str
    attributes: dict[str, Any]
    timezone: str | None = None
    locale: str | None = None
    source: str | None = None
    created_at: UtcDateTime
    updated_at: UtcDateTime
    last_open_at: UtcDateTime | None = None
    last_click_at: UtcDateTime | None = None
    engagement_score: float = Field(
        0.0, description="Human opens and clicks, decaying (halved every SMARTMAIL_ENGAGEMENT_HALF_LIFE_DAYS)."
    )
    lists: list[str] | None = Field(
        None, description="The lists the contact is subscribed to; in answers about one contact only."
    )


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Rows are checked one by one (below), so a bad one is reported in its place.
    contacts: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_BATCH)


class RowError(BaseModel):
    pointer: str
    detail: str


class BatchResult(BaseModel):
    index: int
    email: str | None = None
    id: int | None = None
    created: bool | None = None
    errors: list[RowError] | None = None


class BatchOut(BaseModel):
    created: int
    updated: int
    rejected: int
    results: list[BatchResult]


_contact = TypeAdapter(ContactIn)


def location(email: str) -> str:
    return f"/v1/contacts/{quote(email, safe='@')}"


@router.post(
    "", status_code=201, response_model=ContactOut, responses={200: {"model": ContactOut, "description": "Updated."}}
)
def upsert_contact(
    body: ContactIn,
    response: Response,
    principal: Annotated[Principal, Security(authorize, scopes=["contacts:write"])],
) -> dict[str, Any]:
    """Create the contact (201) or update the one with this address (200): attributes merge."""
    contact, created = contacts.upsert_contact(body.email, **body.fields())
    response.headers["Location"] = location(contact["email"])
    if not created:
        response.status_code = 200
    return contact


@router.post("/batch", response_model=BatchOut, response_model_exclude_none=True)
def upsert_batch(
    body: BatchIn,
    principal: Annotated[Principal, Security(authorize, scopes=["contacts:write"])],
) -> BatchOut:
    """Create or update up to 10,000 contacts in one transaction: a result per row, in order, with
    the contact's id or the row's errors (JSON pointers into this request). A bad row does not keep
    the others out; an address given twice is an error in its second row. Unlike a single upsert, a
    batch never resubscribes an unsubscribed, bounced or complained contact."""
    results: list[BatchResult | None] = [None] * len(body.contacts)
    # Every row goes to the domain, a refused one as None, so the rows it names are this request's.
    rows: list[dict[str, Any] | None] = []
    for i, row in enumerate(body.contacts):
        try:
            item = _contact.validate_python(row)
        except ValidationError as exc:
            errors = [RowError(pointer=json_pointer(["contacts", i, *e["loc"]]), detail=e["msg"]) for e in exc.errors()]
            results[i] = BatchResult(index=i, errors=errors)
            rows.append(None)
        else:
            rows.append({"email": item.email, **item.fields()})
    for i, outcome in enumerate(contacts.upsert_many(rows)):
        if results[i] is not None:
            continue
        if isinstance(outcome, InvalidInput):
            where = f"/contacts/{i}" + (pointer(outcome.field) if outcome.field else "")
            results[i] = BatchResult(index=i, errors=[RowError(pointer=where, detail=outcome.reason)])
        else:
            results[i] = BatchResult(index=i, email=outcome.email, id=outcome.id, created=outcome.created)
    done = [r for r in results if r is not None]
    created = sum(1 for r in done if r.created)
    rejected = sum(1 for r in done if r.errors)
    return BatchOut(created=created, updated=len(done) - created - rejected, rejected=rejected, results=done)


@router.get("", response_model=Page[ContactOut])
def list_contacts(
    principal: Annotated[Principal, Security(authorize, scopes=["contacts:read"])],
    limit: Limit = 100,
    cursor: Cursor = None,
    status: Annotated[ContactStatus | None, Query(description="Only contacts with this status.")] = None,
    list_name: Annotated[
        str | None, Query(alias="list", max_length=200, description="Only subscribers of this list.")
    ] = None,
) -> Page[dict[str, Any]]:
    """Contacts, oldest first."""
    position = decode_cursor(cursor, (int,))
    rows = contacts.list_contacts(
        limit + 1,
        position[0] if position else None,
        status=status.value if status else None,
        list_name=list_name,
    )
    return page(rows, limit, lambda row: [row["id"]])


@router.get("/{key:path}", response_model=ContactOut)
def get_contact(
    key: ContactKey,
    principal: Annotated[Principal, Security(authorize, scopes=["contacts:read"])],
) -> dict[str, Any]:
    """One contact, with its lists."""
    email = contacts.contact_email(key)
    found = contacts.get_contact(email)
    if found is None:
        raise HTTPException(404, f"No contact with address {email}.")
    return found


@router.patch("/{key:path}", response_model=ContactOut)
def update_contact(
    key: ContactKey,
    body: ContactPatch,
    principal: Annotated[Principal, Security(authorize, scopes=["contacts:write"])],
) -> dict[str, Any]:
    """Change a contact: the attributes sent are merged into the stored ones (null removes one)."""
    return contacts.update_contact(
        contacts.contact_email(key), replace_attributes=body.replace_attributes, **body.fields()
    )


@router.delete("/{key:path}", status_code=204)
def erase_contact(
    key: ContactKey,
    principal: Annotated[Principal, Security(authorize, scopes=["contacts:write"])],
) -> Response:
    """Erase a contact (GDPR art. 17): the contact, its memberships and events go; its address stays
    on the suppression list so it is never mailed again (also when there was no contact: then 404)."""
    email = contacts.contact_email(key)
    if not contacts.delete_contact(email):
        raise HTTPException(404, f"No contact with address {email}; the address is suppressed all the same.")
    return Response(status_code=204)
