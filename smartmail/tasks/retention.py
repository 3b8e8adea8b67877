"""Beat tasks: delete events, inbound mail and webhook deliveries older than their retention periods."""

from smartmail.feedback import retention
from smartmail.webhooks import deliveries
from smartmail.workers.app import app


# Hourly, on the default queue; idempotent, so a redelivered or overlapping run only finds less to delete.
@app.task(name="smartmail.maintenance.delete_old_events")
def delete_old_events() -> None:
    retention.delete_old_events()


# Hourly, on the default queue: processed inbound mail past SMARTMAIL_INBOUND_RETENTION_DAYS.
@app.task(name="smartmail.maintenance.delete_old_inbound")
def delete_old_inbound() -> None:
    retention.delete_old_inbound()


# Hourly, on the default queue: finished webhook deliveries and attempts past SMARTMAIL_WEBHOOK_RETENTION_DAYS.
@app.task(name="smartmail.maintenance.delete_old_webhook_deliveries")
def delete_old_webhook_deliveries() -> None:
    deliveries.delete_old()
