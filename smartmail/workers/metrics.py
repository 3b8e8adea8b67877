"""Operator metrics in Prometheus format: the counters every process adds to, and the scrape that reads them."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import structlog
from redis.exceptions import RedisError
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from smartmail.config.settings import MetricsSettings
from smartmail.store.engine import reader
from smartmail.store.models import Message, MessageState, in_state
from smartmail.workers.dispatch import BULK, TRANSACTIONAL, get_outbox

log = structlog.get_logger("smartmail.metrics")


def multiprocess_dir() -> Path:
    """Point prometheus_client at SMARTMAIL_METRICS_DIR (created when missing): every process of an
    installation, web and workers, writes its metrics there and a scrape of any web process sums them.
    Without SMARTMAIL_METRICS_DIR, a PROMETHEUS_MULTIPROC_DIR already set is kept."""
    inherited = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    explicit = any(name.upper() == "SMARTMAIL_METRICS_DIR" for name in os.environ)
    directory = Path(inherited) if inherited and not explicit else MetricsSettings().metrics_dir
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return directory


# prometheus_client picks the storage of every metric from the environment once, when first imported.
DIRECTORY = multiprocess_dir()

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess, values  # noqa: E402
from prometheus_client.core import GaugeMetricFamily  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

if values.ValueClass is values.MutexValue:
    # Imported before the variable was set (Celery's command line loads Flower's plugin, which
    # imports prometheus_client): our metrics, created below, must still go to the directory.
    values.ValueClass = values.MultiProcessValue()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NO_SITE = "none"  # the label of messages sent with traffic shaping off, or held by their campaign

messages = Counter(
    "smartmail_messages",
    "Delivery outcomes recorded, by outcome (sent, deferred, failed, bounced, suppressed, unknown) and site.",
    ["outcome", "site"],
)
throttled = Counter(
    "smartmail_throttled",
    "Messages deferred without an attempt: the site's rate limiter, connection cap or suspension (site=none: "
    "the campaign's sending window or cap).",
    ["site"],
)
accept_latency = Histogram(
    "smartmail_accept_latency_seconds",
    "Seconds from when a message was due (created, or its send_at) to the relay's 2xx, by stream.",
    ["stream"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
)
webhook_deliveries = Counter(
    "smartmail_webhook_deliveries",
    "Outbound webhook delivery attempts recorded, by outcome (delivered, retrying, failed).",
    ["outcome"],
)
import_rows = Counter(
    "smartmail_import_rows",
    "Contact import rows committed, by outcome (created, updated, skipped, failed).",
    ["outcome"],
)


def count_messages(by_outcome_and_site: Mapping[tuple[str, str], int]) -> None:
    for (outcome, site), count in by_outcome_and_site.items():
        messages.labels(outcome, site).inc(count)


def count_throttled(by_site: Mapping[str, int]) -> None:
    for site, count in by_site.items():
        throttled.labels(site).inc(count)


def observe_accept_latency(stream: str, seconds: list[float]) -> None:
    histogram = accept_latency.labels(stream)
    for value in seconds:
        histogram.observe(max(value, 0.0))


def count_webhook_deliveries(delivered: int, retrying: int, failed: int) -> None:
    for outcome, count in (("delivered", delivered), ("retrying", retrying), ("failed", failed)):
        if count:
            webhook_deliveries.labels(outcome).inc(count)


def count_import_rows(created: int, updated: int, skipped: int, failed: int) -> None:
    for outcome, count in (("created", created), ("updated", updated), ("skipped", skipped), ("failed", failed)):
        if count:
            import_rows.labels(outcome).inc(count)


def mark_process_dead(pid: int) -> None:
    """Drop the live-gauge files of an ended process (its counters stay: they are totals)."""
    multiprocess.mark_process_dead(pid, str(DIRECTORY))


class BacklogCollector(Collector):
    """Gauges read at scrape time: the outboxes in Redis and the messages waiting in the database."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "smartmail_metrics_source_up", "1 when the scrape could read the source.", labels=["source"]
        )
        yield from self._outboxes(up)
        yield from self._database(up)
        yield up

    @staticmethod
    def _outboxes(up: GaugeMetricFamily) -> Iterator[GaugeMetricFamily]:
        backlog = GaugeMetricFamily(
            "smartmail_outbox_backlog", "Message ids waiting in an outbox, by stream.", labels=["stream"]
        )
        waiting = GaugeMetricFamily(
            "smartmail_outbox_waiting",
            "Message ids held in an outbox until a short wait ends, by stream.",
            labels=["stream"],
        )
        try:
            for stream in (TRANSACTIONAL, BULK):
                outbox = get_outbox(stream)
                backlog.add_metric([stream], outbox.backlog())
                waiting.add_metric([stream], outbox.waiting())
        except RedisError as exc:
            log.warning("metrics.redis_unavailable", error=str(exc))
            up.add_metric(["redis"], 0)
            return
        up.add_metric(["redis"], 1)
        yield backlog
        yield waiting

    @staticmethod
    def _database(up: GaugeMetricFamily) -> Iterator[GaugeMetricFamily]:
        backlog = GaugeMetricFamily(
            "smartmail_messages_backlog",
            "Messages not yet sent, by state (queued, deferred, scheduled).",
            labels=["state"],
        )
        # Each state's count reads its partial index (store/models.py), never the finished rows.
        try:
            with reader() as connection:
                for state in (MessageState.QUEUED, MessageState.DEFERRED, MessageState.SCHEDULED):
                    count = connection.execute(
                        select(func.count()).select_from(Message).where(in_state(state))
                    ).scalar()
                    backlog.add_metric([state.value], count or 0)
        except SQLAlchemyError as exc:
            log.warning("metrics.database_unavailable", error=str(exc))
            up.add_metric(["database"], 0)
            return
        up.add_metric(["database"], 1)
        yield backlog


def exposition() -> bytes:
    """Every process's metrics, summed from the multiprocess directory, and the backlog gauges."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(DIRECTORY))
    registry.register(BacklogCollector())
    return generate_latest(registry)
