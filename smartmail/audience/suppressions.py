"""The suppression list: list, add, read and remove addresses never mailed, keeping contacts' status in step."""

from __future__ import annotations

from typing import Any, Literal, get_args

import structlog
from sqlalchemy import delete, select

from smartmail.audience.contacts import SUPPRESSION_TO_STATUS, normalize_email
from smartmail.errors import InvalidInput, NotFound
from smartmail.store import dialect
from smartmail.store.engine import session_scope, utcnow
from smartmail.store.models import Contact, ContactStatus, Suppression

log = structlog.get_logger("smartmail.suppressions")

# Why an address is suppressed: `erased` is written by erasing a contact, `soft_bounce` by repeated
# soft bounces (SMARTMAIL_SOFT_BOUNCE_LIMIT), the others by delivery and bounces (hard_bounce),
# complaints, unsubscribes and people (manual).
Reason = Literal["hard_bounce", "soft_bounce", "complaint", "unsubscribed", "manual", "erased"]
AddReason = Literal["manual", "hard_bounce", "complaint", "unsubscribed"]
REASONS: tuple[str, ...] = get_args(Reason)
ADD_REASONS: tuple[str, ...] = get_args(AddReason)
# Statuses a manual removal returns to `subscribed`: a bounce may have been a passing fault (a full
# mailbox, a misconfigured server) and a block was an operator's call. An unsubscribe or a complaint
# is the recipient's withdrawal of consent, which only the recipient can give back.
RESUBSCRIBED_ON_REMOVAL = frozenset({ContactStatus.BOUNCED.value, ContactStatus.BLOCKED.value})
MAX_DETAIL = 2000


def as_dict(row: Suppression) -> dict[str, Any]:
    return {
        "email": row.email,
        "reason": row.reason,
        "detail": row.detail,
        "source_message_id": row.source_message_id,
        "created_at": row.created_at,
    }


def _check_reason(value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InvalidInput(f"{value!r} is not one of {', '.join(allowed)}", field="reason")
    return value


def list_suppressions(*, limit: int, after: str | None = None, reason: str | None = None) -> list[dict[str, Any]]:
    """Entries by address, from the address after `after` (keyset paging over the primary key)."""
    query = select(Suppression).order_by(Suppression.email).limit(limit)
    if after is not None:
        query = query.where(Suppression.email > after)
    if reason is not None:
        query = query.where(Suppression.reason == _check_reason(reason, REASONS))
    with session_scope() as session:
        return [as_dict(row) for row in session.scalars(query)]


def get_suppression(email: str) -> dict[str, Any]:
    """The entry for an address (normalized as contacts are); NotFound if it is not suppressed."""
    email = normalize_email(email)
    with session_scope() as session:
        row = session.get(Suppression, email)
        if row is None:
            raise NotFound(f"{email} is not suppressed")
        return as_dict(row)


def add_suppression(email: str, reason: str = "manual", detail: str | None = None) -> tuple[dict[str, Any], bool]:
    """Suppress an address; (the entry, True) if it is new. An address already suppressed keeps its
    entry and reason (False), as everywhere suppressions are written. A `subscribed` contact of
    that address takes the matching status (manual → blocked, hard_bounce → bounced, …) in the
    same transaction; other statuses stay."""
    email = normalize_email(email)
    _check_reason(reason, ADD_REASONS)
    if detail is not None and (len(detail) > MAX_DETAIL or "\x00" in detail):
        raise InvalidInput(f"must be at most {MAX_DETAIL} characters, without NUL", field="detail")
    with session_scope() as session:
        insert = dialect.insert(session)(Suppression).values(
            email=email, reason=reason, detail=detail, created_at=utcnow()
        )
        created = session.execute(
            insert.on_conflict_do_nothing(index_elements=["email"]).returning(Suppression.email)
        ).first()
        if created:
            contact = session.scalar(select(Contact).where(Contact.email == email).with_for_update())
            if contact is not None and contact.status == ContactStatus.SUBSCRIBED.value:
                contact.status = SUPPRESSION_TO_STATUS.get(reason, ContactStatus.BLOCKED.value)
                contact.updated_at = utcnow()
        row = session.get(Suppression, email)
        assert row is not None  # inserted or already there, in this transaction
        entry = as_dict(row)
    if created:
        log.info("suppression.added", reason=reason)
    return entry, bool(created)


def remove_suppression(email: str) -> None:
    """Take an address off the suppression list, so transactional mail reaches it again.

    The contact's status follows the reason's owner: a `bounced` or `blocked` contact is
    `subscribed` again (the bounce may have been passing; the block was ours), while an
    `unsubscribed` or `complained` one keeps its status: consent withdrawn by the recipient comes
    back only from the recipient (RESUBSCRIBED_ON_REMOVAL), so campaigns, which send to
    `subscribed` contacts only, still pass them by. Providers draw the same line: bounces and
    manual blocks are lifted by the sender, consent is not (e.g. https://www.plain.com/docs/graphql-reference/mutations/deleteEmailSuppression).
    NotFound if the address was not suppressed."""
    email = normalize_email(email)
    with session_scope() as session:
        removed = session.execute(
            delete(Suppression).where(Suppression.email == email).returning(Suppression.reason)
        ).first()
        if removed is None:
            raise NotFound(f"{email} is not suppressed")
        contact = session.scalar(select(Contact).where(Contact.email == email).with_for_update())
        if contact is not None and contact.status in RESUBSCRIBED_ON_REMOVAL:
            contact.status = ContactStatus.SUBSCRIBED.value
            contact.updated_at = utcnow()
    log.info("suppression.removed", reason=removed[0])
