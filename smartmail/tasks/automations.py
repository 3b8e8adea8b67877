"""Automation tasks: beat's tick (new events, then due enrolments; `default`), the advance and the scan (`bulk`)."""

from smartmail.automations import engine, enrolment, triggers
from smartmail.config import get_settings
from smartmail.workers.app import app
from smartmail.workers.dispatch import publish

TICK_TASK = "smartmail.automations.tick"
ADVANCE_TASK = "smartmail.automations.advance"
SCAN_TASK = "smartmail.automations.scan"
# One advance task's turn; it asks for another when more is due. Short, so a bulk worker's processes
# take turns between advancing and delivering.
ADVANCE_SECONDS = 3.0


@app.task(name=TICK_TASK)
def tick() -> None:
    interval = get_settings().automation_interval
    read = enrolment.read_events(max_seconds=interval)
    if read.more:  # a burst: read on in a new task, so the transactional drains sharing `default` get turns
        publish(TICK_TASK, expires=interval * 5)
    # One advance per tick: each claims its own pages (SKIP LOCKED), so bulk workers on several
    # machines share a burst, while one worker keeps a process free for delivering.
    if read.enrolled or read.woken or engine.any_due():
        publish(ADVANCE_TASK, expires=interval)


@app.task(name=ADVANCE_TASK)
def advance() -> None:
    if engine.advance_for(ADVANCE_SECONDS):
        publish(ADVANCE_TASK, expires=get_settings().automation_interval * 5)


@app.task(name=SCAN_TASK)
def scan() -> None:
    if triggers.scan():
        publish(ADVANCE_TASK, expires=get_settings().automation_interval * 5)
