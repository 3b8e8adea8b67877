"""The automations core in-process on both databases: saving, triggers, entry rules, steps, goals, the cap, reports."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select, update

import smartmail
from smartmail.audience import contacts, segments, suppressions
from smartmail.automations import clock, engine, enrolment, reports, triggers, workflows
from smartmail.errors import InvalidInput, NotFound
from smartmail.store.engine import get_engine, session_scope, utcnow
from smartmail.store.ids import new_id
from smartmail.store.models import (
    Campaign,
    Contact,
    Enrolment,
    Event,
    ListMembership,
    Message,
    StepRun,
    Suppression,
    WebhookDelivery,
    Workflow,
    WorkflowVersion,
)
from smartmail.webhooks import endpoints
from tests.conftest import reset_caches, wait_for

SIGNUP = {"event": "signup"}
DAY = timedelta(days=1)


def _send(step_id: str, *tags: str, **more) -> dict:
    return {"id": step_id, "type": "send", "template": "welcome", "tags": list(tags), **more}


def _save(name: str, *steps: dict, trigger: dict | None = None, **top) -> dict:
    document = {"trigger": trigger or SIGNUP, "steps": list(steps), **top}
    return workflows.save_workflow(name, document)[0]


def _person(email: str, **attributes) -> str:
    timezone = attributes.pop("timezone", None)
    contacts.create_contact(email, attributes={"first_name": "Ann", **attributes}, timezone=timezone)
    return email


def _read(events: int) -> enrolment.Read:
    """Read the stream until `events` events of interest were read: on PostgreSQL an event is
    readable once every older transaction on the server has ended."""
    total = enrolment.Read(0, 0, 0, 0, more=False)

    def done() -> bool:
        page = enrolment.read_events()
        for name in ("events", "enrolled", "converted", "woken"):
            setattr(total, name, getattr(total, name) + getattr(page, name))
        return total.events >= events

    wait_for(done, 30, interval=0.05, message=lambda: f"{events} events read ({total.events} so far)")
    return total


def _track(email: str, event: str, properties: dict | None = None, **options) -> int:
    return smartmail.track(email, event, properties, **options)


def _enrolments(name: str) -> list[SimpleNamespace]:
    """The workflow's enrolments, oldest first: `.Enrolment` (its columns) and `.email`."""
    with get_engine().connect() as connection:
        rows = connection.execute(
            select(Enrolment.__table__, Contact.email)
            .join(Workflow, Workflow.id == Enrolment.workflow_id)
            .join(Contact, Contact.id == Enrolment.contact_id)
            .where(Workflow.name == name)
            .order_by(Enrolment.id)
        ).all()
    found = []
    for row in rows:
        columns = dict(row._mapping)
        email = columns.pop("email")
        found.append(SimpleNamespace(Enrolment=SimpleNamespace(**columns), email=email))
    return found


def _enrolment(name: str, email: str) -> SimpleNamespace:
    (row,) = [row for row in _enrolments(name) if row.email == email]
    return row


def _sent(email: str) -> list[Any]:
    """The workflow messages to `email`, oldest first."""
    with get_engine().connect() as connection:
        return connection.execute(
            select(Message).where(Message.recipient == email).order_by(Message.created_at, Message.id)
        ).all()


def _tags(email: str) -> list[str]:
    """Each message's own tag (the one after workflow:<name>), in order."""
    return [message.tags[1] if len(message.tags) > 1 else "-" for message in _sent(email)]


def _runs(email: str) -> list[tuple[str, str | None]]:
    with get_engine().connect() as connection:
        return connection.execute(
            select(StepRun.step, StepRun.outcome)
            .join(Contact, Contact.id == StepRun.contact_id)
            .where(Contact.email == email)
            .order_by(StepRun.enrolment_id, StepRun.run)
        ).all()


def _event_row(email: str, type_: str, *, message_id=None, campaign_id=None, machine=False, at=None) -> None:
    """An event as tracking records it (opens and clicks cannot be tracked by hand)."""
    with session_scope() as session:
        contact_id = session.scalar(select(Contact.id).where(Contact.email == email))
        session.add(
            Event(
                type=type_,
                contact_id=contact_id,
                message_id=message_id,
                campaign_id=campaign_id,
                machine=machine,
                properties={},
                occurred_at=at or utcnow(),
            )
        )


def _advance(at: datetime) -> engine.Advanced:
    """Advance page after page at `at` until a page is not full; the totals."""
    total = engine.Advanced(0, 0, 0, more=False)
    while True:
        page = engine.advance(now=at)
        total.enrolments += page.enrolments
        total.steps += page.steps
        total.messages += page.messages
        if not page.more:
            return total


@pytest.fixture
def wf(env, monkeypatch):
    """Settings for in-process automations: the system clock unless a test makes it adjustable."""
    yield monkeypatch


# --- Saving and versions ----------------------------------------------------------------------------


def test_an_unknown_template_is_refused_at_save_naming_the_step_and_nothing_is_stored(wf):
    with pytest.raises(InvalidInput) as caught:
        _save("welcome", _send("hello"), {"id": "later", "type": "send", "template": "no-such-template"})
    assert caught.value.field == "steps.later.template"
    for reference, field in [
        ({"id": "u", "type": "update", "add_to_lists": ["nope"]}, "steps.u.add_to_lists[0]"),
        ({"id": "h", "type": "webhook", "endpoint": 12345}, "steps.h.endpoint"),
    ]:
        with pytest.raises(InvalidInput) as caught:
            _save("welcome", _send("hello"), reference)
        assert caught.value.field == field
    with pytest.raises(InvalidInput) as caught:
        _save("welcome", _send("hello"), trigger={"segment": "nobody"})
    assert caught.value.field == "trigger.segment"
    with pytest.raises(InvalidInput) as caught:
        _save("welcome", _send("hello"), trigger={"engagement": {"event": "opened", "campaign": "nope"}})
    assert caught.value.field == "trigger.engagement.campaign"
    with pytest.raises(InvalidInput) as caught:
        workflows.save_workflow("bad name!", {"trigger": SIGNUP, "steps": [_send("hello")]})
    assert caught.value.field == "name"
    with get_engine().connect() as connection:
        assert connection.scalar(select(func.count()).select_from(Workflow)) == 0
        assert connection.scalar(select(func.count()).select_from(WorkflowVersion)) == 0
    with pytest.raises(NotFound):
        workflows.get_workflow("welcome")


