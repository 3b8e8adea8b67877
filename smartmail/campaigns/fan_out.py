"""Campaign fan-out: the audience query, a page of contacts at a time into message rows, the fan-out lease."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy import and_, exists, or_, select

from smartmail.audience import frequency_cap, segments
from smartmail.campaigns import ab_tests
from smartmail.config import get_settings
from smartmail.errors import NotFound
from smartmail.store.engine import reader, refresh_statistics, session_scope, utcnow
from smartmail.store.ids import new_id, new_ids
from smartmail.store.models import (
    Campaign,
    CampaignState,
    Contact,
    ContactStatus,
    Message,
    MessageState,
    Segment,
    Suppression,
)
from smartmail.store.sql import fan_out as fan_out_sql
from smartmail.store.sql.fan_out import MessageRow
from smartmail.workers.campaign_rows import window_opens
from smartmail.workers.dispatch import BULK, enqueue

log = structlog.get_logger("smartmail.campaigns")

# Contacts per fan-out page: one audience query, one INSERT, one checkpoint; smaller pages cost more CPU a row.
PAGE = 5000
_AUDIENCE_TABLES = ["contacts", "list_memberships", "suppressions", "events"]  # what audience queries read


def known_zone(name: str | None, fallback: str) -> str:
    """`name` if it is a time zone this machine knows, else `fallback`."""
    try:
        return name if name and ZoneInfo(name) else fallback
    except (KeyError, ValueError):
        return fallback


def hand_fan_out(campaign: Campaign, now: datetime) -> str:
    """Make a new fan-out run the campaign's only one: it gets a lease and an owner token, and a
    fan-out task holding another token (a lost one redelivered late, a duplicate) stops at once."""
    campaign.fan_out_owner = new_id()
    campaign.fan_out_until = _lease_end(now)
    return campaign.fan_out_owner


def _lease_end(now: datetime | None = None) -> datetime:
    return (now or utcnow()) + timedelta(seconds=get_settings().fan_out_lease)


def audience_query(session, campaign: Campaign, after: int | None = None):
    """SELECT contact id, email, time zone of the campaign's audience: subscribed contacts in any
    of its lists and/or its saved segment, minus suppressed addresses (one query per page of
    contacts with ids above `after`)."""
    rules: list[Any] = [{"status": ContactStatus.SUBSCRIBED.value}]
    if campaign.lists:
        rules.append({"any": [{"list": name} for name in campaign.lists]})
    if campaign.segment:
        segment_rules = session.scalar(select(Segment.rules).where(Segment.name == campaign.segment))
        if segment_rules is None:
            raise NotFound(f"campaign {campaign.name!r}: no saved segment named {campaign.segment!r}")
        rules.append(segment_rules)
    contacts = Contact.__table__
    return (
        segments.audience_query({"all": rules}, session, after=after)
        .add_columns(contacts.c.email, contacts.c.timezone)
        .where(~exists().where(Suppression.email == contacts.c.email))
    )


def fan_out(campaign_id: int, owner: str | None = None) -> int:
    """Create the campaign's message rows a page of contacts at a time and hand them to the bulk
    queue. Each page's rows and the checkpoint commit together, and rows are unique per campaign
    and contact, so a fan-out that crashed resumes where it stopped and a relaunch adds nothing.
    Each page, with the campaign row locked, checks that this run still owns the fan-out (`owner`
    from hand_fan_out; None: unconditionally) and renews its lease (see lifecycle.run_due)."""
    settings = get_settings()
    if not _owns(campaign_id, owner):
        return 0
    _redispatch_waiting(campaign_id)
    with session_scope() as session:
        if analyzed := refresh_statistics(session.connection(), _AUDIENCE_TABLES):
            log.info("campaign.statistics_refreshed", tables=analyzed)
    created = 0
    while True:
        with session_scope() as session:
            campaign = session.get(Campaign, campaign_id, with_for_update=True)
            if campaign is None or campaign.state != CampaignState.SENDING.value or campaign.fanned_out:
                return created
            if owner is not None and campaign.fan_out_owner != owner:
                log.info("campaign.fan_out_superseded", campaign_id=campaign.id, campaign=campaign.name)
                return created
            campaign.fan_out_until = _lease_end()
            contacts = Contact.__table__
            query = audience_query(session, campaign, after=campaign.cursor)
            if campaign.ab_winner is not None:  # the rest of an A/B campaign's audience: those without a message
                query = query.where(
                    ~exists().where(Message.campaign_id == campaign.id, Message.contact_id == contacts.c.id)
                )
            page = session.execute(query.order_by(contacts.c.id).limit(PAGE)).all()
            if not page:
                campaign.fanned_out = True
                log.info("campaign.fanned_out", campaign_id=campaign.id, campaign=campaign.name, messages=created)
                return created
            inserted = _insert_page(session, campaign, page, utcnow(), settings.sender_domain)
            campaign.cursor = page[-1][0]
        queued = [message_id for message_id, state in inserted if state == MessageState.QUEUED.value]
        enqueue(queued, BULK)  # after the commit
        created += len(inserted)


def _owns(campaign_id: int, owner: str | None) -> bool:
    with reader() as connection:
        current = connection.execute(select(Campaign.fan_out_owner).where(Campaign.id == campaign_id)).first()
    return current is not None and (owner is None or current[0] == owner)


def _insert_page(session, campaign: Campaign, page: Sequence, now: datetime, domain: str) -> list[tuple[str, str]]:
    """Insert a page's message rows, skipping contacts that have one; (id, state) of those inserted."""
    rows = _held_by_frequency_cap(session, campaign, page, _message_rows(campaign, page, now), now)
    if not rows:  # an A/B test's page with no contact in the test share
        return []
    return fan_out_sql.for_bind(session).insert_page(session, campaign, rows, now, domain)


