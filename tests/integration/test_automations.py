"""Automations on real processes: beat, workers and an SMTP server; time moved by the scheduler's clock, not slept."""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter, defaultdict

import httpx
import pytest
from sqlalchemy import func, insert, select, text

import smartmail
from smartmail.audience.contacts import create_contact, upsert_many
from smartmail.audience.event_stream import Position
from smartmail.automations import clock, reports, workflows
from smartmail.content.template_store import save_template
from smartmail.store.engine import get_engine, session_scope, utcnow
from smartmail.store.models import Contact, Enrolment, Event, Message, StepRun, StreamCheckpoint, Workflow
from tests.conftest import reset_caches, wait_for

pytestmark = pytest.mark.integration

DAY = 24 * 3600
PUBLIC_URL = "https://mail.example.com"
HUMAN = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0"
_OPEN_PIXEL = re.compile(r"https://mail\.example\.com(/t/o/[A-Za-z0-9._-]*[A-Za-z0-9_-])")
_UNSUBSCRIBE = re.compile(r"<https://mail\.example\.com(/unsubscribe/[^>]+)>")
# Template name -> subject: each received email says by its subject which step sent it.
TEMPLATES = {
    "drip-welcome": "Welcome (1/3)",
    "drip-tips": "Tips (2/3)",
    "drip-offer": "Offer (3/3)",
    "keen": "Since you read us",
    "nudge": "Did you miss this?",
}
QUIET_SECONDS = 2.0  # several beat ticks (0.3 s): long enough for anything due to be sent

DRIP = {
    "description": "Three emails two and three days apart, until the first order",
    "trigger": {"event": "signup"},
    "goal": {"event": "order_placed"},
    "sender": "Shop <shop@example.com>",
    "steps": [
        {"id": "welcome", "type": "send", "template": "drip-welcome"},
        {"id": "two-days", "type": "wait", "duration": "2d"},
        {"id": "tips", "type": "send", "template": "drip-tips"},
        {"id": "three-days", "type": "wait", "duration": "3d"},
        {"id": "offer", "type": "send", "template": "drip-offer"},
    ],
}


