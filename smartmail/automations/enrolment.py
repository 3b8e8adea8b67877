"""Enrolling contacts under a workflow's entry rule; the event reader that enrols, converts and wakes enrolments."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection

from smartmail import runtime
from smartmail.audience import event_stream
from smartmail.audience.event_stream import Position
from smartmail.automations import clock, definitions
from smartmail.automations.definitions import Definition
from smartmail.store import checkpoints, dialect
from smartmail.store.engine import get_engine, utcnow
from smartmail.store.models import (
    Campaign,
    Contact,
    ContactStatus,
    Enrolment,
    EnrolmentState,
    EventType,
    StepRun,
    StreamCheckpoint,
    Suppression,
    Workflow,
    WorkflowState,
    WorkflowVersion,
)

log = structlog.get_logger("smartmail.automations")

CHECKPOINT = "automations"
PAGE = 1000
ENGAGEMENT_TYPES = (EventType.OPENED.value, EventType.CLICKED.value)
_INSERT_CHUNK = 2000


@dataclass(frozen=True)
class Live:
    """An active workflow's current version, as enrolment needs it."""

    id: int
    name: str
    version: int
    definition: Definition
    created_at: datetime


@dataclass(frozen=True)
class Candidate:
    """A contact a trigger found: `key` tells this entry from another (an event id, a date…)."""

    contact_id: int
    key: str
    context: dict[str, Any]
    due_at: datetime | None = None  # None: at once


def live_workflows(connection: Connection, *, kinds: Sequence[str] | None = None) -> list[Live]:
    """The active workflows (with the given trigger kinds) and their current definitions."""
    rows = connection.execute(
        select(Workflow.id, Workflow.name, Workflow.version, Workflow.created_at, WorkflowVersion.definition)
        .join(
            WorkflowVersion,
            (WorkflowVersion.workflow_id == Workflow.id) & (WorkflowVersion.version == Workflow.version),
        )
        .where(Workflow.state == WorkflowState.ACTIVE.value)
        .order_by(Workflow.id)
    ).all()
    found = [
        Live(row.id, row.name, row.version, _parsed(row.id, row.version, row.definition), row.created_at)
        for row in rows
    ]
    return [live for live in found if kinds is None or live.definition.trigger.kind in kinds]


@runtime.per_process()
def _versions() -> dict[tuple[int, int], Definition]:
    """Parsed versions (they never change), in the runtime registry: a reset forgets them with their database."""
    return {}


def _parsed(workflow_id: int, version: int, document: dict[str, Any]) -> Definition:
    key = (workflow_id, version)
    parsed = _versions()
    if key not in parsed:
        parsed[key] = definitions.parse(document)
    return parsed[key]


def parsed_versions(connection: Connection, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], Definition]:
    """The definitions of these (workflow id, version) pairs; a version's document is read once per process."""
    keys = set(keys)
    missing = keys - set(_versions())
    if missing:
        rows = connection.execute(
            select(WorkflowVersion.workflow_id, WorkflowVersion.version, WorkflowVersion.definition).where(
                WorkflowVersion.workflow_id.in_({workflow_id for workflow_id, _ in missing})
            )
        )
        for row in rows:
            _parsed(row.workflow_id, row.version, row.definition)
    parsed = _versions()
    return {key: parsed[key] for key in keys}


