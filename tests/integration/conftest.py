"""Fixtures on real parts: Redis, SQLite and PostgreSQL databases, a scriptable SMTP server, worker and beat processes.

Every test in this folder is marked `integration`. A test that stores data runs on both databases
(`database_url` is parametrized), except a test that runs worker or beat processes: it tests the
processes, not the SQL (which the in-process tests here cover on both dialects), and runs on
PostgreSQL, the production database, only (on SQLite where no PostgreSQL answers and none is required).
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import create_engine, text

from smartmail.devtools import localredis
from tests.conftest import ROOT, RUN_PREFIX, TEST_SECRET, clear_redis, reset_caches, wait_for

HERE = Path(__file__).resolve().parent
# Fixtures that run worker or beat processes; their tests run on PostgreSQL only.
PROCESS_FIXTURES = frozenset({"start_worker", "shared_worker", "start_beat"})


def pytest_generate_tests(metafunc):
    if "database_url" in metafunc.fixturenames:
        uses_processes = PROCESS_FIXTURES.intersection(metafunc.fixturenames)
        dialects = [_process_database()] if uses_processes else ["sqlite", "postgresql"]
        metafunc.parametrize("database_url", dialects, indirect=True, scope="session")


@functools.cache
def _process_database() -> str:
    """PostgreSQL; SQLite on a machine without one (unless it is required), rather than no process test at all."""
    if os.environ.get("SMARTMAIL_TEST_REQUIRE_POSTGRES") == "1":
        return "postgresql"
    engine = create_engine(_postgres_admin_url(), connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return "postgresql"
    except Exception:  # noqa: BLE001 - any connection failure means "no server here"
        return "sqlite"
    finally:
        engine.dispose()


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    # Marked before `-m` selects (the other implementations run inside this wrapper) ...
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)
    result = yield

    # ... and ordered after pytest grouped the tests by database: within each run of one module's
    # tests on one database, those using the shared worker first (in their order), so they reuse
    # one worker and the others run after it is gone.
    def group(item):
        callspec = getattr(item, "callspec", None)
        return item.path, callspec.params.get("database_url") if callspec else None

    ordered, start = [], 0
    for end in range(1, len(items) + 1):
        if end == len(items) or group(items[end]) != group(items[start]):
            ordered += sorted(items[start:end], key=lambda item: "shared_worker" not in item.fixturenames)
            start = end
    items[:] = ordered
    return result


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


@pytest.fixture(scope="session")
def database_url(request, tmp_path_factory):
    """A database migrated with Alembic: SQLite or PostgreSQL, as pytest_generate_tests chose."""
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
        for table in (
            "workflow_step_runs",
            "workflow_segment_presence",
            "enrolments",
            "workflow_versions",
            "workflows",
            "import_errors",
            "import_jobs",
            "events",
            "rollups",
            "conversions",
            "engagement_firsts",
            "stream_checkpoints",
            "list_memberships",
            "segments",
            "lists",
            "contacts",
            "messages",
            "campaigns",
            "suppressions",
            "templates",
            "api_keys",
            "inbound_messages",
            "feedback_marks",
            "webhook_attempts",
            "webhook_deliveries",
            "webhook_endpoints",
        ):
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
            self.messages.append(
                ReceivedMessage(
                    envelope.mail_from,
                    list(envelope.rcpt_tos),
                    envelope.original_content or envelope.content,
                    time.time(),
                )
            )
        return "250 2.0.0 Ok: queued"

    def reset(self) -> None:
        """Forget everything received, attempted and scripted (in place: open sessions keep this handler)."""
        with self.lock:
            self.messages.clear()
            self.attempts.clear()
            self.script.clear()
            self.sessions = 0

    @property
    def count(self) -> int:
        return len(self.messages)

    def message_ids(self) -> list[str]:
        return [m.parsed()["Message-ID"] for m in self.messages]


@pytest.fixture(scope="module")
def _module_smtp_server():
    handler = RecordingHandler()
    port = localredis.free_port()
    controller = Controller(
        handler, hostname="127.0.0.1", port=port, decode_data=False, data_size_limit=10 * 1024 * 1024
    )
    controller.start()
    handler.port = port
    yield handler
    controller.stop()


@pytest.fixture
def smtp_server(_module_smtp_server):
    """The module's SMTP server, with nothing received or scripted yet. One server per module keeps
    the SMTP URL, and so a shared worker's settings, the same from one test to the next."""
    _module_smtp_server.reset()
    return _module_smtp_server


# --- Settings for a test -----------------------------------------------------------------------


