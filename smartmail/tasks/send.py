"""Delivery tasks: drains of the Redis outboxes (see workers/dispatch.py), transactional and bulk."""

import time

import structlog
from kombu.exceptions import KombuError
from redis.exceptions import RedisError
from sqlalchemy.exc import OperationalError

from smartmail.outage import Outage
from smartmail.workers import delivery
from smartmail.workers.app import app
from smartmail.workers.dispatch import BULK, DRAIN_TASKS, TRANSACTIONAL, get_outbox, publish

log = structlog.get_logger("smartmail.dispatch")

# A drain keeps its lease and delivers batch after batch (a backlog, or what arrived meanwhile) for
# up to this long before it hands over to a new task: a task per batch would cost each batch a claim
# and a recording the worker waits for, and a task switch. Worker processes share a backlog through
# the drains its enqueue starts (up to SMARTMAIL_DISPATCH_DRAINS).
LOOP_SECONDS = 1.0

# Per stream and process: a broker outage is one warning line, however many drains fail in it.
_broker = {stream: Outage(f"drain.{stream}", log) for stream in (TRANSACTIONAL, BULK)}


def _drain(task, lease: str, stream: str) -> None:
    outbox = get_outbox(stream)
    deadline = time.monotonic() + LOOP_SECONDS
    token = task.request.id or lease  # names this run's in-flight list (dispatch._POP)

    def batches():
        # A broker failure here ends the drain but not the delivery: the windows claimed so far
        # are still sent and recorded. Ids left in the outbox wait for this drain's lease to
        # expire; then the next enqueue, or beat's, starts another drain.
        try:
            while True:
                ids = outbox.pop(lease, token)
                _broker[stream].ok()
                if isinstance(ids, float):  # this drain times the waiting ids: back when the first is due
                    task.apply_async((lease,), countdown=ids)
                    return
                if not ids:  # the lease ended with this pop
                    return
                if time.monotonic() > deadline:
                    break
                yield ids
        except (RedisError, KombuError, OSError) as exc:
            _broker[stream].failed(exc)
            return
        # More may be waiting: publish the follow-up first, so that another worker process can
        # take the next batch while this one is delivered.
        try:
            publish(DRAIN_TASKS[stream], lease)
        except (RedisError, KombuError, OSError) as exc:
            _broker[stream].failed(exc)
        yield ids

    delivery.deliver([], stream=stream, more=batches())
    try:
        outbox.finish(token)
    except (RedisError, OSError) as exc:  # its list goes back to the outbox once the lease lapses: harmless
        _broker[stream].failed(exc)


# A database outage is retried shortly; the ids of the failed batch stay `queued` in the
# database, and the reconciler pushes them to the outbox again.
@app.task(
    name="smartmail.drain", autoretry_for=(OperationalError,), retry_backoff=2, retry_backoff_max=60, max_retries=5
)
def drain(lease: str) -> None:
    _drain(drain, lease, TRANSACTIONAL)


@app.task(
    name="smartmail.drain_bulk", autoretry_for=(OperationalError,), retry_backoff=2, retry_backoff_max=60, max_retries=5
)
def drain_bulk(lease: str) -> None:
    _drain(drain_bulk, lease, BULK)
