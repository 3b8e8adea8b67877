"""Celery configuration: queues, routing, the reliability settings of DESIGN.md, and the beat schedule."""

from __future__ import annotations

from kombu import Queue

from smartmail.config.settings import Settings

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
        "task_queues": [Queue(name) for name in QUEUES],
        "task_default_queue": "default",
        "task_routes": {
            "smartmail.drain": {"queue": "transactional"},
            "smartmail.drain_bulk": {"queue": "bulk"},
            "smartmail.campaign.*": {"queue": "bulk"},
            "smartmail.maintenance.*": {"queue": "default"},
            "smartmail.imports.*": {"queue": "imports"},
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
        "worker_send_task_events": False,
        "timezone": "UTC",
        "beat_schedule": {
            "enqueue-due-messages": {
                "task": "smartmail.maintenance.enqueue_due",
                "schedule": settings.scheduler_interval,
            },
            "reconcile": {"task": "smartmail.maintenance.reconcile", "schedule": settings.reconcile_interval},
            "campaigns": {"task": "smartmail.maintenance.campaigns", "schedule": settings.scheduler_interval},
        },
    }