def test_saving_the_same_definition_adds_no_version_and_text_is_accepted(wf):
    saved, changed = workflows.save_workflow("welcome", {"trigger": SIGNUP, "steps": [_send("hello")]})
    assert changed and saved["version"] == 1
    again, changed = workflows.save_workflow(
        "welcome", "trigger: {event: signup}\nsteps:\n  - {id: hello, type: send, template: welcome, tags: []}\n"
    )
    assert not changed and again["version"] == 1
    newer, changed = workflows.save_workflow(
        "welcome", '{"trigger": {"event": "signup"}, "steps": [{"id": "x", "type": "exit"}]}'
    )
    assert changed and newer["version"] == 2
    assert workflows.get_workflow("welcome", 1)["definition"]["steps"][0]["id"] == "hello"
    assert workflows.get_workflow("welcome")["current_version"] == 2
    assert [w["name"] for w in workflows.list_workflows()] == ["welcome"]
    with pytest.raises(InvalidInput):
        workflows.save_workflow("welcome", {"name": "other", "trigger": SIGNUP, "steps": [_send("hello")]})


def test_a_new_version_leaves_running_enrolments_on_theirs_until_they_are_moved(wf):
    steps = [_send("hello", "v1"), {"id": "w", "type": "wait", "duration": "1d"}, _send("bye", "v1")]
    _save("drip", *steps)
    first, second = _person("first@example.com"), _person("second@example.com")
    _track(first, "signup")
    _track(second, "signup")
    assert _read(2).enrolled == 2
    start = clock.now() + timedelta(seconds=1)
    assert engine.advance(limit=1, now=start).messages == 1  # the first enrolment: hello, then the wait
    assert engine.advance(limit=1, now=start + timedelta(hours=2)).messages == 1  # the second, 2 h later

    steps[2] = _send("bye", "v2")
    assert workflows.save_workflow("drip", {"trigger": SIGNUP, "steps": steps})[0]["version"] == 2
    assert [row.Enrolment.version for row in _enrolments("drip")] == [1, 1]

    _advance(start + DAY + timedelta(minutes=1))  # the first's wait is over: it ends on version 1
    assert _tags(first) == ["v1", "v1"]
    assert workflows.move_enrolments("drip", from_version=2) == 0
    assert workflows.move_enrolments("drip") == 1  # the second, still waiting; the ended one stays
    assert [row.Enrolment.version for row in _enrolments("drip")] == [1, 2]
    _advance(start + 2 * DAY)
    assert _tags(second) == ["v1", "v2"]
    assert [row.Enrolment.ended_reason for row in _enrolments("drip")] == ["completed", "completed"]


def test_enrolments_at_a_step_the_new_version_lacks_are_not_moved(wf):
    _save("drip", _send("hello"), {"id": "w", "type": "wait", "duration": "1d"}, _send("bye"))
    _track(_person("a@example.com"), "signup")
    _read(1)
    _advance(clock.now() + timedelta(seconds=1))
    _save("drip", _send("hello"), {"id": "pause", "type": "wait", "duration": "1d"}, _send("bye"))
    assert workflows.move_enrolments("drip") == 0
    assert _enrolment("drip", "a@example.com").Enrolment.version == 1


# --- Entry rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "expected"), [("once", 1), ("every_time", 3), ({"once_per": "30d"}, 1)])
def test_entry_rules_within_one_read(wf, entry, expected):
    _save("welcome", _send("hello"), entry=entry)
    email = _person("a@example.com")
    for _ in range(3):
        _track(email, "signup")
    assert _read(3).enrolled == expected
    assert len(_enrolments("welcome")) == expected


def test_once_per_lets_a_contact_in_again_after_the_period_once_ever_does_not(wf):
    wf.setenv("SMARTMAIL_SCHEDULER_CLOCK", "adjustable")
    reset_caches()
    try:
        _save("monthly", _send("hello"), entry={"once_per": "30d"})
        _save("onboarding", _send("hello"), entry="once")
        email = _person("a@example.com")
        _track(email, "signup")
        assert _read(1).enrolled == 2
        clock.advance(10 * 86400)
        _track(email, "signup")
        assert _read(1).enrolled == 0
        clock.advance(21 * 86400)
        _track(email, "signup")
        assert _read(1).enrolled == 1
        assert (len(_enrolments("monthly")), len(_enrolments("onboarding"))) == (2, 1)
    finally:
        clock.reset()


def test_unsubscribed_and_suppressed_contacts_are_not_enrolled(wf):
    _save("welcome", _send("hello"), entry="every_time")
    _person("gone@example.com")
    contacts.update_contact("gone@example.com", status="unsubscribed")
    _person("blocked@example.com")
    suppressions.add_suppression("blocked@example.com", "manual")
    _person("ok@example.com")
    for email in ("gone@example.com", "blocked@example.com", "ok@example.com"):
        _track(email, "signup")
    assert _read(3).enrolled == 1
    assert [row.email for row in _enrolments("welcome")] == ["ok@example.com"]


def test_enrol_contact_by_hand_follows_the_entry_rule(wf):
    _save("welcome", _send("hello"))
    _person("a@example.com")
    assert reports.enrol_contact("welcome", "A@example.com", {"source": "cli"}) is True
    assert reports.enrol_contact("welcome", "a@example.com") is False  # once ever
    assert _enrolment("welcome", "a@example.com").Enrolment.context == {"type": "manual", "source": "cli"}
    with pytest.raises(NotFound):
        reports.enrol_contact("welcome", "nobody@example.com")
    with pytest.raises(NotFound):
        reports.enrol_contact("nothing", "a@example.com")


# --- Triggers ---------------------------------------------------------------------------------------


def test_an_event_trigger_with_where_enrols_on_matching_events_only(wf):
    early = _person("early@example.com")
    _track(early, "signup", {"plan": "pro"})  # before the workflow: never read
    _save("pro", _send("hello"), trigger={"event": "signup", "where": {"plan": "pro", "seats": 5}})
    pro, free, other = _person("pro@example.com"), _person("free@example.com"), _person("other@example.com")
    _track(pro, "signup", {"plan": "pro", "seats": 5, "coupon": "X"})
    _track(free, "signup", {"plan": "free", "seats": 5})
    _track(other, "order_placed", {"plan": "pro", "seats": 5})
    _track(other, "signup", {"plan": "pro", "seats": "5"})
    read = _read(3)
    assert read.enrolled == 1
    row = _enrolment("pro", pro)
    assert row.Enrolment.context["plan"] == "pro" and row.Enrolment.context["coupon"] == "X"
    assert row.Enrolment.context["type"] == "signup"
    assert row.Enrolment.step == "hello" and row.Enrolment.state == "active"


