"""/v1/workflows: save (versioned), read, list, pause, resume and move workflows; enrol, status, simulate."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response, Security
from pydantic import BaseModel, ConfigDict, Field

from smartmail.access.keys import Principal
from smartmail.automations import reports, workflows
from smartmail.automations.definitions import MAX_STEPS
from smartmail.errors import InvalidInput, NotFound
from smartmail.store.engine import as_stored
from smartmail.store.models import WorkflowState
from smartmail.web.api.auth import authorize
from smartmail.web.api.fields import UtcDateTime
from smartmail.web.api.pagination import Cursor, Limit, Page, decode_cursor, page

router = APIRouter(prefix="/workflows", tags=["workflows"])

Reader = Annotated[Principal, Security(authorize, scopes=["workflows:read"])]
Writer = Annotated[Principal, Security(authorize, scopes=["workflows:write"])]
Name = Annotated[
    str, Path(min_length=1, max_length=100, description="The workflow's name (letters, digits, `_`, `.`, `-`).")
]

_TRIGGER = (
    'What enrols a contact, one of: `{"event": "signup", "where": {"plan": "pro"}}`, `{"list": NAME}`, '
    '`{"segment": NAME}`, `{"date": {"attribute": "birthday", "annual": true, "offset_days": -7, "at": "09:00"}}`, '
    '`{"engagement": {"event": "opened|clicked|not_opened|not_clicked", "campaign": NAME}}` (or `"workflow"` and '
    '`"step"`; `"within": "3d"` for the not_ ones).'
)
_STEPS = (
    "The steps, run in order from the first; each has an `id` and a `type`: `send` (template, from, reply_to, "
    "track, tags), `wait` (duration; until `HH:MM`; or event with timeout, on_event, on_timeout), `branch` (if, "
    "then, else), `update` (attributes, add_to_lists, remove_from_lists), `score` (points, attribute), `webhook` "
    "(endpoint, data) or `exit`; any but exit and branch may name its `next` step. A bad step is a 422 pointing "
    "at it by id: `/steps/<id>/<field>`."
)


class WorkflowIn(BaseModel):
    """A workflow's definition (the same document `smartmail workflows save` reads from JSON or YAML)."""

    model_config = ConfigDict(extra="forbid")

    # Not nullable: a null would name no workflow at all.
    name: str = Field(None, max_length=100, description="If given, the name in the URL.")  # type: ignore[assignment]
    description: str | None = Field(None, max_length=2000, description="A note for people.")
    trigger: dict[str, Any] = Field(description=_TRIGGER)
    entry: str | dict[str, Any] = Field(
        "once",
        description='Who may enrol again: `"once"` ever (default), `"every_time"` the trigger fires, or '
        '`{"once_per": "30d"}`.',
    )
    goal: dict[str, Any] | None = Field(
        None, description='`{"event": "order_placed"}`: that event ends the enrolment wherever it is (a conversion).'
    )
    sender: str | None = Field(None, max_length=320, description="The send steps' default `from`.")
    timezone: str = Field(  # type: ignore[assignment]
        None, max_length=64, description="For contacts without one: time-of-day waits and date triggers (UTC)."
    )
    steps: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_STEPS, description=_STEPS)


class WorkflowOut(BaseModel):
    name: str
    state: WorkflowState = Field(description="`paused`: it enrols nobody and holds its enrolments where they are.")
    version: int = Field(description="The version of `definition`.")
    definition: dict[str, Any] = Field(description="The document as saved.")
    created_at: UtcDateTime
    updated_at: UtcDateTime


class WorkflowVersionOut(WorkflowOut):
    current_version: int = Field(description="The version new enrolments start on.")


class SavedOut(WorkflowOut):
    changed: bool = Field(description="Whether this save added a version (false: the definition was the same).")


class EnrolmentsOut(BaseModel):
    name: str
    state: WorkflowState
    version: int
    enrolments: int = Field(description="How many enrolments the operation held, let go on, or moved.")


class MoveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    from_version: int | None = Field(
        None, ge=1, le=2**31 - 1, description="Only enrolments of this version; default: every older one."
    )


class EnrolIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(max_length=320, description="A stored contact's address.")
    properties: dict[str, Any] | None = Field(
        None, max_length=100, description="Kept with the enrolment, as a trigger event's properties are."
    )


class EnrolledOut(BaseModel):
    enrolled: bool = Field(
        description="false: the entry rule let the contact in before, or it is unsubscribed or suppressed."
    )


class StepCounts(BaseModel):
    runs: int = Field(description="Times the step ran.")
    emails: int = Field(description="Emails it queued.")


class StatusOut(BaseModel):
    name: str
    state: WorkflowState
    version: int
    enrolled: int = Field(description="Enrolments ever, running or ended.")
    running: dict[str, dict[str, int]] = Field(description="Running enrolments per step, by state (active, held).")
    ended: dict[str, int] = Field(
        description="Ended enrolments by reason: completed, converted, exited, unsubscribed, bounced, …"
    )
    steps: dict[str, StepCounts] = Field(description="Per step, over every version.")
    conversions: int = Field(description="Enrolments the goal event ended.")
    conversion_rate: float | None = Field(description="conversions / enrolled; null before any enrolment.")


class SimulateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(max_length=320, description="A stored contact's address: branches read its data as it is now.")
    assume: list[Annotated[str, Field(max_length=200)]] = Field(
        [],
        max_length=50,
        description="What happens on the way: `opened`, `clicked` (the previous email), or event types (an "
        "awaited event arrives at once; the goal event converts).",
    )
    start: datetime | None = Field(None, description="When the path starts (ISO 8601; without an offset, UTC); now.")


class StopOut(BaseModel):
    at: UtcDateTime = Field(description="When the step would run.")
    step: str
    type: str = Field(description="The step's type; `goal` or `end` for how the path ends.")
    does: str = Field(description="What it would do, for people.")


class PathOut(BaseModel):
    data: list[StopOut] = Field(description="The stops in order (at most 100: a loop through waits is cut there).")


@router.get("", response_model=Page[WorkflowOut])
def list_workflows(principal: Reader, limit: Limit = 100, cursor: Cursor = None) -> Page[dict[str, Any]]:
    """Workflows, by name, each with its current definition."""
    position = decode_cursor(cursor, (str,))
    rows = workflows.list_workflows(limit=limit + 1, after=position[0] if position else None)
    return page(rows, limit, lambda row: [row["name"]])


@router.put("/{name}", response_model=SavedOut, responses={201: {"model": SavedOut, "description": "Created."}})
def save_workflow(name: Name, body: WorkflowIn, response: Response, principal: Writer) -> dict[str, Any]:
    """Save the definition: 201 when the workflow is new (with `Location`), 200 with a new `version`
    when it differs from the current one, 200 with `changed: false` when it is the same. Running
    enrolments stay on their version (see `/move`). A bad definition is a 422 naming the field
    (`/steps/<id>/template` for an unknown template, `/steps/<id>/next` for a step that leads
    nowhere, a cycle of steps without a wait) and stores nothing."""
    saved, changed = workflows.save_workflow(name, body.model_dump(exclude_unset=True))
    if changed and saved["version"] == 1:
        response.status_code = 201
        response.headers["Location"] = f"/v1/workflows/{saved['name']}"
    return {**saved, "changed": changed}


@router.get("/{name}", response_model=WorkflowVersionOut)
def get_workflow(
    name: Name,
    principal: Reader,
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1, description="This version's definition.")] = None,
) -> dict[str, Any]:
    """The workflow with its current definition, or the given version's."""
    return workflows.get_workflow(name, version)


def _enrolments(name: str, count: int) -> dict[str, Any]:
    found = workflows.get_workflow(name)
    return {"name": found["name"], "state": found["state"], "version": found["version"], "enrolments": count}


@router.post("/{name}/pause", response_model=EnrolmentsOut)
def pause_workflow(name: Name, principal: Writer) -> dict[str, Any]:
    """Enrol nobody and hold every running enrolment where it is; `enrolments`: how many were held."""
    return _enrolments(name, workflows.pause_workflow(name))


@router.post("/{name}/resume", response_model=EnrolmentsOut)
def resume_workflow(name: Name, principal: Writer) -> dict[str, Any]:
    """Enrol again and let held enrolments go on (a wait that ended meanwhile runs at once);
    `enrolments`: how many."""
    return _enrolments(name, workflows.resume_workflow(name))


@router.post("/{name}/move", response_model=EnrolmentsOut)
def move_enrolments(name: Name, principal: Writer, body: MoveIn = MoveIn()) -> dict[str, Any]:
    """Move running enrolments of older versions (or of `from_version` only) to the current version,
    each at the step of the same id; those whose step the current version lacks stay where they are.
    The body is optional."""
    return _enrolments(name, workflows.move_enrolments(name, from_version=body.from_version))


def _contact_named(email_field: str, action: Any) -> Any:
    """The workflow's absence stays a 404; a contact that does not exist is the body's bad `email`."""
    try:
        return action()
    except NotFound as exc:
        raise InvalidInput(str(exc.args[0]) if exc.args else "no such contact", field=email_field) from None


@router.post("/{name}/enrolments", response_model=EnrolledOut)
def enrol_contact(name: Name, body: EnrolIn, principal: Writer) -> dict[str, Any]:
    """Enrol a stored contact by hand, under the workflow's entry rule (a subscribed, unsuppressed
    contact only): it starts at the first step. A contact that does not exist is a 422 naming `email`."""
    workflows.get_workflow(name)
    enrolled = _contact_named("email", lambda: reports.enrol_contact(name, body.email, body.properties))
    return {"enrolled": enrolled}


@router.get("/{name}/status", response_model=StatusOut)
def workflow_status(name: Name, principal: Reader) -> dict[str, Any]:
    """Running enrolments per step and state, ended ones by reason, step runs and emails per step,
    and conversions (enrolments the goal ended) over all enrolments."""
    return reports.status(name)


@router.post("/{name}/simulate", response_model=PathOut)
def simulate(name: Name, body: SimulateIn, principal: Reader) -> dict[str, Any]:
    """The path the contact would take through the current version from `start`, with the time of
    each step: nothing is sent or stored. Branches on stored data read the contact as it is now;
    `assume` says which opens, clicks and events happen on the way (others do not: an awaited event
    times out). A contact that does not exist is a 422 naming `email`."""
    workflows.get_workflow(name)
    start = as_stored(body.start) if body.start is not None else None
    stops = _contact_named(
        "email", lambda: reports.simulate(name, body.email, assume=frozenset(body.assume), start=start)
    )
    return {"data": [{"at": stop.at, "step": stop.step, "type": stop.type, "does": stop.does} for stop in stops]}
