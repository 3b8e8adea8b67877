"""What bounces, complaints and mailto unsubscribes change: message state, suppressions, contacts, events, counters."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from smartmail.addresses import bare_address
from smartmail.audience.contacts import SUPPRESSION_TO_STATUS, email_problem
from smartmail.audience.unsubscribe import unsubscribe_in
from smartmail.config import get_settings
from smartmail.content import unsubscribe_links
from smartmail.errors import InvalidToken
from smartmail.feedback.dsn import DIAGNOSTIC_MAX
from smartmail.feedback.findings import Finding, Kind
from smartmail.store import dialect
from smartmail.store.engine import session_scope, utcnow
from smartmail.store.models import (
    Campaign,
    Contact,
    ContactStatus,
    Event,
    EventType,
    FeedbackMark,
    Message,
    MessageState,
    Suppression,
)

log = structlog.get_logger("smartmail.feedback")

# A hard bounce proves the message left: `unknown` (the worker died after DATA) becomes `bounced` too.
_BOUNCEABLE = (MessageState.SENT.value, MessageState.UNKNOWN.value)
# A complaint outranks an unsubscribe (the address was reported as spam); neither undoes a bounce or block.
_STATUS_FROM = {
    Kind.HARD_BOUNCE: (ContactStatus.SUBSCRIBED.value,),
    Kind.SOFT_BOUNCE: (ContactStatus.SUBSCRIBED.value,),
    Kind.COMPLAINT: (ContactStatus.SUBSCRIBED.value, ContactStatus.UNSUBSCRIBED.value),
}
_SUPPRESSION_REASON = {Kind.HARD_BOUNCE: "hard_bounce", Kind.SOFT_BOUNCE: "soft_bounce", Kind.COMPLAINT: "complaint"}
_EVENT_TYPE = {
    Kind.HARD_BOUNCE: EventType.BOUNCED.value,
    Kind.SOFT_BOUNCE: EventType.BOUNCED.value,
    Kind.COMPLAINT: EventType.COMPLAINED.value,
}
_COUNTER = {Kind.HARD_BOUNCE: "hard_bounces", Kind.SOFT_BOUNCE: "soft_bounces", Kind.COMPLAINT: "complaints"}


# RFC 3463 section 3: the second number of a status code says what the failure is about.
_SUBJECTS = {
    "1": "address",
    "2": "mailbox",
    "3": "system",
    "4": "network",
    "5": "protocol",
    "6": "content",
    "7": "policy",
}
# Soft bounces that say something about the address (a full or disabled mailbox, a destination not
# answering for days) count toward SMARTMAIL_SOFT_BOUNCE_LIMIT; a policy block, a content or a system
# fault is about the sender or the moment, and never suppresses an address (DESIGN: 5.7.x pauses the site).
_COUNTED_SUBJECTS = frozenset({"mailbox", "network"})
_KEY_MAX = 200  # longer mark keys are stored as their SHA-256


@dataclass
class Applied:
    """What a batch of findings changed. `counts` by outcome: the kind applied, `duplicate` (its
    mark existed: a replay), `no_recipient` (neither a known message nor a valid address),
    `unverified` (an address-only finding not trusted: see apply_in), `bad_token`."""

    campaign_ids: set[int] = field(default_factory=set)  # campaigns with a new hard bounce or complaint
    counts: Counter[str] = field(default_factory=Counter)

    def merge(self, other: Applied) -> None:
        self.campaign_ids |= other.campaign_ids
        self.counts.update(other.counts)


@dataclass
class _Effect:
    """A finding resolved: the address it acts on, its message, campaign and contact when known, its mark."""

    finding: Finding
    key: str
    address: str | None
    message_id: str | None = None
    campaign_id: int | None = None
    contact_id: int | None = None
    report: str | None = None  # without a message: the report it came from (reference or origin)
    unverified: bool = False  # without a message, and not to be trusted (see apply_in)


def apply(findings: Sequence[Finding], *, origin: str, now: datetime | None = None) -> Applied:
    """Apply the findings of one report in one transaction (see `apply_in`)."""
    with session_scope() as session:
        return apply_in(session, findings, origins=[origin] * len(findings), now=now)


def apply_in(
    session: Session, findings: Sequence[Finding], *, origins: Sequence[str], now: datetime | None = None
) -> Applied:
    """Apply findings in the caller's transaction, each at most once: a finding about a known
    message is marked `<message id>:<kind>`; one without, `<reference or origin>:<address>:<kind>`
    (`origins[i]`: finding i's report's own id, such as the inbound mail's or the SNS message's).
    A mark that exists means a duplicate or a replay, which changes nothing.

    A finding that names no message we sent acts on its address only when its report names that
    address alone and the address is a contact's: SmartMail sends one recipient per message, so a
    genuine report about its mail names one address, and a forged one naming many strangers
    changes nothing (`unverified`).

    A hard bounce: the message `bounced` (from `sent` or `unknown`), the address suppressed
    (`hard_bounce`), a subscribed contact `bounced`. A soft bounce about the mailbox or the
    network is counted; the contact's SMARTMAIL_SOFT_BOUNCE_LIMIT-th within
    SMARTMAIL_SOFT_BOUNCE_DAYS suppresses (`soft_bounce`). A complaint: suppression `complaint`,
    contact `complained`. Each writes a `bounced` or `complained` event and counts on its
    campaign (unless `counts_for_campaign` is false). An unsubscribe is the one-click POST's."""
    now = now or utcnow()
    applied = Applied()
    # A delivery notification changes nothing: counted, not marked (a mark per delivered message
    # would grow a table for no effect).
    delivered = sum(1 for f in findings if f.kind is Kind.DELIVERED)
    if delivered:
        applied.counts[Kind.DELIVERED.value] = delivered
    kept = [(f, o) for f, o in zip(findings, origins, strict=True) if f.kind is not Kind.DELIVERED]
    effects = _resolve(session, kept)
    _distrust(effects)
    new_keys = _mark(session, [e.key for e in effects if not e.unverified], now)
    fresh: list[_Effect] = []  # the effects applied by this call
    for effect in effects:
        if effect.unverified:
            applied.counts["unverified"] += 1
        elif effect.key not in new_keys:
            applied.counts["duplicate"] += 1
        elif effect.address is None and effect.finding.kind is not Kind.UNSUBSCRIBE:
            applied.counts["no_recipient"] += 1
        else:
            new_keys.discard(effect.key)  # a repeat within the batch is a duplicate too
            fresh.append(effect)
    for effect in fresh:
        if effect.finding.kind is Kind.UNSUBSCRIBE:
            _unsubscribe(session, effect, applied)
    bounces = [e for e in fresh if e.finding.kind in _EVENT_TYPE]
    if bounces:
        _record(session, bounces, now, applied)
    return applied


