"""Workflow definitions: each refusal names its field; times of day across DST."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartmail.automations import definitions
from smartmail.automations.definitions import check_references, parse
from smartmail.automations.engine import next_time_of_day
from smartmail.errors import InvalidInput

SEND = {"id": "hello", "type": "send", "template": "welcome"}


def _doc(*steps: dict, **top) -> dict:
    return {"trigger": {"event": "signup"}, "steps": list(steps) or [SEND], **top}


def _refused(document) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        parse(document)
    return caught.value


# --- Cycles and targets ---------------------------------------------------------------------------


def test_a_cycle_without_a_wait_is_refused_naming_the_step_that_closes_it():
    error = _refused(_doc({**SEND, "id": "a", "next": "b"}, {**SEND, "id": "b", "next": "a"}))
    assert error.field == "steps.b"
    assert "a → b → a" in str(error) and "without a wait" in str(error)


def test_a_step_leading_to_itself_is_a_cycle():
    error = _refused(_doc({"id": "a", "type": "score", "points": 1, "next": "a"}))
    assert error.field == "steps.a"


def test_a_cycle_through_a_branch_without_a_wait_is_refused():
    error = _refused(
        _doc(
            {**SEND, "id": "a"},
            {"id": "b", "type": "branch", "if": {"previous_email": "opened"}, "then": "a", "else": "x"},
            {"id": "x", "type": "exit"},
        )
    )
    assert error.field == "steps.b"


def test_a_cycle_through_a_wait_is_a_loop_and_accepted():
    parsed = parse(_doc({**SEND, "id": "a", "next": "w"}, {"id": "w", "type": "wait", "duration": "7d", "next": "a"}))
    assert parsed.steps["w"].next == "a" and parsed.steps["a"].next == "w"


def test_a_cycle_through_an_event_wait_is_accepted():
    parsed = parse(
        _doc(
            {**SEND, "id": "a"},
            {"id": "w", "type": "wait", "event": "order_placed", "timeout": "1d", "on_timeout": "a", "on_event": "x"},
            {"id": "x", "type": "exit"},
        )
    )
    assert parsed.steps["w"].targets() == {"on_event": "x", "on_timeout": "a", "next": "x"}


@pytest.mark.parametrize(
    ("steps", "field"),
    [
        ([{"id": "b", "type": "branch", "if": {"previous_email": "opened"}, "then": "nowhere"}], "steps.b.then"),
        (
            [
                {"id": "b", "type": "branch", "if": {"previous_email": "opened"}, "then": "b2", "else": "gone"},
                SEND | {"id": "b2"},
            ],
            "steps.b.else",
        ),
        ([SEND | {"next": "gone"}], "steps.hello.next"),
        (
            [{"id": "w", "type": "wait", "event": "order_placed", "timeout": "1d", "on_event": "gone"}],
            "steps.w.on_event",
        ),
        (
            [{"id": "w", "type": "wait", "event": "order_placed", "timeout": "1d", "on_timeout": "gone"}],
            "steps.w.on_timeout",
        ),
        ([{"id": "b", "type": "branch", "if": {"previous_email": "opened"}, "then": "not an id"}], "steps.b.then"),
    ],
)
def test_a_target_that_is_no_step_is_refused_naming_the_step_and_key(steps, field):
    error = _refused(_doc(*steps))
    assert error.field == field


# --- Steps ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "field"),
    [
        ({"id": "a", "type": "teleport"}, "steps.a.type"),
        ({"id": "a"}, "steps.a.type"),
        ({"id": "a", "type": ["send"]}, "steps.a.type"),
        ({"id": "a", "type": {"send": 1}}, "steps.a.type"),
        (SEND | {"colour": "red"}, "steps.hello.colour"),
        ({"id": "x", "type": "exit", "next": "x"}, "steps.x.next"),
        ({"id": "b", "type": "branch", "if": {"previous_email": "opened"}, "then": "b", "next": "b"}, "steps.b.next"),
        ({"id": "1a", "type": "exit"}, "steps[0].id"),
        ({"type": "exit"}, "steps[0].id"),
        ({"id": "a" * 101, "type": "exit"}, "steps[0].id"),
        ("send", "steps[0]"),
        # send
        ({"id": "a", "type": "send"}, "steps.a.template"),
        ({"id": "a", "type": "send", "template": ""}, "steps.a.template"),
        (SEND | {"from": "not an address"}, "steps.hello.from"),
        (SEND | {"reply_to": "@@"}, "steps.hello.reply_to"),
        (SEND | {"track": "yes"}, "steps.hello.track"),
        (SEND | {"tags": ["t"] * 11}, "steps.hello.tags"),
        (SEND | {"tags": [""]}, "steps.hello.tags"),
        (SEND | {"tags": "news"}, "steps.hello.tags"),
        # wait
        ({"id": "w", "type": "wait"}, "steps.w"),
        ({"id": "w", "type": "wait", "duration": "2d", "event": "order_placed", "timeout": "1d"}, "steps.w.event"),
        ({"id": "w", "type": "wait", "until": "09:00", "event": "order_placed", "timeout": "1d"}, "steps.w.event"),
        ({"id": "w", "type": "wait", "event": "order_placed"}, "steps.w.timeout"),
        ({"id": "w", "type": "wait", "duration": "1d", "timeout": "1d"}, "steps.w.timeout"),
        ({"id": "w", "type": "wait", "duration": "1d", "on_event": "w"}, "steps.w.on_event"),
        ({"id": "w", "type": "wait", "event": "order placed", "timeout": "1d"}, "steps.w.event"),
        ({"id": "w", "type": "wait", "event": "order_placed", "timeout": "soon"}, "steps.w.timeout"),
        ({"id": "w", "type": "wait", "event": "order_placed", "timeout": 0}, "steps.w.timeout"),
        # branch
        ({"id": "b", "type": "branch", "then": "b"}, "steps.b.if"),
        ({"id": "b", "type": "branch", "if": {"previous_email": "opened"}}, "steps.b.then"),
        ({"id": "b", "type": "branch", "if": {"previous_email": "bounced"}, "then": "b"}, "steps.b.if.previous_email"),
        ({"id": "b", "type": "branch", "if": {"previous_email": "opened", "not": {}}, "then": "b"}, "steps.b.if"),
        ({"id": "b", "type": "branch", "if": {"maybe": 1}, "then": "b"}, "steps.b.if"),
        ({"id": "b", "type": "branch", "if": "opened", "then": "b"}, "steps.b.if"),
        ({"id": "b", "type": "branch", "if": {"all": []}, "then": "b"}, "steps.b.if.all"),
        (
            {"id": "b", "type": "branch", "if": {"any": [{"previous_email": "x"}]}, "then": "b"},
            "steps.b.if.any[0].previous_email",
        ),
        (
            {"id": "b", "type": "branch", "if": {"not": {"previous_email": "x"}}, "then": "b"},
            "steps.b.if.not.previous_email",
        ),
        # update
        ({"id": "u", "type": "update"}, "steps.u"),
        ({"id": "u", "type": "update", "attributes": "plan=pro"}, "steps.u.attributes"),
        ({"id": "u", "type": "update", "attributes": {'bad"name': 1}}, "steps.u.attributes"),
        ({"id": "u", "type": "update", "add_to_lists": []}, "steps.u.add_to_lists"),
        ({"id": "u", "type": "update", "remove_from_lists": "vip"}, "steps.u.remove_from_lists"),
        ({"id": "u", "type": "update", "add_to_lists": ["ok", "a/b"]}, "steps.u.add_to_lists[1]"),
        # score
        ({"id": "s", "type": "score"}, "steps.s.points"),
        ({"id": "s", "type": "score", "points": "10"}, "steps.s.points"),
        ({"id": "s", "type": "score", "points": True}, "steps.s.points"),
        ({"id": "s", "type": "score", "points": 1e7}, "steps.s.points"),
        ({"id": "s", "type": "score", "points": 1, "attribute": ""}, "steps.s.attribute"),
        # webhook
        ({"id": "h", "type": "webhook"}, "steps.h.endpoint"),
        ({"id": "h", "type": "webhook", "endpoint": "1"}, "steps.h.endpoint"),
        ({"id": "h", "type": "webhook", "endpoint": 0}, "steps.h.endpoint"),
        ({"id": "h", "type": "webhook", "endpoint": True}, "steps.h.endpoint"),
        ({"id": "h", "type": "webhook", "endpoint": 1, "data": [1]}, "steps.h.data"),
        ({"id": "h", "type": "webhook", "endpoint": 1, "data": {"n": float("nan")}}, "steps.h.data"),
        ({"id": "h", "type": "webhook", "endpoint": 1, "data": {"s": "a\x00"}}, "steps.h.data.s"),
    ],
)
def test_a_bad_step_is_refused_naming_the_step_and_field(step, field):
    assert _refused(_doc(step)).field == field


def test_two_steps_with_one_id_are_refused_naming_the_id():
    error = _refused(_doc(SEND, {"id": "hello", "type": "exit"}))
    assert error.field == "steps.hello.id"
    assert "two steps" in str(error)


@pytest.mark.parametrize("steps", [[], None, "hello", {"id": "hello"}])
def test_steps_must_be_a_non_empty_list(steps):
    assert _refused({"trigger": {"event": "signup"}, "steps": steps}).field == "steps"


def test_at_most_max_steps():
    steps = [{"id": f"s{i}", "type": "score", "points": 1} for i in range(definitions.MAX_STEPS + 1)]
    assert _refused(_doc(*steps)).field == "steps"
    assert len(parse(_doc(*steps[:-1])).steps) == definitions.MAX_STEPS


@pytest.mark.parametrize(
    "duration", ["2 weeks", "3x", "-1", -1, 0, "0s", True, None, [], {"days": 2}, "", "1.5.2d", float("nan")]
)
def test_bad_durations_are_refused(duration):
    assert _refused(_doc({"id": "w", "type": "wait", "duration": duration})).field == "steps.w.duration"


@pytest.mark.parametrize("duration", [1e300, float("inf"), "100000000d", 10**12])
def test_durations_past_the_calendar_are_refused(duration):
    # A wait this long would overflow the due date's datetime in the engine and fail its whole page.
    assert _refused(_doc({"id": "w", "type": "wait", "duration": duration})).field == "steps.w.duration"
    error = _refused(_doc(SEND, entry={"once_per": duration}))
    assert error.field == "entry.once_per"


@pytest.mark.parametrize(
    ("duration", "seconds"), [("90s", 90), ("30m", 1800), ("2h", 7200), ("3d", 259200), (45, 45), ("1.5d", 129600)]
)
def test_durations(duration, seconds):
    assert parse(_doc({"id": "w", "type": "wait", "duration": duration})).steps["w"].params["duration"] == seconds


@pytest.mark.parametrize("until", ["24:00", "9:00", "09:60", "0900", 900, "09:00:00", "noon", "", None, " 09:00"])
def test_bad_times_of_day_are_refused(until):
    assert _refused(_doc({"id": "w", "type": "wait", "until": until})).field == "steps.w.until"


@pytest.mark.parametrize("until", ["00:00", "09:05", "23:59"])
def test_times_of_day(until):
    assert parse(_doc({"id": "w", "type": "wait", "until": until})).steps["w"].params["until"] == until


def test_a_wait_until_may_have_a_duration_too():
    params = parse(_doc({"id": "w", "type": "wait", "duration": "1d", "until": "09:00"})).steps["w"].params
    assert params == {"duration": 86400.0, "until": "09:00"}


def test_a_wait_for_a_recorded_event_type_is_allowed():
    params = parse(_doc({"id": "w", "type": "wait", "event": "opened", "timeout": "1d"})).steps["w"].params
    assert params == {"event": "opened", "timeout": 86400.0}


# --- Defaults -------------------------------------------------------------------------------------


def test_each_step_leads_to_the_next_by_default_and_the_last_ends_the_workflow():
    parsed = parse(
        _doc(
            SEND,
            {"id": "b", "type": "branch", "if": {"previous_email": "clicked"}, "then": "x"},
            {"id": "s", "type": "score", "points": 5},
            {"id": "x", "type": "exit"},
        )
    )
    assert parsed.first == "hello"
    assert parsed.steps["hello"].next == "b"
    assert parsed.steps["b"].next is None and parsed.steps["b"].params["else"] == "s"
    assert parsed.steps["s"].next == "x" and parsed.steps["s"].params["attribute"] == "lead_score"
    assert parsed.steps["x"].next is None
    assert parsed.steps["hello"].params == {"template": "welcome", "track": True, "tags": []}
    assert (parsed.entry, parsed.goal, parsed.timezone, parsed.sender) == ("once", None, "UTC", None)


def test_next_null_ends_the_workflow_after_that_step():
    parsed = parse(_doc(SEND | {"next": None}, {"id": "x", "type": "exit"}))
    assert parsed.steps["hello"].next is None


def test_a_branch_as_last_step_ends_the_workflow_on_else():
    parsed = parse(
        _doc(
            SEND | {"next": "b"},
            {"id": "x", "type": "exit"},
            {"id": "b", "type": "branch", "if": {"previous_email": "opened"}, "then": "x"},
        )
    )
    assert parsed.steps["b"].targets() == {"then": "x"}


def test_what_a_definition_refers_to():
    parsed = parse(
        {
            "trigger": {"list": "newsletter"},
            "goal": {"event": "order_placed"},
            "steps": [
                SEND,
                {"id": "w", "type": "wait", "event": "replied", "timeout": "2d"},
                {"id": "u", "type": "update", "add_to_lists": ["vip"], "remove_from_lists": ["cold"]},
                {"id": "h", "type": "webhook", "endpoint": 7, "data": {"k": 1}},
                {"id": "r", "type": "send", "template": "reminder"},
            ],
        }
    )
    assert parsed.templates() == {"welcome", "reminder"}
    assert parsed.lists() == {"newsletter", "vip", "cold"}
    assert parsed.endpoints() == {7}
    assert parsed.events() == {"order_placed", "replied"}


# --- Entry rules, goal, top-level fields ----------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "rule", "period"),
    [("once", "once", 0.0), ("every_time", "every_time", 0.0), ({"once_per": "30d"}, "once_per", 2592000.0)],
)
def test_entry_rules(entry, rule, period):
    parsed = parse(_doc(entry=entry))
    assert (parsed.entry, parsed.entry_period) == (rule, period)


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ("twice", "entry"),
        ("once_per", "entry"),
        ({"once_per": "30d", "max": 2}, "entry"),
        ({}, "entry"),
        (None, "entry"),
        (["once"], "entry"),
        ({"once_per": "soon"}, "entry.once_per"),
        ({"once_per": 0}, "entry.once_per"),
    ],
)
def test_bad_entry_rules_are_refused(entry, field):
    assert _refused(_doc(entry=entry)).field == field


@pytest.mark.parametrize(
    ("top", "field"),
    [
        ({"goal": {"event": "opened"}}, "goal.event"),
        ({"goal": {"event": "order placed"}}, "goal.event"),
        ({"goal": {}}, "goal.event"),
        ({"goal": {"event": "order_placed", "within": "3d"}}, "goal.within"),
        ({"goal": "order_placed"}, "goal"),
        ({"sender": "nobody"}, "sender"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"timezone": 2}, "timezone"),
        ({"description": "x" * 2001}, "description"),
        ({"description": 5}, "description"),
        ({"colour": "red"}, "definition.colour"),
    ],
)
def test_bad_top_level_fields_are_refused(top, field):
    assert _refused(_doc(**top)).field == field


def test_top_level_fields():
    parsed = parse(
        _doc(
            goal={"event": "order_placed"},
            sender="Shop <shop@example.com>",
            timezone="Europe/Paris",
            description="Welcome",
            name="welcome",
        )
    )
    assert (parsed.goal, parsed.sender, parsed.timezone, parsed.description) == (
        "order_placed",
        "Shop <shop@example.com>",
        "Europe/Paris",
        "Welcome",
    )


@pytest.mark.parametrize("document", [None, [], 5, "just words", {1: "a"}])
def test_a_document_that_is_no_object_is_refused(document):
    assert _refused(document).field == "definition"


# --- Triggers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trigger", "expected"),
    [
        ({"event": "signup"}, {"kind": "event", "event": "signup", "where": None}),
        ({"event": "signup", "where": {"plan": "pro"}}, {"kind": "event", "where": {"plan": "pro"}}),
        ({"list": "newsletter"}, {"kind": "list", "list": "newsletter"}),
        ({"segment": "active users"}, {"kind": "segment", "segment": "active users"}),
        (
            {"date": {"attribute": "birthday", "annual": True, "offset_days": -7, "at": "10:30"}},
            {"kind": "date", "attribute": "birthday", "annual": True, "offset_days": -7},
        ),
        ({"date": {"attribute": "renewal_date"}}, {"kind": "date", "annual": False, "offset_days": 0}),
        (
            {"engagement": {"event": "opened", "campaign": "spring"}},
            {"kind": "engagement", "event": "opened", "campaign": "spring", "within": 0.0},
        ),
        (
            {"engagement": {"event": "not_opened", "campaign": "spring", "within": "3d"}},
            {"kind": "engagement", "event": "not_opened", "within": 259200.0},
        ),
        (
            {"engagement": {"event": "clicked", "workflow": "welcome", "step": "hello"}},
            {"kind": "engagement", "workflow": "welcome", "step": "hello", "campaign": None},
        ),
    ],
)
def test_each_trigger_kind(trigger, expected):
    parsed = parse(_doc(trigger=trigger)).trigger
    assert {key: getattr(parsed, key) for key in expected} == expected


def test_a_date_trigger_starts_at_nine_by_default():
    assert parse(_doc(trigger={"date": {"attribute": "birthday"}})).trigger.at.strftime("%H:%M") == "09:00"
    assert parse(_doc(trigger={"date": {"attribute": "b", "at": "18:15"}})).trigger.at.strftime("%H:%M") == "18:15"


@pytest.mark.parametrize(
    ("trigger", "field"),
    [
        ({"event": "signup", "list": "newsletter"}, "trigger"),
        ({"segment": "a", "date": {"attribute": "b"}}, "trigger"),
        ({}, "trigger"),
        ({"where": {"plan": "pro"}}, "trigger"),
        ("signup", "trigger"),
        ({"event": "opened"}, "trigger.event"),
        ({"event": "sign up"}, "trigger.event"),
        ({"event": None}, "trigger.event"),
        ({"event": "signup", "where": ["plan"]}, "trigger.where"),
        # Stored as JSON: PostgreSQL refuses NaN (and NUL in jsonb), SQLite would store invalid JSON.
        ({"event": "signup", "where": {"n": float("nan")}}, "trigger.where"),
        ({"event": "signup", "where": {"plan": "a\x00"}}, "trigger.where.plan"),
        ({"event": "signup", "where": {1: "a"}}, "trigger.where"),
        ({"event": "signup", "when": "now"}, "trigger.when"),
        ({"list": "newsletter", "where": {"a": 1}}, "trigger.where"),
        ({"list": "a/b"}, "trigger.list"),
        ({"list": ""}, "trigger.list"),
        ({"segment": ""}, "trigger.segment"),
        ({"segment": 3}, "trigger.segment"),
        ({"date": "birthday"}, "trigger.date"),
        ({"date": {}}, "trigger.date.attribute"),
        ({"date": {"attribute": "b", "offset_days": 400}}, "trigger.date.offset_days"),
        ({"date": {"attribute": "b", "offset_days": 1.5}}, "trigger.date.offset_days"),
        ({"date": {"attribute": "b", "offset_days": True}}, "trigger.date.offset_days"),
        ({"date": {"attribute": "b", "annual": "yes"}}, "trigger.date.annual"),
        ({"date": {"attribute": "b", "at": "9am"}}, "trigger.date.at"),
        ({"date": {"attribute": "b", "every": "year"}}, "trigger.date.every"),
        ({"engagement": {"event": "bounced", "campaign": "c"}}, "trigger.engagement.event"),
        ({"engagement": {"campaign": "c"}}, "trigger.engagement.event"),
        ({"engagement": {"event": "opened"}}, "trigger.engagement"),
        ({"engagement": {"event": "opened", "campaign": "c", "workflow": "w", "step": "s"}}, "trigger.engagement"),
        ({"engagement": {"event": "opened", "workflow": "w"}}, "trigger.engagement"),
        ({"engagement": {"event": "opened", "campaign": "c", "step": "s"}}, "trigger.engagement"),
        ({"engagement": {"event": "not_opened", "campaign": "c"}}, "trigger.engagement.within"),
        ({"engagement": {"event": "not_clicked", "campaign": "c", "within": "0s"}}, "trigger.engagement.within"),
        ({"engagement": {"event": "opened", "campaign": "c", "within": "3d"}}, "trigger.engagement.within"),
        ({"engagement": {"event": "opened", "campaign": ""}}, "trigger.engagement.campaign"),
        ({"engagement": {"event": "opened", "campaign": "c", "by": "me"}}, "trigger.engagement.by"),
    ],
)
def test_bad_triggers_are_refused_naming_the_field(trigger, field):
    assert _refused(_doc(trigger=trigger)).field == field


def test_a_workflow_needs_a_trigger():
    assert _refused({"steps": [SEND]}).field == "trigger"


# --- Text input -----------------------------------------------------------------------------------

YAML_TEXT = """\
description: Welcome series
trigger:
  event: signup
  where: {plan: pro}
