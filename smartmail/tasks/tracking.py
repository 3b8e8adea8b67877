"""Events-queue tasks: store the opens and clicks the web processes buffered in Redis."""

from smartmail.feedback import engagement
from smartmail.workers.app import app
from smartmail.workers.dispatch import publish


@app.task(name=engagement.DRAIN_TASK)
def drain() -> None:
    _, more = engagement.drain()
    if more:  # time was up with hits left: a new task, so other work on the queue gets its turn
        publish(engagement.DRAIN_TASK)
