"""Workflows: save (a new version when the definition changed), show, list, pause, resume, move enrolments."""

from __future__ import annotations

import re
from typing import Any

import structlog
from sqlalchemy import func, select, update

from smartmail.audience import segments
from smartmail.automations import definitions, enrolment
from smartmail.automations.definitions import Definition
from smartmail.config import get_settings
from smartmail.content import template_store
from smartmail.errors import InvalidInput, InvalidSegment, NotFound, TemplateNotFound
from smartmail.store.engine import session_scope, utcnow
from smartmail.store.models import (
    Campaign,
    ContactList,
    Enrolment,
    EnrolmentState,
    Segment,
    WebhookEndpoint,
    Workflow,
    WorkflowState,
    WorkflowVersion,
)

log = structlog.get_logger("smartmail.automations")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_name(name: Any, *, field: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(f"{name!r} is not a workflow name (letters, digits, _ . -; up to 100)", field=field)
    return name


def _check_references(session, definition: Definition) -> None:
    templates_dir = get_settings().templates_dir

    def template_exists(reference: str) -> bool:
        try:
            template_store.resolve(session, reference, templates_dir)
        except (TemplateNotFound, ValueError):
            return False
        return True

    def exists(model, column, value) -> bool:
        return session.scalar(select(func.count()).select_from(model).where(column == value)) > 0

    definitions.check_references(
        definition,
        template_exists=template_exists,
        list_exists=lambda name: exists(ContactList, ContactList.name, name),
        segment_exists=lambda name: exists(Segment, Segment.name, name),
        endpoint_exists=lambda endpoint_id: exists(WebhookEndpoint, WebhookEndpoint.id, endpoint_id),
        campaign_exists=lambda name: exists(Campaign, Campaign.name, name),
    )


def _as_dict(workflow: Workflow, version: WorkflowVersion) -> dict[str, Any]:
    return {
        "name": workflow.name,
        "state": workflow.state,
        "version": workflow.version,
        "definition": version.definition,
        "created_at": workflow.created_at,
        "updated_at": workflow.updated_at,
    }


def save_workflow(name: str, document: Any) -> tuple[dict[str, Any], bool]:
    """Create the workflow, or give it a new version when the definition differs from its current
    one (running enrolments stay on theirs: see `move_enrolments`). The document is a dict, or
    JSON or YAML text. Returns (the workflow, whether a version was added)."""
    name = check_name(name)
    if isinstance(document, str):
        document = definitions.load_text(document)
    if isinstance(document, dict) and "name" in document and document["name"] != name:
        raise InvalidInput(f"the document names {document['name']!r}, not {name!r}", field="name")
    definition = definitions.parse(document)
    for step_id, rules in definition.branch_rules():
        try:
            segments.check(rules)  # a list that does not exist: a mistake, not an empty condition
        except InvalidSegment as exc:
            raise InvalidInput(exc.reason, field=f"steps.{step_id}.if") from None
    stored = {key: value for key, value in document.items() if key != "name"}
    now = utcnow()
    with session_scope() as session:
        _check_references(session, definition)
        workflow = session.scalar(select(Workflow).where(Workflow.name == name).with_for_update())
        if workflow is None:
            enrolment.start_checkpoint(session.connection())
            workflow = Workflow(name=name, state=WorkflowState.ACTIVE.value, version=1, created_at=now, updated_at=now)
            session.add(workflow)
            session.flush()
        else:
            current = _version(session, workflow.id, workflow.version)
            if current.definition == stored:
                return _as_dict(workflow, current), False
            workflow.version += 1
            workflow.updated_at = now
        version = WorkflowVersion(workflow_id=workflow.id, version=workflow.version, definition=stored, created_at=now)
        session.add(version)
        session.flush()
        log.info("workflow.saved", workflow=name, version=workflow.version)
        return _as_dict(workflow, version), True


def _version(session, workflow_id: int, version: int) -> WorkflowVersion:
    return session.scalars(
        select(WorkflowVersion).where(WorkflowVersion.workflow_id == workflow_id, WorkflowVersion.version == version)
    ).one()


def _get(session, name: str, *, lock: bool = False) -> Workflow:
    query = select(Workflow).where(Workflow.name == name)
    workflow = session.scalar(query.with_for_update() if lock else query)
    if workflow is None:
        raise NotFound(f"No workflow named {name!r}.")
    return workflow


def get_workflow(name: str, version: int | None = None) -> dict[str, Any]:
    """The workflow with its current definition (or the given version's)."""
    with session_scope() as session:
        workflow = _get(session, name)
        found = session.scalar(
            select(WorkflowVersion).where(
                WorkflowVersion.workflow_id == workflow.id, WorkflowVersion.version == (version or workflow.version)
            )
        )
        if found is None:
            raise NotFound(f"Workflow {name!r} has no version {version}.")
        return {**_as_dict(workflow, found), "version": found.version, "current_version": workflow.version}


def list_workflows(*, limit: int = 100, after: str | None = None) -> list[dict[str, Any]]:
    with session_scope() as session:
        query = select(Workflow).order_by(Workflow.name).limit(limit)
        if after:
            query = query.where(Workflow.name > after)
        workflows = session.scalars(query).all()
        return [_as_dict(workflow, _version(session, workflow.id, workflow.version)) for workflow in workflows]


def definition_of(name: str, version: int | None = None) -> Definition:
    return definitions.parse(get_workflow(name, version)["definition"])


def pause_workflow(name: str) -> int:
    """Stop enrolling and hold every running enrolment where it is; how many were held."""
    return _set_state(name, WorkflowState.PAUSED, EnrolmentState.ACTIVE, EnrolmentState.HELD)


def resume_workflow(name: str) -> int:
    """Enrol again and let held enrolments go on (a wait that ended meanwhile runs at once); how many."""
    return _set_state(name, WorkflowState.ACTIVE, EnrolmentState.HELD, EnrolmentState.ACTIVE)


def _set_state(name: str, state: WorkflowState, source: EnrolmentState, target: EnrolmentState) -> int:
    with session_scope() as session:
        workflow = _get(session, name, lock=True)  # two pauses or resumes take turns
        workflow.state = state.value
        workflow.updated_at = utcnow()
        moved = (
            session.connection()
            .execute(
                update(Enrolment)
                .where(Enrolment.workflow_id == workflow.id, Enrolment.state == source.value)
                .values(state=target.value, updated_at=utcnow())
            )
            .rowcount
        )
    log.info(f"workflow.{'paused' if state is WorkflowState.PAUSED else 'resumed'}", workflow=name, enrolments=moved)
    return moved


def move_enrolments(name: str, *, from_version: int | None = None) -> int:
    """Move running enrolments of older versions (or only `from_version`) to the current version,
    each at the step of the same id; those whose step the current version lacks stay. How many moved."""
    with session_scope() as session:
        workflow = _get(session, name, lock=True)
        current = definitions.parse(_version(session, workflow.id, workflow.version).definition)
        query = update(Enrolment).where(
            Enrolment.workflow_id == workflow.id,
            Enrolment.state != EnrolmentState.ENDED.value,
            Enrolment.version != workflow.version,
            Enrolment.step.in_(list(current.steps)),
        )
        if from_version is not None:
            query = query.where(Enrolment.version == from_version)
        moved = session.connection().execute(query.values(version=workflow.version, updated_at=utcnow())).rowcount
        # A waiting enrolment now waits for its step's event in the current version (or for none).
        for step in current.steps.values():
            if step.type == "wait":
                session.connection().execute(
                    update(Enrolment)
                    .where(
                        Enrolment.workflow_id == workflow.id,
                        Enrolment.version == workflow.version,
                        Enrolment.state != EnrolmentState.ENDED.value,
                        Enrolment.step == step.id,
                        Enrolment.wait_started_at.is_not(None),
                    )
                    .values(awaiting=step.params.get("event"))
                )
    log.info("workflow.enrolments_moved", workflow=name, version=workflow.version, enrolments=moved)
    return moved