def test_a_list_trigger_enrols_who_joined_since_the_last_scan(wf):
    contacts.create_list("newsletter")
    contacts.add_members("newsletter", [_person("before@example.com")])
    _save("news", _send("hello"), trigger={"list": "newsletter"})
    with session_scope() as session:  # joined before the workflow existed
        session.execute(update(ListMembership).values(joined_at=utcnow() - timedelta(minutes=1)))
    contacts.add_members("newsletter", [_person("a@example.com"), _person("b@example.com")])
    assert triggers.scan(now=utcnow()) == 2
    assert triggers.scan(now=utcnow()) == 0
    contacts.add_members("newsletter", [_person("c@example.com")])
    assert triggers.scan(now=utcnow()) == 1
    assert sorted(row.email for row in _enrolments("news")) == ["a@example.com", "b@example.com", "c@example.com"]


@pytest.mark.parametrize(("entry", "enrolments"), [("every_time", 2), ("once", 1)])
def test_a_segment_trigger_enrols_on_entry_and_again_after_leaving_as_the_entry_rule_says(wf, entry, enrolments):
    segments.save_segment("pros", {"attr": "plan", "op": "eq", "value": "pro"})
    _save("upsell", _send("hello"), trigger={"segment": "pros"}, entry=entry)
    _person("pro@example.com", plan="pro")
    _person("free@example.com", plan="free")
    now = utcnow()
    assert triggers.scan(now=now) == 1
    assert triggers.scan(now=now + timedelta(minutes=1)) == 0  # still inside: no new entry
    contacts.update_contact("pro@example.com", attributes={"plan": "free"})
    assert triggers.scan(now=now + timedelta(minutes=2)) == 0  # left
    contacts.update_contact("pro@example.com", attributes={"plan": "pro"})
    assert triggers.scan(now=now + timedelta(minutes=3)) == enrolments - 1  # came back
    assert [row.email for row in _enrolments("upsell")] == ["pro@example.com"] * enrolments


def _utc(local: datetime, zone: str) -> datetime:
    return local.replace(tzinfo=ZoneInfo(zone)).astimezone(ZoneInfo("UTC")).replace(tzinfo=None)


def test_a_date_trigger_enrols_on_the_day_in_the_contacts_time_zone_with_offset_and_annually(wf):
    year = utcnow().year + 1
    _save(
        "birthday",
        _send("hello"),
        trigger={"date": {"attribute": "birthday", "annual": True, "offset_days": -7, "at": "09:00"}},
        entry="every_time",  # every year: once per date
    )
    _save("renewal", _send("hello"), trigger={"date": {"attribute": "renewal_date", "offset_days": -7}})
    _person("auckland@example.com", birthday="1990-03-15", timezone="Pacific/Auckland")
    _person("newyork@example.com", birthday="1985-03-15", timezone="America/New_York")
    _person("nozone@example.com", birthday="2000-03-16")
    _person("renews@example.com", renewal_date=f"{year}-03-15", timezone="America/New_York")
    _person("renewed@example.com", renewal_date=f"{year - 1}-03-15", timezone="America/New_York")
    _person("garbage@example.com", birthday=19900315)

    # 20:00 UTC on 7 March: already 8 March (seven days before the 15th) in Auckland only.
    first = datetime(year, 3, 7, 20, 0)
    assert triggers.scan(now=first) == 1
    (auckland,) = _enrolments("birthday")
    assert auckland.email == "auckland@example.com"
    assert auckland.Enrolment.entry_key == f"date:{year}-03-08"
    assert auckland.Enrolment.due_at == max(first, _utc(datetime(year, 3, 8, 9, 0), "Pacific/Auckland"))

    # 11:00 UTC on 8 March: 8 March in New York, before 09:00 there: due at 09:00 New York time.
    second = datetime(year, 3, 8, 11, 0)
    assert triggers.scan(now=second) == 2
    newyork = _enrolment("birthday", "newyork@example.com").Enrolment
    assert newyork.due_at == _utc(datetime(year, 3, 8, 9, 0), "America/New_York") > second
    renews = _enrolment("renewal", "renews@example.com").Enrolment
    assert renews.due_at == newyork.due_at
    assert triggers.scan(now=second + timedelta(hours=1)) == 0  # once per date

    # 9 March, UTC (the workflow's zone for a contact without one): the birthday of the 16th.
    assert triggers.scan(now=datetime(year, 3, 9, 10, 0)) == 1
    assert _enrolment("birthday", "nozone@example.com").Enrolment.due_at == datetime(year, 3, 9, 10, 0)
    assert {row.email for row in _enrolments("renewal")} == {"renews@example.com"}


def test_a_29_february_birthday_comes_round_on_28_february_in_common_years(wf):
    _save("birthday", _send("hello"), trigger={"date": {"attribute": "birthday", "annual": True}}, entry="every_time")
    _person("leap@example.com", birthday="2000-02-29")
    _person("march@example.com", birthday="2000-03-01")
    assert triggers.scan(now=datetime(2027, 2, 28, 12, 0)) == 1  # 2027 has no 29 February
    assert _enrolment("birthday", "leap@example.com").Enrolment.entry_key == "date:2027-02-28"
    assert triggers.scan(now=datetime(2028, 2, 28, 12, 0)) == 0  # 2028 has one: that day, not this
    assert triggers.scan(now=datetime(2028, 2, 29, 12, 0)) == 1
    assert {row.Enrolment.entry_key for row in _enrolments("birthday")} == {"date:2027-02-28", "date:2028-02-29"}


def _campaign(name: str = "spring") -> int:
    with session_scope() as session:
        campaign = Campaign(name=name, template_name="welcome", sender="news@example.com", lists=[], tags=[])
        session.add(campaign)
        session.flush()
        return campaign.id


def _campaign_message(email: str, campaign_id: int, finished_at: datetime) -> str:
    message_id = new_id()
    with session_scope() as session:
        contact_id = session.scalar(select(Contact.id).where(Contact.email == email))
        session.add(
            Message(
                id=message_id,
                state="sent",
                sender="news@example.com",
                recipient=email,
                subject="Spring",
                text="Hi",
                headers={},
                tags=[],
                message_id_header=f"<{message_id}@example.com>",
                campaign_id=campaign_id,
                contact_id=contact_id,
                finished_at=finished_at,
            )
        )
    return message_id