entry: {once_per: 30d}
goal: {event: order_placed}
timezone: Europe/Paris
steps:
  - {id: hello, type: send, template: welcome}
  - {id: pause, type: wait, duration: 2d, until: "09:00"}
  - id: opened
    type: branch
    if: {previous_email: opened}
    then: done
  - {id: nudge, type: send, template: welcome, tags: [nudge]}
  - {id: done, type: exit}
"""


def test_yaml_json_and_a_dict_give_the_same_definition():
    as_dict = yaml.safe_load(YAML_TEXT)
    from_yaml = parse(YAML_TEXT)
    assert from_yaml == parse(as_dict) == parse(json.dumps(as_dict))
    assert from_yaml.steps["pause"].params == {"duration": 172800.0, "until": "09:00"}
    assert from_yaml.steps["opened"].params["else"] == "nudge"
    assert definitions.load_text(json.dumps(as_dict)) == as_dict


def test_a_yaml_syntax_error_says_where():
    broken = "trigger:\n  event: signup\nsteps:\n  - id: a\n    type: send\n   template: [x\n"
    error = _refused(broken)
    assert error.field == "definition"
    assert "line 6" in str(error) and "neither JSON nor YAML" in str(error)
    with pytest.raises(InvalidInput) as caught:
        definitions.load_text(broken, field="body")
    assert caught.value.field == "body"


@pytest.mark.parametrize(
    "text",
    [
        # YAML's own value types raise plain ValueErrors from its constructor: still a bad definition.
        "trigger: {event: signup}\nsteps: [{id: a, type: exit}]\ndescription: 1e1e1\nx: !!float abc\n",
        "[" * 5000 + "]" * 5000,
        "{" * 100000,
    ],
)
def test_unreadable_text_is_refused_as_input(text):
    assert _refused(text).field == "definition"


# --- Stored references ----------------------------------------------------------------------------


def _references(**missing):
    known = {
        "template_exists": lambda name: name != "gone",
        "list_exists": lambda name: name != "gone",
        "segment_exists": lambda name: name != "gone",
        "endpoint_exists": lambda endpoint: endpoint != 99,
        "campaign_exists": lambda name: name != "gone",
    }
    return known | missing


@pytest.mark.parametrize(
    ("document", "field"),
    [
        (_doc({"id": "hi", "type": "send", "template": "gone"}), "steps.hi.template"),
        (_doc({"id": "h", "type": "webhook", "endpoint": 99}), "steps.h.endpoint"),
        (_doc({"id": "u", "type": "update", "add_to_lists": ["ok", "gone"]}), "steps.u.add_to_lists[1]"),
        (_doc({"id": "u", "type": "update", "remove_from_lists": ["gone"]}), "steps.u.remove_from_lists[0]"),
        (_doc(trigger={"list": "gone"}), "trigger.list"),
        (_doc(trigger={"segment": "gone"}), "trigger.segment"),
        (_doc(trigger={"engagement": {"event": "opened", "campaign": "gone"}}), "trigger.engagement.campaign"),
    ],
)
def test_references_to_nothing_stored_are_refused_naming_the_step(document, field):
    with pytest.raises(InvalidInput) as caught:
        check_references(parse(document), **_references())
    assert caught.value.field == field


def test_references_to_stored_things_pass():
    check_references(parse(YAML_TEXT), **_references())


# --- Arbitrary input ------------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
_FIELD_NAMES = [
    "id", "type", "next", "template", "duration", "until", "event", "timeout", "on_event", "on_timeout", "if",
    "then", "else", "attributes", "add_to_lists", "remove_from_lists", "points", "attribute", "endpoint", "data",
    "trigger", "steps", "entry", "goal", "where", "list", "segment", "date", "engagement", "campaign", "workflow",
    "step", "within", "offset_days", "annual", "at", "previous_email", "rules", "all", "any", "not", "once_per",
]  # fmt: skip
_VALUES = [
    "send", "wait", "branch", "update", "score", "webhook", "exit", "welcome", "signup", "opened", "not_opened",
    "clicked", "2d", "09:00", "a", "b", "once", "every_time", 1, 0, -3,
]  # fmt: skip
_keys = st.sampled_from(_FIELD_NAMES) | st.text(max_size=8)
_json = st.recursive(
    _scalars | st.sampled_from(_VALUES),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=5),
    max_leaves=30,
)


@st.composite
def _near_valid(draw) -> dict:
    """A valid document with some fields replaced by arbitrary values: reaches the deep checks."""
    document = copy.deepcopy(yaml.safe_load(YAML_TEXT))
    for _ in range(draw(st.integers(1, 4))):
        target = document
        path = draw(
            st.sampled_from(
                [
                    ("trigger",),
                    ("trigger", "event"),
                    ("trigger", "where"),
                    ("entry",),
                    ("goal",),
                    ("steps",),
                    ("steps", 0),
                    ("steps", 1),
                    ("steps", 2),
                    ("steps", 2, "if"),
                    ("steps", 1, "duration"),
                    ("steps", 0, "type"),
                    ("steps", 3, "next"),
                ]
            )
        )
        for key in path[:-1]:
            if isinstance(target, dict) and key in target or isinstance(target, list) and key < len(target):
                target = target[key]
        if (
            isinstance(target, dict)
            or isinstance(target, list)
            and isinstance(path[-1], int)
            and path[-1] < len(target)
        ):
            target[path[-1]] = draw(_json)
    return document


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_json, _near_valid(), st.dictionaries(st.sampled_from(_FIELD_NAMES), _json)))
def test_parse_raises_nothing_but_invalid_input(document):
    try:
        parse(document)
    except InvalidInput as error:
        assert error.field
    else:  # what it accepts, save_workflow stores as JSON
        json.dumps(document, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_parse_of_any_text_raises_nothing_but_invalid_input(text):
    try:
        parse(text)
    except InvalidInput:
        pass


# --- Times of day ---------------------------------------------------------------------------------

PARIS, NEW_YORK = ZoneInfo("Europe/Paris"), ZoneInfo("America/New_York")


@pytest.mark.parametrize(
    ("after", "hh_mm", "zone", "expected"),
    [
        # Europe/Paris: CET (+1) until 2026-03-29 02:00, then CEST (+2) until 2026-10-25 03:00.
        ("2026-03-27 07:00", "09:00", PARIS, "2026-03-27 08:00"),
        ("2026-03-28 10:00", "09:00", PARIS, "2026-03-29 07:00"),
        ("2026-03-29 06:59", "09:00", PARIS, "2026-03-29 07:00"),
        ("2026-10-24 12:00", "09:00", PARIS, "2026-10-25 08:00"),
        ("2026-10-25 07:00", "09:00", PARIS, "2026-10-25 08:00"),
        # 02:30 does not exist on 2026-03-29 in Paris: the wall clock's 02:30 read with the winter
        # offset, 03:30 summer time.
        ("2026-03-29 00:00", "02:30", PARIS, "2026-03-29 01:30"),
        # 02:30 happens twice on 2026-10-25: the first one, and not again that day.
        ("2026-10-24 22:00", "02:30", PARIS, "2026-10-25 00:30"),
        ("2026-10-25 00:45", "02:30", PARIS, "2026-10-26 01:30"),
        # America/New_York: EST (-5) until 2026-03-08 02:00, EDT (-4) until 2026-11-01 02:00.
        ("2026-03-07 20:00", "09:00", NEW_YORK, "2026-03-08 13:00"),
        ("2026-03-07 13:00", "09:00", NEW_YORK, "2026-03-07 14:00"),
        ("2026-10-31 20:00", "09:00", NEW_YORK, "2026-11-01 14:00"),
        ("2026-11-01 03:00", "00:30", NEW_YORK, "2026-11-01 04:30"),
        # Day boundaries: the local date, not the UTC one, decides "today".
        ("2026-01-01 12:00", "09:00", ZoneInfo("Pacific/Auckland"), "2026-01-01 20:00"),
        ("2026-01-01 05:00", "09:00", ZoneInfo("Pacific/Honolulu"), "2026-01-01 19:00"),
        ("2025-12-31 23:30", "00:00", ZoneInfo("UTC"), "2026-01-01 00:00"),
        ("2026-02-28 23:59", "23:59", ZoneInfo("UTC"), "2026-02-28 23:59"),
        ("2026-02-28 23:59:01", "23:59", ZoneInfo("UTC"), "2026-03-01 23:59"),
        ("2028-02-28 23:00", "08:00", PARIS, "2028-02-29 07:00"),
    ],
)
def test_next_time_of_day(after, hh_mm, zone, expected):
    assert next_time_of_day(datetime.fromisoformat(after), hh_mm, zone) == datetime.fromisoformat(expected)


_ZONES = ["Europe/Paris", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu", "Pacific/Apia", "UTC"]


@settings(max_examples=500, deadline=None)
@given(
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1)),
    st.integers(0, 23),
    st.integers(0, 59),
    st.sampled_from(_ZONES),
)
def test_next_time_of_day_is_the_first_time_the_wall_clock_shows_it(after, hours, minutes, zone_name):
    zone = ZoneInfo(zone_name)
    hh_mm = f"{hours:02d}:{minutes:02d}"
    found = next_time_of_day(after, hh_mm, zone)
    assert after <= found < after + timedelta(hours=26)
    local = found.replace(tzinfo=ZoneInfo("UTC")).astimezone(zone)
    round_trip = datetime.combine(local.date(), local.time(), tzinfo=zone).astimezone(ZoneInfo("UTC"))
    if local.strftime("%H:%M") != hh_mm:  # only in a gap of the wall clock (a DST change)
        wall = datetime(local.year, local.month, local.day, hours, minutes, tzinfo=zone)
        assert wall.astimezone(ZoneInfo("UTC")).astimezone(zone).strftime("%H:%M") != hh_mm
    assert round_trip.replace(tzinfo=None) == found
