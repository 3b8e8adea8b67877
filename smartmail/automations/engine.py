"""Advancing enrolments: claim a page of due ones, run their steps until each waits or ends, in one transaction."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Connection

from smartmail.audience import frequency_cap
from smartmail.audience.contacts import known_zone
from smartmail.automations import clock, conditions, enrolment
from smartmail.automations import messages as step_messages
from smartmail.automations.definitions import Definition, Step
from smartmail.config import get_settings
from smartmail.errors import TemplateError
from smartmail.store import dialect
from smartmail.store.engine import get_engine, utcnow
from smartmail.store.ids import new_id, new_ids
from smartmail.store.models import (
    Contact,
    ContactList,
    ContactStatus,
    Enrolment,
    EnrolmentState,
    ListMembership,
    StepRun,
    Suppression,
    WebhookDelivery,
    WebhookEndpoint,
    Workflow,
    WorkflowState,
)
from smartmail.store.sql import messages as messages_sql
from smartmail.workers.dispatch import BULK, enqueue

log = structlog.get_logger("smartmail.automations")

# Steps one enrolment may run in one advance: definitions refuse cycles without a wait, so only a
# very long chain of instant steps reaches it; the rest runs at the next advance.
MAX_STEPS_PER_ADVANCE = 50
WEBHOOK_EVENT = "workflow.webhook"
ACTIVE, HELD, ENDED = EnrolmentState.ACTIVE.value, EnrolmentState.HELD.value, EnrolmentState.ENDED.value


@dataclass
class Run:
    """One enrolment being advanced: its row's values, changed in memory as its steps run."""

    enrolment_id: int
    workflow_id: int
    workflow: str
    definition: Definition
    contact: Any  # id, email, status, attributes, timezone
    step: str
    runs: int
    context: dict[str, Any]
    last_message_id: str | None
    wait_started_at: datetime | None
    awaited_at: datetime | None
    state: str = ACTIVE
    due_at: datetime | None = None
    awaiting: str | None = None
    ended_reason: str | None = None
    going: bool = True  # runs another step in this advance

    @property
    def contact_id(self) -> int:
        return self.contact.id

    def end(self, reason: str) -> None:
        self.state, self.ended_reason, self.going = ENDED, reason, False

    def move(self, target: str | None) -> None:
        """On to `target`, or the end of the workflow when there is none."""
        self.wait_started_at = self.awaited_at = self.awaiting = None
        if target is None:
            self.end("completed")
        else:
            self.step = target


@dataclass
class Advanced:
    enrolments: int  # enrolments claimed and advanced
    steps: int  # step runs recorded
    messages: int  # emails queued
    more: bool  # a full page: more may be due


@dataclass
class _Writes:
    """What a page's steps did, written together at the end of its transaction."""

    step_runs: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    deliveries: list[dict[str, Any]] = field(default_factory=list)