def enrol(connection: Connection, workflow: Live, candidates: Sequence[Candidate], now: datetime) -> list[int]:
    """Enrol the candidates the entry rule lets in (once ever; once per period; every time, once per
    `key`); subscribed, unsuppressed contacts only. The unique (workflow, contact, entry key) makes a
    repeated enrolment a no-op. The new enrolments' contact ids."""
    definition = workflow.definition
    chosen: dict[tuple[int, str], Candidate] = {}
    for candidate in candidates:
        key = "once" if definition.entry == "once" else candidate.key
        chosen.setdefault((candidate.contact_id, key), candidate)
    if definition.entry == "once_per":
        # One per contact per call too: two events a second apart enrol once.
        by_contact: dict[int, tuple[str, Candidate]] = {}
        for (contact_id, key), candidate in chosen.items():
            by_contact.setdefault(contact_id, (key, candidate))
        recent = _recently_enrolled(
            connection, workflow.id, list(by_contact), now - timedelta(seconds=definition.entry_period)
        )
        chosen = {(cid, key): cand for cid, (key, cand) in by_contact.items() if cid not in recent}
    if not chosen:
        return []
    allowed = _enrollable(connection, sorted({contact_id for contact_id, _ in chosen}))
    rows = [
        {
            "workflow_id": workflow.id,
            "version": workflow.version,
            "contact_id": contact_id,
            "entry_key": key[:100],
            "state": EnrolmentState.ACTIVE.value,
            "step": definition.first,
            "due_at": candidate.due_at or now,
            "runs": 0,
            "context": candidate.context,
            "entered_at": now,
            "updated_at": now,
        }
        for (contact_id, key), candidate in chosen.items()
        if contact_id in allowed
    ]
    entered: list[int] = []
    statement = (
        dialect.insert(connection)(Enrolment)
        .on_conflict_do_nothing(index_elements=["workflow_id", "contact_id", "entry_key"])
        .returning(Enrolment.contact_id)
    )
    for start in range(0, len(rows), _INSERT_CHUNK):
        chunk = rows[start : start + _INSERT_CHUNK]
        entered.extend(connection.execute(statement, chunk).scalars())
    if entered:
        log.info("workflow.enrolled", workflow=workflow.name, contacts=len(entered))
    return entered


def _recently_enrolled(connection: Connection, workflow_id: int, contact_ids: list[int], since: datetime) -> set[int]:
    found: set[int] = set()
    for start in range(0, len(contact_ids), _INSERT_CHUNK):
        found.update(
            connection.scalars(
                select(Enrolment.contact_id).where(
                    Enrolment.workflow_id == workflow_id,
                    Enrolment.contact_id.in_(contact_ids[start : start + _INSERT_CHUNK]),
                    Enrolment.entered_at > since,
                )
            )
        )
    return found


def _enrollable(connection: Connection, contact_ids: list[int]) -> set[int]:
    """Subscribed contacts whose address is not suppressed."""
    found: set[int] = set()
    for start in range(0, len(contact_ids), _INSERT_CHUNK):
        found.update(
            connection.scalars(
                select(Contact.id)
                .outerjoin(Suppression, Suppression.email == Contact.email)
                .where(
                    Contact.id.in_(contact_ids[start : start + _INSERT_CHUNK]),
                    Contact.status == ContactStatus.SUBSCRIBED.value,
                    Suppression.email.is_(None),
                )
            )
        )
    return found


def start_checkpoint(connection: Connection) -> None:
    """Make the reader's checkpoint (at the stream's end) if there is none: called when a workflow
    is saved, so the reader starts with the first workflow and never enrols from older events."""
    checkpoints.lock(connection, CHECKPOINT, initial=str(event_stream.end(connection)))


@dataclass
class Read:
    events: int
    enrolled: int
    converted: int
    woken: int
    more: bool


def read_events(*, max_seconds: float = 5.0) -> Read:
    """Read new events for up to `max_seconds`: enrol contacts on event and engagement triggers,
    end enrolments whose goal event came (converted), and wake those waiting for an event. Each
    page's changes and the moved checkpoint commit together: a crash repeats no page, skips none."""
    total = Read(0, 0, 0, 0, more=False)
    deadline = utcnow() + timedelta(seconds=max_seconds)
    while True:
        page = _read_page()
        total.events += page.events
        total.enrolled += page.enrolled
        total.converted += page.converted
        total.woken += page.woken
        total.more = page.more
        if not page.more or utcnow() >= deadline:
            return total


