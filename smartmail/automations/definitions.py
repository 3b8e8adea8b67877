"""Workflow definitions: parsed from JSON or YAML and checked, with errors naming the step and the field."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import time
from typing import Any

import yaml

from smartmail.addresses import AddressError, parse_mailbox
from smartmail.audience import segments
from smartmail.audience.contacts import (
    check_attribute_name,
    check_attributes,
    check_event_name,
    check_event_properties,
    check_list_name,
    check_timezone,
)
from smartmail.errors import InvalidInput
from smartmail.store.models import EventType
from smartmail.workers.policy import parse_duration

MAX_STEPS = 200
# Longer waits, periods and windows would put due dates past the calendar (datetime overflows).
MAX_DURATION_DAYS = 3660
_ID = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,99}")
_TIME_OF_DAY = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_ENGAGEMENTS = ("opened", "clicked", "not_opened", "not_clicked")
_ENTRY_RULES = ("once", "every_time")
_TRIGGERS = ("event", "list", "segment", "date", "engagement")
# What each step type may carry besides `id`, `type` and `next`.
_STEP_FIELDS: dict[str, set[str]] = {
    "send": {"template", "from", "reply_to", "track", "tags"},
    "wait": {"duration", "until", "event", "timeout", "on_event", "on_timeout"},
    "branch": {"if", "then", "else"},
    "update": {"attributes", "add_to_lists", "remove_from_lists"},
    "score": {"points", "attribute"},
    "webhook": {"endpoint", "data"},
    "exit": set(),
}
# Step types that end here: no `next`.
_TERMINAL = {"exit"}


@dataclass(frozen=True)
class Trigger:
    """What enrols a contact: `kind` is one of _TRIGGERS; the other fields are that kind's."""

    kind: str
    event: str | None = None  # event: a custom event's type; engagement: opened, clicked, not_opened, not_clicked
    where: dict[str, Any] | None = None  # event: properties the event must carry (equal values)
    list: str | None = None
    segment: str | None = None
    attribute: str | None = None  # date: the contact attribute holding an ISO date
    offset_days: int = 0  # date: enrol this many days after (negative: before) the date
    annual: bool = False  # date: every year on the date's month and day (a birthday)
    at: time = time(9, 0)  # date: the local time of day the enrolment starts
    campaign: str | None = None  # engagement: of this campaign's email…
    workflow: str | None = None  # …or of this workflow's step
    step: str | None = None
    within: float = 0.0  # engagement not_*: seconds after the email was sent


@dataclass(frozen=True)
class Step:
    id: str
    type: str
    next: str | None  # None: the workflow ends after this step
    params: dict[str, Any] = field(default_factory=dict)

    def targets(self) -> dict[str, str]:
        """Where this step can lead: {field: step id} (for `next`, a branch's ways, a wait's outcomes)."""
        found = {key: self.params[key] for key in ("then", "else", "on_event", "on_timeout") if self.params.get(key)}
        if self.next is not None:
            found["next"] = self.next
        return found

    @property
    def pauses(self) -> bool:
        """Whether the step makes time pass (a wait): a cycle through one is a loop, not a spin."""
        return self.type == "wait"


@dataclass(frozen=True)
class Definition:
    trigger: Trigger
    steps: dict[str, Step]  # in their given order; the first one is where an enrolment starts
    entry: str = "once"  # once | every_time | once_per
    entry_period: float = 0.0  # once_per: seconds between two enrolments of a contact
    goal: str | None = None  # an event type that ends the enrolment wherever it is (a conversion)
    sender: str | None = None  # the default `from` of its send steps
    timezone: str = "UTC"  # for contacts without one: time-of-day waits and date triggers
    description: str | None = None

    @property
    def first(self) -> str:
        return next(iter(self.steps))

    def templates(self) -> set[str]:
        return {step.params["template"] for step in self.steps.values() if step.type == "send"}

    def lists(self) -> set[str]:
        names = {self.trigger.list} if self.trigger.list else set()
        for step in self.steps.values():
            if step.type == "update":
                names.update(step.params.get("add_to_lists", []), step.params.get("remove_from_lists", []))
        return names

    def branch_rules(self) -> Iterator[tuple[str, Any]]:
        """(step id, segment rules) of every `rules` condition of its branches."""

        def walk(condition: dict[str, Any]) -> Iterator[Any]:
            ((kind, inner),) = condition.items()
            if kind == "rules":
                yield inner
            elif kind in ("all", "any"):
                for part in inner:
                    yield from walk(part)
            elif kind == "not":
                yield from walk(inner)

        for step in self.steps.values():
            if step.type == "branch":
                for rules in walk(step.params["if"]):
                    yield step.id, rules

    def endpoints(self) -> set[int]:
        return {step.params["endpoint"] for step in self.steps.values() if step.type == "webhook"}

    def events(self) -> set[str]:
        """Event types that move its enrolments: the goal and awaited events."""
        found = {self.goal} if self.goal else set()
        found.update(
            step.params["event"] for step in self.steps.values() if step.type == "wait" and "event" in step.params
        )
        return found


