"""Delivery tasks: drains of the Redis outboxes (see workers/dispatch.py), transactional and bulk."""
from sqlalchemy.exc import OperationalError

from smartmail import delivery
from smartmail.workers.app import app
from smartmail.workers.dispatch import BULK, TRANSACTIONAL, get_outbox, publish_drains


def _drain(task, lease: str, stream: str) -> None:
    ids = get_outbox(stream).pop(lease)
    if isinstance(ids, float):  # this drain times the waiting ids: back when the first is due
        task.apply_async((lease,), countdown=ids)
        return
    if not ids:
        return
    # Publish the follow-up first: while this batch is delivered, another worker process can
    # already take the next one.
    publish_drains([lease], stream)
    delivery.deliver(ids, stream=stream)


# A database outage is retried shortly; the ids of the failed batch stay `queued` in the
# database, and the reconciler pushes them to the outbox again.
@app.task(name="smartmail.drain", autoretry_for=(OperationalError,), retry_backoff=2, retry_backoff_max=60,
          max_retries=5)
def drain(lease: str) -> None:
    _drain(drain, lease, TRANSACTIONAL)


@app.task(name="smartmail.drain_bulk", autoretry_for=(OperationalError,), retry_backoff=2, retry_backoff_max=60,
          max_retries=5)
def drain_bulk(lease: str) -> None:
    _drain(drain_bulk, lease, BULK)