def test_not_opened_enrols_each_unopened_email_of_the_campaign_once_after_the_window(wf):
    campaign_id = _campaign()
    other_campaign = _campaign("autumn")
    sent_at = utcnow() - 2 * DAY
    messages = {}
    for name in ("opened", "machine", "silent", "old", "other"):
        email = _person(f"{name}@example.com")
        when = sent_at - 3 * DAY if name == "old" else sent_at
        messages[name] = _campaign_message(email, other_campaign if name == "other" else campaign_id, when)
    _event_row("opened@example.com", "opened", message_id=messages["opened"], campaign_id=campaign_id)
    _event_row("machine@example.com", "opened", message_id=messages["machine"], campaign_id=campaign_id, machine=True)
    _save(
        "nudge", _send("hello"), trigger={"engagement": {"event": "not_opened", "campaign": "spring", "within": "3d"}}
    )

    now = utcnow()
    assert triggers.scan(now=now) == 0  # sent two days ago: not three yet
    assert triggers.scan(now=now + DAY + timedelta(hours=1)) == 2
    assert sorted(row.email for row in _enrolments("nudge")) == ["machine@example.com", "silent@example.com"]
    assert _enrolment("nudge", "silent@example.com").Enrolment.context == {
        "type": "not_opened",
        "message_id": messages["silent"],
    }
    assert triggers.scan(now=now + 2 * DAY) == 0


def test_opened_enrols_on_a_human_open_of_the_campaign_read_from_the_stream(wf):
    campaign_id = _campaign()
    _save("thanks", _send("hello"), trigger={"engagement": {"event": "opened", "campaign": "spring"}})
    human, machine, elsewhere = _person("human@example.com"), _person("machine@example.com"), _person("x@example.com")
    _event_row(human, "opened", message_id=_campaign_message(human, campaign_id, utcnow()), campaign_id=campaign_id)
    _event_row(machine, "opened", campaign_id=campaign_id, machine=True)
    _event_row(elsewhere, "opened", campaign_id=campaign_id + 1)
    assert _read(3).enrolled == 1
    assert [row.email for row in _enrolments("thanks")] == [human]


def test_clicked_on_a_workflow_steps_email_enrols_in_another_workflow(wf):
    _save("welcome", _send("hello"))
    _save(
        "engaged", _send("hello"), trigger={"engagement": {"event": "clicked", "workflow": "welcome", "step": "hello"}}
    )
    email = _person("a@example.com")
    _track(email, "signup")
    _read(1)
    _advance(clock.now() + timedelta(seconds=1))
    (message,) = _sent(email)
    _event_row(email, "clicked", message_id=message.id)
    _event_row(email, "clicked", message_id=new_id())  # an email of nothing here
    assert _read(2).enrolled == 1
    assert [row.email for row in _enrolments("engaged")] == [email]


# --- Goals and waits for events ---------------------------------------------------------------------


def test_a_goal_ends_the_enrolment_wherever_it_is_even_waiting_for_an_event(wf):
    _save(
        "cart",
        _send("hello", "first"),
        {"id": "w", "type": "wait", "duration": "1h"},
        _send("ask", "second"),
        {"id": "reply", "type": "wait", "event": "replied", "timeout": "3d"},
        _send("bye", "third"),
        goal={"event": "order_placed"},
    )
    early, late, never = _person("early@example.com"), _person("late@example.com"), _person("never@example.com")
    for email in (early, late, never):
        _track(email, "signup")
    _read(3)
    start = clock.now() + timedelta(seconds=1)
    _advance(start)
    _track(early, "order_placed")  # in the one-hour wait
    assert _read(1).converted == 1
    _advance(start + timedelta(hours=2))
    assert _enrolment("cart", late).Enrolment.awaiting == "replied"
    _track(late, "order_placed")  # waiting for `replied`
    assert _read(1).converted == 1
    _advance(start + 5 * DAY)
    assert _tags(early) == ["first"]
    assert _tags(late) == ["first", "second"]
    assert _tags(never) == ["first", "second", "third"]
    reasons = {row.email: row.Enrolment.ended_reason for row in _enrolments("cart")}
    assert reasons == {early: "converted", late: "converted", never: "completed"}
    _track(never, "order_placed")  # after the end: nothing changes
    assert _read(1).converted == 0
    status = reports.status("cart")
    assert (status["conversions"], status["enrolled"]) == (2, 3)
    assert status["conversion_rate"] == pytest.approx(2 / 3)


def test_a_wait_for_an_event_goes_on_event_or_on_timeout_and_earlier_events_do_not_count(wf):
    _save(
        "demo",
        {"id": "w", "type": "wait", "event": "demo_booked", "timeout": "2d", "on_event": "yes", "on_timeout": "no"},
        _send("yes", "booked", next=None),
        _send("no", "not-booked"),
    )
    booked, before, silent = _person("booked@example.com"), _person("before@example.com"), _person("s@example.com")
    for email in (booked, before, silent):
        _track(email, "signup")
    _track(before, "demo_booked")  # before the wait started
    _read(4)
    start = clock.now() + timedelta(seconds=1)
    _advance(start)
    assert {row.Enrolment.awaiting for row in _enrolments("demo")} == {"demo_booked"}
    _track(before, "demo_booked", occurred_at=utcnow() - timedelta(hours=1))  # read now, happened earlier
    _track(booked, "demo_booked")
    assert _read(2).woken == 1
    row = _enrolment("demo", booked).Enrolment
    assert row.awaited_at is not None and row.due_at <= clock.now()
    assert _advance(start + timedelta(hours=1)).messages == 1
    assert _tags(booked) == ["booked"]
    assert _advance(start + DAY).messages == 0
    _advance(start + 2 * DAY + timedelta(minutes=1))
    assert _tags(before) == ["not-booked"] and _tags(silent) == ["not-booked"] and _tags(booked) == ["booked"]
    assert _runs(booked)[-1] == ("yes", None)


# --- Branches -----------------------------------------------------------------------------------------


def test_a_branch_on_the_previous_email_counts_human_opens_only(wf):
    _save(
        "follow-up",
        _send("hello", "hello"),
        {"id": "w", "type": "wait", "duration": "1d"},
        {"id": "b", "type": "branch", "if": {"previous_email": "opened"}, "then": "thanks"},
        _send("nudge", "nudge", next=None),
        _send("thanks", "thanks"),
    )
    human, machine, silent = _person("human@example.com"), _person("machine@example.com"), _person("s@example.com")
    for email in (human, machine, silent):
        _track(email, "signup")
    _read(3)
    start = clock.now() + timedelta(seconds=1)
    _advance(start)
    _event_row(human, "opened", message_id=_sent(human)[0].id)
    _event_row(machine, "opened", message_id=_sent(machine)[0].id, machine=True)
    _event_row(silent, "opened", message_id=_sent(human)[0].id)  # someone else's email
    _advance(start + DAY + timedelta(minutes=1))
    assert _tags(human) == ["hello", "thanks"]
    assert _tags(machine) == ["hello", "nudge"]
    assert _tags(silent) == ["hello", "nudge"]
    assert ("b", "then") in _runs(human) and ("b", "else") in _runs(machine)


