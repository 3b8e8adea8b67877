"""Celery configuration: queues, routing, the reliability settings of DESIGN.md, and the beat schedule."""

from __future__ import annotations

import logging
from collections.abc import Callable

import structlog
from kombu import Queue

from smartmail.config.settings import Settings
from smartmail.outage import Outage, is_connection_error

log = structlog.get_logger("smartmail.broker")

QUEUES = ("transactional", "bulk", "imports", "events", "webhooks", "default")


def celery_config(settings: Settings) -> dict:
    return {
        "broker_url": settings.redis_url,
        # A task whose ETA/countdown exceeds the visibility timeout would be delivered twice
        # (docs/getting-started/backends-and-brokers/redis.rst), so long waits live in the database.
        "broker_transport_options": {
            "visibility_timeout": settings.broker_visibility_timeout,
            "global_keyprefix": settings.redis_key_prefix,
        },
        "broker_connection_retry_on_startup": True,
        # A worker waits out a Redis outage of any length and reconnects, instead of exiting after
        # Celery's default of 100 attempts (with backoff, under an hour) and needing a restart.
        "broker_connection_max_retries": None,
        # Cancelling tasks on a lost connection would end a drain in the middle of an SMTP
        # transaction (its messages become `unknown`); late acks redeliver them anyway, harmlessly.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_queues": [Queue(name) for name in QUEUES],
        "task_default_queue": "default",
        "task_routes": {
            "smartmail.drain": {"queue": "transactional"},
            "smartmail.drain_bulk": {"queue": "bulk"},
            "smartmail.campaign.*": {"queue": "bulk"},
            "smartmail.maintenance.*": {"queue": "default"},
            "smartmail.imports.*": {"queue": "imports"},
            "smartmail.tracking.*": {"queue": "events"},
            "smartmail.inbound.*": {"queue": "events"},
            # Sending waits on subscribers' servers: its own queue and worker (threads). Reading the
            # stream for new deliveries is beat's cheap, frequent job on `default`.
            "smartmail.webhooks.send": {"queue": "webhooks"},
            "smartmail.webhooks.*": {"queue": "default"},
            # Advancing enrolments renders and queues marketing email, and a scan may evaluate a large
            # segment: bulk work, never in the way of the transactional drains that share `default`.
            "smartmail.automations.advance": {"queue": "bulk"},
            "smartmail.automations.scan": {"queue": "bulk"},
            "smartmail.automations.*": {"queue": "default"},
            "smartmail.engagement.*": {"queue": "default"},
            "smartmail.analytics.*": {"queue": "default"},
        },
        # Ack after the task ran, and put it back if the worker process died: with the conditional
        # claims in delivery.py a redelivered task is harmless (docs/userguide/tasks.rst, "Idempotence").
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        # structlog lines go to stderr as they are: redirected, Celery would prefix each JSON line
        # with its own "[time: WARNING/ForkPoolWorker-1]", which no log collector can parse.
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "timezone": "UTC",
        "beat_schedule": {
            "enqueue-due-messages": {
                "task": "smartmail.maintenance.enqueue_due",
                "schedule": settings.scheduler_interval,
            },
            "reconcile": {"task": "smartmail.maintenance.reconcile", "schedule": settings.reconcile_interval},
            "campaigns": {"task": "smartmail.maintenance.campaigns", "schedule": settings.scheduler_interval},
            # The web processes ask for a drain when they write hits; this catches a request lost.
            "tracking": {"task": "smartmail.tracking.drain", "schedule": 30.0},
            # `smartmail inbound` asks after storing mail; this catches a request lost, and retries.
            "inbound": {"task": "smartmail.inbound.process", "schedule": 30.0},
            # A tick not started before the next is due is dropped (the next one does its work).
            "webhooks": {
                "task": "smartmail.webhooks.tick",
                "schedule": settings.webhook_poll_interval,
                "options": {"expires": settings.webhook_poll_interval},
            },
            # New trigger, goal and awaited events, then due enrolments; a late tick is dropped as above.
            "automations": {
                "task": "smartmail.automations.tick",
                "schedule": settings.automation_interval,
                "options": {"expires": settings.automation_interval},
            },
            "automation-triggers": {
                "task": "smartmail.automations.scan",
                "schedule": settings.automation_scan_interval,
                "options": {"expires": settings.automation_scan_interval},
            },
            # Human opens and clicks into the contacts' engagement scores; a tick not started before
            # the next is due is dropped, as the webhooks' (each run reads for up to the interval).
            "engagement-score": {
                "task": "smartmail.engagement.score",
                "schedule": settings.engagement_interval,
                "options": {"expires": settings.engagement_interval},
            },
            # New events into the hourly and daily roll-ups; a late tick is dropped as above.
            "analytics-roll-up": {
                "task": "smartmail.analytics.roll_up",
                "schedule": settings.analytics_interval,
                "options": {"expires": settings.analytics_interval},
            },
            # The trends report by e-mail; the task sends nothing while no recipients are set.
            "analytics-report": {
                "task": "smartmail.analytics.send_report",
                "schedule": settings.report_interval,
                "options": {"expires": settings.report_interval},
            },
            # Events past SMARTMAIL_EVENT_RETENTION_DAYS: an hour's worth of old rows is a small run.
            "delete-old-events": {"task": "smartmail.maintenance.delete_old_events", "schedule": 3600.0},
            "delete-old-inbound": {"task": "smartmail.maintenance.delete_old_inbound", "schedule": 3600.0},
            "delete-old-webhook-deliveries": {
                "task": "smartmail.maintenance.delete_old_webhook_deliveries",
                "schedule": 3600.0,
            },
        },
    }


