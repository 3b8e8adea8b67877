"""What a workflow did and would do: enrolments per step, conversions, a simulated path; enrolling by hand."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select

from smartmail.audience.contacts import check_event_properties, known_zone, normalize_email
from smartmail.automations import clock, conditions, definitions
from smartmail.automations.definitions import Definition
from smartmail.automations.engine import next_time_of_day
from smartmail.automations.enrolment import Candidate, Live, enrol
from smartmail.errors import InvalidInput, NotFound
from smartmail.store.engine import get_engine
from smartmail.store.ids import new_id
from smartmail.store.models import Contact, ContactStatus, Enrolment, EnrolmentState, StepRun, Workflow, WorkflowVersion


def _workflow(connection, name: str) -> Any:
    row = connection.execute(
        select(Workflow.id, Workflow.name, Workflow.state, Workflow.version, Workflow.created_at).where(
            Workflow.name == name
        )
    ).first()
    if row is None:
        raise NotFound(f"No workflow named {name!r}.")
    return row


def status(name: str) -> dict[str, Any]:
    """Enrolments per step (running, by state), ended ones by reason, step runs and emails per step,
    and conversions (enrolments that reached the goal) over all enrolments."""
    with get_engine().connect() as connection:
        workflow = _workflow(connection, name)
        running: dict[str, dict[str, int]] = {}
        for step, state, count in connection.execute(
            select(Enrolment.step, Enrolment.state, func.count())
            .where(Enrolment.workflow_id == workflow.id, Enrolment.state != EnrolmentState.ENDED.value)
            .group_by(Enrolment.step, Enrolment.state)
        ):
            running.setdefault(step, {})[state] = count
        ended = dict(
            connection.execute(
                select(Enrolment.ended_reason, func.count())
                .where(Enrolment.workflow_id == workflow.id, Enrolment.state == EnrolmentState.ENDED.value)
                .group_by(Enrolment.ended_reason)
            ).all()
        )
        document = connection.scalar(
            select(WorkflowVersion.definition).where(
                WorkflowVersion.workflow_id == workflow.id, WorkflowVersion.version == workflow.version
            )
        )
        # Every step of the current version, in order (a wait leaves no run), then older versions' others.
        runs = {step: {"runs": 0, "emails": 0} for step in definitions.parse(document).steps}
        for step, count, emails in connection.execute(
            select(StepRun.step, func.count(), func.count(StepRun.message_id))
            .where(StepRun.workflow_id == workflow.id)
            .group_by(StepRun.step)
        ):
            runs[step] = {"runs": count, "emails": emails}
    enrolled = sum(ended.values()) + sum(sum(states.values()) for states in running.values())
    converted = ended.get("converted", 0)
    return {
        "name": workflow.name,
        "state": workflow.state,
        "version": workflow.version,
        "enrolled": enrolled,
        "running": running,
        "ended": ended,
        "steps": runs,
        "conversions": converted,
        "conversion_rate": converted / enrolled if enrolled else None,
    }


def enrol_contact(name: str, email: str, properties: dict[str, Any] | None = None) -> bool:
    """Enrol a stored contact by hand, under the workflow's entry rule (a subscribed, unsuppressed
    contact only); whether it was enrolled."""
    email = normalize_email(email)
    now = clock.now()
    with get_engine().begin() as connection:
        workflow = _workflow(connection, name)
        contact_id = connection.scalar(select(Contact.id).where(Contact.email == email))
        if contact_id is None:
            raise NotFound(f"No contact {email!r}.")
        document = connection.scalar(
            select(WorkflowVersion.definition).where(
                WorkflowVersion.workflow_id == workflow.id, WorkflowVersion.version == workflow.version
            )
        )
        live = Live(workflow.id, workflow.name, workflow.version, definitions.parse(document), workflow.created_at)
        context = {**check_event_properties(properties), "type": "manual"}
        return bool(enrol(connection, live, [Candidate(contact_id, f"manual:{new_id()}", context)], now))


@dataclass(frozen=True)
class Stop:
    """One step of a simulated path: when it would run and what it would do."""

    at: datetime
    step: str
    type: str
    does: str


def simulate(
    name: str, email: str, *, assume: frozenset[str] = frozenset(), start: datetime | None = None
) -> list[Stop]:
    """The path `email` would take through the workflow's current version from `start` (now),
    without sending or storing anything. Branches on stored data are evaluated against the
    contact as it is now; `assume` names what the simulation takes as happening: `opened`,
    `clicked` (the previous email), or event types (an awaited event arrives at once; the goal ends it)."""
    email = normalize_email(email)
    if start is not None and start.year > 9000:
        raise InvalidInput("must be before the year 9000", field="start")
    with get_engine().connect() as connection:
        workflow = _workflow(connection, name)
        document = connection.scalar(
            select(WorkflowVersion.definition).where(
                WorkflowVersion.workflow_id == workflow.id, WorkflowVersion.version == workflow.version
            )
        )
        contact = connection.execute(
            select(Contact.id, Contact.timezone, Contact.status).where(Contact.email == email)
        ).first()
        if contact is None:
            raise NotFound(f"No contact {email!r}.")
        return _walk(connection, definitions.parse(document), contact, assume, start or clock.now())


def _walk(connection, definition: Definition, contact: Any, assume: frozenset[str], now: datetime) -> list[Stop]:
    path: list[Stop] = []
    if contact.status != ContactStatus.SUBSCRIBED.value:  # the advance ends it before any step
        return [Stop(now, definition.first, "-", f"the contact is {contact.status}: leaves at once, nothing sent")]
    zone = ZoneInfo(known_zone(contact.timezone, definition.timezone))
    step_id: str | None = definition.first
    sent_before = False
    for _ in range(100):  # a loop through waits would go on forever: the first 100 stops are enough
        if step_id is None:
            path.append(Stop(now, "-", "end", "completed"))
            return path
        step = definition.steps[step_id]
        params = step.params
        if step.type == "send":
            path.append(Stop(now, step.id, step.type, f"sends template {params['template']!r}"))
            sent_before = True
            step_id = step.next
        elif step.type == "wait":
            if "event" in params:
                if params["event"] in assume:
                    path.append(Stop(now, step.id, step.type, f"{params['event']} arrives (assumed)"))
                    step_id = params.get("on_event", step.next)
                else:
                    now += timedelta(seconds=params["timeout"])
                    path.append(Stop(now, step.id, step.type, f"no {params['event']} within the timeout"))
                    step_id = params.get("on_timeout", step.next)
            else:
                due = now + timedelta(seconds=params.get("duration", 0))
                if "until" in params:
                    due = next_time_of_day(due, params["until"], zone)
                path.append(Stop(due, step.id, step.type, f"waits until {due.isoformat(timespec='minutes')}Z"))
                now = due
                step_id = step.next
            if definition.goal and definition.goal in assume:
                path.append(Stop(now, step.id, "goal", f"{definition.goal} (assumed): converted"))
                return path
        elif step.type == "branch":
            holds = _holds(connection, params["if"], contact.id, assume, sent_before, now)
            way = "then" if holds else "else"
            path.append(Stop(now, step.id, step.type, f"condition {'holds' if holds else 'does not hold'}: {way}"))
            step_id = params.get(way)
        elif step.type == "exit":
            path.append(Stop(now, step.id, step.type, "exits"))
            return path
        else:
            path.append(Stop(now, step.id, step.type, _describe(step.type, params)))
            step_id = step.next
    return path


def _holds(connection, condition: dict[str, Any], contact_id: int, assume, sent_before: bool, now: datetime) -> bool:
    ((kind, inner),) = condition.items()
    if kind == "previous_email":
        return sent_before and inner in assume
    if kind == "all":
        return all(_holds(connection, part, contact_id, assume, sent_before, now) for part in inner)
    if kind == "any":
        return any(_holds(connection, part, contact_id, assume, sent_before, now) for part in inner)
    if kind == "not":
        return not _holds(connection, inner, contact_id, assume, sent_before, now)
    subject = conditions.Subject(0, contact_id, None)
    return bool(conditions.holding(connection, condition, [subject], now))


def _describe(kind: str, params: dict[str, Any]) -> str:
    if kind == "update":
        parts = []
        if params.get("attributes"):
            parts.append(f"sets {', '.join(sorted(params['attributes']))}")
        if params.get("add_to_lists"):
            parts.append(f"adds to {', '.join(params['add_to_lists'])}")
        if params.get("remove_from_lists"):
            parts.append(f"removes from {', '.join(params['remove_from_lists'])}")
        return "; ".join(parts)
    if kind == "score":
        return f"adds {params['points']} to {params['attribute']}"
    return f"posts to webhook endpoint {params['endpoint']}"
