"""delivery._decide: how a classified reply becomes the next state of a message row."""

from __future__ import annotations

from datetime import datetime, timedelta
from types import SimpleNamespace

from smartmail.store.models import MessageState
from smartmail.workers.delivery import _decide
from smartmail.workers.outcomes import Reply, RetrySchedule

NOW = datetime(2026, 11, 26, 12, 0, 0)
SCHEDULE = RetrySchedule(first_interval=60, backoff_factor=2, max_interval=3600, jitter=0, max_age=3600)


def row(attempts=1, created_at=NOW, send_at=None):
    return SimpleNamespace(
        id="01TEST", recipient="Ann <ann@example.org>", attempts=attempts, created_at=created_at, send_at=send_at
    )


def test_a_4xx_defers_on_the_backoff_schedule():
    result = _decide(row(attempts=2), Reply(451, "4.3.0 try later", "rcpt"), SCHEDULE, NOW)
    assert result.state is MessageState.DEFERRED and result.next_attempt_at == NOW + timedelta(seconds=120)


def test_a_message_older_than_the_maximum_age_fails_as_expired():
    old = row(attempts=5, created_at=NOW - timedelta(hours=2))
    result = _decide(old, Reply(451, "4.3.0 try later", "rcpt"), SCHEDULE, NOW)
    assert result.state is MessageState.FAILED and result.reason.startswith("expired")


def test_the_maximum_age_of_a_scheduled_message_counts_from_its_send_time():
    scheduled = row(created_at=NOW - timedelta(days=10), send_at=NOW - timedelta(minutes=1))
    result = _decide(scheduled, Reply(451, "4.3.0 try later", "rcpt"), SCHEDULE, NOW)
    assert result.state is MessageState.DEFERRED


def test_a_hard_bounce_fails_and_asks_for_suppression():
    result = _decide(row(), Reply(550, "5.1.1 user unknown", "rcpt"), SCHEDULE, NOW)
    assert result.state is MessageState.FAILED and result.suppress and result.reason == "hard bounce"


def test_a_connection_lost_after_the_body_is_unknown():
    result = _decide(row(), Reply(None, "connection lost at DATA", "data"), SCHEDULE, NOW)
    assert result.state is MessageState.UNKNOWN and result.next_attempt_at is None