@pytest.fixture
def env(monkeypatch, database_url, redis_url, tmp_path):
    """SMARTMAIL_* for one test: a clean database and Redis, fast retries, the repo's templates.

    The values depend on nothing but the session's database and Redis, so every test of a module
    gets the same ones: a shared worker started for one test has the settings of the next.
    """
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
        self.popen = subprocess.Popen(
            argv,
            env=dict(os.environ),
            cwd=ROOT,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill9(self) -> None:
        os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def kill(self) -> None:
        """SIGKILL to the process group, if it still runs: how fixtures end their processes.
        A clean Celery shutdown costs seconds per worker and no test here asserts on one (a test
        that does would call stop() itself)."""
        if self.alive():
            self.kill9()

    def stop(self) -> None:
        """A clean shutdown (SIGTERM: a worker finishes its tasks), SIGKILL after 15 s."""
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()


def _worker_process(log: Path, name: str, concurrency: int, pool: str, queues: str, nice: int) -> Process:
    return Process(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "smartmail.workers.app",
            "worker",
            "-Q",
            queues,
            "--pool",
            pool,
            "-c",
            str(concurrency),
            "-l",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-n",
            f"{name}-{uuid.uuid4().hex[:6]}@%h",
        ],
        log,
        nice,
    )


def _wait_ready(processes: list[Process]) -> None:
    try:
        wait_for(
            lambda: all("ready." in p.output() or not p.alive() for p in processes),
            60,
            interval=0.02,
            message="worker ready",
        )
    except AssertionError:
        for process in processes:
            process.kill()
        raise
    for process in processes:
        assert process.alive(), process.output()


def _start_worker(log: Path, name: str, concurrency: int, pool: str, queues: str, nice: int) -> Process:
    process = _worker_process(log, name, concurrency, pool, queues, nice)
    _wait_ready([process])
    return process


class WorkerStarter:
    """start_worker(...) starts one worker and returns once it is ready; start_worker.many(n, ...)
    starts n alike at once (each start costs seconds of CPU: in parallel they overlap)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Process] = []

    def _new(self, concurrency: int, pool: str, queues: str, nice: int) -> Process:
        number = len(self.started)
        process = _worker_process(
            self.directory / f"worker-{number}.log", f"test{number}", concurrency, pool, queues, nice
        )
        self.started.append(process)
        return process

    def __call__(
        self, concurrency: int = 2, pool: str = "prefork", queues: str = "transactional,default", nice: int = 0
    ) -> Process:
        return self.many(1, concurrency, pool, queues, nice)[0]

    def many(
        self,
        count: int,
        concurrency: int = 2,
        pool: str = "prefork",
        queues: str = "transactional,default",
        nice: int = 0,
    ) -> list[Process]:
        processes = [self._new(concurrency, pool, queues, nice) for _ in range(count)]
        _wait_ready(processes)
        return processes

    def kill_all(self) -> None:
        for process in self.started:
            process.kill()


@pytest.fixture
def start_worker(tmp_path):
    """Start workers of this test's own; they are killed (SIGKILL) when the test ends."""
    starter = WorkerStarter(tmp_path)
    yield starter
    starter.kill_all()


class SharedWorkers:
    """The shared worker of one module: the one running is reused by a test that asks for the same
    options with the same SMARTMAIL_* settings, else killed and replaced, so a test always gets a
    worker started with its own settings."""

    def __init__(self, tmp_path_factory, module: str) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.module = module
        self.key: tuple | None = None
        self.process: Process | None = None
        self.started = 0

    def start(
        self, concurrency: int = 2, pool: str = "prefork", queues: str = "transactional,default", nice: int = 0
    ) -> Process:
        settings = tuple(sorted((k, v) for k, v in os.environ.items() if k.upper().startswith("SMARTMAIL_")))
        key = (concurrency, pool, queues, nice, settings)
        # Not on SQLite: it hands a deleted row's id out again, and a worker keeps campaigns by id.
        reusable = not os.environ.get("SMARTMAIL_DATABASE_URL", "").startswith("sqlite")
        if reusable and self.process and self.process.alive() and key == self.key:
            return self.process
        self.kill()
        self.started += 1
        log = self.tmp_path_factory.mktemp(f"shared-worker-{self.module}") / "worker.log"
        self.process = _start_worker(log, f"shared{self.started}", concurrency, pool, queues, nice)
        self.key = key
        return self.process

    def kill(self) -> None:
        if self.process:
            self.process.kill()
        self.process = self.key = None


@pytest.fixture(scope="module")
def _module_workers(request, tmp_path_factory):
    workers = SharedWorkers(tmp_path_factory, request.module.__name__.rsplit(".", 1)[-1])
    yield workers
    workers.kill()


@pytest.fixture(autouse=True)
def _shared_worker_only_when_asked(request, _module_workers):
    """A test that does not ask for the shared worker runs without it: it would take that test's
    tasks (the test may start its own workers, or none). pytest_collection_modifyitems puts a
    module's tests that ask for it first, so it starts about once per module."""
    if "shared_worker" not in request.fixturenames:
        _module_workers.kill()