def _resolve(session: Session, findings: Sequence[tuple[Finding, str]]) -> list[_Effect]:
    """Each finding with its message (when it names one we sent), address, contact and mark key."""
    ids = sorted({f.message_id for f, _ in findings if f.message_id})
    messages = {}
    if ids:
        columns = (Message.id, Message.recipient, Message.campaign_id, Message.contact_id)
        messages = {row.id: row for row in session.execute(select(*columns).where(Message.id.in_(ids)))}
    effects = []
    for finding, origin in findings:
        message = messages.get(finding.message_id) if finding.message_id else None
        if message is not None:
            # The message we sent is the truth: a forwarded address may be the DSN's Final-Recipient.
            effects.append(
                _Effect(
                    finding,
                    f"{message.id}:{finding.kind.value}",
                    bare_address(message.recipient).lower(),
                    message.id,
                    message.campaign_id,
                    message.contact_id,
                )
            )
            continue
        address = email_problem(finding.recipient)[0] if finding.recipient else None
        anchor = finding.reference or origin
        key = f"{anchor}:{address or finding.unsubscribe_token or ''}:{finding.kind.value}"
        if len(key) > _KEY_MAX:
            key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
        effects.append(_Effect(finding, key, address, report=anchor))
    unknown = sorted({e.address for e in effects if e.contact_id is None and e.address})
    if unknown:
        query = select(Contact.email, Contact.id).where(Contact.email.in_(unknown))
        contacts = {row.email: row.id for row in session.execute(query)}
        for effect in effects:
            if effect.contact_id is None and effect.address:
                effect.contact_id = contacts.get(effect.address)
    return effects


