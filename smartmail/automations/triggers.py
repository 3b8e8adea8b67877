"""Triggers beat evaluates: list joins, segment entries, dates in contact attributes, emails not opened or clicked."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy import and_, delete, exists, func, literal, select, update
from sqlalchemy.engine import Connection

from smartmail.audience import segments
from smartmail.audience.contacts import known_zone
from smartmail.automations import clock
from smartmail.automations.enrolment import Candidate, Live, enrol, live_workflows
from smartmail.store import dialect
from smartmail.store.engine import get_engine, utcnow
from smartmail.store.models import (
    Campaign,
    Contact,
    ContactList,
    Event,
    ListMembership,
    Message,
    MessageState,
    Segment,
    SegmentPresence,
    StepRun,
    Workflow,
)
from smartmail.store.sql import json_attributes

log = structlog.get_logger("smartmail.automations")

SCANNED = ("list", "segment", "date", "engagement")
LATE_COMMITS = timedelta(minutes=10)
_PAGE = 5000


def scan(now: datetime | None = None) -> int:
    """Evaluate every active workflow's beat-evaluated trigger once; how many contacts were enrolled.
    Each workflow's scan and its new watermark commit together."""
    now = now or clock.now()
    with get_engine().connect() as connection:
        workflows = live_workflows(connection, kinds=SCANNED)
    enrolled = 0
    for live in workflows:
        trigger = live.definition.trigger
        if trigger.kind == "engagement" and not (trigger.event or "").startswith("not_"):
            continue  # opens and clicks come from the event stream
        with get_engine().begin() as connection:
            since = connection.scalar(select(Workflow.scanned_at).where(Workflow.id == live.id).with_for_update())
            # The watermark is the last stamp looked at, on the clock of the rows compared with it:
            # list joins and sends are stamped with the system's time, whatever the scheduler's says.
            candidates, watermark = _candidates(connection, live, since, now)
            enrolled += len(enrol(connection, live, candidates, now))
            connection.execute(update(Workflow).where(Workflow.id == live.id).values(scanned_at=watermark))
    return enrolled


def _candidates(
    connection: Connection, live: Live, since: datetime | None, now: datetime
) -> tuple[list[Candidate], datetime]:
    """The trigger's candidates, and the new watermark."""
    kind = live.definition.trigger.kind
    if kind == "list":
        # Joins are stamped before their transaction commits (an import's batch, say): each scan
        # looks back a margin over the last one's end too; the entry key makes that a no-op.
        upto = utcnow()
        start = max(since - LATE_COMMITS, live.created_at) if since else live.created_at
        return list(_list_joins(connection, live, start, upto)), upto
    if kind == "engagement":
        # Emails sent `within` before the scheduler's now are due; the first scan also takes those
        # whose time ran out after the workflow was created.
        window = timedelta(seconds=live.definition.trigger.within)
        upto = now - window
        return list(_not_engaged(connection, live, since or live.created_at - window, upto)), upto
    found = _segment_entries(connection, live, now) if kind == "segment" else _dates(connection, live, now)
    return list(found), now


def _list_joins(connection: Connection, live: Live, start: datetime, end: datetime) -> Iterator[Candidate]:
    """Who joined the list after `start`, up to `end` (system times, as joins are stamped)."""
    list_id = connection.scalar(select(ContactList.id).where(ContactList.name == live.definition.trigger.list))
    if list_id is None:
        return
    rows = connection.execute(
        select(ListMembership.contact_id, ListMembership.joined_at).where(
            ListMembership.list_id == list_id,
            ListMembership.status == "subscribed",
            ListMembership.joined_at > start,
            ListMembership.joined_at <= end,
        )
    )
    for contact_id, joined_at in rows:
        yield Candidate(
            contact_id, f"list:{joined_at.isoformat()}", {"type": "list_joined", "list": live.definition.trigger.list}
        )


