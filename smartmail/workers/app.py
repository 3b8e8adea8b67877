"""The Celery app, configured from settings on first use; per-process state is reset after fork by smartmail.runtime."""

from __future__ import annotations

from celery import Celery
from celery.signals import beat_init, celeryd_init, worker_process_shutdown

from smartmail.config import get_settings
from smartmail.config.celery import celery_config, quiet_broker_outages
from smartmail.logs import configure as configure_logging

app = Celery(
    "smartmail",
    include=[
        "smartmail.tasks.send",
        "smartmail.tasks.maintenance",
        "smartmail.tasks.imports",
        "smartmail.tasks.campaigns",
        "smartmail.tasks.tracking",
        "smartmail.tasks.inbound",
        "smartmail.tasks.process_hooks",
        "smartmail.tasks.retention",
        "smartmail.tasks.webhooks",
        "smartmail.tasks.automations",
        "smartmail.tasks.engagement",
        "smartmail.tasks.analytics",
    ],
)


# Read when the configuration is first needed (Celery's lazy defaults): a `conf.update()` in an
# on_configure handler notifies amqp's conf observer, which reads the still-pending conf and
# re-enters the configuration: a RecursionError that Celery's signal dispatch logs and swallows.
app.add_defaults(lambda: celery_config(get_settings()))


@celeryd_init.connect
@beat_init.connect
def _configure_logging(signal=None, **_kwargs) -> None:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    quiet_broker_outages("beat" if signal is beat_init else "worker")


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


@worker_process_shutdown.connect
def _close_transport(**_kwargs) -> None:
    from smartmail.workers.transports import set_transport

    set_transport(None)  # QUIT pooled SMTP connections
