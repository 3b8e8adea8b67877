"""Campaigns: create, schedule, launch, pause, resume and cancel; fan a campaign out to its audience; report progress."""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy import and_, exists, func, or_, select, update

from smartmail.content import rendering
from smartmail.audience import segments
from smartmail.content import template_store
from smartmail.addresses import AddressError, parse_mailbox
from smartmail.config import get_settings
from smartmail.audience.contacts import InvalidInput, NotFound
from smartmail.store.engine import (COPY_SPECIAL, insert_else_upsert, reader, refresh_statistics, session_scope,
                          upsert_insert, utcnow)
from smartmail.store.ids import new_id, new_ids
from smartmail.store.models import (
    OF_CAMPAIGNS,
    Campaign,
    CampaignState,
    Contact,
    ContactList,
    ContactStatus,
    Message,
    MessageState,
    Segment,
    Suppression,
)
from smartmail.workers.campaign_rows import window_opens
from smartmail.workers.dispatch import BULK, enqueue, publish

log = structlog.get_logger("smartmail.campaigns")

PAGE = 5000  # contacts per fan-out page: one audience query, one INSERT, one checkpoint (1,000: 20% more CPU a row)
_AUDIENCE_TABLES = ["contacts", "list_memberships", "suppressions", "events"]  # what audience queries read
_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
_OPEN = (MessageState.QUEUED.value, MessageState.SENDING.value, MessageState.DEFERRED.value,
         MessageState.SCHEDULED.value)


# --- Send windows ------------------------------------------------------------------------------

def parse_window(value: str | None, *, field: str = "window") -> tuple[str, str] | None:
    """`"08:00-20:00"` → ("08:00", "20:00"); a window may wrap midnight ("22:00-06:00")."""
    if value is None:
        return None
    match = _WINDOW.match(value) if isinstance(value, str) else None
    if not match or value[:5] == value[6:]:
        raise InvalidInput('expected "HH:MM-HH:MM" in 24-hour time, start and end different', field=field)
    return value[:5], value[6:]


def _zone(name: str | None, fallback: str) -> str:
    try:
        return name if name and ZoneInfo(name) else fallback
    except (KeyError, ValueError):
        return fallback


# --- The API -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CampaignStatus:
    name: str
    state: str
    counts: dict[str, int]
    total: int
    rate: float           # messages sent per second over the last minute
    eta_seconds: float | None
    fanned_out: bool


def _get(session, name: str) -> Campaign:
    campaign = session.scalar(select(Campaign).where(Campaign.name == name))
    if campaign is None:
        raise NotFound(f"no campaign named {name!r}")
    return campaign


def create_campaign(name: str, *, template: str, lists: Iterable[str] = (), segment: str | None = None,
                    from_: str | None = None, reply_to: str | None = None, send_at: datetime | None = None,
                    window: str | None = None, window_timezone: str = "UTC", rate_cap: float | None = None,
                    tags: Iterable[str] = ()) -> dict[str, Any]:
    """A draft campaign: `template` to the members of `lists` and/or the saved `segment`, minus
    suppressed and non-subscribed contacts. Errors name the field; nothing is stored then."""
    settings = get_settings()
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise InvalidInput("a name of 1-200 characters is required", field="name")
    lists = list(lists)
    if not lists and not segment:
        raise InvalidInput("give lists, a segment, or both", field="audience")
    try:
        sender = str(parse_mailbox(from_ or settings.default_sender, field="from_"))
        reply = str(parse_mailbox(reply_to, field="reply_to")) if reply_to else None
    except AddressError as exc:
        raise InvalidInput(exc.reason, field=exc.field) from None
    start_end = parse_window(window)
    if _zone(window_timezone, "") != window_timezone:
        raise InvalidInput(f"unknown time zone {window_timezone!r}", field="window_timezone")
    if rate_cap is not None and (isinstance(rate_cap, bool) or not isinstance(rate_cap, (int, float)) or rate_cap <= 0):
        raise InvalidInput("must be a positive number of messages per second", field="rate_cap")
    if send_at is not None and send_at.tzinfo is not None:
        send_at = send_at.astimezone(timezone.utc).replace(tzinfo=None)
    with session_scope() as session:
        try:
            template_store.resolve(session, template, settings.templates_dir)
        except (template_store.TemplateNotFound, ValueError) as exc:
            raise InvalidInput(str(exc), field="template") from None
        for i, list_name in enumerate(lists):
            if session.scalar(select(ContactList.id).where(ContactList.name == list_name)) is None:
                raise InvalidInput(f"no list named {list_name!r}", field=f"lists[{i}]")
        if segment and session.scalar(select(Segment.id).where(Segment.name == segment)) is None:
            raise InvalidInput(f"no saved segment named {segment!r}", field="segment")
        if session.scalar(select(Campaign.id).where(Campaign.name == name)) is not None:
            raise InvalidInput(f"a campaign named {name!r} exists already", field="name")
        campaign = Campaign(name=name, state=CampaignState.DRAFT.value, template_name=template, lists=lists,
                            segment=segment, sender=sender, reply_to=reply, send_at=send_at, tags=list(tags),
                            window_start=start_end[0] if start_end else None,
                            window_end=start_end[1] if start_end else None, window_timezone=window_timezone,
                            rate_cap=rate_cap, cursor=0, fanned_out=False)
        session.add(campaign)
        session.flush()
        if send_at is not None:
            campaign.state = CampaignState.SCHEDULED.value
        return {"id": campaign.id, "name": name, "state": campaign.state}


