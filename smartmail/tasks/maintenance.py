"""Beat tasks: queue due messages and reconcile with the broker."""

from smartmail.workers import maintenance
from smartmail.workers.app import app


@app.task(name="smartmail.maintenance.enqueue_due")
def enqueue_due() -> None:
    maintenance.enqueue_due()


@app.task(name="smartmail.maintenance.reconcile")
def reconcile() -> None:
    maintenance.reconcile()
