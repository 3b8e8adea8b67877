"""Worker process hooks: ids a task handed off are pushed before the process can end; its live metrics go with it."""

import os

from celery.signals import task_postrun, worker_process_shutdown

from smartmail.producer.handoff import flush
from smartmail.workers import metrics


@task_postrun.connect
def _flush_handoff(**_kwargs) -> None:
    # A task that called send() may be its process's last: prefork children end with os._exit.
    flush()


@worker_process_shutdown.connect
def _flush_before_exit(**_kwargs) -> None:
    flush()
    metrics.mark_process_dead(os.getpid())
