"""The Celery app; configured from settings on first use, with per-process resources reset after fork."""
from __future__ import annotations

from celery import Celery
from celery.signals import beat_init, celeryd_init, task_postrun, worker_process_init, worker_process_shutdown

from smartmail.config import get_settings
from smartmail.config.celery import celery_config
from smartmail.logs import configure as configure_logging

app = Celery("smartmail", include=["smartmail.tasks.send", "smartmail.tasks.maintenance",
                                     "smartmail.tasks.imports", "smartmail.tasks.campaigns"])


@app.on_configure.connect
def _configure(sender: Celery, **_kwargs) -> None:
    sender.conf.update(celery_config(get_settings()))


@celeryd_init.connect
@beat_init.connect
def _configure_logging(**_kwargs) -> None:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)


@celeryd_init.connect
def _check_policy(**_kwargs) -> None:
    """A worker must not start on a malformed traffic-shaping policy."""
    from smartmail.workers.policy import PolicyError, get_policy

    if get_settings().shaping:
        try:
            get_policy()
        except PolicyError as exc:
            # SystemExit, because Celery's signal dispatch logs and swallows ordinary exceptions.
            raise SystemExit(f"error: {exc}") from None


@worker_process_init.connect
def _after_fork(**_kwargs) -> None:
    # A prefork child must not share the parent's database connections or SMTP sockets.
    from smartmail.store.engine import forget_engines
    from smartmail.workers import transports

    forget_engines(close=False)
    transports._transport = None  # forget, without QUIT: those sockets are the parent's


@task_postrun.connect
def _flush_handoff(**_kwargs) -> None:
    # A task that called send() may be its process's last: prefork children end with os._exit.
    from smartmail.producer.handoff import flush

    flush()


@worker_process_shutdown.connect
def _close_transport(**_kwargs) -> None:
    from smartmail.producer.handoff import flush
    from smartmail.workers.transports import set_transport

    flush()
    set_transport(None)  # QUIT pooled SMTP connections