def _distrust(effects: list[_Effect]) -> None:
    """Mark the address-only effects not to trust: of a report naming several addresses, or of an
    address that is no contact's."""
    address_only = [e for e in effects if e.message_id is None and e.finding.kind in _EVENT_TYPE and e.address]
    per_report = Counter(e.report for e in address_only)
    for effect in address_only:
        effect.unverified = effect.contact_id is None or per_report[effect.report] > 1


def _mark(session: Session, keys: Sequence[str], now: datetime) -> set[str]:
    """Insert the marks not there yet; the keys inserted."""
    unique = sorted(set(keys))
    if not unique:
        return set()
    statement = (
        dialect.insert(session)(FeedbackMark)
        .values([{"key": key, "created_at": now} for key in unique])
        .on_conflict_do_nothing(index_elements=["key"])
        .returning(FeedbackMark.key)
    )
    return set(session.scalars(statement))


def _unsubscribe(session: Session, effect: _Effect, applied: Applied) -> None:
    try:
        contact_id, campaign_id = unsubscribe_links.read_token(effect.finding.unsubscribe_token)
    except InvalidToken:
        applied.counts["bad_token"] += 1
        return
    unsubscribe_in(session, contact_id, campaign_id, source="mailto")
    applied.counts[Kind.UNSUBSCRIBE.value] += 1


def _record(session: Session, effects: list[_Effect], now: datetime, applied: Applied) -> None:
    """Events, message states, campaign counters and suppressions of the new bounces and complaints."""
    session.execute(insert(Event), [_event(e, now) for e in effects])
    hard = sorted({e.message_id for e in effects if e.finding.kind is Kind.HARD_BOUNCE and e.message_id})
    if hard:
        session.execute(
            update(Message)
            .where(Message.id.in_(hard), Message.state.in_(_BOUNCEABLE))
            .values(state=MessageState.BOUNCED.value, reason="hard bounce"),
            execution_options={"synchronize_session": False},
        )
    per_campaign: Counter[tuple[int, str]] = Counter(
        (e.campaign_id, _COUNTER[e.finding.kind])
        for e in effects
        if e.campaign_id is not None and e.finding.counts_for_campaign
    )
    for (campaign_id, column), count in sorted(per_campaign.items()):
        session.execute(
            update(Campaign).where(Campaign.id == campaign_id).values({column: getattr(Campaign, column) + count})
        )
        if column != "soft_bounces":
            applied.campaign_ids.add(campaign_id)
    suppress = [e for e in effects if e.finding.kind is not Kind.SOFT_BOUNCE]
    suppress += _over_soft_limit(session, [e for e in effects if e.finding.kind is Kind.SOFT_BOUNCE], now)
    _suppress(session, suppress, now)
    for effect in effects:
        applied.counts[effect.finding.kind.value] += 1
        log.info(  # a hard bounce turns a sent message `bounced`; every finding is one line with its ids
            "message.feedback",
            message_id=effect.message_id,
            campaign_id=effect.campaign_id,
            contact_id=effect.contact_id,
            kind=effect.finding.kind.value,
            source=effect.finding.source,
            status=effect.finding.status,
        )
    log.info("feedback.applied", **applied.counts)


def _subject(status: str | None) -> str | None:
    """What an RFC 3463 status code is about (`5.2.2` → mailbox)."""
    parts = (status or "").split(".")
    return _SUBJECTS.get(parts[1]) if len(parts) == 3 else None