def _segment_entries(connection: Connection, live: Live, now: datetime) -> Iterator[Candidate]:
    """Contacts in the segment now and not at the last evaluation entered it; those who left it are
    forgotten, so coming back is entering again (the entry rule decides whether that enrols)."""
    name = live.definition.trigger.segment
    rules = connection.scalar(select(Segment.rules).where(Segment.name == name))
    if rules is None:
        return
    inside = segments.compile_where(rules, connection, now)
    presence = SegmentPresence.__table__
    contacts = Contact.__table__
    connection.execute(
        delete(presence).where(
            presence.c.workflow_id == live.id,
            ~presence.c.contact_id.in_(select(contacts.c.id).where(inside)),
        )
    )
    entered = connection.execute(
        dialect.insert(connection)(presence)
        .from_select(
            ["workflow_id", "contact_id"],
            select(literal(live.id), contacts.c.id).where(
                inside,
                ~exists().where(presence.c.workflow_id == live.id, presence.c.contact_id == contacts.c.id),
            ),
        )
        .returning(presence.c.contact_id)
    ).scalars()
    key = f"segment:{now.isoformat(timespec='seconds')}"
    for contact_id in entered:
        yield Candidate(contact_id, key, {"type": "segment_entered", "segment": name})


def _dates(connection: Connection, live: Live, now: datetime) -> Iterator[Candidate]:
    """Contacts whose date attribute, moved by the offset, is today where they live: enrolled once
    per date, starting at the trigger's time of day in their time zone (at once if that has passed)."""
    trigger = live.definition.trigger
    attribute = json_attributes.for_bind(connection).attribute(Contact.attributes, trigger.attribute or "")
    today = now.date()
    # Every time zone's today is one of these three; the contact's own is checked below.
    days = [today + timedelta(days=shift) for shift in (-1, 0, 1)]
    wanted = {_attribute_value(day, trigger.offset_days, trigger.annual): day for day in days}
    if trigger.annual:  # a 29 February date comes round on 28 February in other years
        for day in days:
            if _is_feb_28_of_common_year(day - timedelta(days=trigger.offset_days)):
                wanted["02-29"] = day
    part = attribute.string()
    compared = func.substr(part, 6, 5) if trigger.annual else func.substr(part, 1, 10)  # MM-DD or the date
    rows = connection.execute(
        select(Contact.id, Contact.timezone, compared.label("value")).where(
            attribute.is_string(), compared.in_(sorted(wanted))
        )
    )
    for contact_id, zone_name, value in rows:
        zone = ZoneInfo(known_zone(zone_name, live.definition.timezone))
        local_today = now.replace(tzinfo=ZoneInfo("UTC")).astimezone(zone).date()
        if wanted.get(value) != local_today:
            continue
        start = datetime.combine(local_today, trigger.at, tzinfo=zone).astimezone(ZoneInfo("UTC")).replace(tzinfo=None)
        yield Candidate(
            contact_id,
            f"date:{local_today.isoformat()}",
            {"type": "date", "attribute": trigger.attribute, "date": local_today.isoformat()},
            due_at=max(start, now),
        )


def _is_feb_28_of_common_year(day: date) -> bool:
    return day.month == 2 and day.day == 28 and (day + timedelta(days=1)).month == 3


def _attribute_value(day: date, offset_days: int, annual: bool) -> str:
    """What the attribute holds when `day` is its date moved by `offset_days` (MM-DD when annual)."""
    source = day - timedelta(days=offset_days)
    return source.strftime("%m-%d") if annual else source.isoformat()


def _not_engaged(connection: Connection, live: Live, start: datetime, end: datetime) -> Iterator[Candidate]:
    """Emails of the trigger's campaign (or workflow step) sent after `start`, up to `end`, without a
    human open (or click) since: each becomes eligible once, in the scan after its time is up."""
    trigger = live.definition.trigger
    engaged_type = "opened" if trigger.event == "not_opened" else "clicked"
    engaged = exists().where(Event.message_id == Message.id, Event.type == engaged_type, Event.machine.is_(False))
    query = select(Message.id, Message.contact_id).where(
        Message.state == MessageState.SENT.value,
        Message.finished_at > start,
        Message.finished_at <= end,
        Message.contact_id.is_not(None),
        ~engaged,
    )
    if trigger.campaign is not None:
        campaign_id = connection.scalar(select(Campaign.id).where(Campaign.name == trigger.campaign))
        query = query.where(Message.campaign_id == campaign_id)
    else:
        step_messages = (
            select(StepRun.message_id)
            .join(Workflow, Workflow.id == StepRun.workflow_id)
            .where(
                and_(Workflow.name == trigger.workflow, StepRun.step == trigger.step, StepRun.message_id.is_not(None))
            )
        )
        query = query.where(Message.id.in_(step_messages))
    for message_id, contact_id in connection.execute(query):
        if contact_id is not None:
            yield Candidate(contact_id, f"message:{message_id}", {"type": trigger.event, "message_id": message_id})
