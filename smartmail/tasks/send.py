"""Delivery task for transactional messages."""
from sqlalchemy.exc import OperationalError

from smartmail import delivery
from smartmail.workers.app import app


# A database outage is retried shortly; anything else leaves the rows queued for the reconciler.
@app.task(name="smartmail.deliver", autoretry_for=(OperationalError,), retry_backoff=2, retry_backoff_max=60,
          max_retries=5)
def deliver(message_ids: list[str]) -> None:
    delivery.deliver(message_ids)
