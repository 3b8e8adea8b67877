"""Contacts and lists: create, upsert, update and erase contacts, list membership, and `track` for custom events."""

from __future__ import annotations

import functools
import json
import math
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import Row, bindparam, delete, func, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from smartmail.audience.engagement_decay import Decay
from smartmail.errors import ConflictingInput, InvalidInput, NotFound
from smartmail.store import dialect
from smartmail.store.engine import session_scope, utcnow
from smartmail.store.models import Contact, ContactList, ContactStatus, Event, EventType, ListMembership, Suppression
from smartmail.workers.dispatch import publish

log = structlog.get_logger("smartmail.contacts")

STATUSES = tuple(s.value for s in ContactStatus)
MAX_ID = 2**63 - 1  # ids are 64-bit: a larger number from a URL or cursor names no contact
# A contact status that must never be mailed maps to a suppression reason, and back.
STATUS_TO_SUPPRESSION = {
    "unsubscribed": "unsubscribed",
    "bounced": "hard_bounce",
    "complained": "complaint",
    "blocked": "manual",
}
SUPPRESSION_TO_STATUS = {
    "unsubscribed": "unsubscribed",
    "hard_bounce": "bounced",
    "soft_bounce": "bounced",
    "complaint": "complained",
}
# Event types the tracking and delivery code record; `track` is for the application's own names.
RESERVED_EVENTS = frozenset(
    {*(t.value for t in EventType), "open", "click", "bounce", "complaint", "unsubscribe", "delivered"}
)

_EVENT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}")
_LOCALE = re.compile(r"[A-Za-z]{2,3}([_-][A-Za-z0-9]{2,8}){0,3}")
_LIST_NAME = re.compile(r"[^\x00-\x1f\x7f/]{1,200}")  # no "/": names are URL path segments
# RFC 5322 dot-atom local part: what nearly every address is. Anything else (quoted, non-ASCII)
# goes through email-validator in full.
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_BAD_ATTRIBUTE_CHARS = re.compile(r'["\\\x00-\x1f\x7f]')