def schedule_campaign(name: str, send_at: datetime) -> None:
    """Start the campaign at `send_at` (beat starts it); a draft or scheduled campaign only."""
    if send_at.tzinfo is not None:
        send_at = send_at.astimezone(timezone.utc).replace(tzinfo=None)
    _transition(name, {CampaignState.DRAFT, CampaignState.SCHEDULED}, CampaignState.SCHEDULED, send_at=send_at)


def launch_campaign(name: str) -> None:
    """Start now: freeze the template and fan out on the bulk queue."""
    with session_scope() as session:
        campaign = _get(session, name)
        if not _start(session, campaign):
            raise InvalidInput(f"campaign {name!r} is {campaign.state}; only a draft or scheduled one can launch",
                               field="state")
        campaign_id, owner = campaign.id, campaign.fan_out_owner
    _publish_fan_out(campaign_id, owner)


def pause_campaign(name: str) -> None:
    """Workers stop claiming its messages at once; the rest stay queued until resumed."""
    _transition(name, {CampaignState.SENDING}, CampaignState.PAUSED)


def resume_campaign(name: str) -> None:
    with session_scope() as session:
        campaign = _get(session, name)
        if campaign.state != CampaignState.PAUSED.value:
            raise InvalidInput(f"campaign {name!r} is {campaign.state}, not paused", field="state")
        campaign.state = CampaignState.SENDING.value
        owner = _hand_fan_out(campaign, utcnow())
        campaign_id = campaign.id
    _publish_fan_out(campaign_id, owner)  # finishes the fan-out if unfinished, and re-dispatches what waits


def cancel_campaign(name: str) -> int:
    """Nothing more is sent; messages not yet sent become `cancelled`. Returns how many."""
    with session_scope() as session:
        campaign = _get(session, name)
        if campaign.state in (CampaignState.SENT.value, CampaignState.CANCELLED.value):
            raise InvalidInput(f"campaign {name!r} is {campaign.state} already", field="state")
        campaign.state = CampaignState.CANCELLED.value
        campaign.finished_at = utcnow()
        session.flush()  # the campaign's row first, then its messages: the order delivery's recording keeps
        result = session.execute(
            update(Message).where(Message.campaign_id == campaign.id,
                                  Message.state.in_([MessageState.QUEUED.value, MessageState.DEFERRED.value,
                                                     MessageState.SCHEDULED.value]))
            .values(state=MessageState.CANCELLED.value, finished_at=utcnow(), reason="campaign cancelled"),
            execution_options={"synchronize_session": False})
        return result.rowcount


def _transition(name: str, sources: set[CampaignState], target: CampaignState, **values) -> None:
    with session_scope() as session:
        campaign = _get(session, name)
        if campaign.state not in {s.value for s in sources}:
            raise InvalidInput(f"campaign {name!r} is {campaign.state}; cannot go to {target.value}", field="state")
        campaign.state = target.value
        for key, value in values.items():
            setattr(campaign, key, value)