@pytest.fixture
def relay(env, smtp_server, monkeypatch):
    """`env` with the SMTP server, the adjustable scheduler's clock at the system time, a fast
    automation tick, no trigger scan (event triggers only: the scan plays no part) and the templates."""
    values = {
        "SMARTMAIL_SMTP_URL": f"smtp://127.0.0.1:{smtp_server.port}?tls=none",
        "SMARTMAIL_PUBLIC_URL": PUBLIC_URL,
        "SMARTMAIL_SCHEDULER_CLOCK": "adjustable",
        "SMARTMAIL_AUTOMATION_INTERVAL": "0.3",
        "SMARTMAIL_AUTOMATION_SCAN_INTERVAL": "3600",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    reset_caches()
    clock.reset()
    with session_scope() as session:
        for name, subject in TEMPLATES.items():
            save_template(
                session,
                name,
                subject=subject,
                html=f"<p>{subject}, {{{{ first_name | default('friend') }}}}.</p>",
                text=f"{subject}.",
            )
    yield smtp_server
    clock.reset()


@pytest.fixture
def processes(start_worker, start_beat):
    """Start what runs automations, as the Procfile does: a worker on `bulk` (the advance tasks, and
    the workflow emails' delivery from the bulk outbox), a worker on `default` and `events` (beat's
    tick; tracking hits are stored from `events`) and beat. Returns the `bulk` worker."""

    def start():
        bulk = start_worker(concurrency=2, queues="bulk")
        start_worker(concurrency=2, queues="default,events")
        start_beat()
        return bulk

    return start


# --- Reading what was received and stored ------------------------------------------------------


def received(relay) -> dict[str, list[str]]:
    """{recipient: subjects of the emails received, in the order they arrived}."""
    found: dict[str, list[str]] = defaultdict(list)
    for message in list(relay.messages):
        found[message.rcpt_tos[0]].append(message.parsed()["Subject"])
    return dict(found)


def enrolments(workflow: str) -> dict[str, tuple[str, str | None]]:
    """{contact email: (state, ended reason)} of the workflow's enrolments."""
    with session_scope() as session:
        rows = session.execute(
            select(Contact.email, Enrolment.state, Enrolment.ended_reason)
            .join(Contact, Contact.id == Enrolment.contact_id)
            .join(Workflow, Workflow.id == Enrolment.workflow_id)
            .where(Workflow.name == workflow)
        ).all()
    found = {row.email: (row.state, row.ended_reason) for row in rows}
    assert len(found) == len(rows), "a contact enrolled twice"
    return found


def stays(relay, count: int, seconds: float = QUIET_SECONDS) -> None:
    """Nothing more arrives for `seconds` of beat ticks (the SMTP server holds `count` emails)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert relay.count == count, f"{relay.count - count} unexpected emails: {received(relay)}"
        time.sleep(0.1)


def reader_passed(event_id: int) -> bool:
    """Whether the automations' event reader has read past the event (its checkpoint is beyond it)."""
    with session_scope() as session:
        xact = session.scalar(select(Event.xact).where(Event.id == event_id))
        position = session.scalar(select(StreamCheckpoint.position).where(StreamCheckpoint.name == "automations"))
    return position is not None and Position.parse(position) >= Position(xact, event_id)


def one_message_row_per_step_run() -> list:
    """Every workflow message: one per (enrolment, run), named by its step run, sent. Their rows."""
    with session_scope() as session:
        rows = session.execute(
            select(Message.id, Message.idempotency_key, Message.state, Message.tags, Message.contact_id).where(
                Message.idempotency_key.like("workflow:%")
            )
        ).all()
        runs = {
            row.message_id: (row.enrolment_id, row.run)
            for row in session.execute(
                select(StepRun.message_id, StepRun.enrolment_id, StepRun.run).where(StepRun.message_id.is_not(None))
            )
        }
    keys = Counter(row.idempotency_key for row in rows)
    assert not [key for key, n in keys.items() if n > 1]
    assert len(runs) == len(rows)
    for row in rows:
        enrolment_id, run = runs[row.id]
        assert row.idempotency_key == f"workflow:{enrolment_id}:{run}"
        assert row.state == "sent" and row.contact_id is not None, row
    return rows


# --- Tests -----------------------------------------------------------------------------------------


def test_a_three_step_drip_sends_each_step_once_in_order_and_nothing_after_a_conversion_or_an_unsubscribe(
    relay, api, processes
):
    people = {f"p{n}@drip.example": f"P{n}" for n in range(5)}
    converts, leaves = "p0@drip.example", "p1@drip.example"
    for email, name in people.items():
        create_contact(email, attributes={"first_name": name})
    workflows.save_workflow("drip", DRIP)
    processes()
    for email in people:
        smartmail.track(email, "signup", {"plan": "pro"})

    wait_for(lambda: relay.count == 5, 30, message=lambda: f"step 1 sent to all; have {received(relay)}")
    assert received(relay) == {email: ["Welcome (1/3)"] for email in people}
    first = relay.messages[0].parsed()
    assert first["From"] == "Shop <shop@example.com>" and first["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert f"Welcome (1/3), {people[first['To']]}." in first.get_body(("html",)).get_content()

    smartmail.track(converts, "order_placed", {"total": 42})
    wait_for(lambda: enrolments("drip")[converts] == ("ended", "converted"), 10, message="the goal reached")
    # A wait is a wait: an hour short of two days, nothing is due.
    clock.advance(2 * DAY - 3600)
    stays(relay, 5)
    clock.advance(3600 + 60)
    wait_for(lambda: relay.count == 9, 20, message=lambda: f"step 2 sent; have {received(relay)}")

    # Unsubscribed through the RFC 8058 one-click POST to the List-Unsubscribe URL of the email it got.
    tips = next(m.parsed() for m in relay.messages if m.rcpt_tos[0] == leaves and "Tips" in m.parsed()["Subject"])
    path = _UNSUBSCRIBE.search(tips["List-Unsubscribe"]).group(1)
    answer = httpx.post(api.url + path, data={"List-Unsubscribe": "One-Click"}, timeout=10)
    assert answer.status_code == 200
    assert smartmail.contacts.get_contact(leaves)["status"] == "unsubscribed"

    clock.advance(3 * DAY + 60)
    wait_for(lambda: relay.count == 12, 20, message=lambda: f"step 3 sent; have {received(relay)}")
    wait_for(lambda: all(state == "ended" for state, _ in enrolments("drip").values()), 10, message="all ended")
    clock.advance(30 * DAY)  # whatever was left would be due by now
    stays(relay, 12)

    everyone = ["Welcome (1/3)", "Tips (2/3)", "Offer (3/3)"]
    assert received(relay) == {
        **{email: everyone for email in people},
        converts: ["Welcome (1/3)"],
        leaves: ["Welcome (1/3)", "Tips (2/3)"],
    }
    assert enrolments("drip") == {
        **{email: ("ended", "completed") for email in people},
        converts: ("ended", "converted"),
        leaves: ("ended", "unsubscribed"),
    }
    rows = one_message_row_per_step_run()
    assert len(rows) == 12 and all(row.tags == ["workflow:drip"] for row in rows)
    status = reports.status("drip")
    assert status["enrolled"] == 5 and status["ended"] == {"completed": 3, "converted": 1, "unsubscribed": 1}
    assert {step: runs["emails"] for step, runs in status["steps"].items()} == {
        "welcome": 5,
        "two-days": 0,
        "tips": 4,
        "three-days": 0,
        "offer": 3,
    }
    assert status["conversions"] == 1


def test_a_branch_on_the_previous_email_follows_opens_made_through_the_tracking_endpoint(relay, api, processes):
    workflows.save_workflow(
        "engaged",
        {
            "trigger": {"event": "signup"},
            "steps": [
                {"id": "hello", "type": "send", "template": "drip-welcome"},
                {"id": "a-day", "type": "wait", "duration": "1d"},
                {
                    "id": "read-it",
                    "type": "branch",
                    "if": {"previous_email": "opened"},
                    "then": "keen",
                    "else": "nudge",
                },
                {"id": "keen", "type": "send", "template": "keen", "next": "done"},
                {"id": "nudge", "type": "send", "template": "nudge"},
                {"id": "done", "type": "exit"},
            ],
        },
    )
    for email in ("reader@branch.example", "skipper@branch.example"):
        create_contact(email, attributes={"first_name": email.split("@")[0]})
    processes()
    for email in ("reader@branch.example", "skipper@branch.example"):
        smartmail.track(email, "signup")
    wait_for(lambda: relay.count == 2, 30, message="the first emails")

    # The reader's mail client loads the open pixel of the email it received, from `smartmail web`.
    hello = next(m.parsed() for m in relay.messages if m.rcpt_tos[0] == "reader@branch.example")
    pixels = _OPEN_PIXEL.findall(hello.get_body(("html",)).get_content())
    assert len(pixels) == 1
    answer = httpx.get(api.url + pixels[0], headers={"User-Agent": HUMAN}, timeout=10)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/gif"

    def opened() -> list:
        with session_scope() as session:
            return list(session.scalars(select(Event).where(Event.type == "opened")))

    wait_for(opened, 20, message="the open stored by the events worker")
    assert [event.machine for event in opened()] == [False]
    clock.advance(DAY + 60)
    wait_for(lambda: relay.count == 4, 20, message=lambda: f"the branch's emails; have {received(relay)}")
    wait_for(lambda: all(state == "ended" for state, _ in enrolments("engaged").values()), 10, message="all ended")
    stays(relay, 4)

    assert received(relay) == {
        "reader@branch.example": ["Welcome (1/3)", "Since you read us"],
        "skipper@branch.example": ["Welcome (1/3)", "Did you miss this?"],
    }
    with session_scope() as session:
        ways = dict(
            session.execute(
                select(Contact.email, StepRun.outcome)
                .join(Contact, Contact.id == StepRun.contact_id)
                .where(StepRun.step == "read-it")
            ).all()
        )
    assert ways == {"reader@branch.example": "then", "skipper@branch.example": "else"}
    assert enrolments("engaged") == {
        "reader@branch.example": ("ended", "exited"),
        "skipper@branch.example": ("ended", "exited"),
    }
    one_message_row_per_step_run()


# Rendering cost per email of the slow template (a Jinja loop): with pages of 100, one page's
# transaction lasts most of a second, so a kill lands inside one.
SLOW_HTML = (
    "{% set ns = namespace(n=0) %}{% for i in range(1500) %}{% set ns.n = ns.n + i %}{% endfor %}"
    "<p>Welcome {{ email }} ({{ ns.n }}).</p>"
)


def _locked_at_first_step(workflow_id: int) -> set[int]:
    """Enrolments still at the first step that another transaction holds locked: a page being advanced.
    (A share lock taken and dropped at once: the advance skips locked rows, so it only looks away.)"""
    with get_engine().connect() as connection:
        at_first = """SELECT id FROM enrolments WHERE workflow_id = :w AND state = 'active' AND step = 'first'"""
        every = set(connection.scalars(text(at_first), {"w": workflow_id}))
        free = set(connection.scalars(text(at_first + " FOR SHARE SKIP LOCKED"), {"w": workflow_id}))
        connection.rollback()
    return every - free


def test_kill_9_of_the_worker_advancing_enrolments_mid_page_sends_no_step_twice_and_skips_none(
    relay, processes, start_worker, monkeypatch
):
    if os.environ["SMARTMAIL_DATABASE_URL"].startswith("sqlite"):
        pytest.skip("finding the page in flight takes PostgreSQL's row locks (SKIP LOCKED)")
    total = 2000
    monkeypatch.setenv("SMARTMAIL_AUTOMATION_BATCH_SIZE", "100")
    # Messages committed by a page whose hand-off to the bulk queue died with the worker: re-queued soon.
    monkeypatch.setenv("SMARTMAIL_RECONCILE_INTERVAL", "1")
    monkeypatch.setenv("SMARTMAIL_RECONCILE_QUEUED_AFTER", "5")
    reset_caches()
    with session_scope() as session:
        save_template(session, "slow-welcome", subject="First", html=SLOW_HTML, text="Welcome.")
    upsert_many([{"email": f"c{n:04d}@kill.example"} for n in range(total)])
    workflows.save_workflow(
        "burst",
        {
            "trigger": {"event": "signup"},
            "steps": [
                {"id": "first", "type": "send", "template": "slow-welcome"},
                {"id": "a-day", "type": "wait", "duration": "1d"},
                {"id": "second", "type": "send", "template": "drip-tips"},
            ],
        },
    )
    with session_scope() as session:
        workflow_id = session.scalar(select(Workflow.id).where(Workflow.name == "burst"))
    victim = processes()
    # One burst of events, as a batch of track() calls writes them.
    with get_engine().begin() as connection:
        contact_ids = connection.scalars(select(Contact.id).order_by(Contact.id)).all()
        connection.execute(
            insert(Event),
            [{"type": "signup", "contact_id": cid, "properties": {}, "occurred_at": utcnow()} for cid in contact_ids],
        )

    def first_runs() -> int:
        with session_scope() as session:
            return session.scalar(select(func.count()).select_from(StepRun).where(StepRun.step == "first"))

    wait_for(lambda: first_runs() >= 300, 60, message="some pages advanced")
    # Freeze the worker (its open transaction stays open), look for rows a page of it holds, kill it
    # then: so the kill is inside a page, never between two (else let it run a moment and look again).
    for _ in range(100):
        os.killpg(victim.popen.pid, signal.SIGSTOP)
        in_flight = _locked_at_first_step(workflow_id)
        if in_flight:
            victim.kill9()
            break
        os.killpg(victim.popen.pid, signal.SIGCONT)
        time.sleep(0.05)
    else:
        pytest.fail("never caught the worker inside a page")
    done_at_kill = first_runs()
    print(f"killed with {done_at_kill} first steps committed and {len(in_flight)} enrolments in a page")
    assert done_at_kill < total, "every page committed before the kill; the test proved nothing"
    with session_scope() as session:  # the page in flight was rolled back: none of its steps ran
        assert not session.scalar(
            select(func.count()).select_from(StepRun).where(StepRun.enrolment_id.in_(sorted(in_flight)))
        )

    # Two new workers: the rolled-back page and the rest are shared out among them (SKIP LOCKED).
    start_worker.many(2, concurrency=2, queues="bulk")
    wait_for(lambda: relay.count >= total, 120, interval=0.5, message=lambda: f"step 1 to all; {relay.count} received")
    clock.advance(DAY + 60)
    wait_for(
        lambda: relay.count >= 2 * total, 120, interval=0.5, message=lambda: f"step 2 to all; {relay.count} received"
    )
    wait_for(lambda: all(state == "ended" for state, _ in enrolments("burst").values()), 20, message="all ended")
    stays(relay, 2 * total)

    got = Counter((message.rcpt_tos[0], message.parsed()["Subject"]) for message in relay.messages)
    twice = [key for key, n in got.items() if n > 1]
    assert not twice, f"sent twice: {twice[:5]}"
    emails = {f"c{n:04d}@kill.example" for n in range(total)}
    assert {email for email, subject in got if subject == "First"} == emails
    assert {email for email, subject in got if subject == "Tips (2/3)"} == emails
    assert len(one_message_row_per_step_run()) == 2 * total
    with session_scope() as session:
        per_step = Counter(
            session.execute(select(StepRun.enrolment_id, StepRun.step).where(StepRun.workflow_id == workflow_id)).all()
        )
    assert set(per_step.values()) == {1} and len(per_step) == 2 * total  # the two sends: a wait leaves no row
    assert enrolments("burst") == {email: ("ended", "completed") for email in emails}


def test_an_event_trigger_enrols_and_sends_within_seconds_on_the_default_tick(relay, processes, monkeypatch):
    monkeypatch.delenv("SMARTMAIL_AUTOMATION_INTERVAL")  # the default tick, 1 s
    reset_caches()
    workflows.save_workflow(
        "instant", {"trigger": {"event": "lead_created"}, "steps": [{"id": "hi", "type": "send", "template": "keen"}]}
    )
    processes()
    tracked = {}
    for n in range(3):
        email = f"lead{n}@fast.example"
        tracked[email] = time.time()
        smartmail.track(email, "lead_created", {"source": "form"})
        time.sleep(0.7)  # at different moments of the tick
    wait_for(lambda: relay.count == 3, 20, message="the emails")
    latency = {message.rcpt_tos[0]: message.at - tracked[message.rcpt_tos[0]] for message in relay.messages}
    print(f"track() to the SMTP server: {latency}")
    assert max(latency.values()) < 10, latency


def test_a_paused_workflow_holds_its_enrolments_past_their_due_time_and_resuming_releases_them(relay, processes):
    workflows.save_workflow("drip", DRIP)
    people = ["a@pause.example", "b@pause.example"]
    processes()
    for email in people:
        smartmail.track(email, "signup")
    wait_for(lambda: relay.count == 2, 30, message="step 1")
    wait_for(
        lambda: enrolments("drip") == {email: ("active", None) for email in people}, 10, message="waiting at step 2"
    )

    assert workflows.pause_workflow("drip") == 2
    assert enrolments("drip") == {email: ("held", None) for email in people}
    clock.advance(10 * DAY)  # both waits long over
    late = smartmail.track("late@pause.example", "signup")  # a paused workflow enrols nobody
    wait_for(lambda: reader_passed(late), 10, message="the event reader past the late signup")
    stays(relay, 2)
    assert enrolments("drip") == {email: ("held", None) for email in people}
    assert workflows.get_workflow("drip")["state"] == "paused"

    assert workflows.resume_workflow("drip") == 2
    wait_for(lambda: relay.count == 4, 10, message=lambda: f"step 2 after resuming; have {received(relay)}")
    clock.advance(3 * DAY + 60)
    wait_for(lambda: relay.count == 6, 10, message=lambda: f"step 3; have {received(relay)}")
    stays(relay, 6)
    assert received(relay) == {email: ["Welcome (1/3)", "Tips (2/3)", "Offer (3/3)"] for email in people}
    assert enrolments("drip") == {email: ("ended", "completed") for email in people}
    one_message_row_per_step_run()