@pytest.fixture
def shared_worker(env, _module_workers):
    """start_worker's stand-in for tests that neither kill their worker nor need it to start at a
    given moment (it may run from an earlier test on): a worker kept between the module's tests
    while they ask for it with the same options and settings (`env` gives every test of a module
    the same ones, and the module's SMTP server keeps its port). It runs while `env` empties the
    tables and Redis for the next test, idle: each test waits for the work it started. Killed
    (SIGKILL) before a test that does not ask for it, and at the end of the module."""
    return _module_workers.start


@pytest.fixture
def start_beat(tmp_path):
    """Start celery beat; it is killed (SIGKILL) when the test ends."""
    started: list[Process] = []

    def start() -> Process:
        process = Process(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "smartmail.workers.app",
                "beat",
                "-l",
                "INFO",
                "-s",
                str(tmp_path / "beat-schedule"),
            ],
            tmp_path / "beat.log",
        )
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


# --- The web app, as a real `smartmail web` process ----------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class WebServers:
    """The `smartmail web` process of one module: reused by the next test while the SMARTMAIL_*
    settings are the same (`env` gives a module's tests the same ones per database), else replaced."""

    def __init__(self, tmp_path_factory, module: str) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.module = module
        self.key: tuple | None = None
        self.process: Process | None = None
        self.url = ""

    def start(self, workers: int = 1) -> str:
        settings = tuple(sorted((k, v) for k, v in os.environ.items() if k.upper().startswith("SMARTMAIL_")))
        if self.process and self.process.alive() and self.key == (workers, settings):
            return self.url
        self.kill()
        port = free_port()
        log = self.tmp_path_factory.mktemp(f"web-{self.module}") / "web.log"
        argv = [sys.executable, "-m", "smartmail.cli", "web", "--port", str(port), "--workers", str(workers)]
        self.process = Process(argv, log)
        self.url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert self.process is not None and self.process.alive(), self.process and self.process.output()
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 30, interval=0.05, message="smartmail web ready")
        self.key = (workers, settings)
        return self.url

    def kill(self) -> None:
        if self.process:
            self.process.kill()
        self.process = self.key = None


@pytest.fixture(scope="module")
def _module_web(request, tmp_path_factory):
    servers = WebServers(tmp_path_factory, request.module.__name__.rsplit(".", 1)[-1])
    yield servers
    servers.kill()


@dataclass
class Api:
    """A running `smartmail web` and the means to call it: `api.client("contacts:read", ...)` is an
    httpx client holding a new key with those scopes (all scopes when none are named)."""

    url: str
    clients: list = field(default_factory=list)

    def key(self, *scopes: str, **options) -> str:
        from smartmail.access import keys
        from smartmail.access.scopes import SCOPES

        return keys.create_key("test", list(scopes) or list(SCOPES), **options)[1]

    def client(self, *scopes: str, **options) -> httpx.Client:
        return self.client_for(self.key(*scopes, **options))

    def client_for(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        self.clients.append(client)
        return client


@pytest.fixture
def api(env, monkeypatch, _module_web):
    """A real `smartmail web` process (one uvicorn worker) on this test's database and Redis.
    Templates and keys are read afresh on every request: the tables are emptied between tests
    while the process lives on."""
    monkeypatch.setenv("SMARTMAIL_TEMPLATE_CACHE_SECONDS", "0")
    monkeypatch.setenv("SMARTMAIL_API_KEY_CACHE_SECONDS", "0")
    monkeypatch.setenv("SMARTMAIL_API_UPLOAD_DIR", str(_module_web.tmp_path_factory.getbasetemp() / "uploads"))
    reset_caches()
    handle = Api(_module_web.start())
    yield handle
    for client in handle.clients:
        client.close()


# --- Rows as delivery leaves them ----------------------------------------------------------------


def sent_message(email: str, *, state: str = "sent", campaign_id: int | None = None) -> str:
    """A message to `email` in `state` (its contact created when new; a campaign's message names
    its contact, as fan-out does); its id. For tests of what happens after delivery."""
    from sqlalchemy import select

    from smartmail.store.engine import session_scope, utcnow
    from smartmail.store.ids import new_id
    from smartmail.store.models import Contact, Message

    message_id = new_id()
    with session_scope() as session:
        contact = session.scalar(select(Contact).where(Contact.email == email))
        if contact is None:
            contact = Contact(email=email, status="subscribed", attributes={})
            session.add(contact)
            session.flush()
        session.add(
            Message(
                id=message_id,
                state=state,
                sender="news@example.com",
                recipient=email,
                subject="News",
                text="Hi",
                headers={},
                tags=[],
                message_id_header=f"<{message_id}@example.com>",
                campaign_id=campaign_id,
                contact_id=contact.id if campaign_id else None,
                finished_at=utcnow(),
            )
        )
    return message_id
