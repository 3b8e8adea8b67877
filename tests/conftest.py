"""Shared fixtures: a real Redis, SQLite and PostgreSQL databases, a scriptable SMTP server, worker and beat processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from aiosmtpd.controller import Controller
from sqlalchemy import create_engine, text

from smartmail.devtools import localredis

ROOT = Path(__file__).resolve().parent.parent
TEST_SECRET = "test-secret-key-0123456789"
RUN_PREFIX = f"smartmail-test-{uuid.uuid4().hex[:8]}:"


def clear_redis(url: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{RUN_PREFIX}*", count=1000))
    if keys:
        client.delete(*keys)


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05, message="condition"):
    """Poll `predicate` until it is truthy; `message` may be a callable that describes the state on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message() if callable(message) else message}")
        time.sleep(interval)


# --- Redis -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """The Redis named by SMARTMAIL_TEST_REDIS_URL (default 127.0.0.1:6379, database 13), else a local one."""
    wanted = os.environ.get("SMARTMAIL_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
    url, process = localredis.ensure(wanted, tmp_path_factory.mktemp("redis"))
    yield url
    if process:
        process.terminate()
        process.wait(10)


# --- Databases ---------------------------------------------------------------------------------

def _postgres_admin_url() -> str:
    return os.environ.get("SMARTMAIL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(request, tmp_path_factory):
    """Every test that stores data runs on SQLite and on PostgreSQL, each migrated with Alembic."""
    from smartmail.store import migrate

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'smartmail.db'}"
        migrate.upgrade(url)
        yield url
        return
    admin_url = _postgres_admin_url()
    try:
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:  # noqa: BLE001 - any connection failure means "no server here"
        if os.environ.get("SMARTMAIL_TEST_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL required (SMARTMAIL_TEST_REQUIRE_POSTGRES=1) but not reachable: {exc}")
        pytest.skip(f"no PostgreSQL at {admin_url} (set SMARTMAIL_TEST_POSTGRES_URL): {exc}")
    name = f"smartmail_test_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    migrate.upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _clear_tables(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        for table in ("import_errors", "import_jobs", "events", "list_memberships", "segments", "lists", "contacts",
                      "messages", "campaigns", "suppressions", "templates"):
            conn.execute(text(f"DELETE FROM {table}"))
    engine.dispose()


# --- SMTP server -------------------------------------------------------------------------------

@dataclass
class ReceivedMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    at: float

    def parsed(self):
        import email
        import email.policy

        return email.message_from_bytes(self.data, policy=email.policy.default)


@dataclass
class RecordingHandler:
    """Records every message; `script[recipient]` lists replies to give to that recipient's next DATA
    attempts (e.g. ["451 4.3.0 Try again", "451 4.3.0 Try again"]) before accepting."""

    messages: list[ReceivedMessage] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    script: dict[str, list[str]] = field(default_factory=dict)
    sessions: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        with self.lock:
            self.sessions += 1
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server, session, envelope):
        recipient = envelope.rcpt_tos[0].lower()
        with self.lock:
            self.attempts[recipient] += 1
            scripted = self.script.get(recipient)
            if scripted:
                return scripted.pop(0)
            self.messages.append(ReceivedMessage(envelope.mail_from, list(envelope.rcpt_tos),
                                                 envelope.original_content or envelope.content, time.time()))
        return "250 2.0.0 Ok: queued"

    @property
    def count(self) -> int:
        return len(self.messages)

    def message_ids(self) -> list[str]:
        return [m.parsed()["Message-ID"] for m in self.messages]


@pytest.fixture
def smtp_server():
    handler = RecordingHandler()
    port = localredis.free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, decode_data=False,
                            data_size_limit=10 * 1024 * 1024)
    controller.start()
    handler.port = port
    yield handler
    controller.stop()


# --- Settings for a test -----------------------------------------------------------------------

def reset_caches() -> None:
    """Drop every per-process value (settings, engines, clients, caches), pushing handed-off ids first."""
    from smartmail import runtime

    runtime.reset()


@pytest.fixture
def env(monkeypatch, database_url, redis_url, tmp_path):
    """SMARTMAIL_* for one test: a clean database and Redis, fast retries, the repo's templates."""
    values = {
        "SMARTMAIL_DATABASE_URL": database_url,
        "SMARTMAIL_REDIS_URL": redis_url,
        "SMARTMAIL_DEFAULT_SENDER": "SmartMail Tests <tests@example.com>",
        "SMARTMAIL_SECRET_KEY": TEST_SECRET,
        "SMARTMAIL_TEMPLATES_DIR": str(ROOT / "templates"),
        "SMARTMAIL_TRANSPORT": "smtp",
        "SMARTMAIL_SMTP_URL": "smtp://127.0.0.1:9?tls=none",
        "SMARTMAIL_RETRY_FIRST_INTERVAL": "0.5",
        "SMARTMAIL_RETRY_MAX_INTERVAL": "2",
        "SMARTMAIL_RETRY_JITTER": "0.1",
        "SMARTMAIL_SCHEDULER_INTERVAL": "0.3",
        "SMARTMAIL_LOG_LEVEL": "WARNING",
        # Keys of this run only, so a concurrent run on the same Redis cannot steal its tasks.
        "SMARTMAIL_REDIS_KEY_PREFIX": RUN_PREFIX,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    _clear_tables(database_url)
    clear_redis(redis_url)
    reset_caches()
    yield values
    reset_caches()


# --- Worker and beat processes -----------------------------------------------------------------

class Process:
    """A celery worker or beat subprocess in its own process group (so kill -9 takes its children too)."""

    def __init__(self, argv: list[str], log: Path, nice: int = 0) -> None:
        self.log = log
        self.popen = subprocess.Popen(argv, env=dict(os.environ), cwd=ROOT, stdout=log.open("wb"),
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=(lambda: os.nice(nice)) if nice else None)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill9(self) -> None:
        os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)


@pytest.fixture
def start_worker(tmp_path):
    started: list[Process] = []

    def start(concurrency: int = 2, pool: str = "prefork", queues: str = "transactional,default",
              nice: int = 0) -> Process:
        log = tmp_path / f"worker-{len(started)}.log"
        process = Process([sys.executable, "-m", "celery", "-A", "smartmail.workers.app", "worker",
                           "-Q", queues, "--pool", pool, "-c", str(concurrency), "-l", "INFO",
                           "--without-gossip", "--without-mingle", "--without-heartbeat",
                           "-n", f"test{len(started)}-{uuid.uuid4().hex[:6]}@%h"], log, nice)
        started.append(process)
        wait_for(lambda: "ready." in process.output() or process.popen.poll() is not None, 60, message="worker ready")
        assert process.popen.poll() is None, process.output()
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def start_beat(tmp_path):
    started: list[Process] = []

    def start() -> Process:
        process = Process([sys.executable, "-m", "celery", "-A", "smartmail.workers.app", "beat", "-l", "INFO",
                           "-s", str(tmp_path / "beat-schedule")], tmp_path / "beat.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