def _start(session, campaign: Campaign, now: datetime | None = None) -> bool:
    """draft/scheduled → sending, with the template frozen; False if it was not startable."""
    if campaign.state not in (CampaignState.DRAFT.value, CampaignState.SCHEDULED.value):
        return False
    settings = get_settings()
    ref = template_store.resolve(session, campaign.template_name, settings.templates_dir)
    if ref.version is not None:
        parts = {part: template_store.load_part(None, ref.name, ref.version, part, session=session)
                 for part in ("subject", "html", "text")}
    else:
        parts = {part: (ref.path / filename).read_text(encoding="utf-8") if (ref.path / filename).is_file() else None
                 for part, filename in template_store.FILE_PARTS.items()}
    campaign.subject, campaign.html, campaign.text = parts["subject"], parts["html"], parts["text"]
    if campaign.text is None and campaign.html:
        campaign.text = rendering.text_source_from_html(campaign.html)
    campaign.template_version = ref.version
    campaign.state = CampaignState.SENDING.value
    campaign.launched_at = now or utcnow()
    _hand_fan_out(campaign, campaign.launched_at)
    return True


def _hand_fan_out(campaign: Campaign, now: datetime) -> str:
    """Make a new fan-out run the campaign's only one: it gets a lease and an owner token, and a
    fan-out task holding another token (a lost one redelivered late, a duplicate) stops at once."""
    campaign.fan_out_owner = new_id()
    campaign.fan_out_until = _lease_end(now)
    return campaign.fan_out_owner


def _lease_end(now: datetime | None = None) -> datetime:
    return (now or utcnow()) + timedelta(seconds=get_settings().fan_out_lease)


def _publish_fan_out(campaign_id: int, owner: str | None) -> None:
    publish("smartmail.campaign.fan_out", campaign_id, owner)


def campaign_status(name: str) -> CampaignStatus:
    with reader() as connection:
        campaign = connection.execute(select(Campaign.id, Campaign.state, Campaign.fanned_out)
                                      .where(Campaign.name == name)).first()
        if campaign is None:
            raise NotFound(f"no campaign named {name!r}")
        counts = dict(connection.execute(select(Message.state, func.count()).where(Message.campaign_id == campaign.id)
                                         .group_by(Message.state)).all())
        minute_ago = utcnow() - timedelta(seconds=60)
        recent = connection.scalar(select(func.count()).where(Message.campaign_id == campaign.id,
                                                              Message.state == MessageState.SENT.value,
                                                              Message.finished_at >= minute_ago))
    remaining = sum(counts.get(s, 0) for s in _OPEN)
    rate = recent / 60.0
    return CampaignStatus(name, campaign.state, counts, sum(counts.values()), rate,
                          remaining / rate if rate > 0 else None, bool(campaign.fanned_out))


# --- Fan-out -----------------------------------------------------------------------------------

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
    return (segments.audience_query({"all": rules}, session.get_bind().dialect.name, after=after)
            .add_columns(contacts.c.email, contacts.c.timezone)
            .where(~exists().where(Suppression.email == contacts.c.email)))


def fan_out(campaign_id: int, owner: str | None = None) -> int:
    """Create the campaign's message rows a page of contacts at a time and hand them to the bulk
    queue. Each page's rows and the checkpoint commit together, and rows are unique per campaign
    and contact, so a fan-out that crashed resumes where it stopped and a relaunch adds nothing.
    Each page, with the campaign row locked, checks that this run still owns the fan-out (`owner`
    from _hand_fan_out; None: unconditionally) and renews its lease (see run_due)."""
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
                log.info("campaign.fan_out_superseded", campaign=campaign.name)
                return created
            campaign.fan_out_until = _lease_end()
            contacts = Contact.__table__
            page = session.execute(audience_query(session, campaign, after=campaign.cursor)
                                   .order_by(contacts.c.id).limit(PAGE)).all()
            if not page:
                campaign.fanned_out = True
                log.info("campaign.fanned_out", campaign=campaign.name, messages=created)
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


