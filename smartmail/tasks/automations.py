"""Automation tasks: beat's tick (new events, then due enrolments) and scan (list, segment, date, no-open triggers)."""

from smartmail.automations import engine, enrolment, triggers
from smartmail.config import get_settings
from smartmail.workers.app import app
from smartmail.workers.dispatch import publish

TICK_TASK = "smartmail.automations.tick"
ADVANCE_TASK = "smartmail.automations.advance"
SCAN_TASK = "smartmail.automations.scan"
# Advance tasks asked for at once when enrolments are due: each claims its own pages (SKIP LOCKED),
# so the default workers' processes share a burst.
PARALLEL_ADVANCES = 2
ADVANCE_SECONDS = 10.0  # one advance task's turn; it asks for another when more is due


@app.task(name=TICK_TASK)
def tick() -> None:
    interval = get_settings().automation_interval
    read = enrolment.read_events(max_seconds=interval * 5)
    if read.more:
        publish(TICK_TASK, expires=interval * 5)
    if read.enrolled or read.woken or engine.any_due():
        for _ in range(PARALLEL_ADVANCES):
            publish(ADVANCE_TASK, expires=interval * 5)


@app.task(name=ADVANCE_TASK)
def advance() -> None:
    if engine.advance_for(ADVANCE_SECONDS):
        publish(ADVANCE_TASK, expires=get_settings().automation_interval * 5)


@app.task(name=SCAN_TASK)
def scan() -> None:
    if triggers.scan():
        publish(ADVANCE_TASK, expires=get_settings().automation_interval * 5)