def _message_rows(campaign: Campaign, page: Sequence, now: datetime) -> list[MessageRow]:
    """The message rows of a page of (contact id, email, time zone)."""
    window = None
    if campaign.window_start and campaign.window_end:  # set together, or neither
        window = (campaign.window_start, campaign.window_end, campaign.window_timezone or "UTC")
    if campaign.ab_test is not None:
        return _ab_rows(campaign, page, now, window)
    queued, scheduled = MessageState.QUEUED.value, MessageState.SCHEDULED.value
    rows = []
    for message_id, (contact_id, email, zone) in zip(new_ids(len(page)), page):
        opens = window_opens(now, known_zone(zone, window[2]), window[0], window[1]) if window else None
        rows.append(
            MessageRow(message_id, scheduled if opens else queued, email, contact_id, opens, None if opens else now)
        )
    return rows


def _held_by_frequency_cap(
    session, campaign: Campaign, page: Sequence, rows: list[MessageRow], now: datetime
) -> list[MessageRow]:
    """With SMARTMAIL_FREQUENCY_CAP_DAY/_WEEK set, a contact at the cap gets the email later
    (scheduled for when the cap allows one more, within the send window), not never. One query per
    page; none without a cap."""
    if not rows or not frequency_cap.caps():
        return rows
    sent = frequency_cap.recent_sends(session.connection(), [row.contact_id for row in rows], now)
    zones = {contact_id: zone for contact_id, _, zone in page}
    held = []
    for row in rows:
        until = frequency_cap.held_until(sent.get(row.contact_id, []), now)
        if until is not None and campaign.window_start and campaign.window_end:
            zone = known_zone(zones.get(row.contact_id), campaign.window_timezone or "UTC")
            until = window_opens(until, zone, campaign.window_start, campaign.window_end) or until
        if until is not None and (row.send_at is None or row.send_at < until):
            row = row._replace(state=MessageState.SCHEDULED.value, send_at=until, enqueued_at=None)
        held.append(row)
    return held


def _ab_rows(campaign: Campaign, page: Sequence, now: datetime, window: tuple | None) -> list[MessageRow]:
    """An A/B campaign's rows: before the winner, only the test share's contacts, each with its
    variant (and that variant's sender and send time); after, the winner to everyone left."""
    split = ab_tests.Split(campaign)
    queued, scheduled = MessageState.QUEUED.value, MessageState.SCHEDULED.value
    rows = []
    placed = [(contact, split.place(contact[0], now)) for contact in page]
    kept = [(contact, where) for contact, where in placed if where is not None]
    for message_id, ((contact_id, email, zone), where) in zip(new_ids(len(kept)), kept):
        opens = window_opens(now, known_zone(zone, window[2]), window[0], window[1]) if window else None
        due = max(d for d in (opens, where.send_at) if d) if opens or where.send_at else None
        rows.append(
            MessageRow(
                message_id,
                scheduled if due else queued,
                email,
                contact_id,
                due,
                None if due else now,
                sender=where.sender,
                variant=where.variant,
                renders=where.renders,
            )
        )
    return rows


def _redispatch_waiting(campaign_id: int) -> None:
    """Rows whose ids are not in the outbox: queued ones (a pause dropped them, or a fan-out died
    between its commit and its dispatch) and deferred ones that came due while the campaign was
    paused. Hand them to the bulk queue again; claims are conditional."""
    waiting = or_(
        Message.state == MessageState.QUEUED.value,
        and_(Message.state == MessageState.DEFERRED.value, Message.next_attempt_at <= utcnow()),
    )
    last = ""
    while True:
        with reader() as connection:
            ids = list(
                connection.scalars(
                    select(Message.id)
                    .where(Message.campaign_id == campaign_id, waiting, Message.id > last)
                    .order_by(Message.id)
                    .limit(5000)
                )
            )
        if not ids:
            return
        enqueue(ids, BULK)
        last = ids[-1]


def take_lost_fan_outs(now: datetime) -> list[tuple[int, str, str]]:
    """Campaigns whose fan-out's lease ran out, each handed to a new run: the rows are locked
    (SKIP LOCKED: a fan-out renewing its lease right now is alive), so two beats cannot both
    restart one, and a renewal cannot slip in between."""
    with session_scope() as session:
        lost = session.scalars(
            select(Campaign)
            .where(
                Campaign.state == CampaignState.SENDING.value,
                ~Campaign.fanned_out,
                or_(Campaign.fan_out_until.is_(None), Campaign.fan_out_until < now),
            )
            .with_for_update(skip_locked=True)
        ).all()
        return [(c.id, c.name, hand_fan_out(c, now)) for c in lost]