def test_a_branch_on_segment_rules_sees_the_update_made_just_before(wf):
    rules = {"any": [{"attr": "plan", "op": "eq", "value": "pro"}, {"attr": "lead_score", "op": "gte", "value": 10}]}
    _save(
        "route",
        {"id": "score", "type": "score", "points": 10},
        {
            "id": "b",
            "type": "branch",
            "if": {"all": [{"rules": rules}, {"not": {"previous_email": "opened"}}]},
            "then": "pro",
        },
        _send("basic", "basic", next=None),
        _send("pro", "pro"),
    )
    pro, scored, low = (
        _person("pro@example.com", plan="pro"),
        _person("scored@example.com", lead_score=5),
        _person("low@example.com", lead_score=-20),
    )
    for email in (pro, scored, low):
        _track(email, "signup")
    _read(3)
    _advance(clock.now() + timedelta(seconds=1))
    assert (_tags(pro), _tags(scored), _tags(low)) == (["pro"], ["pro"], ["basic"])


# --- Update, score, webhook ---------------------------------------------------------------------------


def test_update_merges_attributes_and_changes_lists_and_score_adds_points(wf):
    for name in ("customers", "leads", "untouched"):
        contacts.create_list(name)
    email = _person("a@example.com", plan="free", lead_score=2.5, keep="me")
    contacts.add_members("leads", [email])
    contacts.add_members("untouched", [email])
    _save(
        "convert",
        {"id": "u", "type": "update", "attributes": {"plan": "pro", "vip": True}, "add_to_lists": ["customers"]},
        {"id": "u2", "type": "update", "remove_from_lists": ["leads"]},
        {"id": "s", "type": "score", "points": 10},
        {"id": "s2", "type": "score", "points": -3, "attribute": "engagement"},
        {"id": "s3", "type": "score", "points": 1, "attribute": "engagement"},
    )
    _track(email, "signup")
    _read(1)
    _advance(clock.now() + timedelta(seconds=1))
    contact = contacts.get_contact(email)
    assert contact["attributes"] == {
        "first_name": "Ann",
        "plan": "pro",
        "vip": True,
        "keep": "me",
        "lead_score": 12.5,
        "engagement": -2,
    }
    assert sorted(contact["lists"]) == ["customers", "untouched"]
    assert _runs(email) == [
        ("u", None),
        ("u2", None),
        ("s", "lead_score = 12.5"),
        ("s2", "engagement = -3"),
        ("s3", "engagement = -2"),
    ]
    assert _enrolment("convert", email).Enrolment.ended_reason == "completed"


def test_a_webhook_step_writes_a_pending_delivery_for_an_enabled_endpoint_only(wf):
    wf.setenv("SMARTMAIL_WEBHOOK_ALLOW_HTTP", "true")
    wf.setenv("SMARTMAIL_WEBHOOK_ALLOW_NETWORKS", '["127.0.0.0/8"]')
    reset_caches()
    enabled, _ = endpoints.create_endpoint("http://127.0.0.1:9/hook")
    disabled, _ = endpoints.create_endpoint("http://127.0.0.1:9/off")
    endpoints.set_enabled(disabled["id"], False)
    _save(
        "crm",
        {"id": "h", "type": "webhook", "endpoint": enabled["id"], "data": {"stage": "lead"}},
        {"id": "off", "type": "webhook", "endpoint": disabled["id"]},
    )
    email = _person("a@example.com")
    _track(email, "signup", {"plan": "pro"})
    _read(1)
    _advance(clock.now() + timedelta(seconds=1))
    with session_scope() as session:
        rows = session.scalars(select(WebhookDelivery)).all()
        assert [(row.endpoint_id, row.state, row.event_type) for row in rows] == [
            (enabled["id"], "pending", "workflow.webhook")
        ]
        payload = json.loads(rows[0].payload)
    row = _enrolment("crm", email)
    assert payload["type"] == "workflow.webhook"
    assert payload["data"]["stage"] == "lead" and payload["data"]["email"] == email
    assert payload["data"]["workflow"] == "crm" and payload["data"]["step"] == "h"
    assert payload["data"]["enrolment_id"] == row.Enrolment.id and payload["data"]["event"]["plan"] == "pro"
    assert _runs(email) == [("h", None), ("off", "endpoint missing or disabled")]
    assert row.Enrolment.ended_reason == "completed"


# --- Sending: messages, the frequency cap, exactly once -----------------------------------------------


def test_send_steps_queue_keyed_messages_with_the_contact_and_unsubscribe_headers(wf):
    _save(
        "welcome",
        _send("hello", "intro", **{"from": "Shop <shop@example.com>", "reply_to": "help@example.com"}),
        _send("again", track=False),
        sender="Team <team@example.com>",
    )
    email = _person("a@example.com", first_name="Zoé")
    _track(email, "signup")
    _read(1)
    advanced = _advance(clock.now() + timedelta(seconds=1))
    assert (advanced.enrolments, advanced.steps, advanced.messages) == (1, 2, 2)
    row = _enrolment("welcome", email)
    first, second = _sent(email)
    with get_engine().connect() as connection:
        contact_id = connection.scalar(select(Contact.id).where(Contact.email == email))
        runs = connection.execute(
            select(StepRun.run, StepRun.message_id)
            .where(StepRun.enrolment_id == row.Enrolment.id)
            .order_by(StepRun.run)
        ).all()
    assert [message.id for message in (first, second)] == [run.message_id for run in runs]
    for message, run in zip((first, second), runs):
        assert message.contact_id == contact_id
        assert message.idempotency_key == f"workflow:{row.Enrolment.id}:{run.run}"
        assert message.state == "queued"
        assert "List-Unsubscribe" in message.headers and "One-Click" in message.headers["List-Unsubscribe-Post"]
        assert message.headers["X-SmartMail-Workflow"] == "welcome"
    assert first.tags == ["workflow:welcome", "intro"] and second.tags == ["workflow:welcome"]
    assert first.sender == "Shop <shop@example.com>" and first.reply_to == "help@example.com"
    assert second.sender == "Team <team@example.com>"
    assert "Zoé" in first.subject
    assert first.id in first.html and second.id not in second.html  # tracked links carry the message's id
    assert row.Enrolment.last_message_id == second.id


def test_a_send_that_cannot_render_ends_the_enrolment_as_failed(wf):
    _save("welcome", _send("hello"))
    email = "nameless@example.com"
    contacts.create_contact(email)  # the template needs first_name
    _track(email, "signup")
    _read(1)
    _advance(clock.now() + timedelta(seconds=1))
    assert _sent(email) == []
    assert _enrolment("welcome", email).Enrolment.ended_reason == "failed"
    ((step, outcome),) = _runs(email)
    assert step == "hello" and outcome.startswith("failed: ")