class _Loader(yaml.SafeLoader):
    """YAML as JSON sees it: `10:30` and `2024-01-01` stay strings (YAML 1.1 would make them the
    number 630 and a date, which times of day and segment rules do not take)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in ("tag:yaml.org,2002:timestamp",)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+$")
for _first in "+-0123456789":
    _Loader.yaml_implicit_resolvers[_first] = [
        ("tag:yaml.org,2002:str", _SEXAGESIMAL),
        *_Loader.yaml_implicit_resolvers.get(_first, []),
    ]


def load_text(text: str, *, field: str = "definition") -> Any:
    """A definition's document from JSON or YAML text (YAML is a superset; JSON's errors are clearer)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader
    except (ValueError, RecursionError) as exc:  # YAML's own values (a date like 2024-02-30), deep nesting
        raise InvalidInput(f"neither JSON nor YAML: {exc}", field=field) from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise InvalidInput(f"neither JSON nor YAML{at}: {getattr(exc, 'problem', None) or exc}", field=field) from None


def _only(value: Mapping, allowed: set[str], path: str) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise InvalidInput(
            f"unknown field {unknown[0]!r}; known: {', '.join(sorted(allowed))}", field=f"{path}.{unknown[0]}"
        )


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise InvalidInput("must be an object", field=path)
    return value


def _duration(value: Any, path: str, *, positive: bool = True) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise InvalidInput(f"{value!r} is not a duration (90s, 30m, 2h, 3d or seconds)", field=path) from None
    if positive and seconds <= 0:
        raise InvalidInput("must be longer than 0", field=path)
    if not seconds <= MAX_DURATION_DAYS * 86400:
        raise InvalidInput(f"at most {MAX_DURATION_DAYS} days", field=path)
    return seconds


def _time_of_day(value: Any, path: str) -> time:
    match = _TIME_OF_DAY.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise InvalidInput(f"{value!r} is not a time of day (HH:MM, 24-hour)", field=path)
    return time(int(match.group(1)), int(match.group(2)))


