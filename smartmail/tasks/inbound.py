"""Events-queue task: process the mail `smartmail inbound` stored (bounces, complaints, mailto unsubscribes)."""

from smartmail.campaigns import feedback_guard
from smartmail.feedback import inbound
from smartmail.workers.app import app
from smartmail.workers.dispatch import publish


@app.task(name=inbound.PROCESS_TASK)
def process() -> None:
    processed = inbound.process_pending()
    feedback_guard.pause_if_unhealthy(processed.applied.campaign_ids)
    if processed.more:  # time was up with mail left: a new task, so other work on the queue gets its turn
        publish(inbound.PROCESS_TASK)