def test_the_frequency_cap_holds_the_second_send_of_a_day_until_the_window_passes(wf):
    wf.setenv("SMARTMAIL_FREQUENCY_CAP_DAY", "1")
    reset_caches()
    _save("two", _send("first", "first"), _send("second", "second"))
    email = _person("a@example.com")
    _track(email, "signup")
    _read(1)
    start = clock.now() + timedelta(seconds=1)
    assert _advance(start).messages == 1
    held = _enrolment("two", email).Enrolment
    assert (held.state, held.step) == ("active", "second")
    assert start + timedelta(hours=23) < held.due_at <= start + DAY + timedelta(minutes=1)
    assert _advance(start + timedelta(hours=12)).messages == 0
    assert _advance(held.due_at).messages == 1
    assert _tags(email) == ["first", "second"]
    assert _enrolment("two", email).Enrolment.ended_reason == "completed"


def test_campaign_emails_count_towards_the_frequency_cap(wf):
    wf.setenv("SMARTMAIL_FREQUENCY_CAP_DAY", "1")
    reset_caches()
    campaign_id = _campaign()
    email = _person("a@example.com")
    message_id = _campaign_message(email, campaign_id, utcnow())
    _event_row(email, "sent", message_id=message_id, campaign_id=campaign_id)
    _save("one", _send("hello"))
    _track(email, "signup")
    _read(1)
    assert _advance(clock.now() + timedelta(seconds=1)).messages == 0
    assert _enrolment("one", email).Enrolment.step == "hello"


def test_each_step_runs_once_a_second_advance_at_the_same_time_changes_nothing(wf):
    _save("drip", _send("hello"), {"id": "w", "type": "wait", "duration": "1h"}, _send("bye"))
    emails = [_person(f"c{i}@example.com") for i in range(5)]
    for email in emails:
        _track(email, "signup")
    _read(5)
    start = clock.now() + timedelta(seconds=1)
    first = engine.advance(now=start)
    assert (first.enrolments, first.steps, first.messages) == (5, 5, 5)
    before = [(row.Enrolment.step, row.Enrolment.runs, row.Enrolment.due_at) for row in _enrolments("drip")]
    again = engine.advance(now=start)
    assert (again.enrolments, again.steps, again.messages) == (0, 0, 0)
    assert [(row.Enrolment.step, row.Enrolment.runs, row.Enrolment.due_at) for row in _enrolments("drip")] == before
    assert not engine.any_due(start) and engine.due_count(start) == 0
    later = start + timedelta(hours=1)
    assert engine.any_due(later) and engine.due_count(later) == 5
    assert _advance(later).messages == 5
    assert _advance(later).steps == 0
    with get_engine().connect() as connection:
        # hello and bye: a wait leaves no step-run row
        assert connection.scalar(select(func.count()).select_from(StepRun)) == 10
        assert connection.scalar(select(func.count()).select_from(Message)) == 10
        assert connection.scalar(select(func.count(func.distinct(Message.idempotency_key)))) == 10


def test_advance_works_in_pages(wf):
    wf.setenv("SMARTMAIL_AUTOMATION_BATCH_SIZE", "2")
    reset_caches()
    _save("welcome", _send("hello"))
    for i in range(5):
        _track(_person(f"c{i}@example.com"), "signup")
    _read(5)
    at = clock.now() + timedelta(seconds=1)
    pages = [engine.advance(now=at) for _ in range(4)]
    assert [(page.enrolments, page.more) for page in pages] == [(2, True), (2, True), (1, False), (0, False)]


# --- Pausing, leaving -------------------------------------------------------------------------------


def test_pausing_holds_enrolments_and_enrols_nobody_resuming_lets_them_go_on(wf):
    _save("drip", _send("hello", "hello"), {"id": "w", "type": "wait", "duration": "1h"}, _send("bye", "bye"))
    email, late = _person("a@example.com"), _person("late@example.com")
    _track(email, "signup")
    _read(1)
    start = clock.now() + timedelta(seconds=1)
    _advance(start)
    assert workflows.pause_workflow("drip") == 1
    assert _enrolment("drip", email).Enrolment.state == "held"
    _track(late, "signup")
    time.sleep(0.2)
    assert enrolment.read_events().enrolled == 0
    assert _advance(start + DAY).messages == 0
    assert workflows.get_workflow("drip")["state"] == "paused"
    assert reports.status("drip")["running"] == {"w": {"held": 1}}
    assert workflows.resume_workflow("drip") == 1
    assert _advance(start + DAY).messages == 1
    assert _tags(email) == ["hello", "bye"] and _sent(late) == []
    with pytest.raises(NotFound):
        workflows.pause_workflow("nothing")


@pytest.mark.parametrize(
    ("leave", "reason"),
    [
        (lambda email: contacts.update_contact(email, status="unsubscribed"), "unsubscribed"),
        (lambda email: suppressions.add_suppression(email, "manual"), "blocked"),
        (lambda email: suppressions.add_suppression(email, "hard_bounce"), "bounced"),
        (lambda email: _suppress_only(email), "suppressed"),
    ],
)
def test_a_contact_who_unsubscribes_or_is_suppressed_leaves_and_gets_nothing_more(wf, leave, reason):
    _save("drip", _send("hello"), {"id": "w", "type": "wait", "duration": "1h"}, _send("bye"))
    email = _person("a@example.com")
    _track(email, "signup")
    _read(1)
    start = clock.now() + timedelta(seconds=1)
    _advance(start)
    leave(email)
    _advance(start + DAY)
    assert len(_sent(email)) == 1
    row = _enrolment("drip", email).Enrolment
    assert (row.state, row.ended_reason) == ("ended", reason)


def _suppress_only(email: str) -> None:
    """On the suppression list, the contact's status untouched (as an import of suppressions may leave it)."""
    with session_scope() as session:
        session.add(Suppression(email=email, reason="manual"))


# --- Reports ------------------------------------------------------------------------------------------


