"""Webhooks-queue tasks: turn new events into deliveries, and send an endpoint's due deliveries."""

from smartmail.webhooks import deliveries, fan_out
from smartmail.workers.app import app
from smartmail.workers.dispatch import publish


@app.task(name=fan_out.FAN_OUT_TASK)
def fan_out_events() -> None:
    fanned = fan_out.fan_out()
    for endpoint_id in sorted(fanned.endpoint_ids):
        publish(deliveries.SEND_TASK, endpoint_id)
    if fanned.more:  # time was up with events left: a new task, so sends on the queue get their turn
        publish(fan_out.FAN_OUT_TASK)


@app.task(name=deliveries.SEND_TASK)
def send(endpoint_id: int) -> None:
    if deliveries.drain(endpoint_id):
        publish(deliveries.SEND_TASK, endpoint_id)


@app.task(name=deliveries.TICK_TASK)
def tick() -> None:
    """Beat's look: new events to fan out, and endpoints with due deliveries and no drain."""
    fan_out_events()
    for endpoint_id in deliveries.due_endpoints():
        publish(deliveries.SEND_TASK, endpoint_id)
