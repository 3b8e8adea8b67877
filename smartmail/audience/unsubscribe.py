"""The unsubscribe itself: the contact's status, the suppression list and an event, in one transaction."""

from __future__ import annotations

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from smartmail.audience.contacts import sync_suppression
from smartmail.store.engine import session_scope, utcnow
from smartmail.store.models import Contact, ContactStatus, Event, EventType, Suppression

log = structlog.get_logger("smartmail.unsubscribe")


def unsubscribe(contact_id: int, campaign_id: int | None, *, source: str) -> bool:
    """Unsubscribe the contact, in one transaction: a `subscribed` contact becomes `unsubscribed`
    (bounced, complained and blocked stay as they are), the address is on the suppression list
    (an existing entry keeps its reason), and an `unsubscribed` event records {campaign_id, source}.

    True if this call changed anything. Idempotent: a repeat (or a concurrent duplicate, such as a
    provider's one-click POST racing the recipient's own click) changes nothing and returns False,
    as does an unknown contact id: an erased contact's address is already suppressed."""
    with session_scope() as session:
        return unsubscribe_in(session, contact_id, campaign_id, source=source)


def unsubscribe_in(session: Session, contact_id: int, campaign_id: int | None, *, source: str) -> bool:
    """`unsubscribe` in the caller's transaction (a mailto unsubscribe commits with its inbound mail)."""
    # Row lock on PostgreSQL so concurrent calls for one contact run one after the other
    # (SQLite ignores FOR UPDATE; its BEGIN IMMEDIATE already serializes writers).
    contact = session.scalar(select(Contact).where(Contact.id == contact_id).with_for_update())
    if contact is None:
        return False
    changed = False
    if contact.status == ContactStatus.SUBSCRIBED.value:
        contact.status = ContactStatus.UNSUBSCRIBED.value
        contact.updated_at = utcnow()
        changed = True
    if session.scalar(select(Suppression.email).where(Suppression.email == contact.email)) is None:
        sync_suppression(session, contact.email, ContactStatus.UNSUBSCRIBED.value)
        changed = True
    if changed:
        session.add(
            Event(
                type=EventType.UNSUBSCRIBED.value,
                contact_id=contact.id,
                campaign_id=campaign_id,
                occurred_at=utcnow(),
                properties={"campaign_id": campaign_id, "source": source},
            )
        )
        log.info("contact.unsubscribed", contact_id=contact_id, campaign_id=campaign_id, source=source)
    return changed