def test_status_numbers_equal_direct_counts(wf):
    _save(
        "mixed",
        _send("hello"),
        {"id": "w", "type": "wait", "duration": "1d"},
        {"id": "b", "type": "branch", "if": {"rules": {"attr": "plan", "op": "eq", "value": "pro"}}, "then": "x"},
        _send("bye", next=None),
        {"id": "x", "type": "exit"},
        goal={"event": "order_placed"},
        entry="every_time",
    )
    people = [_person(f"c{i}@example.com", plan="pro" if i % 3 == 0 else "free") for i in range(9)]
    for email in people:
        _track(email, "signup")
    _track(people[0], "signup")
    _read(10)
    start = clock.now() + timedelta(seconds=1)
    _advance(start)
    _track(people[1], "order_placed")
    _read(1)
    contacts.update_contact(people[2], status="unsubscribed")
    workflows.pause_workflow("mixed")
    workflows.resume_workflow("mixed")
    _advance(start + DAY + timedelta(minutes=1))
    _track(people[4], "signup")
    _read(1)
    status = reports.status("mixed")
    with get_engine().connect() as connection:
        enrolments = connection.execute(select(Enrolment.state, Enrolment.step, Enrolment.ended_reason)).all()
        runs = connection.execute(select(StepRun.step, StepRun.message_id)).all()
        messages = connection.scalar(select(func.count()).select_from(Message))
    assert status["enrolled"] == len(enrolments) == 11
    running: dict = {}
    for state, step, _ in enrolments:
        if state != "ended":
            running.setdefault(step, {}).setdefault(state, 0)
            running[step][state] += 1
    assert status["running"] == running == {"hello": {"active": 1}}
    ended: dict = {}
    for state, _, reason in enrolments:
        if state == "ended":
            ended[reason] = ended.get(reason, 0) + 1
    assert status["ended"] == ended
    assert ended == {"converted": 1, "unsubscribed": 1, "exited": 4, "completed": 4}
    steps: dict = {}
    for step, message_id in runs:
        counted = steps.setdefault(step, {"runs": 0, "emails": 0})
        counted["runs"] += 1
        counted["emails"] += message_id is not None
    assert {step: counted for step, counted in status["steps"].items() if counted["runs"]} == steps
    assert sum(step["emails"] for step in steps.values()) == messages
    assert status["conversions"] == 1 and status["conversion_rate"] == pytest.approx(1 / 11)
    assert (status["name"], status["state"], status["version"]) == ("mixed", "active", 1)


def test_simulate_prints_the_path_with_dates_and_stores_nothing(wf):
    contacts.create_list("vips")
    _save(
        "sample",
        _send("hello"),
        {"id": "w", "type": "wait", "duration": "1d", "until": "09:00"},
        {"id": "b", "type": "branch", "if": {"previous_email": "opened"}, "then": "vip"},
        {"id": "reply", "type": "wait", "event": "replied", "timeout": "2d", "on_event": "x"},
        {"id": "vip", "type": "update", "attributes": {"vip": True}, "add_to_lists": ["vips"]},
        {"id": "s", "type": "score", "points": 5},
        {"id": "x", "type": "exit"},
        timezone="Europe/Paris",
        goal={"event": "order_placed"},
    )
    email = _person("a@example.com", timezone="America/New_York")
    start = datetime(2026, 3, 7, 20, 0)  # 15:00 in New York, the day before it changes to summer time
    path = reports.simulate("sample", email, start=start)
    assert [(stop.at, stop.step, stop.type) for stop in path] == [
        (start, "hello", "send"),
        (datetime(2026, 3, 9, 13, 0), "w", "wait"),  # a day later, then 09:00 EDT
        (datetime(2026, 3, 9, 13, 0), "b", "branch"),
        (datetime(2026, 3, 11, 13, 0), "reply", "wait"),
        (datetime(2026, 3, 11, 13, 0), "vip", "update"),
        (datetime(2026, 3, 11, 13, 0), "s", "score"),
        (datetime(2026, 3, 11, 13, 0), "x", "exit"),
    ]
    assert path[0].does == "sends template 'welcome'"
    assert path[2].does == "condition does not hold: else"
    assert path[4].does == "sets vip; adds to vips"
    opened = reports.simulate("sample", email, assume=frozenset({"opened", "replied"}), start=start)
    assert [stop.step for stop in opened] == ["hello", "w", "b", "vip", "s", "x"]
    converted = reports.simulate("sample", email, assume=frozenset({"order_placed"}), start=start)
    assert [(stop.step, stop.type) for stop in converted] == [("hello", "send"), ("w", "wait"), ("w", "goal")]
    with get_engine().connect() as connection:
        assert connection.scalar(select(func.count()).select_from(Enrolment)) == 0
        assert connection.scalar(select(func.count()).select_from(Message)) == 0
    with pytest.raises(NotFound):
        reports.simulate("sample", "nobody@example.com")


def test_the_weekly_cap_holds_the_third_send_until_the_first_is_a_week_old(wf):
    wf.setenv("SMARTMAIL_FREQUENCY_CAP_WEEK", "2")
    reset_caches()
    wait = {"type": "wait", "duration": "1d"}
    _save(
        "daily", _send("one", "1"), {"id": "w1", **wait}, _send("two", "2"), {"id": "w2", **wait}, _send("three", "3")
    )
    email = _person("a@example.com")
    _track(email, "signup")
    _read(1)
    start = clock.now() + timedelta(seconds=1)
    for day in range(3):
        _advance(start + day * DAY)
    assert _tags(email) == ["1", "2"]
    held = _enrolment("daily", email).Enrolment
    assert (held.state, held.step, held.due_at) == ("active", "three", start + 7 * DAY)
    assert _advance(start + 6 * DAY).messages == 0
    assert _advance(start + 7 * DAY + timedelta(seconds=1)).messages == 1
    assert _tags(email) == ["1", "2", "3"]


def test_a_workflow_saved_later_is_not_enrolled_by_events_before_it(wf):
    _save("first", _send("hello"))
    email = _person("a@example.com")
    _track(email, "signup")
    time.sleep(0.01)
    _save("second", _send("hello"))
    assert _read(1).enrolled == 1
    assert [row.email for row in _enrolments("first")] == [email] and _enrolments("second") == []
    with pytest.raises(NotFound):
        reports.status("third")