# --- Validation -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=65536)
def _domain_ok(domain: str) -> str | None:
    """The domain as stored (lower-case A-label), or None. Memoized: imports repeat a few domains."""
    try:
        valid = validate_email(f"a@{domain}", check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError:
        return None
    return valid.ascii_domain.lower()


def email_problem(value: Any) -> tuple[str | None, str | None]:
    """(normalized address, None) or (None, reason). The one definition of a contact's email key:
    lower-case (as the suppression list is keyed), an IDN domain as its A-label."""
    if not isinstance(value, str) or not value.strip():
        return None, "an email address is required"
    value = value.strip()
    if len(value) > 254:  # RFC 5321 section 4.5.3.1: at most 254 characters in a path
        return None, "must be at most 254 characters"
    local, at, domain = value.rpartition("@")
    # Fast path: a dot-atom local part and a memoized domain check, without full validation.
    if at and len(local) <= 64 and _DOT_ATOM.fullmatch(local):
        checked = _domain_ok(domain)
        if checked:
            return f"{local.lower()}@{checked}", None
    try:
        valid = validate_email(value, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        return None, f"{value!r} is not a valid email address: {exc}"
    return (valid.ascii_email or valid.normalized).lower(), None


def normalize_email(value: Any, *, field: str = "email") -> str:
    email, reason = email_problem(value)
    if email is None:
        raise InvalidInput(reason or "not an email address", field=field)
    return email


def check_attribute_name(name: Any, *, field: str) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= 64 or _BAD_ATTRIBUTE_CHARS.search(name):
        raise InvalidInput(
            f"{name!r} is not a valid attribute name (1-64 characters, no quotes, backslashes or control characters)",
            field=field,
        )
    check_storable(name, field)
    return name


def check_storable(value: Any, field: str) -> None:
    """Every string in a value (keys too) is one the databases store: PostgreSQL refuses NUL
    characters, and a lone UTF-16 surrogate (which a JSON body may hold) has no UTF-8 encoding."""
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidInput("a NUL character cannot be stored", field=field)
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidInput(
                    "a lone UTF-16 surrogate is not a character and cannot be stored", field=field
                ) from None
    elif isinstance(value, Mapping):
        for key, item in value.items():
            check_storable(key, field)
            check_storable(item, f"{field}.{key}")
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_storable(item, field)


def _check_json_value(value: Any, field: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput("NaN and infinity cannot be stored", field=field)
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"not JSON-serializable: {exc}", field=field) from None
    check_storable(value, field)


def check_attributes(attributes: Any, *, field: str = "attributes") -> dict[str, Any]:
    if attributes is None:
        return {}
    if not isinstance(attributes, Mapping):
        raise InvalidInput("must be a mapping of names to values", field=field)
    checked = {}
    for name, value in attributes.items():
        check_attribute_name(name, field=field)
        _check_json_value(value, f"{field}.{name}")
        checked[name] = value
    return checked


def check_status(value: Any, *, field: str = "status") -> str:
    if value not in STATUSES:
        raise InvalidInput(f"{value!r} is not one of {', '.join(STATUSES)}", field=field)
    return value


@functools.lru_cache(maxsize=1024)
def _zone_ok(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def known_zone(name: str | None, fallback: str) -> str:
    """`name` if it is a time zone this machine knows, else `fallback`."""
    return name if name and _zone_ok(name) else fallback


def check_timezone(value: Any, *, field: str = "timezone") -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 64 or not _zone_ok(value):
        raise InvalidInput(f"{value!r} is not an IANA time zone such as Europe/Paris", field=field)
    return value


def check_locale(value: Any, *, field: str = "locale") -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 35 or not _LOCALE.fullmatch(value):
        raise InvalidInput(f"{value!r} is not a locale such as en or pt-BR", field=field)
    return value


def check_source(value: Any, *, field: str = "source") -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= 64 or not value.isprintable():
        raise InvalidInput("must be 1-64 printable characters", field=field)
    return value


def check_list_name(value: Any, *, field: str = "list") -> str:
    if not isinstance(value, str) or not _LIST_NAME.fullmatch(value) or not value.strip():
        raise InvalidInput("a list name is 1-200 characters without control characters or /", field=field)
    check_storable(value, field)
    return value


_FIELDS = {"attributes", "status", "timezone", "locale", "source"}


def _check_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(fields) - _FIELDS
    if unknown:
        raise InvalidInput(f"unknown field(s) {', '.join(sorted(unknown))}", field="contact")
    checked: dict[str, Any] = {}
    if "attributes" in fields:
        checked["attributes"] = check_attributes(fields["attributes"])
    if "status" in fields:
        checked["status"] = check_status(fields["status"])
    if "timezone" in fields:
        checked["timezone"] = check_timezone(fields["timezone"])
    if "locale" in fields:
        checked["locale"] = check_locale(fields["locale"])
    if "source" in fields:
        checked["source"] = check_source(fields["source"])
    return checked


# --- Contacts ---------------------------------------------------------------------------------------


def _engagement_score(contact: Contact) -> float:
    """The contact's engagement score as of now, to 2 places (0 with no human open or click)."""
    if contact.engagement_scored_at is None:
        return 0.0
    return round(Decay.from_settings().decayed(contact.engagement_score, contact.engagement_scored_at, utcnow()), 2)


def as_dict(contact: Contact, lists: list[str] | None = None) -> dict[str, Any]:
    data = {
        "id": contact.id,
        "email": contact.email,
        "status": contact.status,
        "attributes": dict(contact.attributes or {}),
        "timezone": contact.timezone,
        "locale": contact.locale,
        "source": contact.source,
        "created_at": contact.created_at,
        "updated_at": contact.updated_at,
        "last_open_at": contact.last_open_at,
        "last_click_at": contact.last_click_at,
        "engagement_score": _engagement_score(contact),
    }
    if lists is not None:
        data["lists"] = lists
    return data


def _suppression_status(session: Session, email: str) -> str | None:
    reason = session.scalar(select(Suppression.reason).where(Suppression.email == email))
    if reason is None:
        return None
    return SUPPRESSION_TO_STATUS.get(reason, "blocked")


def _sync_suppression(session: Session, email: str, status: str) -> None:
    """A status that must not be mailed puts the address on the suppression list (which the send
    path checks); an explicit return to `subscribed` takes it off."""
    if status in STATUS_TO_SUPPRESSION:
        insert = dialect.insert(session)
        session.execute(
            insert(Suppression)
            .values(email=email, reason=STATUS_TO_SUPPRESSION[status], detail="contact status", created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["email"])
        )
    elif status == ContactStatus.SUBSCRIBED.value:
        session.execute(delete(Suppression).where(Suppression.email == email))


def _get(session: Session, email: str) -> Contact | None:
    return session.scalar(select(Contact).where(Contact.email == email))


def _lists_of(session: Session, contact_id: int) -> list[str]:
    return list(
        session.scalars(
            select(ContactList.name)
            .join(ListMembership, ListMembership.list_id == ContactList.id)
            .where(ListMembership.contact_id == contact_id, ListMembership.status == "subscribed")
            .order_by(ContactList.name)
        )
    )


def _merge_attributes(current: Mapping[str, Any] | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """The given attributes added to the current ones, replacing those of the same name; None removes one."""
    merged = {**(current or {}), **given}
    return {k: v for k, v in merged.items() if v is not None}


def _apply(session: Session, contact: Contact, fields: dict[str, Any], *, merge: bool) -> None:
    if fields.get("status") == ContactStatus.UNSUBSCRIBED.value and contact.status == ContactStatus.SUBSCRIBED.value:
        session.add(  # the same event as an unsubscribe by link, in the same transaction
            Event(type=EventType.UNSUBSCRIBED.value, contact_id=contact.id, properties={"source": "update"})
        )
    for name, value in fields.items():
        if name == "attributes":
            contact.attributes = _merge_attributes(contact.attributes if merge else None, value)
        else:
            setattr(contact, name, value)
    contact.updated_at = utcnow()
    if "status" in fields:
        _sync_suppression(session, contact.email, fields["status"])


def _create(session: Session, email: str, fields: dict[str, Any]) -> Contact:
    now = utcnow()
    suppressed_as = _suppression_status(session, email)
    # A given status wins (an explicit `subscribed` lifts the suppression); otherwise a suppressed
    # address starts with the matching status.
    status = fields.get("status") or suppressed_as or ContactStatus.SUBSCRIBED.value
    contact = Contact(
        email=email,
        status=status,
        attributes=_merge_attributes(None, fields.get("attributes", {})),
        timezone=fields.get("timezone"),
        locale=fields.get("locale"),
        source=fields.get("source"),
        created_at=now,
        updated_at=now,
    )
    session.add(contact)
    session.flush()
    if "status" in fields:
        _sync_suppression(session, email, status)
    return contact


def create_contact(email: str, **fields: Any) -> dict[str, Any]:
    """Create a contact; an address already known is an error (use upsert_contact to merge).
    An address on the suppression list starts with the matching status (bounced, unsubscribed…)."""
    email = normalize_email(email)
    checked = _check_fields(fields)
    with session_scope() as session:
        if _get(session, email) is not None:
            raise InvalidInput(f"a contact with address {email} already exists", field="email")
        contact = _create(session, email, checked)
        return as_dict(contact, [])


def upsert_contact(email: str, **fields: Any) -> tuple[dict[str, Any], bool]:
    """Create the contact or update it (attributes are merged); returns (contact, created)."""
    email = normalize_email(email)
    checked = _check_fields(fields)
    with session_scope() as session:
        contact = _get(session, email)
        if contact is None:
            contact = _create(session, email, checked)
            return as_dict(contact, []), True
        _apply(session, contact, checked, merge=True)
        return as_dict(contact, _lists_of(session, contact.id)), False


def get_contact(email: str) -> dict[str, Any] | None:
    email = normalize_email(email)
    with session_scope() as session:
        contact = _get(session, email)
        return None if contact is None else as_dict(contact, _lists_of(session, contact.id))


def update_contact(email: str, *, replace_attributes: bool = False, **fields: Any) -> dict[str, Any]:
    """Change a contact's fields; attributes are merged (a None value removes one) unless
    replace_attributes is true. Raises NotFound for an unknown address."""
    email = normalize_email(email)
    checked = _check_fields(fields)
    with session_scope() as session:
        contact = _get(session, email)
        if contact is None:
            raise NotFound(f"email: no contact with address {email}")
        _apply(session, contact, checked, merge=not replace_attributes)
        return as_dict(contact, _lists_of(session, contact.id))


def delete_contact(email: str) -> bool:
    """Erase a contact: the row, its memberships and events go (GDPR art. 17), and the address
    stays on the suppression list so it is never mailed again. False if there was no contact."""
    email = normalize_email(email)
    with session_scope() as session:
        contact = _get(session, email)
        insert = dialect.insert(session)
        # Keep an existing reason (a hard bounce stays a hard bounce); otherwise record the erasure.
        session.execute(
            insert(Suppression)
            .values(email=email, reason="erased", detail="contact deleted", created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["email"])
        )
        if contact is None:
            return False
        # Explicit deletes rather than relying on ON DELETE CASCADE: SQLite only honours it with
        # PRAGMA foreign_keys, which connections made outside SmartMail's engine may lack.
        session.execute(delete(Event).where(Event.contact_id == contact.id))
        session.execute(delete(ListMembership).where(ListMembership.contact_id == contact.id))
        session.execute(delete(Contact).where(Contact.id == contact.id))
    log.info("contact.erased", contact_id=contact.id)
    return True


def count_contacts(status: str | None = None) -> int:
    query = select(func.count()).select_from(Contact)
    if status is not None:
        query = query.where(Contact.status == check_status(status))
    with session_scope() as session:
        return session.scalar(query) or 0


def contact_email(key: str) -> str:
    """The stored address a contact is named by in a URL: its address (any case) or its numeric id.
    NotFound when it is neither a known id nor a usable address."""
    if key.isascii() and key.isdigit():
        with session_scope() as session:
            email = None if int(key) > MAX_ID else session.scalar(select(Contact.email).where(Contact.id == int(key)))
        if email is None:
            raise NotFound(f"no contact with id {key}")
        return email
    email, _ = email_problem(key)
    if email is None:
        raise NotFound(f"no contact with address {key!r}")
    return email


def _with_lists(session: Session, contacts: list[Contact]) -> list[dict[str, Any]]:
    """Contacts as dicts with their lists, found in one query for the lot."""
    lists: dict[int, list[str]] = {c.id: [] for c in contacts}
    if lists:
        rows = session.execute(
            select(ListMembership.contact_id, ContactList.name)
            .join(ContactList, ContactList.id == ListMembership.list_id)
            .where(ListMembership.contact_id.in_(list(lists)), ListMembership.status == "subscribed")
            .order_by(ContactList.name)
        )
        for contact_id, name in rows:
            lists[contact_id].append(name)
    return [as_dict(c, lists[c.id]) for c in contacts]


def list_contacts(
    limit: int, after: int | None = None, *, status: str | None = None, list_name: str | None = None
) -> list[dict[str, Any]]:
    """Contacts in id order, from the one after `after` (keyset paging), with their lists; only those
    of a status, or subscribed to a list (InvalidInput naming `list` when there is no such list)."""
    query = select(Contact).order_by(Contact.id).limit(limit)
    if after is not None:
        if after >= MAX_ID:  # a cursor past every id (no larger id fits the column)
            return []
        query = query.where(Contact.id > after)
    if status is not None:
        query = query.where(Contact.status == check_status(status))
    with session_scope() as session:
        if list_name is not None:
            target = _list_by_name(session, check_list_name(list_name))
            query = query.join(ListMembership, ListMembership.contact_id == Contact.id).where(
                ListMembership.list_id == target.id, ListMembership.status == "subscribed"
            )
        return _with_lists(session, list(session.scalars(query)))


# --- Lists --------------------------------------------------------------------------------------------


def _list_by_name(session: Session, name: str, *, field: str = "list") -> ContactList:
    row = session.scalar(select(ContactList).where(ContactList.name == name))
    if row is None:
        raise InvalidInput(f"no list named {name!r}", field=field)
    return row


def create_list(name: str, description: str | None = None) -> dict[str, Any]:
    name = check_list_name(name, field="name")
    if description is not None and not isinstance(description, str):
        raise InvalidInput("must be a string", field="description")
    check_storable(description, "description")
    with session_scope() as session:
        taken = ConflictingInput(f"a list named {name!r} already exists", field="name")
        if session.scalar(select(ContactList.id).where(ContactList.name == name)) is not None:
            raise taken
        row = ContactList(name=name, description=description, created_at=utcnow())
        session.add(row)
        try:
            session.flush()
        except IntegrityError:  # created meanwhile by a concurrent request (the name is unique)
            raise taken from None
        return {
            "id": row.id,
            "name": row.name,
            "description": row.description,
            "created_at": row.created_at,
            "members": 0,
        }


def get_list_id(name: str) -> int:
    """The id of the list with this name; InvalidInput(field='list') if there is none."""
    with session_scope() as session:
        return _list_by_name(session, check_list_name(name)).id


def get_lists() -> list[dict[str, Any]]:
    """Every list with its number of subscribed members."""
    members = (
        select(ListMembership.list_id, func.count().label("n"))
        .where(ListMembership.status == "subscribed")
        .group_by(ListMembership.list_id)
        .subquery()
    )
    with session_scope() as session:
        rows = session.execute(
            select(ContactList, func.coalesce(members.c.n, 0))
            .outerjoin(members, members.c.list_id == ContactList.id)
            .order_by(ContactList.name)
        )
        return [
            {"id": row.id, "name": row.name, "description": row.description, "created_at": row.created_at, "members": n}
            for row, n in rows
        ]


def _list_dict(row: ContactList, members: int) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "description": row.description,
        "created_at": row.created_at,
        "members": members,
    }


def _member_counts(session: Session, list_ids: list[int]) -> dict[int, int]:
    rows = session.execute(
        select(ListMembership.list_id, func.count())
        .where(ListMembership.list_id.in_(list_ids), ListMembership.status == "subscribed")
        .group_by(ListMembership.list_id)
    )
    return {list_id: n for list_id, n in rows}


def list_lists(limit: int, after: str | None = None) -> list[dict[str, Any]]:
    """Lists in name order from the one after `after` (keyset paging), with their subscribed members."""
    query = select(ContactList).order_by(ContactList.name).limit(limit)
    if after is not None:
        check_storable(after, "cursor")  # a cursor is the client's to alter
        query = query.where(ContactList.name > after)
    with session_scope() as session:
        rows = list(session.scalars(query))
        counts = _member_counts(session, [row.id for row in rows]) if rows else {}
        return [_list_dict(row, counts.get(row.id, 0)) for row in rows]


def _named_list(session: Session, name: str) -> ContactList:
    """The list a URL names; NotFound for an unknown name, or one no list could have."""
    try:
        check_list_name(name)
    except InvalidInput:
        raise NotFound(f"no list named {name!r}") from None
    row = session.scalar(select(ContactList).where(ContactList.name == name))
    if row is None:
        raise NotFound(f"no list named {name!r}")
    return row


def get_list(name: str) -> dict[str, Any]:
    """One list with its number of subscribed members; NotFound if there is none by that name."""
    with session_scope() as session:
        row = _named_list(session, name)
        return _list_dict(row, _member_counts(session, [row.id]).get(row.id, 0))


def list_members(name: str, limit: int, after: int | None = None) -> list[dict[str, Any]]:
    """A list's subscribed contacts in id order, from the one after `after`; NotFound for an unknown list."""
    with session_scope() as session:
        _named_list(session, name)
    return list_contacts(limit, after, list_name=name)


def delete_list(name: str) -> bool:
    name = check_list_name(name, field="name")
    with session_scope() as session:
        row = session.scalar(select(ContactList).where(ContactList.name == name))
        if row is None:
            return False
        session.execute(delete(ListMembership).where(ListMembership.list_id == row.id))
        session.delete(row)
        return True


def add_members(list_name: str, emails: Iterable[str], *, source: str | None = "api") -> int:
    """Subscribe addresses to a list, creating contacts that do not exist yet; all addresses are
    checked first (one bad address: an error naming it, nothing written). Returns how many joined."""
    list_name = check_list_name(list_name)
    source = check_source(source)
    normalized = list(dict.fromkeys(normalize_email(e, field=f"emails[{i}]") for i, e in enumerate(emails)))
    now = utcnow()
    with session_scope() as session:
        target = _list_by_name(session, list_name)
        insert = dialect.insert(session)
        joined = 0
        for email in normalized:
            contact = _get(session, email) or _create(session, email, {"source": source})
            result = session.execute(
                insert(ListMembership)
                .values(list_id=target.id, contact_id=contact.id, status="subscribed", joined_at=now, source=source)
                .on_conflict_do_update(
                    index_elements=["list_id", "contact_id"],
                    set_={"status": "subscribed", "joined_at": now, "source": source},
                    where=ListMembership.status != "subscribed",
                )
                .returning(ListMembership.contact_id)
            )
            joined += len(result.all())
        return joined


def remove_members(list_name: str, emails: Iterable[str]) -> int:
    """Take addresses off a list (the membership row is deleted). Returns how many were members."""
    list_name = check_list_name(list_name)
    normalized = list(dict.fromkeys(normalize_email(e, field=f"emails[{i}]") for i, e in enumerate(emails)))
    with session_scope() as session:
        target = _list_by_name(session, list_name)
        ids = select(Contact.id).where(Contact.email.in_(normalized)).scalar_subquery()
        result = session.connection().execute(
            delete(ListMembership.__table__).where(
                ListMembership.list_id == target.id, ListMembership.contact_id.in_(ids)
            )
        )
        return result.rowcount


# --- Batches: many contacts in a few statements (the API's batch upsert, event ingestion) ------------

_IN_CHUNK = 5000  # addresses per look-up: well under SQLite's 32,766 parameters per statement


@dataclass(frozen=True)
class Upserted:
    """A batch row stored: its contact's id, and whether the batch created the contact."""

    email: str
    id: int
    created: bool


def bulk_status(requested: str | None, current: str | None, suppressed_as: str | None) -> str:
    """The status a bulk write leaves: it can move a contact away from `subscribed`, never back. A
    suppressed address takes the suppression's status; an unsubscribed, bounced, complained or
    blocked contact keeps its status unless another such status is asked for."""
    if suppressed_as:
        return SUPPRESSION_TO_STATUS.get(suppressed_as, ContactStatus.BLOCKED.value)
    if current in STATUS_TO_SUPPRESSION and requested in (None, ContactStatus.SUBSCRIBED.value):
        return current
    return requested or current or ContactStatus.SUBSCRIBED.value


def _check_row(row: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(row, Mapping):
        raise InvalidInput("must be an object with an email", field="")
    fields = dict(row)
    unknown = sorted(set(fields) - _FIELDS - {"email"})
    if unknown:
        raise InvalidInput(f"unknown field; known: email, {', '.join(sorted(_FIELDS))}", field=unknown[0])
    email = normalize_email(fields.pop("email", None))
    return email, _check_fields(fields)


def _suppressed(connection: Connection, emails: list[str]) -> dict[str, str]:
    query = select(Suppression.email, Suppression.reason).where(Suppression.email.in_(emails))
    return {email: reason for email, reason in connection.execute(query)}


def _stored(connection: Connection, emails: list[str], *, lock: bool) -> dict[str, Row[Any]]:
    query = select(
        Contact.id, Contact.email, Contact.status, Contact.attributes, Contact.timezone, Contact.locale, Contact.source
    ).where(Contact.email.in_(emails))
    if lock:  # attributes are merged here, in Python: no concurrent write may slip in between
        query = query.order_by(Contact.id).with_for_update()  # in id order: two batches cannot deadlock
    return {row.email: row for row in connection.execute(query)}


def _insert_new(connection: Connection, values: list[dict[str, Any]]) -> dict[str, int]:
    """Insert contacts, skipping addresses a concurrent writer added since the look-up; {email: id} of
    those inserted."""
    statement = (
        dialect.insert(connection)(Contact)
        .on_conflict_do_nothing(index_elements=["email"])
        .returning(Contact.email, Contact.id)
    )
    return {email: contact_id for email, contact_id in connection.execute(statement, values)}


def _add_suppressions(connection: Connection, pairs: list[tuple[str, str]]) -> None:
    if pairs:
        now = utcnow()
        connection.execute(
            dialect.insert(connection)(Suppression).on_conflict_do_nothing(index_elements=["email"]),
            [{"email": e, "reason": r, "detail": "contact status", "created_at": now} for e, r in pairs],
        )


def _new_values(email: str, fields: dict[str, Any], suppressed_as: str | None, now: datetime) -> dict[str, Any]:
    return {
        "email": email,
        "status": bulk_status(fields.get("status"), None, suppressed_as),
        "attributes": _merge_attributes(None, fields.get("attributes", {})),
        "timezone": fields.get("timezone"),
        "locale": fields.get("locale"),
        "source": fields.get("source"),
        "created_at": now,
        "updated_at": now,
    }


def _upsert_chunk(connection: Connection, rows: dict[str, dict[str, Any]]) -> dict[str, tuple[int, bool]]:
    """One chunk of checked rows ({email: fields}) written in a few statements: the look-ups, one
    INSERT and one UPDATE (executemany), the new suppressions; {email: (id, created)}."""
    now = utcnow()
    emails = list(rows)
    suppressed = _suppressed(connection, emails)
    stored = _stored(connection, emails, lock=True)
    new = [_new_values(e, rows[e], suppressed.get(e), now) for e in emails if e not in stored]
    inserted = _insert_new(connection, new) if new else {}
    statuses = {values["email"]: values["status"] for values in new if values["email"] in inserted}
    raced = [values["email"] for values in new if values["email"] not in inserted]
    if raced:
        stored.update(_stored(connection, raced, lock=True))
    changes = []
    for email, row in stored.items():
        fields = rows[email]
        statuses[email] = bulk_status(fields.get("status"), row.status, suppressed.get(email))
        changes.append(
            {
                "contact_id": row.id,
                "status": statuses[email],
                "attributes": _merge_attributes(row.attributes, fields.get("attributes", {})),
                "timezone": fields.get("timezone", row.timezone),
                "locale": fields.get("locale", row.locale),
                "source": fields.get("source", row.source),
                "updated_at": now,
            }
        )
    if changes:
        table = Contact.__table__
        connection.execute(update(table).where(table.c.id == bindparam("contact_id")), changes)
    _add_suppressions(
        connection,
        [
            (e, STATUS_TO_SUPPRESSION[s])
            for e, s in statuses.items()
            if s in STATUS_TO_SUPPRESSION and e not in suppressed
        ],
    )
    outcome = {email: (contact_id, True) for email, contact_id in inserted.items()}
    outcome.update({email: (row.id, False) for email, row in stored.items()})
    return outcome


def upsert_many(rows: Sequence[Any]) -> list[Upserted | InvalidInput]:
    """Create or update many contacts (the API's batch) in one transaction and a few statements per
    5,000: attributes merge as in upsert_contact, statuses change only as `bulk_status` allows, and
    suppressions follow. A result per row, in order: what was stored, or the row's error (`field`
    relative to the row; an address repeated in the batch is an error). The good rows are stored
    whatever the bad ones hold."""
    results: list[Upserted | InvalidInput | None] = [None] * len(rows)
    checked: dict[str, tuple[int, dict[str, Any]]] = {}
    for index, row in enumerate(rows):
        try:
            email, fields = _check_row(row)
        except InvalidInput as exc:
            results[index] = exc
            continue
        if email in checked:
            results[index] = InvalidInput(f"{email} is also in row {checked[email][0]}", field="email")
            continue
        checked[email] = (index, fields)
    # In one order whatever the client's: concurrent batches take their row locks in the same order.
    emails = sorted(checked)
    with session_scope() as session:
        connection = session.connection()
        for start in range(0, len(emails), _IN_CHUNK):
            chunk = {email: checked[email][1] for email in emails[start : start + _IN_CHUNK]}
            for email, (contact_id, created) in _upsert_chunk(connection, chunk).items():
                results[checked[email][0]] = Upserted(email, contact_id, created)
    return [r for r in results if r is not None]


# --- Custom events ------------------------------------------------------------------------------------


def check_event_name(value: Any, *, field: str = "event") -> str:
    """A custom event's name: a letter, then up to 63 letters, digits or _ . : -, not one SmartMail records itself."""
    if not isinstance(value, str) or not _EVENT_NAME.fullmatch(value):
        raise InvalidInput(
            f"{value!r} is not an event name (a letter, then up to 63 letters, digits or _ . : -)", field=field
        )
    if value.lower() in RESERVED_EVENTS:
        raise InvalidInput(f"{value!r} is recorded by SmartMail's tracking and cannot be tracked by hand", field=field)
    return value


def check_event_properties(value: Any, *, field: str = "properties") -> dict[str, Any]:
    """A custom event's properties: a JSON object (None is an empty one)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise InvalidInput("must be a mapping with string keys", field=field)
    _check_json_value(dict(value), field)
    return dict(value)


def check_occurred_at(value: Any, *, field: str = "occurred_at") -> datetime:
    """When an event happened, as the naive UTC the database stores; None is now. Naive input is taken as UTC."""
    if value is None:
        return utcnow()
    if not isinstance(value, datetime):
        raise InvalidInput("must be a datetime", field=field)
    if value.tzinfo is not None:
        try:
            return value.astimezone(UTC).replace(tzinfo=None)
        except OverflowError:
            raise InvalidInput("is outside the years 1-9999 once in UTC", field=field) from None
    return value


# The automations' tick reads new events (automations/enrolment.py): asked for when custom events
# are stored, so a triggered workflow starts at once rather than at beat's next tick; at most once
# a second per process, since one tick reads every event stored before it.
AUTOMATIONS_TICK = "smartmail.automations.tick"
_ASK_EVERY = 1.0
_asked = {"at": -_ASK_EVERY}
_asking = threading.Lock()


def ask_for_automations() -> None:
    """Ask the workers to read the custom events just stored (never raises: beat's tick reads them anyway)."""
    with _asking:
        if time.monotonic() - _asked["at"] < _ASK_EVERY:
            return
        _asked["at"] = time.monotonic()
    try:
        publish(AUTOMATIONS_TICK, expires=5.0)
    except Exception as exc:  # noqa: BLE001 - a broker outage must not fail the event's recording
        log.warning("events.automations_not_asked", error=str(exc))


def track(
    email: str, event: str, properties: Mapping[str, Any] | None = None, *, occurred_at: datetime | None = None
) -> int:
    """Record a custom event (e.g. `order_placed`) for a contact, creating the contact if it is new;
    segments and automations select on these. Returns the event id."""
    email = normalize_email(email)
    event = check_event_name(event)
    checked_properties = check_event_properties(properties)
    occurred_at = check_occurred_at(occurred_at)
    with session_scope() as session:
        contact = _get(session, email) or _create(session, email, {"source": "track"})
        row = Event(type=event, contact_id=contact.id, properties=checked_properties, occurred_at=occurred_at)
        session.add(row)
        session.flush()
        event_id = row.id
    ask_for_automations()
    return event_id


# --- For modules that change a contact inside their own transaction (unsubscribe, …) ----------------


def sync_suppression(session: Session, email: str, status: str) -> None:
    """Public name of `_sync_suppression`: put the address on (or take it off) the suppression list
    to match `status`, in the caller's transaction. An existing suppression keeps its reason."""
    _sync_suppression(session, email, status)


def ensure_contacts(session: Session, emails: Sequence[str], *, source: str) -> dict[str, int]:
    """{email: contact id} for normalized addresses, creating the contacts not known yet (as `track`
    does: a suppressed address starts with the matching status), in the caller's transaction."""
    connection = session.connection()
    ids: dict[str, int] = {}
    unique = sorted(set(emails))  # one order for every caller's row locks (see upsert_many)
    for start in range(0, len(unique), _IN_CHUNK):
        chunk = unique[start : start + _IN_CHUNK]
        ids.update({email: row.id for email, row in _stored(connection, chunk, lock=False).items()})
        new = [e for e in chunk if e not in ids]
        if not new:
            continue
        now = utcnow()
        suppressed = _suppressed(connection, new)
        ids.update(_insert_new(connection, [_new_values(e, {"source": source}, suppressed.get(e), now) for e in new]))
        raced = [e for e in new if e not in ids]
        if raced:
            ids.update({email: row.id for email, row in _stored(connection, raced, lock=False).items()})
    return ids