def _read_page() -> Read:
    now = clock.now()
    with get_engine().begin() as connection:
        if connection.scalar(select(Workflow.id).limit(1)) is None:
            return Read(0, 0, 0, 0, more=False)
        # Nothing written while nothing is new: an idle tick costs two index look-ups, no commit.
        stored = connection.scalar(select(StreamCheckpoint.position).where(StreamCheckpoint.name == CHECKPOINT))
        end = event_stream.end(connection)
        if stored is not None and Position.parse(stored, field=CHECKPOINT) >= end:
            return Read(0, 0, 0, 0, more=False)
        position = Position.parse(checkpoints.lock(connection, CHECKPOINT, initial=str(end)), field=CHECKPOINT)
        workflows = live_workflows(connection)
        kinds = _types_of_interest(connection, workflows)
        if not kinds:  # nothing reacts to any event: skip what is there
            checkpoints.move(connection, CHECKPOINT, str(end))
            return Read(0, 0, 0, 0, more=False)
        page = event_stream.read(position, types=kinds, limit=PAGE, connection=connection)
        # Enrol first: an order placed after the cart was abandoned, in the same page, converts.
        enrolled = _enrol_triggered(connection, workflows, page.events, now)
        converted, woken = _move_running(connection, page.events, now)
        checkpoints.move(connection, CHECKPOINT, str(page.next))
    return Read(len(page.events), enrolled, converted, woken, more=page.more)


def _types_of_interest(connection: Connection, workflows: list[Live]) -> list[str]:
    """Event types some workflow reacts to: its trigger's, and every stored version's goal and
    awaited events (enrolments on older versions still wait for theirs)."""
    kinds: set[str] = set()
    for live in workflows:
        trigger = live.definition.trigger
        if trigger.kind == "event" and trigger.event:
            kinds.add(trigger.event)
        elif trigger.kind == "engagement" and trigger.event in ENGAGEMENT_TYPES:
            kinds.add(trigger.event)
    versions = connection.execute(select(WorkflowVersion.workflow_id, WorkflowVersion.version)).all()
    for definition in parsed_versions(connection, [(row.workflow_id, row.version) for row in versions]).values():
        kinds.update(definition.events())
    return sorted(kinds)


def _move_running(connection: Connection, events: list[dict[str, Any]], now: datetime) -> tuple[int, int]:
    """Goal events end their contact's enrolments (converted); awaited events make the wait's step
    due. Returns (converted, woken)."""
    contact_ids = sorted({event["contact_id"] for event in events if event["contact_id"] is not None})
    if not contact_ids:
        return 0, 0
    running = connection.execute(
        select(
            Enrolment.id,
            Enrolment.workflow_id,
            Enrolment.version,
            Enrolment.contact_id,
            Enrolment.awaiting,
            Enrolment.wait_started_at,
            Enrolment.awaited_at,
            Enrolment.context,
        ).where(Enrolment.contact_id.in_(contact_ids), Enrolment.state != EnrolmentState.ENDED.value)
    ).all()
    order = {event["id"]: index for index, event in enumerate(events)}
    versions = parsed_versions(connection, {(row.workflow_id, row.version) for row in running})
    by_contact: dict[int, list[Any]] = defaultdict(list)
    for row in running:
        by_contact[row.contact_id].append(row)
    converted: set[int] = set()
    woken: dict[int, Any] = {}
    for index, event in enumerate(events):
        occurred = _occurred(event)
        for row in by_contact.get(event["contact_id"], []):
            if row.id in converted or not _after_trigger(row, event, index, order, occurred):
                continue
            if versions[(row.workflow_id, row.version)].goal == event["type"]:
                converted.add(row.id)
            elif (
                row.awaiting == event["type"]
                and row.awaited_at is None
                and row.id not in woken
                and row.wait_started_at is not None
                and occurred >= row.wait_started_at
                and not event["machine"]
            ):
                woken[row.id] = row
    changed = utcnow()
    if converted:
        connection.execute(
            update(Enrolment)
            .where(Enrolment.id.in_(sorted(converted)), Enrolment.state != EnrolmentState.ENDED.value)
            .values(state=EnrolmentState.ENDED.value, ended_reason="converted", ended_at=changed, updated_at=changed)
        )
    waiting = [row for enrolment_id, row in sorted(woken.items()) if enrolment_id not in converted]
    if waiting:
        # Only the wait read above: an advance may have moved the enrolment on meanwhile (its wait
        # timed out), and a later wait must not end because of this event.
        connection.execute(
            update(Enrolment)
            .where(
                Enrolment.id == bindparam("enrolment"),
                Enrolment.awaiting == bindparam("type"),
                Enrolment.wait_started_at == bindparam("started"),
                Enrolment.awaited_at.is_(None),
            )
            .values(awaited_at=changed, due_at=now, updated_at=changed),
            [{"enrolment": row.id, "type": row.awaiting, "started": row.wait_started_at} for row in waiting],
        )
    return len(converted), len(waiting)