def _insert_page(session, campaign: Campaign, page: list, now: datetime, domain: str) -> list[tuple[str, str]]:
    """Insert a page's message rows, skipping contacts that have one; (id, state) of those inserted."""
    rows = _message_rows(campaign, page, now)
    connection = session.connection()
    if connection.dialect.name == "postgresql" and not COPY_SPECIAL.search("".join(r.recipient for r in rows)):
        return _insert_page_by_copy(connection, campaign, rows, now, domain)
    shared = {
        "idempotency_key": None, "sender": campaign.sender, "reply_to": campaign.reply_to,
        "subject": "", "html": None, "text": "",  # rendered when sent (campaign_delivery.py)
        "headers": {}, "tags": campaign.tags, "template_name": campaign.template_name,
        "template_version": campaign.template_version, "attempts": 0, "created_at": now, "claimed_at": None,
        "finished_at": None, "smtp_code": None, "smtp_reply": None, "reason": None, "campaign_id": campaign.id,
    }
    insert = (upsert_insert(connection.dialect.name)(Message.__table__)
              .on_conflict_do_nothing(index_elements=["campaign_id", "contact_id"], index_where=OF_CAMPAIGNS)
              .returning(Message.id, Message.state))
    return [tuple(r) for r in session.execute(insert, [
        {**shared, "id": r.id, "state": r.state, "recipient": r.recipient, "message_id_header": f"<{r.id}@{domain}>",
         "enqueued_at": r.enqueued_at, "next_attempt_at": r.send_at, "send_at": r.send_at, "contact_id": r.contact_id}
        for r in rows])]


# On PostgreSQL a page goes through COPY into a staging table and one INSERT … SELECT: the generic
# multi-row INSERT … RETURNING of 1,000 rows × 26 columns took more than half of a worker's CPU
# while a campaign fanned out (psycopg parses every such statement's 26,000 placeholders).
_PG_FAN_OUT_STAGING = """CREATE TEMP TABLE IF NOT EXISTS smartmail_fan_out (
    id text, state text, recipient text, contact_id bigint, due timestamp, enqueued_at timestamp) ON COMMIT DELETE ROWS"""
_PG_FAN_OUT_INSERT = """INSERT INTO messages (id, state, sender, recipient, reply_to, subject, text, headers, tags,
    message_id_header, template_name, template_version, attempts, created_at, enqueued_at, next_attempt_at, send_at,
    campaign_id, contact_id)
SELECT s.id, s.state, %(sender)s, s.recipient, %(reply_to)s, '', '', '{}'::json, %(tags)s::json,
    '<' || s.id || '@' || %(domain)s || '>', %(template)s, %(version)s, 0, %(now)s, s.enqueued_at, s.due, s.due,
    %(campaign)s, s.contact_id
FROM smartmail_fan_out s"""
_PG_FAN_OUT_UPSERT = (_PG_FAN_OUT_INSERT + " ON CONFLICT (campaign_id, contact_id) WHERE campaign_id IS NOT NULL "
                      "DO NOTHING RETURNING id, state")


def _insert_page_by_copy(connection, campaign: Campaign, rows: list[MessageRow], now: datetime,
                         domain: str) -> list[tuple[str, str]]:
    now_text = now.isoformat(sep=" ")  # most rows' enqueued_at: formatted once a page

    def stamp(moment: datetime | None) -> str:
        if moment is None:
            return "\\N"
        return now_text if moment is now else moment.isoformat(sep=" ")

    cursor = connection.connection.driver_connection.cursor()
    cursor.execute(_PG_FAN_OUT_STAGING)
    with cursor.copy("COPY smartmail_fan_out FROM STDIN") as copy:
        copy.write("".join([f"{r.id}\t{r.state}\t{r.recipient}\t{r.contact_id}\t{stamp(r.send_at)}\t"
                            f"{stamp(r.enqueued_at)}\n" for r in rows]))
    params = {"sender": campaign.sender, "reply_to": campaign.reply_to, "tags": json.dumps(campaign.tags),
              "domain": domain, "template": campaign.template_name, "version": campaign.template_version, "now": now,
              "campaign": campaign.id}
    # The page's contacts come after the checkpoint, committed with the rows before them, so none
    # has a row yet (fan-out of 100,000 alone: 27.6 -> 23.5-25.1 us of PostgreSQL CPU a row without
    # ON CONFLICT), and the rows are known: nothing to return. Should one have a row after all (a
    # relaunch), the page adds only the others.
    upserted = insert_else_upsert(cursor, _PG_FAN_OUT_INSERT, _PG_FAN_OUT_UPSERT, params)
    return [(r.id, r.state) for r in rows] if upserted is None else upserted