def test_advances_running_at_once_run_each_step_once(wf):
    _save("welcome", _send("hello"), {"id": "w", "type": "wait", "duration": "1h"}, _send("bye"))
    emails = [_person(f"c{i}@example.com") for i in range(40)]
    for email in emails:
        _track(email, "signup")
    _read(40)
    start = clock.now() + timedelta(seconds=1)
    errors: list[BaseException] = []

    def work(at: datetime) -> None:
        try:
            while engine.advance(limit=3, now=at).enrolments:
                pass
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    for at in (start, start + timedelta(hours=1)):
        threads = [threading.Thread(target=work, args=(at,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    with get_engine().connect() as connection:
        per_enrolment = connection.execute(
            select(StepRun.enrolment_id, func.count(), func.count(StepRun.message_id)).group_by(StepRun.enrolment_id)
        ).all()
    assert len(per_enrolment) == 40 and {(runs, sent) for _, runs, sent in per_enrolment} == {(2, 2)}
    assert all(_tags(email) == ["-", "-"] for email in emails)
    assert {row.Enrolment.ended_reason for row in _enrolments("welcome")} == {"completed"}


def test_a_list_join_after_the_scheduler_clock_moved_on_is_enrolled(wf):
    wf.setenv("SMARTMAIL_SCHEDULER_CLOCK", "adjustable")
    reset_caches()
    try:
        contacts.create_list("newsletter")
        _save("news", _send("hello"), trigger={"list": "newsletter"})
        clock.advance(3600)
        assert triggers.scan() == 0
        contacts.add_members("newsletter", [_person("a@example.com")])
        assert triggers.scan() == 1
    finally:
        clock.reset()


def test_the_cap_counts_emails_of_every_workflow_but_not_sends_that_failed(wf):
    wf.setenv("SMARTMAIL_FREQUENCY_CAP_DAY", "1")
    reset_caches()
    _save("welcome", _send("hello", "welcome"))
    _save("onboarding", _send("hello", "onboarding"))
    reset = {"id": "reset", "type": "send", "template": "password-reset", "tags": ["reset"]}
    _save("reset", reset, trigger={"event": "reset_requested"})
    email = _person("a@example.com")
    _track(email, "signup")
    _read(1)
    start = clock.now() + timedelta(seconds=1)
    assert _advance(start).messages == 1  # one of the two workflows; the other held
    assert {row.Enrolment.step for row in _enrolments("welcome") + _enrolments("onboarding")} == {"hello"}

    nameless = "nameless@example.com"
    # welcome cannot render without first_name: that send fails; password-reset can
    contacts.create_contact(nameless, attributes={"reset_url": "https://example.com/reset"})
    _track(nameless, "signup")
    _read(1)
    _advance(start + timedelta(minutes=1))
    assert _sent(nameless) == [] and _enrolment("welcome", nameless).Enrolment.ended_reason == "failed"
    _track(nameless, "reset_requested")
    _read(1)
    assert _advance(start + timedelta(minutes=2)).messages == 1
    assert _tags(nameless) == ["reset"]


def test_waits_pass_by_the_scheduler_clock_without_explicit_times(wf):
    with pytest.raises(RuntimeError):
        clock.advance(60)  # the system clock cannot be moved
    wf.setenv("SMARTMAIL_SCHEDULER_CLOCK", "adjustable")
    reset_caches()
    try:
        _save("drip", _send("hello", "1"), {"id": "w", "type": "wait", "duration": "2d"}, _send("bye", "2"))
        email = _person("a@example.com")
        _track(email, "signup")
        _read(1)
        assert engine.advance().messages == 1
        assert not engine.any_due() and engine.due_count() == 0
        moved = clock.advance(2 * 86400 + 1)
        assert moved - utcnow() > timedelta(days=2)
        assert engine.any_due() and engine.due_count() == 1
        assert engine.advance_for(5) is False
        assert _tags(email) == ["1", "2"]
    finally:
        clock.reset()
    assert abs(clock.now() - utcnow()) < timedelta(seconds=5)


def test_a_long_chain_of_instant_steps_goes_on_at_the_next_advance(wf):
    chain = [{"id": f"s{i}", "type": "score", "points": 1} for i in range(engine.MAX_STEPS_PER_ADVANCE + 10)]
    _save("long", *chain)
    email = _person("a@example.com")
    _track(email, "signup")
    _read(1)
    at = clock.now() + timedelta(seconds=1)
    assert engine.advance(now=at).steps == engine.MAX_STEPS_PER_ADVANCE
    row = _enrolment("long", email).Enrolment
    assert (row.state, row.step, row.due_at) == ("active", f"s{engine.MAX_STEPS_PER_ADVANCE}", at)
    assert engine.advance(now=at).steps == 10
    assert contacts.get_contact(email)["attributes"]["lead_score"] == len(chain)
    assert _enrolment("long", email).Enrolment.ended_reason == "completed"


# --- What a review found -------------------------------------------------------------------------


def test_a_goal_read_in_the_same_page_as_the_trigger_converts_and_a_back_dated_one_does_not(wf):
    _save(
        "cart", {"id": "an-hour", "type": "wait", "duration": "1h"}, _send("reminder"), goal={"event": "order_placed"}
    )
    bought, backfilled = _person("bought@example.com"), _person("backfilled@example.com")
    for email in (bought, backfilled):
        _track(email, "signup")
    _track(bought, "order_placed")  # a second later, read in the same page as the signup
    _track(backfilled, "order_placed", occurred_at=utcnow() - timedelta(days=300))  # last year's order, loaded now
    _read(4)
    assert (_enrolment("cart", bought).Enrolment.state, _enrolment("cart", bought).Enrolment.ended_reason) == (
        "ended",
        "converted",
    )
    assert _enrolment("cart", backfilled).Enrolment.state == "active"
    start = clock.now() + timedelta(seconds=1)
    assert _advance(start).enrolments == 1  # its wait starts
    assert _advance(start + timedelta(hours=2)).messages == 1
    assert [len(_sent(email)) for email in (bought, backfilled)] == [0, 1]


def test_yaml_times_and_dates_stay_text_and_bad_rules_name_the_branch(wf):
    document = """
trigger: {event: signup}
steps:
  - {id: nine-thirty, type: wait, until: 09:30}
  - {id: late, type: wait, until: 18:45}
  - id: recent
    type: branch
    if: {rules: {attr: since, op: gt, value: 2024-01-01, type: date}}
    then: hello
  - {id: hello, type: send, template: welcome}
"""
    saved = workflows.save_workflow("yaml", document)[0]
    assert saved["definition"]["steps"][1]["until"] == "18:45"
    with pytest.raises(InvalidInput) as caught:
        _save("lists", {"id": "b", "type": "branch", "if": {"rules": {"list": "nope"}}, "then": "s"}, _send("s"))
    assert caught.value.field == "steps.b.if" and "nope" in caught.value.reason


def test_a_date_trigger_enrols_on_every_date_by_default_and_bad_manual_input_is_refused(wf):
    saved = _save("birthday", _send("hello"), trigger={"date": {"attribute": "birthday", "annual": True}})
    assert "entry" not in saved["definition"]
    _person("ann@example.com", birthday="1990-06-01")
    assert triggers.scan(now=datetime(2027, 6, 1, 12, 0)) == 1
    assert triggers.scan(now=datetime(2028, 6, 1, 12, 0)) == 1  # next year again
    with pytest.raises(InvalidInput) as caught:
        reports.enrol_contact("birthday", "ann@example.com", {"x": float("nan")})
    assert caught.value.field.startswith("properties")
    with pytest.raises(InvalidInput) as caught:
        reports.simulate("birthday", "ann@example.com", start=datetime(9999, 12, 31))
    assert caught.value.field == "start"
