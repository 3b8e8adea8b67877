"""Beat task: delete events older than the retention period."""

from smartmail.feedback import retention
from smartmail.workers.app import app


# Hourly, on the default queue; idempotent, so a redelivered or overlapping run only finds less to delete.
@app.task(name="smartmail.maintenance.delete_old_events")
def delete_old_events() -> None:
    retention.delete_old_events()


# Hourly, on the default queue: processed inbound mail past SMARTMAIL_INBOUND_RETENTION_DAYS.
@app.task(name="smartmail.maintenance.delete_old_inbound")
def delete_old_inbound() -> None:
    retention.delete_old_inbound()
