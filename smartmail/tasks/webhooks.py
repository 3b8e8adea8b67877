"""Webhook tasks: turn new events into deliveries (beat's tick, on `default`), and drain an endpoint (on `webhooks`)."""

from smartmail.config import get_settings
from smartmail.webhooks import drain, fan_out
from smartmail.workers.app import app
from smartmail.workers.dispatch import publish

# A send task not started by then is dropped: the next tick asks again for any endpoint still due,
# so a busy webhooks worker does not find a queue of stale requests for the same endpoints.
SEND_EXPIRES = 30.0


def _send_later(endpoint_ids) -> None:
    for endpoint_id in sorted(endpoint_ids):
        publish(drain.SEND_TASK, endpoint_id, expires=SEND_EXPIRES)


@app.task(name=fan_out.FAN_OUT_TASK)
def fan_out_events() -> None:
    fanned = fan_out.fan_out(max_seconds=get_settings().webhook_poll_interval)
    _send_later(fanned.endpoint_ids)
    if fanned.more:  # time was up with events left: a new task, so other beat jobs get their turn
        publish(fan_out.FAN_OUT_TASK)


@app.task(name=drain.SEND_TASK)
def send(endpoint_id: int) -> None:
    if drain.drain(endpoint_id):
        publish(drain.SEND_TASK, endpoint_id, expires=SEND_EXPIRES)


@app.task(name=drain.TICK_TASK)
def tick() -> None:
    """Beat's look: new events to fan out, and endpoints with due deliveries and no drain."""
    fan_out_events()
    _send_later(drain.due_endpoints())