def _name(value: Any, path: str, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 200 or not value.isprintable():
        raise InvalidInput(f"must name a {what}", field=path)
    return value


def _trigger(value: Any) -> Trigger:
    rule = _mapping(value, "trigger")
    kinds = [kind for kind in _TRIGGERS if kind in rule]
    if len(kinds) != 1:
        raise InvalidInput(f"give exactly one of {', '.join(_TRIGGERS)}", field="trigger")
    kind = kinds[0]
    path = f"trigger.{kind}"
    if kind == "event":
        _only(rule, {"event", "where"}, "trigger")
        # Stored as JSON on both databases: no NaN, no NUL (PostgreSQL refuses them).
        where = check_event_properties(rule["where"], field="trigger.where") if rule.get("where") is not None else None
        return Trigger(kind, event=check_event_name(rule["event"], field=path), where=where)
    _only(rule, {kind}, "trigger")
    if kind == "list":
        return Trigger(kind, list=check_list_name(rule[kind], field=path))
    if kind == "segment":
        return Trigger(kind, segment=_name(rule[kind], path, "saved segment"))
    spec = _mapping(rule[kind], path)
    if kind == "date":
        _only(spec, {"attribute", "offset_days", "annual", "at"}, path)
        offset = spec.get("offset_days", 0)
        if isinstance(offset, bool) or not isinstance(offset, int) or abs(offset) > 366:
            raise InvalidInput("must be a whole number of days, -366 to 366", field=f"{path}.offset_days")
        annual = spec.get("annual", False)
        if not isinstance(annual, bool):
            raise InvalidInput("must be true or false", field=f"{path}.annual")
        return Trigger(
            kind,
            attribute=_name(spec.get("attribute"), f"{path}.attribute", "contact attribute"),
            offset_days=offset,
            annual=annual,
            at=_time_of_day(spec.get("at", "09:00"), f"{path}.at"),
        )
    _only(spec, {"event", "campaign", "workflow", "step", "within"}, path)
    event = spec.get("event")
    if event not in _ENGAGEMENTS:
        raise InvalidInput(f"must be one of {', '.join(_ENGAGEMENTS)}", field=f"{path}.event")
    if ("campaign" in spec) == ("workflow" in spec) or ("workflow" in spec) != ("step" in spec):
        raise InvalidInput("give a campaign, or a workflow and its step", field=path)
    within = 0.0
    if event.startswith("not_"):
        within = _duration(spec.get("within"), f"{path}.within")
    elif "within" in spec:
        raise InvalidInput("only not_opened and not_clicked wait a while", field=f"{path}.within")
    return Trigger(
        kind,
        event=event,
        campaign=_name(spec["campaign"], f"{path}.campaign", "campaign") if "campaign" in spec else None,
        workflow=_name(spec["workflow"], f"{path}.workflow", "workflow") if "workflow" in spec else None,
        step=_name(spec["step"], f"{path}.step", "step") if "step" in spec else None,
        within=within,
    )


def _condition(value: Any, path: str) -> dict[str, Any]:
    """A branch's `if`: {"previous_email": "opened"|"clicked"}, {"rules": <segment rules>}, or
    all/any/not of those."""
    rule = _mapping(value, path)
    if len(rule) != 1:
        raise InvalidInput("give exactly one of previous_email, rules, all, any, not", field=path)
    ((key, inner),) = rule.items()
    if key == "previous_email":
        if inner not in ("opened", "clicked"):
            raise InvalidInput("must be opened or clicked", field=f"{path}.previous_email")
        return {key: inner}
    if key == "rules":
        try:
            segments.parse(inner, f"{path}.rules")
        except (TypeError, ValueError) as exc:  # InvalidInput is a ValueError too: kept as it is
            if isinstance(exc, InvalidInput):
                raise
            raise InvalidInput(f"not segment rules: {exc}", field=f"{path}.rules") from None
        return {key: inner}
    if key in ("all", "any"):
        if not isinstance(inner, list) or not inner:
            raise InvalidInput("must be a non-empty list of conditions", field=f"{path}.{key}")
        return {key: [_condition(item, f"{path}.{key}[{i}]") for i, item in enumerate(inner)]}
    if key == "not":
        return {key: _condition(inner, f"{path}.not")}
    raise InvalidInput("give exactly one of previous_email, rules, all, any, not", field=path)


def _target(value: Any, path: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InvalidInput(f"{value!r} is not a step id", field=path)
    return value


def _send_params(raw: Mapping[str, Any], path: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    template = raw.get("template")
    if not isinstance(template, str) or not template:
        raise InvalidInput("a send step names its template", field=f"{path}.template")
    params["template"] = template
    for key in ("from", "reply_to"):
        if raw.get(key) is not None:
            try:
                params[key] = str(parse_mailbox(raw[key], field=f"{path}.{key}"))
            except AddressError as exc:
                raise InvalidInput(exc.reason, field=exc.field) from None
    track = raw.get("track", True)
    if not isinstance(track, bool):
        raise InvalidInput("must be true or false", field=f"{path}.track")
    params["track"] = track
    tags = raw.get("tags", [])
    if not isinstance(tags, list) or len(tags) > 10 or not all(isinstance(t, str) and 0 < len(t) <= 64 for t in tags):
        raise InvalidInput("at most 10 tags of 1-64 characters", field=f"{path}.tags")
    params["tags"] = tags
    return params


def _wait_params(raw: Mapping[str, Any], path: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if not {"duration", "until", "event"} & set(raw):
        raise InvalidInput("a wait has a duration, an until (HH:MM) or an event", field=path)
    if "duration" in raw:
        params["duration"] = _duration(raw["duration"], f"{path}.duration")
    if "until" in raw:
        params["until"] = _time_of_day(raw["until"], f"{path}.until").strftime("%H:%M")
    if "event" in raw:
        if "duration" in raw or "until" in raw:
            raise InvalidInput("a wait for an event has a timeout, not a duration or until", field=f"{path}.event")
        params["event"] = _event_type(raw["event"], f"{path}.event")
        if "timeout" not in raw:
            raise InvalidInput("a wait for an event needs a timeout", field=f"{path}.timeout")
        params["timeout"] = _duration(raw["timeout"], f"{path}.timeout")
        for key in ("on_event", "on_timeout"):
            if key in raw:
                params[key] = _target(raw[key], f"{path}.{key}")
    else:
        for key in ("timeout", "on_event", "on_timeout"):
            if key in raw:
                raise InvalidInput("only a wait for an event has this", field=f"{path}.{key}")
    return params


def _branch_params(raw: Mapping[str, Any], path: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if "if" not in raw:
        raise InvalidInput("a branch needs a condition", field=f"{path}.if")
    params["if"] = _condition(raw["if"], f"{path}.if")
    if "then" not in raw:
        raise InvalidInput("a branch says where to go when its condition holds", field=f"{path}.then")
    params["then"] = _target(raw["then"], f"{path}.then")
    if "else" in raw:
        params["else"] = _target(raw["else"], f"{path}.else")
    return params


def _update_params(raw: Mapping[str, Any], path: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if not {"attributes", "add_to_lists", "remove_from_lists"} & set(raw):
        raise InvalidInput("an update sets attributes or changes lists", field=path)
    if "attributes" in raw:
        params["attributes"] = check_attributes(raw["attributes"], field=f"{path}.attributes")
    for key in ("add_to_lists", "remove_from_lists"):
        if key in raw:
            names = raw[key]
            if not isinstance(names, list) or not names:
                raise InvalidInput("must be a non-empty list of list names", field=f"{path}.{key}")
            params[key] = [check_list_name(name, field=f"{path}.{key}[{i}]") for i, name in enumerate(names)]
    return params


def _score_params(raw: Mapping[str, Any], path: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    points = raw.get("points")
    if isinstance(points, bool) or not isinstance(points, (int, float)) or not -1e6 <= points <= 1e6:
        raise InvalidInput("must be a number of points, -1,000,000 to 1,000,000", field=f"{path}.points")
    params["points"] = points
    attribute = raw.get("attribute", "lead_score")
    params["attribute"] = check_attribute_name(attribute, field=f"{path}.attribute")
    return params


def _webhook_params(raw: Mapping[str, Any], path: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    endpoint = raw.get("endpoint")
    if isinstance(endpoint, bool) or not isinstance(endpoint, int) or endpoint < 1:
        raise InvalidInput("must be a webhook endpoint's id", field=f"{path}.endpoint")
    params["endpoint"] = endpoint
    if "data" in raw:
        params["data"] = check_event_properties(raw["data"], field=f"{path}.data")
    return params


_PARAMS: dict[str, Callable[[Mapping[str, Any], str], dict[str, Any]]] = {
    "send": _send_params,
    "wait": _wait_params,
    "branch": _branch_params,
    "update": _update_params,
    "score": _score_params,
    "webhook": _webhook_params,
    "exit": lambda raw, path: {},
}


def _event_type(value: Any, path: str) -> str:
    """A custom event type or one SmartMail records (an awaited `opened`, say)."""
    if isinstance(value, str) and value in {kind.value for kind in EventType}:
        return value
    return check_event_name(value, field=path)


def _steps(value: Any) -> dict[str, Step]:
    if not isinstance(value, list) or not value:
        raise InvalidInput("must be a non-empty list of steps", field="steps")
    if len(value) > MAX_STEPS:
        raise InvalidInput(f"at most {MAX_STEPS} steps", field="steps")
    raw_steps: list[tuple[str, Mapping[str, Any], str]] = []
    for i, item in enumerate(value):
        raw = _mapping(item, f"steps[{i}]")
        step_id = raw.get("id")
        if not isinstance(step_id, str) or not _ID.fullmatch(step_id):
            raise InvalidInput(
                f"{step_id!r} is not a step id (a letter, then letters, digits, _ or -)", field=f"steps[{i}].id"
            )
        path = f"steps.{step_id}"
        if any(step_id == seen for seen, _, _ in raw_steps):
            raise InvalidInput("two steps have this id", field=f"{path}.id")
        kind = raw.get("type")
        if not isinstance(kind, str) or kind not in _STEP_FIELDS:
            raise InvalidInput(f"{kind!r} is not a step type ({', '.join(_STEP_FIELDS)})", field=f"{path}.type")
        _only(
            raw,
            {"id", "type"} | _STEP_FIELDS[kind] | (set() if kind in _TERMINAL or kind == "branch" else {"next"}),
            path,
        )
        raw_steps.append((step_id, raw, path))
    steps: dict[str, Step] = {}
    for i, (step_id, raw, path) in enumerate(raw_steps):
        kind = raw["type"]
        # By default a step leads to the one listed after it (a branch's `else` too); the last ends the workflow.
        following = raw_steps[i + 1][0] if i + 1 < len(raw_steps) and kind not in _TERMINAL else None
        if "next" in raw:
            following = _target(raw["next"], f"{path}.next") if raw["next"] is not None else None
        params = _PARAMS[kind](raw, path)
        if kind == "branch":
            params.setdefault("else", following)
            following = None
        steps[step_id] = Step(step_id, kind, following, params)
    for step in steps.values():
        for key, target in step.targets().items():
            if target not in steps:
                raise InvalidInput(
                    f"leads to {target!r}, which is no step of this workflow", field=f"steps.{step.id}.{key}"
                )
    _refuse_spins(steps)
    return steps


def _refuse_spins(steps: dict[str, Step]) -> None:
    """A cycle of steps none of which waits would run forever in one advance (and could send an
    email per turn): refused, naming a step on it. Depth-first search over the non-wait steps."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(step_id: str, path: list[str]) -> None:
        state[step_id] = 1
        for target in steps[step_id].targets().values():
            if steps[target].pauses:
                continue
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                raise InvalidInput(
                    f"steps {' → '.join(cycle)} form a cycle without a wait (it would repeat at once, forever)",
                    field=f"steps.{step_id}",
                )
            if target not in state:
                visit(target, [*path, target])
        state[step_id] = 2

    for step_id, step in steps.items():
        if step_id not in state and not step.pauses:
            visit(step_id, [step_id])


def parse(document: Any) -> Definition:
    """A Definition from a parsed document (a dict); InvalidInput naming the field otherwise
    (`trigger.event`, `steps.reminder.template`). References to stored things (templates, lists,
    segments, endpoints) are checked by `check_references`, which needs the database."""
    if isinstance(document, str):
        document = load_text(document)
    raw = _mapping(document, "definition")
    _only(raw, {"name", "description", "trigger", "steps", "entry", "goal", "sender", "timezone"}, "definition")
    if "trigger" not in raw:
        raise InvalidInput("a workflow needs a trigger", field="trigger")
    trigger = _trigger(raw["trigger"])
    steps = _steps(raw.get("steps"))
    # A date recurs: by default a contact enters once per date (every birthday), else once ever.
    entry, period = _entry(raw.get("entry", "every_time" if trigger.kind == "date" else "once"))
    goal = None
    if raw.get("goal") is not None:
        goal_rule = _mapping(raw["goal"], "goal")
        _only(goal_rule, {"event"}, "goal")
        goal = check_event_name(goal_rule.get("event"), field="goal.event")
    sender = None
    if raw.get("sender") is not None:
        try:
            sender = str(parse_mailbox(raw["sender"], field="sender"))
        except AddressError as exc:
            raise InvalidInput(exc.reason, field=exc.field) from None
    zone = check_timezone(raw.get("timezone", "UTC"), field="timezone") or "UTC"
    description = raw.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > 2000):
        raise InvalidInput("must be text of at most 2,000 characters", field="description")
    return Definition(trigger, steps, entry, period, goal, sender, zone, description)


def _entry(value: Any) -> tuple[str, float]:
    if value in _ENTRY_RULES:
        return value, 0.0
    if isinstance(value, Mapping) and set(value) == {"once_per"}:
        return "once_per", _duration(value["once_per"], "entry.once_per")
    raise InvalidInput('must be "once", "every_time" or {"once_per": <duration>}', field="entry")


def check_references(
    definition: Definition,
    *,
    template_exists: Callable[[str], bool],
    list_exists: Callable[[str], bool],
    segment_exists: Callable[[str], bool],
    endpoint_exists: Callable[[int], bool],
    campaign_exists: Callable[[str], bool],
) -> None:
    """Refuse a definition that names a template, list, segment, webhook endpoint or campaign that
    does not exist, naming the step (or the trigger) that names it."""
    trigger = definition.trigger
    if trigger.list and not list_exists(trigger.list):
        raise InvalidInput(f"no list named {trigger.list!r}", field="trigger.list")
    if trigger.segment and not segment_exists(trigger.segment):
        raise InvalidInput(f"no saved segment named {trigger.segment!r}", field="trigger.segment")
    if trigger.campaign and not campaign_exists(trigger.campaign):
        raise InvalidInput(f"no campaign named {trigger.campaign!r}", field="trigger.engagement.campaign")
    for step in definition.steps.values():
        if step.type == "send" and not template_exists(step.params["template"]):
            raise InvalidInput(f"no template named {step.params['template']!r}", field=f"steps.{step.id}.template")
        if step.type == "webhook" and not endpoint_exists(step.params["endpoint"]):
            raise InvalidInput(f"no webhook endpoint {step.params['endpoint']}", field=f"steps.{step.id}.endpoint")
        if step.type == "update":
            for key in ("add_to_lists", "remove_from_lists"):
                for i, name in enumerate(step.params.get(key, [])):
                    if not list_exists(name):
                        raise InvalidInput(f"no list named {name!r}", field=f"steps.{step.id}.{key}[{i}]")