def _event(effect: _Effect, now: datetime) -> dict[str, Any]:
    finding = effect.finding
    properties: dict[str, Any] = {"source": finding.source, "recipient": effect.address}
    if finding.kind is not Kind.COMPLAINT:
        properties["kind"] = "hard" if finding.kind is Kind.HARD_BOUNCE else "soft"
        properties["about"] = _subject(finding.status)
    for name in ("status", "diagnostic", "feedback_type", "reference"):
        value = getattr(finding, name)
        if value:
            properties[name] = value[:DIAGNOSTIC_MAX]
    return {
        "type": _EVENT_TYPE[finding.kind],
        "contact_id": effect.contact_id,
        "message_id": effect.message_id,
        "campaign_id": effect.campaign_id,
        "properties": properties,
        "occurred_at": now,
    }


def _over_soft_limit(session: Session, effects: list[_Effect], now: datetime) -> list[_Effect]:
    """The soft bounces that bring their contact to the limit within the window (this batch's
    events are already in the table). The contacts are locked first, in one order, so two
    batches counting one contact's bounces take turns."""
    counted = [e for e in effects if e.contact_id is not None and _subject(e.finding.status) in _COUNTED_SUBJECTS]
    contact_ids = sorted({e.contact_id for e in counted if e.contact_id is not None})
    if not contact_ids:
        return []
    session.execute(select(Contact.id).where(Contact.id.in_(contact_ids)).order_by(Contact.id).with_for_update())
    settings = get_settings()
    rows = session.execute(
        select(Event.contact_id, Event.properties).where(
            Event.contact_id.in_(contact_ids),
            Event.type == EventType.BOUNCED.value,
            Event.occurred_at >= now - timedelta(days=settings.soft_bounce_days),
        )
    )
    soft = Counter(
        contact_id
        for contact_id, properties in rows
        if (properties or {}).get("kind") == "soft" and (properties or {}).get("about") in _COUNTED_SUBJECTS
    )
    chosen: dict[int, _Effect] = {}
    for effect in counted:
        if effect.contact_id is not None and soft[effect.contact_id] >= settings.soft_bounce_limit:
            chosen.setdefault(effect.contact_id, effect)
    return list(chosen.values())


def _suppress(session: Session, effects: list[_Effect], now: datetime) -> None:
    """The addresses on the suppression list (an existing entry keeps its reason) and their contacts'
    status: one INSERT, and one UPDATE per kind, in address order (row locks taken in one order)."""
    rows: dict[str, dict[str, Any]] = {}
    for effect in sorted(effects, key=lambda e: e.address or ""):
        finding, address = effect.finding, effect.address
        if address is None or address in rows:
            continue
        detail = finding.diagnostic or finding.status or finding.feedback_type or finding.source
        if finding.kind is Kind.SOFT_BOUNCE:
            settings = get_settings()
            detail = f"{settings.soft_bounce_limit} soft bounces within {settings.soft_bounce_days:g} days: {detail}"
        rows[address] = {
            "email": address,
            "reason": _SUPPRESSION_REASON[finding.kind],
            "detail": detail[:DIAGNOSTIC_MAX],
            "source_message_id": effect.message_id,
            "created_at": now,
        }
    if not rows:
        return
    session.execute(
        dialect.insert(session)(Suppression)
        .values(list(rows.values()))
        .on_conflict_do_nothing(index_elements=["email"])
    )
    for kind in (Kind.HARD_BOUNCE, Kind.SOFT_BOUNCE, Kind.COMPLAINT):
        emails = sorted(email for email, row in rows.items() if row["reason"] == _SUPPRESSION_REASON[kind])
        if emails:
            session.execute(
                update(Contact)
                .where(Contact.email.in_(emails), Contact.status.in_(_STATUS_FROM[kind]))
                .values(status=SUPPRESSION_TO_STATUS[_SUPPRESSION_REASON[kind]], updated_at=now)
                .execution_options(synchronize_session=False)
            )