class MessageRow(NamedTuple):
    """What differs between a page's message rows; the rest is the campaign's (_insert_page)."""
    id: str
    state: str
    recipient: str
    contact_id: int
    send_at: datetime | None  # the recipient's send window opens then (state scheduled)
    enqueued_at: datetime | None


def _message_rows(campaign: Campaign, page: list, now: datetime) -> list[MessageRow]:
    """The message rows of a page of (contact id, email, time zone)."""
    window = (campaign.window_start, campaign.window_end, campaign.window_timezone) if campaign.window_start else None
    queued, scheduled = MessageState.QUEUED.value, MessageState.SCHEDULED.value
    rows = []
    for message_id, (contact_id, email, zone) in zip(new_ids(len(page)), page):
        opens = window_opens(now, _zone(zone, window[2]), window[0], window[1]) if window else None
        rows.append(MessageRow(message_id, scheduled if opens else queued, email, contact_id, opens,
                               None if opens else now))
    return rows


def _redispatch_waiting(campaign_id: int) -> None:
    """Rows whose ids are not in the outbox: queued ones (a pause dropped them, or a fan-out died
    between its commit and its dispatch) and deferred ones that came due while the campaign was
    paused. Hand them to the bulk queue again; claims are conditional."""
    waiting = or_(Message.state == MessageState.QUEUED.value,
                  and_(Message.state == MessageState.DEFERRED.value, Message.next_attempt_at <= utcnow()))
    last = ""
    while True:
        with reader() as connection:
            ids = list(connection.scalars(
                select(Message.id).where(Message.campaign_id == campaign_id, waiting, Message.id > last)
                .order_by(Message.id).limit(5000)))
        if not ids:
            return
        enqueue(ids, BULK)
        last = ids[-1]


# --- Beat ----------------------------------------------------------------------------------------

def _take_lost_fan_outs(now: datetime) -> list[tuple[int, str, str]]:
    """Campaigns whose fan-out's lease ran out, each handed to a new run: the rows are locked
    (SKIP LOCKED: a fan-out renewing its lease right now is alive), so two beats cannot both
    restart one, and a renewal cannot slip in between."""
    with session_scope() as session:
        lost = session.scalars(select(Campaign).where(
            Campaign.state == CampaignState.SENDING.value, ~Campaign.fanned_out,
            or_(Campaign.fan_out_until.is_(None), Campaign.fan_out_until < now))
            .with_for_update(skip_locked=True)).all()
        return [(c.id, c.name, _hand_fan_out(c, now)) for c in lost]


def run_due(now: datetime | None = None) -> None:
    """Start scheduled campaigns whose time has come, restart fan-outs whose lease ran out, and
    mark finished campaigns sent."""
    now = now or utcnow()
    with session_scope() as session:
        due = session.scalars(select(Campaign).where(Campaign.state == CampaignState.SCHEDULED.value,
                                                     Campaign.send_at <= now)).all()
        started = [(c.id, c.fan_out_owner) for c in due if _start(session, c, now)]
    for campaign_id, owner in started:
        log.info("campaign.started", campaign_id=campaign_id)
        _publish_fan_out(campaign_id, owner)
    for campaign_id, name, owner in _take_lost_fan_outs(now):
        log.warning("campaign.fan_out_restarted", campaign=name)
        _publish_fan_out(campaign_id, owner)
    open_messages = exists().where(Message.campaign_id == Campaign.id, Message.state.in_(_OPEN))
    with session_scope() as session:
        session.execute(update(Campaign).where(Campaign.state == CampaignState.SENDING.value, Campaign.fanned_out,
                                               ~open_messages)
                        .values(state=CampaignState.SENT.value, finished_at=now),
                        execution_options={"synchronize_session": False})


__all__ = ["CampaignStatus", "audience_query", "campaign_status", "cancel_campaign", "create_campaign",
           "fan_out", "launch_campaign", "parse_window", "pause_campaign", "resume_campaign", "run_due",
           "schedule_campaign", "window_opens"]