"""The outage helper: one warning per outage, silence on repeats, one recovery line; Celery's broker errors tamed."""

from __future__ import annotations

import logging
import sys

import pytest
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError

from smartmail.config import celery as celery_config
from smartmail.outage import Outage, is_connection_error, one_line


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def warning(self, event: str, **kw) -> None:
        self.lines.append(("warning", event, kw))

    def info(self, event: str, **kw) -> None:
        self.lines.append(("info", event, kw))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_first_failure_is_one_warning_repeats_are_quiet_and_the_recovery_says_how_long():
    log, clock = Recorder(), Clock()
    outage = Outage("smtp.sweeper", log, clock)
    assert not outage.ok()  # nothing to recover from: nothing logged
    assert outage.failed(RedisConnectionError("Error 111 connecting to\n127.0.0.1:6390."))
    for _ in range(50):
        clock.now += 1
        assert not outage.failed(RedisConnectionError("again"))
    assert outage.down
    clock.now += 4
    assert outage.ok()
    assert not outage.ok()
    assert log.lines == [
        (
            "warning",
            "outage.started",
            {"component": "smtp.sweeper", "error": "ConnectionError: Error 111 connecting to 127.0.0.1:6390."},
        ),
        ("info", "outage.recovered", {"component": "smtp.sweeper", "seconds": 54.0, "failures": 51}),
    ]
    # The next outage is reported again.
    assert outage.failed("lost") and log.lines[-1][1] == "outage.started"


def test_a_traceback_is_attached_only_when_asked():
    log = Recorder()
    error = ValueError("a bug")
    Outage("x", log).failed(error, traceback=True)
    Outage("y", log).failed(error)
    assert log.lines[0][2]["exc_info"] is error and "exc_info" not in log.lines[1][2]


def test_connection_errors_are_found_along_the_exception_chain():
    def raised(make):
        try:
            make()
        except Exception as exc:  # noqa: BLE001
            return exc

    def chained():
        try:
            raise ConnectionRefusedError(111, "refused")
        except OSError:
            raise IndexError("pop from empty list") from None

    def caused():
        try:
            raise RedisConnectionError("down")
        except RedisConnectionError as exc:
            raise RuntimeError("Couldn't apply scheduled task") from exc

    assert is_connection_error(OperationalError("Error 111"))
    assert is_connection_error(raised(caused))
    assert not is_connection_error(raised(chained))  # `from None` hides the context
    assert not is_connection_error(ValueError("a bug")) and not is_connection_error(None)
    assert one_line("a\n  b\tc") == "a b c"


def _record(name: str, msg: str, args: tuple = (), exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, exc_info)


@pytest.fixture
def quieted(monkeypatch):
    """Filters installed on fresh loggers for each process kind; removed afterwards."""
    from celery.signals import after_task_publish

    monkeypatch.setattr(celery_config, "_installed", {})
    names = ("celery.beat", "celery.worker.consumer.consumer", "celery.worker.consumer.connection", "py.warnings")
    before = {name: list(logging.getLogger(name).filters) for name in names}
    receivers = list(after_task_publish.receivers)
    yield
    for name, filters in before.items():
        logging.getLogger(name).filters[:] = filters
    after_task_publish.receivers[:] = receivers
    after_task_publish.sender_receivers_cache.clear()


def test_the_worker_consumers_reconnect_errors_become_one_outage(quieted, monkeypatch):
    from celery.worker.consumer.consumer import CONNECTION_ERROR, CONNECTION_RETRY

    log = Recorder()
    monkeypatch.setattr(celery_config, "log", log)
    outage = celery_config.quiet_broker_outages("worker")
    assert celery_config.quiet_broker_outages("worker") is outage  # once per process
    consumer = logging.getLogger("celery.worker.consumer.consumer")
    connection = logging.getLogger("celery.worker.consumer.connection")
    error = RedisConnectionError("Error 111 connecting to 127.0.0.1:6390. Connection refused.")
    assert not consumer.filter(_record(consumer.name, "%s (%r)", (CONNECTION_RETRY, error)))
    for attempt in range(5):
        uri = "redis://127.0.0.1:6390/0"
        assert not consumer.filter(_record(consumer.name, CONNECTION_ERROR, (uri, error, f"again ({attempt}/-)")))
    assert consumer.filter(_record(consumer.name, "something else %s", ("x",)))
    assert not connection.filter(
        _record(connection.name, "Connected to %s", ("redis://…",))
    )  # the recovery line says it
    assert connection.filter(_record(connection.name, "Connected to %s", ("redis://…",)))  # at start-up: kept
    assert [(level, event) for level, event, _ in log.lines] == [
        ("warning", "outage.started"),
        ("info", "outage.recovered"),
    ]
    assert log.lines[1][2]["failures"] == 6
    warning = _record(
        "py.warnings",
        "%s",
        (
            "consumer.py:427: CPendingDeprecationWarning: \nIn Celery 5.1 … "
            "worker_cancel_long_running_tasks_on_connection_loss …",
        ),
    )
    assert not logging.getLogger("py.warnings").filter(warning)


def test_beats_message_errors_become_one_outage_ended_by_a_publish(quieted, monkeypatch):
    from celery.beat import SchedulingError
    from celery.signals import after_task_publish

    log = Recorder()
    monkeypatch.setattr(celery_config, "log", log)
    celery_config.quiet_broker_outages("beat")
    beat = logging.getLogger("celery.beat")

    def scheduling_error():
        try:
            try:
                raise OperationalError("Error 111 connecting to 127.0.0.1:6390. Connection refused.")
            except OperationalError as exc:
                raise SchedulingError(f"Couldn't apply scheduled task reconcile: {exc}") from exc
        except SchedulingError:
            return sys.exc_info()[1]

    for _ in range(3):
        record = _record("celery.beat", "Message Error: %s\n%s", (scheduling_error(), ["stack"]))
        record.exc_info = (SchedulingError, scheduling_error(), None)
        assert not beat.filter(record)
    bug = _record("celery.beat", "Message Error: %s\n%s", ("x", []), ValueError("not an outage"))
    assert beat.filter(bug)  # other errors keep their traceback
    after_task_publish.send(sender="smartmail.maintenance.reconcile")
    assert [event for _, event, _ in log.lines] == ["outage.started", "outage.recovered"]
    assert "Couldn't apply scheduled task reconcile" in log.lines[0][2]["error"]