def _claim(connection: Connection, now: datetime, limit: int) -> Sequence[Any]:
    """Due active enrolments, oldest due first, locked (PostgreSQL: others' locked rows skipped, so
    several workers share the work; SQLite: its one writer is this transaction)."""
    return connection.execute(
        select(Enrolment)
        .where(Enrolment.state == ACTIVE, Enrolment.due_at <= now)
        .order_by(Enrolment.due_at, Enrolment.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()


def _contacts(connection: Connection, contact_ids: Sequence[int], *, lock: bool) -> dict[int, Any]:
    """The contacts; with `lock` (update and score steps rewrite attributes; a frequency cap counts
    sends) locked for this transaction, in id order so that two advances wait for each other
    instead of deadlocking. FOR NO KEY UPDATE: an enrolment's insert (a foreign key's KEY SHARE
    lock) is not kept waiting. Without, no lock: a lock is a write to every row."""
    query = (
        select(
            Contact.id,
            Contact.email,
            Contact.status,
            Contact.attributes,
            Contact.timezone,
            Suppression.reason.label("suppressed"),
        )
        .outerjoin(Suppression, Suppression.email == Contact.email)
        .where(Contact.id.in_(sorted(set(contact_ids))))
        .order_by(Contact.id)
    )
    rows = connection.execute(query.with_for_update(of=Contact, key_share=True) if lock else query).all()
    return {row.id: _MutableContact(row) for row in rows}


class _MutableContact:
    """A contact's row whose attributes the page's update and score steps change as they run."""

    __slots__ = ("id", "email", "status", "attributes", "timezone", "suppressed", "changed")

    def __init__(self, row: Any) -> None:
        self.id, self.email, self.status, self.timezone, self.suppressed = (
            row.id,
            row.email,
            row.status,
            row.timezone,
            row.suppressed,
        )
        self.attributes = dict(row.attributes or {})
        self.changed = False


def advance(*, limit: int | None = None, now: datetime | None = None) -> Advanced:
    """Advance one page of due enrolments: each runs steps until it waits or ends. Every step's
    effects (its message, attribute changes, webhook delivery), its run's row and the enrolment's
    new position commit in one transaction, so a crash repeats or loses nothing; the messages are
    handed to the bulk queue after the commit (the reconciler re-queues them if that is lost)."""
    settings = get_settings()
    limit = limit or settings.automation_batch_size
    now = now or clock.now()
    with get_engine().begin() as connection:
        rows = _claim(connection, now, limit)
        if not rows:
            return Advanced(0, 0, 0, more=False)
        workflows = {
            row.id: row
            for row in connection.execute(
                select(Workflow.id, Workflow.name, Workflow.state).where(Workflow.id.in_({r.workflow_id for r in rows}))
            )
        }
        held = [row.id for row in rows if workflows[row.workflow_id].state != WorkflowState.ACTIVE.value]
        rows = [row for row in rows if workflows[row.workflow_id].state == WorkflowState.ACTIVE.value]
        if held:  # paused between the claim's snapshot and now: held where they are
            connection.execute(update(Enrolment).where(Enrolment.id.in_(held)).values(state=HELD, updated_at=utcnow()))
        found = enrolment.parsed_versions(connection, {(row.workflow_id, row.version) for row in rows})
        writes_contacts = any(
            step.type in ("update", "score") for definition in found.values() for step in definition.steps.values()
        )
        # Locked too under a frequency cap: two advances sending to one contact count each other's sends.
        lock = writes_contacts or bool(frequency_cap.caps())
        contacts = _contacts(connection, [row.contact_id for row in rows], lock=lock)
        runs = []
        for row in rows:
            run = Run(
                enrolment_id=row.id,
                workflow_id=row.workflow_id,
                workflow=workflows[row.workflow_id].name,
                definition=found[(row.workflow_id, row.version)],
                contact=contacts.get(row.contact_id),
                step=row.step,
                runs=row.runs,
                context=row.context or {},
                last_message_id=row.last_message_id,
                wait_started_at=row.wait_started_at,
                awaited_at=row.awaited_at,
                awaiting=row.awaiting,
            )
            runs.append(run)
        writes = _Writes()
        _Stepper(connection, now, writes).run(runs)
        _write(connection, runs, writes, now)
    message_ids = [message["id"] for message in writes.messages]
    if message_ids:
        enqueue(message_ids, BULK)
    names = {run.enrolment_id: run.workflow for run in runs}
    for ran in writes.step_runs:  # one line per step run, a sent message's id with its enrolment's
        log.info(
            "workflow.step_ran",
            workflow=names.get(ran["enrolment_id"]),
            enrolment_id=ran["enrolment_id"],
            contact_id=ran["contact_id"],
            step=ran["step"],
            kind=ran["kind"],
            message_id=ran["message_id"],
            outcome=ran["outcome"],
        )
    for run in runs:
        if run.state == ENDED:
            log.info(
                "workflow.enrolment_ended",
                workflow=run.workflow,
                enrolment_id=run.enrolment_id,
                contact_id=run.contact.id if run.contact is not None else None,
                reason=run.ended_reason,
            )
    return Advanced(len(rows) + len(held), len(writes.step_runs), len(message_ids), more=len(rows) + len(held) >= limit)


class _Stepper:
    """Runs steps for a page of enrolments in lockstep: each round, the enrolments at the same step
    of the same workflow version run it together (one query for a branch's condition, one for the
    frequency cap), until every enrolment waits or ends."""

    def __init__(self, connection: Connection, now: datetime, writes: _Writes) -> None:
        self.connection, self.now, self.writes = connection, now, writes
        self.settings = get_settings()
        self.sent_here: dict[int, list[datetime]] = defaultdict(list)  # emails this page queued, per contact

    def run(self, runs: list[Run]) -> None:
        going = [run for run in runs if self._may_go_on(run)]
        for _ in range(MAX_STEPS_PER_ADVANCE):
            if not going:
                return
            groups: dict[tuple[int, int, str], list[Run]] = defaultdict(list)
            for run in going:
                groups[(run.workflow_id, id(run.definition), run.step)].append(run)
            for group in groups.values():
                step = group[0].definition.steps.get(group[0].step)
                if step is None:  # a version's step is always there; a moved enrolment's was checked
                    for run in group:
                        run.end("removed")
                    continue
                getattr(self, f"_{step.type}")(step, group)
            going = [run for run in going if run.going]
        for run in going:  # a long chain of instant steps: the rest at the next advance
            run.due_at, run.going = self.now, False

    def _may_go_on(self, run: Run) -> bool:
        """A contact who unsubscribed, bounced, complained, was blocked or suppressed leaves the workflow."""
        contact = run.contact
        if contact is None:
            run.end("removed")
        elif contact.status != ContactStatus.SUBSCRIBED.value:
            run.end(contact.status)
        elif contact.suppressed:
            run.end("suppressed")
        return run.going

    def _record(self, run: Run, step: Step, *, message_id: str | None = None, outcome: str | None = None) -> None:
        self.writes.step_runs.append(
            {
                "enrolment_id": run.enrolment_id,
                "run": run.runs,
                "workflow_id": run.workflow_id,
                "step": step.id,
                "kind": step.type,
                "contact_id": run.contact_id,
                "ran_at": self.now,
                "message_id": message_id,
                "outcome": outcome,
            }
        )
        run.runs += 1

    # --- the steps: each takes the runs at that step ---------------------------------------------

    def _send(self, step: Step, group: list[Run]) -> None:
        sent_before = frequency_cap.recent_sends(self.connection, [run.contact_id for run in group], self.now)
        ids = new_ids(len(group))
        for run, message_id in zip(group, ids):
            until = frequency_cap.held_until(
                sent_before.get(run.contact_id, []) + self.sent_here[run.contact_id], self.now
            )
            if until is not None:
                run.due_at, run.going = until, False
                log.info(
                    "workflow.step_held",
                    workflow=run.workflow,
                    step=step.id,
                    enrolment_id=run.enrolment_id,
                    contact_id=run.contact_id,
                    until=until,
                )
                continue
            try:
                row = step_messages.message_row(
                    self.connection,
                    message_id=message_id,
                    enrolment_id=run.enrolment_id,
                    run=run.runs,
                    workflow=run.workflow,
                    step=step.params,
                    sender=run.definition.sender,
                    contact=run.contact,
                    context=run.context,
                    now=utcnow(),
                )
            except (TemplateError, LookupError, ValueError) as exc:
                log.error("workflow.send_failed", workflow=run.workflow, step=step.id, error=str(exc))
                self._record(run, step, outcome=f"failed: {exc}"[:200])
                run.end("failed")
                continue
            self.writes.messages.append(row)
            self.sent_here[run.contact_id].append(self.now)
            self._record(run, step, message_id=message_id)
            run.last_message_id = message_id
            run.move(step.next)

    def _wait(self, step: Step, group: list[Run]) -> None:
        for run in group:
            if run.wait_started_at is None:
                self._start_wait(run, step)
                continue
            if "event" in step.params:
                target = step.params.get("on_event" if run.awaited_at else "on_timeout", step.next)
                run.move(target)
            else:
                run.move(step.next)

    def _start_wait(self, run: Run, step: Step) -> None:
        params = step.params
        due = self.now + timedelta(seconds=params.get("duration", params.get("timeout", 0)))
        if "until" in params:
            zone = ZoneInfo(known_zone(run.contact.timezone, run.definition.timezone))
            due = next_time_of_day(due, params["until"], zone)
        run.wait_started_at, run.due_at, run.going = utcnow(), due, False
        run.awaiting, run.awaited_at = params.get("event"), None

    def _branch(self, step: Step, group: list[Run]) -> None:
        subjects = [conditions.Subject(run.enrolment_id, run.contact_id, run.last_message_id) for run in group]
        holding = conditions.holding(self.connection, step.params["if"], subjects, self.now)
        for run in group:
            way = "then" if run.enrolment_id in holding else "else"
            self._record(run, step, outcome=way)
            run.move(step.params.get(way))

    def _update(self, step: Step, group: list[Run]) -> None:
        attributes = step.params.get("attributes")
        for run in group:
            if attributes:
                run.contact.attributes.update(attributes)
                run.contact.changed = True
        self._write_attributes(group)
        contact_ids = sorted({run.contact_id for run in group})
        for key, joining in (("add_to_lists", True), ("remove_from_lists", False)):
            for name in step.params.get(key, []):
                list_id = self.connection.scalar(select(ContactList.id).where(ContactList.name == name))
                if list_id is None:  # deleted since the workflow was saved
                    log.warning("workflow.list_missing", workflow=group[0].workflow, step=step.id, list=name)
                    continue
                if joining:
                    insert_membership = dialect.insert(self.connection)(ListMembership)
                    self.connection.execute(
                        insert_membership.on_conflict_do_nothing(index_elements=["list_id", "contact_id"]),
                        [
                            {
                                "list_id": list_id,
                                "contact_id": contact_id,
                                "status": "subscribed",
                                "joined_at": utcnow(),
                                "source": f"workflow:{group[0].workflow}"[:64],
                            }
                            for contact_id in contact_ids
                        ],
                    )
                else:
                    self.connection.execute(
                        delete(ListMembership).where(
                            ListMembership.list_id == list_id, ListMembership.contact_id.in_(contact_ids)
                        )
                    )
        for run in group:
            self._record(run, step)
            run.move(step.next)

    def _score(self, step: Step, group: list[Run]) -> None:
        name, points = step.params["attribute"], step.params["points"]
        for run in group:
            current = run.contact.attributes.get(name)
            base = current if isinstance(current, (int, float)) and not isinstance(current, bool) else 0
            run.contact.attributes[name] = base + points
            run.contact.changed = True
        self._write_attributes(group)
        for run in group:
            self._record(run, step, outcome=f"{name} = {run.contact.attributes[name]}")
            run.move(step.next)

    def _write_attributes(self, group: list[Run]) -> None:
        """Now, in this transaction, so a later step of the same advance (a branch's rules) sees them."""
        changed = {run.contact_id: run.contact for run in group if run.contact.changed}
        if not changed:
            return
        self.connection.execute(
            update(Contact)
            .where(Contact.id == bindparam("contact"))
            .values(attributes=bindparam("new_attributes"), updated_at=utcnow()),
            [{"contact": contact.id, "new_attributes": contact.attributes} for contact in changed.values()],
        )
        for contact in changed.values():
            contact.changed = False

    def _webhook(self, step: Step, group: list[Run]) -> None:
        endpoint_id = step.params["endpoint"]
        enabled = self.connection.scalar(select(WebhookEndpoint.enabled).where(WebhookEndpoint.id == endpoint_id))
        for run in group:
            if not enabled:
                self._record(run, step, outcome="endpoint missing or disabled")
                run.move(step.next)
                continue
            timestamp = utcnow()
            payload = {
                "type": WEBHOOK_EVENT,
                "timestamp": timestamp.isoformat() + "Z",
                "data": {
                    **step.params.get("data", {}),
                    "workflow": run.workflow,
                    "step": step.id,
                    "enrolment_id": run.enrolment_id,
                    "contact_id": run.contact_id,
                    "email": run.contact.email,
                    "attributes": run.contact.attributes,
                    "event": run.context,
                },
            }
            self.writes.deliveries.append(
                {
                    "endpoint_id": endpoint_id,
                    "event_id": None,
                    "event_type": WEBHOOK_EVENT,
                    "payload": json.dumps(payload, default=str),
                    "webhook_id": f"msg_{new_id()}",
                    "state": "pending",
                    "attempts": 0,
                    "next_attempt_at": timestamp,
                    "created_at": timestamp,
                }
            )
            self._record(run, step)
            run.move(step.next)

    def _exit(self, step: Step, group: list[Run]) -> None:
        for run in group:
            self._record(run, step)
            run.end("exited")


def next_time_of_day(after: datetime, hh_mm: str, zone: ZoneInfo) -> datetime:
    """The first moment at or after `after` (naive UTC) when the wall clock in `zone` shows HH:MM, as naive UTC."""
    hours, minutes = (int(part) for part in hh_mm.split(":"))
    local = after.replace(tzinfo=ZoneInfo("UTC")).astimezone(zone)
    for days in range(3):
        day = (local + timedelta(days=days)).date()
        candidate = datetime(day.year, day.month, day.day, hours, minutes, tzinfo=zone)
        as_utc = candidate.astimezone(ZoneInfo("UTC")).replace(tzinfo=None)
        if as_utc >= after:
            return as_utc
    raise AssertionError("a time of day recurs within three days")


def _write(connection: Connection, runs: list[Run], writes: _Writes, now: datetime) -> None:
    if writes.messages:
        messages_sql.for_bind(connection).insert_many(connection, writes.messages)
    if writes.deliveries:
        connection.execute(insert(WebhookDelivery), writes.deliveries)
    if writes.step_runs:
        connection.execute(insert(StepRun), writes.step_runs)
    changed = utcnow()
    connection.execute(
        update(Enrolment)
        .where(Enrolment.id == bindparam("enrolment"))
        .values(
            state=bindparam("new_state"),
            step=bindparam("new_step"),
            due_at=bindparam("new_due_at"),
            runs=bindparam("new_runs"),
            awaiting=bindparam("new_awaiting"),
            wait_started_at=bindparam("new_wait_started_at"),
            awaited_at=bindparam("new_awaited_at"),
            last_message_id=bindparam("new_last_message_id"),
            ended_at=bindparam("new_ended_at"),
            ended_reason=bindparam("new_ended_reason"),
            updated_at=changed,
        ),
        [
            {
                "enrolment": run.enrolment_id,
                "new_state": run.state,
                "new_step": run.step,
                "new_due_at": run.due_at or now,
                "new_runs": run.runs,
                "new_awaiting": run.awaiting,
                "new_wait_started_at": run.wait_started_at,
                "new_awaited_at": run.awaited_at,
                "new_last_message_id": run.last_message_id,
                "new_ended_at": changed if run.state == ENDED else None,
                "new_ended_reason": run.ended_reason,
            }
            for run in runs
        ],
    )


def due_count(now: datetime | None = None) -> int:
    with get_engine().connect() as connection:
        return (
            connection.scalar(
                select(func.count())
                .select_from(Enrolment)
                .where(Enrolment.state == ACTIVE, Enrolment.due_at <= (now or clock.now()))
            )
            or 0
        )


def any_due(now: datetime | None = None) -> bool:
    """Whether an enrolment is due (one index probe)."""
    with get_engine().connect() as connection:
        return (
            connection.scalar(
                select(Enrolment.id).where(Enrolment.state == ACTIVE, Enrolment.due_at <= (now or clock.now())).limit(1)
            )
            is not None
        )


def advance_for(max_seconds: float) -> bool:
    """Advance pages of due enrolments for up to `max_seconds`; whether more were due when time was up."""
    deadline = utcnow() + timedelta(seconds=max_seconds)
    while True:
        advanced = advance()
        if not advanced.more:
            return False
        if utcnow() >= deadline:
            return True