class _OutageFilter(logging.Filter):
    """On a Celery logger: records that report a lost broker connection become one Outage line per
    outage (dropped here); a record that reports the connection back ends the outage."""

    def __init__(
        self,
        outage: Outage,
        failure: Callable[[logging.LogRecord], BaseException | None],
        recovery: Callable[[logging.LogRecord], bool] = lambda _record: False,
    ) -> None:
        super().__init__()
        self.outage, self._failure, self._recovery = outage, failure, recovery

    def filter(self, record: logging.LogRecord) -> bool:
        error = self._failure(record)
        if error is not None:
            self.outage.failed(error)
            return False
        if self._recovery(record):
            return not self.outage.ok()  # the recovered line says it, with the outage's length
        return True


def _consumer_failure(record: logging.LogRecord) -> BaseException | None:
    # celery.worker.consumer logs CONNECTION_ERROR (uri, exc, next step) per reconnect attempt and
    # CONNECTION_RETRY (as '%s (%r)', text, exc) when the connection drops: the exception is args[1].
    from celery.worker.consumer.consumer import CONNECTION_ERROR, CONNECTION_RETRY

    args = record.args if isinstance(record.args, tuple) else ()
    if len(args) >= 2 and isinstance(args[1], BaseException):
        if record.msg == CONNECTION_ERROR or (record.msg == "%s (%r)" and args[0] == CONNECTION_RETRY):
            return args[1]
    return None


def _beat_failure(record: logging.LogRecord) -> BaseException | None:
    # celery.beat's apply_entry logs 'Message Error' with the stack and the exception's whole chain
    # (kombu's retries, `IndexError: pop from empty list` from its channel pool) for every due entry.
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(record.msg, str) and record.msg.startswith("Message Error") and is_connection_error(exc):
        return exc
    return None


def _not_the_cancel_warning(record: logging.LogRecord) -> bool:
    return "worker_cancel_long_running_tasks_on_connection_loss" not in record.getMessage()


_installed: dict[str, Outage] = {}


def quiet_broker_outages(process: str) -> Outage:
    """Install, once per process, the log filters that turn Celery's per-attempt broker errors
    (`process` is "worker" or "beat") into one warning line per outage and one when it ends."""
    if process in _installed:
        return _installed[process]
    outage = _installed[process] = Outage(f"{process}.broker", log)
    if process == "beat":
        from celery.signals import after_task_publish

        logging.getLogger("celery.beat").addFilter(_OutageFilter(outage, _beat_failure))
        # Beat logs nothing when a send succeeds; the publish signal says the broker is back.
        after_task_publish.connect(lambda **_kwargs: outage.ok(), weak=False)
    else:
        logging.getLogger("celery.worker.consumer.consumer").addFilter(_OutageFilter(outage, _consumer_failure))
        logging.getLogger("celery.worker.consumer.connection").addFilter(
            _OutageFilter(outage, lambda _record: None, lambda record: record.msg == "Connected to %s")
        )
        # Celery prints this multi-line warning on every lost connection while the setting above is
        # False; it routes warnings to the `py.warnings` logger (logging.captureWarnings).
        logging.getLogger("py.warnings").addFilter(_not_the_cancel_warning)
    return outage