def _after_trigger(row: Any, event: dict[str, Any], index: int, order: dict[int, int], occurred: datetime) -> bool:
    """Whether `event` came after the event that enrolled `row` (if an event did): later in the
    stream, and not dated before it (a back-filled order from last year converts no cart)."""
    context = row.context or {}
    trigger_id = context.get("event_id")
    if trigger_id is None:
        return True
    if trigger_id in order and order[trigger_id] >= index:
        return False
    return occurred >= _occurred(context)


def _enrol_triggered(connection: Connection, workflows: list[Live], events: list[dict[str, Any]], now: datetime) -> int:
    enrolled = 0
    for live in workflows:
        trigger = live.definition.trigger
        if trigger.kind == "event":
            matching = [event for event in events if _matches_event(live, event)]
        elif trigger.kind == "engagement" and trigger.event in ENGAGEMENT_TYPES:
            matching = _engaged(connection, live, events)
        else:
            continue
        candidates = [
            Candidate(event["contact_id"], f"event:{event['id']}", _context_of(event))
            for event in matching
            if event["contact_id"] is not None
        ]
        if candidates:
            enrolled += len(enrol(connection, live, candidates, now))
    return enrolled


def _context_of(event: dict[str, Any]) -> dict[str, Any]:
    """What the enrolment's emails can use as `event`: the trigger's type, time and properties."""
    return {
        **event["properties"],
        "type": event["type"],
        "event_id": event["id"],
        "occurred_at": event["occurred_at"],
        "message_id": event["message_id"],
    }


def _occurred(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["occurred_at"].replace("Z", "+00:00")).replace(tzinfo=None)


def _matches_event(live: Live, event: dict[str, Any]) -> bool:
    trigger = live.definition.trigger
    if event["type"] != trigger.event or _occurred(event) < live.created_at:
        return False
    properties = event["properties"]
    return all(properties.get(key) == value for key, value in (trigger.where or {}).items())


def _engaged(connection: Connection, live: Live, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Human opens or clicks of the trigger's campaign, or of its workflow step's emails."""
    trigger = live.definition.trigger
    found = [
        event
        for event in events
        if event["type"] == trigger.event and not event["machine"] and _occurred(event) >= live.created_at
    ]
    if not found:
        return []
    if trigger.campaign is not None:
        campaign_id = connection.scalar(select(Campaign.id).where(Campaign.name == trigger.campaign))
        return [event for event in found if campaign_id is not None and event["campaign_id"] == campaign_id]
    message_ids = sorted({event["message_id"] for event in found if event["message_id"]})
    if not message_ids:
        return []
    of_step = set(
        connection.scalars(
            select(StepRun.message_id)
            .join(Workflow, Workflow.id == StepRun.workflow_id)
            .where(StepRun.message_id.in_(message_ids), Workflow.name == trigger.workflow, StepRun.step == trigger.step)
        )
    )
    return [event for event in found if event["message_id"] in of_step]
