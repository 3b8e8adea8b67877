#!/usr/bin/env python3
"""Benchmark: end-to-end send throughput (naive Celery baseline vs smartmail) and send-to-acceptance latency.

    .venv/bin/python scripts/bench_send.py                      # PostgreSQL, 10,000 messages, 20 s latency run
    .venv/bin/python scripts/bench_send.py --database sqlite

Needs Redis (127.0.0.1:6379, database 12 by default; one is started if none answers), PostgreSQL
with trust auth (or --database sqlite) and Postfix's smtp-sink (Debian package `postfix`).

1. Throughput: --messages emails through one Celery worker with 2 prefork processes into Postfix's
   C smtp-sink, timed from the first enqueue to the sink's last acceptance, three ways:
   a. baseline  scripts/naive_baseline.py: a task per email, Jinja2 + EmailMessage, a new SMTP connection each
   b. send      smartmail.send() once per message
   c. send_many smartmail.send_many() in batches of --batch specs
   d. send_many_unshaped  the same with traffic shaping off (SMARTMAIL_SHAPING=0); every other run
      shapes, with a policy that gives the recipients' domain a generous limit (100,000/s, 50
      connections), so each message takes its rate token from Redis: the ratio is shaping's cost
2. Latency: smartmail.send() at a steady --rate for --latency-seconds into an aiosmtpd sink that stamps
   each Message-ID when its DATA is accepted.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC
from pathlib import Path

import bench_results

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(ROOT))

SENDER = "SmartMail Bench <bench@bench.example.com>"
TEMPLATE = "welcome"
WORKER_FLAGS = [
    "--pool",
    "prefork",
    "-c",
    "2",
    "-l",
    "WARNING",
    "--without-gossip",
    "--without-mingle",
    "--without-heartbeat",
]
SCENARIOS = ("baseline", "send", "send_many", "send_many_unshaped", "latency")
# The bench's recipients are all @example.com: one site, limited generously, so shaping does its work.
POLICY = """
[sites.bench]
domains = ["example.com"]
rate = "100000/s"
burst = 1000
max_connections = 50
"""


class BenchError(RuntimeError):
    """A run could not complete (a child died, a timeout passed); the message says which and where to look."""


def log(line: str = "") -> None:
    print(line, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if process is not None and process.poll() is not None:
            raise BenchError(f"process {process.args[0]} exited with {process.returncode} before listening on {port}")
        if time.monotonic() > deadline:
            raise BenchError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")
        time.sleep(0.05)


def recipient(i: int) -> tuple[str, dict]:
    address = f"user{i}@example.com"
    return address, {"first_name": f"User{i}", "email": address, "plan": ("free", "pro", "team")[i % 3]}


# --- CPU accounting ----------------------------------------------------------------------------
# The machine may be shared: each run reports how busy all CPUs were and how much of that was the
# benchmark's own processes (this one, the workers, the sink, our PostgreSQL backends, Redis).

_TICKS = os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values)
    return (total - idle) / _TICKS, total / _TICKS


def process_cpu(pids: set[int]) -> dict[int, float]:
    """CPU seconds (user + system) used so far by each pid still alive."""
    used = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            used[pid] = (int(fields[11]) + int(fields[12])) / _TICKS
        except (OSError, IndexError, ValueError):
            pass
    return used


def wait_until_idle(max_wait: float, busy_below: float = 0.15) -> float:
    """Wait (up to max_wait s) for a 2-second window with all CPUs less than busy_below busy; return that fraction."""
    deadline = time.monotonic() + max_wait
    said = False
    while True:
        busy0, total0 = machine_cpu()
        time.sleep(2.0)
        busy1, total1 = machine_cpu()
        busy = (busy1 - busy0) / max(total1 - total0, 1e-9)
        if busy < busy_below or time.monotonic() > deadline:
            if busy >= busy_below:
                log(f"    (the machine is still {busy:.0%} busy with other work; running anyway)")
            return busy
        if not said:
            log(
                f"    (the machine is {busy:.0%} busy with other work; "
                f"waiting up to {max_wait:.0f} s for it to go idle)"
            )
            said = True


class CpuMeter:
    """CPU use of the machine, and of each of the benchmark's own processes by role, over one run."""

    def __init__(self, own_pids: Callable[[], dict[str, set[int]]]) -> None:
        self.own_pids = own_pids
        self.busy0, self.total0 = machine_cpu()
        self.wall0 = time.monotonic()
        self.own0 = {role: process_cpu(pids) for role, pids in own_pids().items()}

    def summary(self, messages: int) -> str:
        busy1, total1 = machine_cpu()
        wall = time.monotonic() - self.wall0
        used: dict[str, float] = {}
        for role, pids in self.own_pids().items():
            before = self.own0.get(role, {})
            # A process that appeared during the run (a new database connection) counts from zero.
            used[role] = sum(v - before.get(pid, 0.0) for pid, v in process_cpu(pids).items())
        cpus = (total1 - self.total0) / wall if wall else 1
        machine = (busy1 - self.busy0) / wall
        own = sum(used.values()) / wall
        per_message = ", ".join(f"{role} {seconds / messages * 1000:.2f}" for role, seconds in used.items() if seconds)
        return (
            f"CPU: machine {machine:.2f} of {cpus:.0f} cores busy, benchmark processes {own:.2f}, "
            f"other work {max(machine - own, 0.0):.2f}\n"
            f"             CPU ms per message: {per_message} (total {sum(used.values()) / messages * 1000:.2f})"
        )


# --- child processes ---------------------------------------------------------------------------


class Children:
    """Every child runs in its own session (process group), so stopping it takes its forks too."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []

    def start(
        self, argv: list[str], *, env: dict[str, str], log_path: Path, cwd: Path = ROOT, stdout=None
    ) -> subprocess.Popen:
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=stdout if stdout is not None else log_file,
                stderr=log_file if stdout is not None else subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen, grace: float = 15.0) -> None:
        if process.poll() is None:
            try:
                # SIGTERM to the leader only: a celery worker then shuts down warm, letting the running
                # task finish (and its SMTP connections QUIT) before it stops its pool processes.
                process.terminate()
                process.wait(grace)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        # The group may outlive its leader (a prefork child whose parent died): make sure it is gone.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if process in self.processes:
            self.processes.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.processes)):
            try:
                self.stop(process, grace=5.0)
            except Exception as exc:  # noqa: BLE001 - cleanup must go on
                log(f"  (could not stop pid {process.pid}: {exc})")


READ_INTERVAL = 0.005


class SmtpSink:
    """Postfix's smtp-sink, with its running counters read from a pipe.

    End signal for all three throughput runs: `smtp-sink -c` writes "sess=N quit=N mesg=N\\r" to stdout,
    flushed, each time a message's final "." is received (it replies 250 right then), a QUIT arrives or
    a session ends. mesg counts accepted messages on the server side, whoever the client is, so the same
    signal times the baseline (which records nothing anywhere) and smartmail; the reader thread stamps
    each update with perf_counter as it arrives. (For smartmail we additionally wait until the rows are
    `sent` in the database and report that time too, so the recording cost after acceptance is visible.)
    """

    def __init__(self, children: Children, log_path: Path) -> None:
        binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        if not Path(binary).exists():
            raise BenchError("Postfix's smtp-sink not found (Debian: apt-get install postfix)")
        self.binary = binary
        self.port = free_port()
        argv = [binary, "-c"]
        if os.geteuid() == 0:  # smtp-sink refuses to run as root without dropping privileges
            argv += ["-u", pwd.getpwuid(0).pw_name]
        argv += [f"127.0.0.1:{self.port}", "256"]
        self.children = children
        self.process = children.start(argv, env=dict(os.environ), log_path=log_path, stdout=subprocess.PIPE)
        self.count = 0
        self.updated_at = time.perf_counter()
        self._reached: dict[int, float] = {}
        self._targets: set[int] = set()
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="smtp-sink-counter", daemon=True)
        self._reader.start()
        wait_port(self.port, 10, self.process)

    def _read(self) -> None:
        pattern = re.compile(rb"mesg=(\d+)")
        fd = self.process.stdout.fileno()
        tail = b""
        while True:
            chunk = os.read(fd, 65536)
            now = time.perf_counter()
            if not chunk:
                break
            # This thread shares the producer's GIL: woken once per accepted message, it took the
            # GIL from send() ~1,000 times a second. Reading every few milliseconds instead stamps a
            # count at most READ_INTERVAL late, on runs of 10 s and more.
            time.sleep(READ_INTERVAL)
            *lines, tail = (tail + chunk).split(b"\r")
            if not lines:
                continue
            match = pattern.search(lines[-1])
            if match is None:
                continue
            with self._cond:
                self.count = int(match.group(1))
                self.updated_at = now
                for target in [t for t in self._targets if self.count >= t]:
                    self._reached[target] = now
                    self._targets.discard(target)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def expect(self, target: int) -> None:
        """Register a count to time; call before producing, so the crossing is stamped by the reader."""
        with self._cond:
            if target in self._reached or target in self._targets:
                return
            if self.count >= target:
                self._reached[target] = self.updated_at
            else:
                self._targets.add(target)

    def wait(self, target: int, *, timeout: float, stall: float, what: str, alive: Callable[[], None]) -> float:
        """perf_counter time at which the sink had accepted `target` messages in all."""
        self.expect(target)
        deadline = time.perf_counter() + timeout
        with self._cond:
            while target not in self._reached:
                now = time.perf_counter()
                if self.process.poll() is not None:
                    raise BenchError(f"smtp-sink exited ({self.process.returncode}) at {self.count} messages")
                if now > deadline:
                    raise BenchError(f"{what}: timed out after {timeout:.0f}s at {self.count}/{target} messages")
                if now - self.updated_at > stall:
                    raise BenchError(f"{what}: no message accepted for {stall:.0f}s, at {self.count}/{target}")
                self._cond.wait(0.5)
                self._cond.release()
                try:
                    alive()  # raises if a worker died
                finally:
                    self._cond.acquire()
            return self._reached[target]

    def stop(self) -> None:
        self.children.stop(self.process, grace=5.0)


def _stamp_sink_main(port: int, conn) -> None:
    """Child process: an aiosmtpd server that records time.time() per Message-ID when DATA is accepted.

    It runs in its own process, not a thread of the benchmark, so the producer's send() calls
    cannot hold the GIL while a message is waiting to be stamped.
    """
    from aiosmtpd.controller import Controller

    message_id = re.compile(rb"^Message-ID:[ \t]*<([^@>\r\n]+)@", re.IGNORECASE | re.MULTILINE)
    stamps: dict[str, float] = {}
    unmatched = [0]
    sessions = [0]

    class StampingHandler:
        async def handle_EHLO(self, server, session, envelope, hostname, responses):
            sessions[0] += 1  # one per SMTP connection: shows how well connections are reused
            session.host_name = hostname
            return responses

        async def handle_DATA(self, server, session, envelope) -> str:
            accepted = time.time()
            data = envelope.original_content or envelope.content
            header_end = data.find(b"\r\n\r\n")
            match = message_id.search(data, 0, header_end if header_end >= 0 else len(data))
            if match:
                stamps[match.group(1).decode("ascii", "replace")] = accepted
            else:
                unmatched[0] += 1
            return "250 2.0.0 Ok: queued"

    controller = Controller(
        StampingHandler(),
        hostname="127.0.0.1",
        port=port,
        decode_data=False,
        data_size_limit=10 * 1024 * 1024,
        server_hostname="bench-sink",
    )
    controller.start()
    conn.send("ready")
    try:
        while True:
            request = conn.recv()
            if request == "count":
                conn.send(len(stamps) + unmatched[0])
            elif request == "dump":
                conn.send((dict(stamps), unmatched[0], sessions[0]))
            else:
                break
    finally:
        controller.stop()


class StampSink:
    """The latency run's SMTP server: aiosmtpd in a separate process, asked for its stamps over a pipe."""

    def __init__(self) -> None:
        import aiosmtpd

        self.version = getattr(aiosmtpd, "__version__", "?")
        self.port = free_port()
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_stamp_sink_main, args=(self.port, child_conn), daemon=True)
        self.process.start()
        if not self.conn.poll(30) or self.conn.recv() != "ready":
            raise BenchError("the aiosmtpd sink did not start")
        self._lock = threading.Lock()

    def _ask(self, request: str):
        with self._lock:
            self.conn.send(request)
            if not self.conn.poll(30):
                raise BenchError("the aiosmtpd sink stopped answering")
            return self.conn.recv()

    def count(self) -> int:
        return self._ask("count")

    def dump(self) -> tuple[dict[str, float], int, int]:
        return self._ask("dump")

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send("stop")
            except OSError:
                pass
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


# --- services ----------------------------------------------------------------------------------


class Database:
    """A throw-away PostgreSQL database (created here, dropped at the end) or a SQLite file."""

    def __init__(self, kind: str, admin_url: str, workdir: Path, name: str = "smartmail_bench") -> None:
        from sqlalchemy import create_engine, text

        self.kind = kind
        self.admin = None
        if kind == "sqlite":
            self.url = f"sqlite:///{workdir / 'smartmail-bench.db'}"
            import sqlite3

            self.version = f"SQLite {sqlite3.sqlite_version} (WAL, synchronous=NORMAL)"
        else:
            self.name = name
            self.admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
            try:
                with self.admin.connect() as conn:
                    self.version = conn.execute(text("select version()")).scalar().split(" on ")[0]
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
                    conn.execute(text(f'CREATE DATABASE "{self.name}"'))
            except Exception as exc:
                raise BenchError(f"PostgreSQL at {admin_url} not usable ({exc}); try --database sqlite") from exc
            self.url = admin_url.rsplit("/", 1)[0] + f"/{self.name}"
            with create_engine(self.url).connect() as conn:
                settings = ", ".join(
                    f"{n}={conn.execute(text(f'SHOW {n}')).scalar()}"
                    for n in ("synchronous_commit", "fsync", "shared_buffers")
                )
            self.version += f" ({settings})"
        from smartmail.store import migrate

        migrate.upgrade(self.url)
        self.engine = create_engine(self.url, pool_size=1, isolation_level="AUTOCOMMIT")

    def clear(self) -> None:
        """Empty the messages table between runs, so every run starts from the same table."""
        from sqlalchemy import text

        with self.engine.connect() as conn:
            conn.execute(text("DELETE FROM messages"))
            conn.execute(text("VACUUM ANALYZE messages" if self.kind == "postgresql" else "VACUUM"))

    def states(self) -> dict[str, int]:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT state, count(*) FROM messages GROUP BY state")).all()
        return {state: count for state, count in rows}

    def claimed_at(self, ids: list[str]) -> dict[str, float]:
        """Message id -> claimed_at as a Unix time (stored as naive UTC)."""

        from sqlalchemy import select

        from smartmail.store.models import Message

        out: dict[str, float] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                for mid, at in conn.execute(select(Message.id, Message.claimed_at).where(Message.id.in_(chunk))):
                    if at is not None:
                        out[mid] = at.replace(tzinfo=UTC).timestamp()
        return out

    def backend_pids(self) -> set[int]:
        if self.admin is None:
            return set()
        from sqlalchemy import text

        with self.admin.connect() as conn:
            return set(
                conn.execute(
                    text("SELECT pid FROM pg_stat_activity WHERE datname = :name"), {"name": self.name}
                ).scalars()
            )

    def drop(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.dispose()
        if self.admin is None:
            return
        from sqlalchemy import text

        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


def wait_for(
    predicate: Callable[[], object],
    *,
    timeout: float,
    what: str,
    alive: Callable[[], None] = lambda: None,
    interval: float = 0.05,
):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        alive()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Worker:
    """`celery worker` with two prefork processes, its log in a temp file."""

    def __init__(self, bench: Bench, label: str, app: str, queues: list[str], env: dict[str, str]) -> None:
        self.bench = bench
        self.label = label
        self.queues = queues
        self.log_path = bench.workdir / f"worker-{label}.log"
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            *WORKER_FLAGS,
            "-n",
            f"bench-{label}-{uuid.uuid4().hex[:6]}@%h",
        ]
        if app.startswith("smartmail"):
            argv += ["-Q", ",".join(queues)]  # as tests/conftest.py starts them
        self.process = bench.children.start(argv, env=env, log_path=self.log_path)
        # Publishing before the worker has declared its queues would route messages nowhere (kombu's
        # Redis transport keeps bindings in _kombu.binding.* keys, which FLUSHDB removed).
        wait_for(self._declared, timeout=60, what=f"the {label} worker to declare its queues", alive=self.check)

    def _declared(self) -> bool:
        bound: set[str] = set()
        for key in self.bench.redis.scan_iter("*_kombu.binding.*"):  # any SMARTMAIL_REDIS_KEY_PREFIX
            # Members are "routing_key\x06\x16pattern\x06\x16queue".
            bound.update(m.rsplit(b"\x06\x16", 1)[-1].decode() for m in self.bench.redis.smembers(key))
        return set(self.queues) <= bound

    def check(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(
                f"the {self.label} worker exited with {self.process.returncode}; see {self.log_path}:\n{self.tail()}"
            )

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def problems(self) -> int:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return 0
        return sum(1 for line in text.splitlines() if "ERROR" in line or "Traceback" in line or "CRITICAL" in line)

    def pids(self) -> list[int]:
        """The worker's main process and its pool processes."""
        out = subprocess.run(["ps", "-o", "pid=", "-g", str(self.process.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self) -> None:
        self.bench.children.stop(self.process)
        problems = self.problems()
        if problems:
            log(f"  warning: {problems} error line(s) in the {self.label} worker log {self.log_path}:\n{self.tail(10)}")


# --- the benchmark -----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.children = Children()
        self.workdir = Path(tempfile.mkdtemp(prefix="smartmail-bench-"))
        self.redis_process = None
        self.database: Database | None = None
        self.sinks: list = []
        self.failed = False

    # set-up and tear-down

    def setup(self) -> None:
        import redis

        from smartmail.devtools import localredis

        self.redis_url, self.redis_process = localredis.ensure(self.args.redis_url, self.workdir / "redis")
        self.redis = redis.Redis.from_url(self.redis_url)
        self.redis.flushdb()
        name = getattr(self.args, "database_name", "smartmail_bench")
        self.database = Database(self.args.database, self.args.postgres_admin_url, self.workdir, name)
        # The producer (this process) and the workers read the same SMARTMAIL_* settings.
        os.environ.update(
            {
                "SMARTMAIL_DATABASE_URL": self.database.url,
                "SMARTMAIL_REDIS_URL": self.redis_url,
                "SMARTMAIL_DEFAULT_SENDER": SENDER,
                "SMARTMAIL_SECRET_KEY": "bench-secret-key-0123456789",
                "SMARTMAIL_TEMPLATES_DIR": str(ROOT / "templates"),
                "SMARTMAIL_TRANSPORT": "smtp",
                "SMARTMAIL_LOG_LEVEL": "WARNING",
                "SMARTMAIL_SMTP_URL": "smtp://127.0.0.1:9?tls=none",  # each run's workers get their sink's port
                "NAIVE_BROKER_URL": self.redis_url,
                "NAIVE_TEMPLATES_DIR": str(ROOT / "templates"),
                "NAIVE_SENDER": SENDER,
                "SMARTMAIL_POLICY_FILE": str(self.workdir / "policy.toml"),
            }
        )
        (self.workdir / "policy.toml").write_text(POLICY)
        from smartmail.config import get_settings

        get_settings.forget()
        settings = get_settings()
        self.batch_size = settings.batch_size
        self.claim_window = settings.claim_window

    def teardown(self) -> None:
        for sink in self.sinks:
            try:
                sink.stop()
            except Exception as exc:  # noqa: BLE001
                log(f"  (could not stop a sink: {exc})")
        self.children.stop_all()
        try:
            from smartmail.store import engine as db

            if db.get_engine.cache_info().currsize:
                db.get_engine().dispose()
        except Exception:  # noqa: BLE001
            pass
        if self.database is not None:
            try:
                self.database.drop()
            except Exception as exc:  # noqa: BLE001
                log(f"  (could not drop the database: {exc})")
        try:
            if hasattr(self, "redis"):
                self.redis.flushdb()
        except Exception:  # noqa: BLE001
            pass
        if self.redis_process is not None:
            self.redis_process.terminate()
            self.redis_process.wait(10)
        if self.failed or self.args.keep_logs:
            log(f"worker logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def environment(self) -> None:
        import aiosmtpd
        import celery
        import kombu
        import sqlalchemy

        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
        redis_version = self.redis.info("server").get("redis_version", "?")
        postfix = subprocess.run(
            ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True
        ).stdout.strip()
        log("environment")
        log(
            f"  cpus               {os.cpu_count()} (usable by this process: {affinity}); load avg "
            + " ".join(f"{x:.2f}" for x in os.getloadavg())
        )
        log(f"  platform           {platform.platform()}, Python {platform.python_version()}")
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
        ).stdout.strip()
        log(f"  smartmail          {commit or '?'} ({ROOT})")
        log(f"  database           {self.args.database}: {self.database.version}")
        log(f"  broker             Redis {redis_version} at {self.redis_url}")
        log(f"  celery / kombu     {celery.__version__} / {kombu.__version__}; SQLAlchemy {sqlalchemy.__version__}")
        log(f"  workers            1 worker, {' '.join(WORKER_FLAGS)} (SMARTMAIL_LOG_LEVEL=WARNING)")
        log(
            f"  throughput sink    Postfix smtp-sink {postfix or '?'} ({shutil.which('smtp-sink')}), "
            "counted by its -c counters"
        )
        log(
            f"  latency sink       aiosmtpd {getattr(aiosmtpd, '__version__', '?')} in a separate process, "
            "time.time() at handle_DATA"
        )
        log(
            "  traffic shaping    on (policy: example.com at 100000/s, burst 1000, 50 connections), "
            "except send_many_unshaped"
        )
        log(
            f"  smartmail settings batch_size={self.batch_size} claim_window={self.claim_window} "
            f"smtp_max_messages_per_connection={os.environ.get('SMARTMAIL_SMTP_MAX_MESSAGES_PER_CONNECTION', '100')}"
        )
        log()

    def own_pids(self, worker: Worker | None, sink_pid: int | None) -> dict[str, set[int]]:
        """The benchmark's processes by role (the producer is this process, with the sink's reader thread)."""
        roles: dict[str, set[int]] = {"producer": {os.getpid()}}
        if worker is not None:
            roles["worker main"] = {worker.process.pid}
            roles["worker pool"] = set(worker.pids()) - {worker.process.pid}
        roles["postgres backends"] = self.database.backend_pids()
        try:
            roles["redis"] = {int(self.redis.info("server")["process_id"])}
        except Exception:  # noqa: BLE001 - a remote Redis: not ours to count
            pass
        if sink_pid:
            roles["smtp sink"] = {sink_pid}
        return roles

    def quiet(self) -> None:
        if self.args.idle_wait > 0:
            wait_until_idle(self.args.idle_wait)

    def fresh_broker(self) -> None:
        self.redis.flushdb()

    def smartmail_worker(self, label: str, smtp_port: int) -> Worker:
        env = dict(
            os.environ,
            SMARTMAIL_SMTP_URL=f"smtp://127.0.0.1:{smtp_port}?tls=none",
            SMARTMAIL_SHAPING="0" if label.endswith("_unshaped") else "1",
        )
        return Worker(self, label, "smartmail.workers.app", ["transactional", "default"], env)

    # throughput

    def throughput(self, scenario: str) -> dict:
        args = self.args
        n, warmup = args.messages, args.warmup
        self.fresh_broker()
        if scenario != "baseline":
            self.database.clear()
        sink = SmtpSink(self.children, self.workdir / f"smtp-sink-{scenario}.log")
        self.sinks.append(sink)
        worker = None
        try:
            if scenario == "baseline":
                env = dict(
                    os.environ,
                    NAIVE_SMTP_HOST="127.0.0.1",
                    NAIVE_SMTP_PORT=str(sink.port),
                    PYTHONPATH=os.pathsep.join(filter(None, [str(SCRIPTS), os.environ.get("PYTHONPATH")])),
                )
                worker = Worker(self, scenario, "naive_baseline", ["celery"], env)
                import naive_baseline

                def produce(first: int, count: int) -> None:
                    for i in range(first, first + count):
                        to, context = recipient(i)
                        naive_baseline.send_email.delay(to, TEMPLATE, context)
            else:
                worker = self.smartmail_worker(scenario, sink.port)
                import smartmail

                if scenario == "send":

                    def produce(first: int, count: int) -> None:
                        for i in range(first, first + count):
                            to, context = recipient(i)
                            smartmail.send(to, template=TEMPLATE, context=context)
                else:

                    def produce(first: int, count: int) -> None:
                        for start in range(first, first + count, args.batch):
                            specs = []
                            for i in range(start, min(start + args.batch, first + count)):
                                to, context = recipient(i)
                                specs.append({"to": to, "template": TEMPLATE, "context": context})
                            smartmail.send_many(specs)

            # Warm-up (untimed): both pool processes have forked, connected and compiled the template.
            produce(10_000_000, warmup)
            sink.wait(warmup, timeout=120, stall=60, what=f"{scenario} warm-up", alive=worker.check)
            if scenario != "baseline":
                wait_for(
                    lambda: self.database.states().get("sent", 0) >= warmup,
                    timeout=60,
                    what="warm-up rows to be recorded",
                    alive=worker.check,
                )
                self.database.clear()
            time.sleep(0.5)  # let the warm-up's trailing QUITs and acks settle
            self.quiet()

            target = sink.count + n
            sink.expect(target)
            meter = CpuMeter(lambda: self.own_pids(worker, sink.process.pid))
            started = time.perf_counter()
            produce(0, n)
            enqueued = time.perf_counter()
            accepted = sink.wait(
                target, timeout=args.timeout, stall=args.stall_timeout, what=f"{scenario} run", alive=worker.check
            )
            result = {
                "scenario": scenario,
                "seconds": accepted - started,
                "enqueue_seconds": enqueued - started,
                "cpu": meter.summary(n),
            }
            if scenario != "baseline":
                wait_for(
                    lambda: self._all_final(n),
                    timeout=60,
                    what=f"{scenario} rows to be recorded",
                    alive=worker.check,
                    interval=0.02,
                )
                result["recorded_seconds"] = time.perf_counter() - started
                result["states"] = self.database.states()
            result["accepted_total"] = sink.count - (target - n)
            return result
        finally:
            if worker is not None:
                worker.stop()
            sink.stop()
            self.sinks.remove(sink)

    def _all_final(self, n: int) -> bool:
        states = self.database.states()
        return sum(states.values()) >= n and not any(states.get(s) for s in ("queued", "sending"))

    # latency

    def latency(self, fresh: bool = True) -> dict:
        """send() at args.rate for args.latency_seconds, each message timed to the sink's acceptance;
        fresh=False keeps the broker and database as they are (a campaign may be running)."""
        import smartmail

        args = self.args
        if fresh:
            self.fresh_broker()
            self.database.clear()
        sink = StampSink()
        self.sinks.append(sink)
        worker = None
        try:
            worker = self.smartmail_worker("latency", sink.port)
            for i in range(args.warmup):
                to, context = recipient(20_000_000 + i)
                smartmail.send(to, template=TEMPLATE, context=context)
            wait_for(lambda: sink.count() >= args.warmup, timeout=120, what="latency warm-up", alive=worker.check)
            time.sleep(0.5)
            if fresh:  # with a campaign running the machine is busy on purpose
                self.quiet()
            meter = CpuMeter(lambda: self.own_pids(worker, sink.process.pid))

            total = max(1, round(args.rate * args.latency_seconds))
            interval = 1.0 / args.rate
            before: dict[str, float] = {}
            call_seconds: list[float] = []
            returned: dict[str, float] = {}
            late = 0
            t0 = time.perf_counter() + 0.1
            for i in range(total):
                # An absolute schedule: a slow call makes the next ones go at once, not the whole run drift.
                due = t0 + i * interval
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                elif pause < -interval:
                    late += 1
                to, context = recipient(30_000_000 + i)
                wall = time.time()
                start = time.perf_counter()
                result = smartmail.send(to, template=TEMPLATE, context=context)
                call_seconds.append(time.perf_counter() - start)
                before[result.id] = wall
                returned[result.id] = wall + call_seconds[-1]
            sent_for = time.perf_counter() - t0
            wait_for(
                lambda: sink.count() >= args.warmup + total,
                timeout=args.stall_timeout,
                what="the latency run's messages to be accepted",
                alive=worker.check,
            )
            cpu = meter.summary(total)
            stamps, unmatched, sessions = sink.dump()
            latencies = sorted(stamps[mid] - t for mid, t in before.items() if mid in stamps)
            # Where the time goes: claimed_at is stamped by the worker as it starts the delivery window,
            # just before its claim transaction, so it splits the path after send() returned into
            # "broker and Celery dispatch" and "claim, MIME, SMTP".
            claimed = self.database.claimed_at(list(before))
            queue = sorted(claimed[mid] - returned[mid] for mid in before if mid in claimed)
            worker_part = sorted(stamps[mid] - claimed[mid] for mid in before if mid in claimed and mid in stamps)
            return {
                "total": total,
                "received": len(latencies),
                "unmatched": unmatched,
                "late": late,
                "achieved_rate": total / sent_for,
                "cpu": cpu,
                "latencies": latencies,
                "call_seconds": sorted(call_seconds),
                "queue_seconds": queue,
                "worker_seconds": worker_part,
                "sessions": sessions,
            }
        finally:
            if worker is not None:
                worker.stop()
            sink.stop()
            self.sinks.remove(sink)


def run_guarded(bench: Bench, body: Callable[[], None], teardown: Callable[[], None]) -> int:
    """Run a benchmark's `body`: signals become KeyboardInterrupt, children are always stopped by
    `teardown`; 0 done, 130 interrupted, 1 a BenchError (logged)."""

    def interrupt(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, interrupt)
    try:
        body()
        return 0
    except KeyboardInterrupt as exc:
        bench.failed = True
        log(f"interrupted ({exc}); stopping children")
        return 130
    except BenchError as exc:
        bench.failed = True
        log(f"benchmark failed: {exc}")
        return 1
    except BaseException:
        bench.failed = True
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the clean-up even if asked again
        teardown()


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def report_throughput(r: dict, n: int) -> float:
    rate = n / r["seconds"]
    line = (
        f"  {r['scenario']:10} {rate:8.0f} msg/s   {n} messages in {r['seconds']:7.2f} s "
        f"(enqueue took {r['enqueue_seconds']:6.2f} s = {n / r['enqueue_seconds']:6.0f}/s"
    )
    if "recorded_seconds" in r:
        line += f"; all rows final in the database after {r['recorded_seconds']:.2f} s"
    log(line + ")")
    log(f"             {r['cpu']}")
    if r.get("states") and set(r["states"]) != {"sent"}:
        log(f"             states: {r['states']}")
    if r["accepted_total"] != n:
        log(f"             note: the sink accepted {r['accepted_total']} messages for {n} sent")
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000, help="messages per throughput run (default 10000)")
    parser.add_argument("--batch", type=int, default=1000, help="specs per send_many() call (default 1000)")
    parser.add_argument("--rate", type=float, default=100.0, help="send() calls per second in the latency run")
    parser.add_argument("--latency-seconds", type=float, default=20.0, help="length of the latency run (default 20)")
    parser.add_argument("--warmup", type=int, default=40, help="untimed messages before each run (default 40)")
    parser.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument(
        "--postgres-admin-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="a database to connect to while creating/dropping smartmail_bench",
    )
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/12",
        help="broker; this Redis database is FLUSHED (default redis://127.0.0.1:6379/12)",
    )
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="limit per throughput run, seconds")
    parser.add_argument(
        "--stall-timeout", type=float, default=60.0, help="give up when nothing was accepted for this long, seconds"
    )
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=180.0,
        help="before each timed run, wait up to this long for other work on the machine to stop (0: do not wait)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp directory with worker logs")
    args = parser.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        parser.error(f"--only: unknown scenario(s) {', '.join(sorted(unknown))}")

    # SIGTERM/SIGHUP become KeyboardInterrupt, so the finally below stops every child either way.
    def interrupt(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    signal.signal(signal.SIGINT, interrupt)  # even when started in the background with SIGINT ignored

    bench = Bench(args)
    try:
        bench.setup()
        bench.environment()
        rates: dict[str, float] = {}
        throughput_runs = [s for s in ("baseline", "send", "send_many", "send_many_unshaped") if s in only]
        if throughput_runs:
            log(
                f"throughput: {args.messages} messages per run, 2 worker processes, from the first enqueue "
                "to smtp-sink's last acceptance"
            )
            for scenario in throughput_runs:
                log(f"  running {scenario} ...")
                rates[scenario] = report_throughput(bench.throughput(scenario), args.messages)
            if "baseline" in rates:
                if "send" in rates:
                    ratio = rates["send"] / rates["baseline"]
                    log(f"  ratio send/baseline      {ratio:5.2f}x  (target >= 2)  {'OK' if ratio >= 2 else 'MISSED'}")
                if "send_many" in rates:
                    ratio = rates["send_many"] / rates["baseline"]
                    log(f"  ratio send_many/baseline {ratio:5.2f}x  (target >= 5)  {'OK' if ratio >= 5 else 'MISSED'}")
            if "send_many" in rates and "send_many_unshaped" in rates:
                ratio = rates["send_many"] / rates["send_many_unshaped"]
                log(f"  ratio shaped/unshaped    {ratio:5.2f}x  (target >= 0.90) {'OK' if ratio >= 0.9 else 'MISSED'}")
            log()
        if rates:
            bench_results.save("bench_send", args, {"throughput_msg_s": rates})
        if "latency" in only:
            log(
                f"latency: send() to SMTP acceptance at {args.rate:g} msg/s for {args.latency_seconds:g} s, "
                "2 worker processes"
            )
            r = bench.latency()
            lat = [x * 1000 for x in r["latencies"]]
            calls = [x * 1000 for x in r["call_seconds"]]
            log(
                f"  messages {r['total']} sent at {r['achieved_rate']:.1f}/s, {r['received']} matched at the sink"
                + (f", {r['unmatched']} without a Message-ID" if r["unmatched"] else "")
                + (f", {r['late']} calls more than one interval late" if r["late"] else "")
            )
            bench_results.save(
                "bench_send_latency",
                args,
                {
                    "rate": args.rate,
                    "sent": r["total"],
                    "matched": r["received"],
                    "latency_ms": {p: percentile(lat, p) for p in (50, 90, 99)},
                },
            )
            log(
                f"  latency  p50 {percentile(lat, 50):6.1f} ms  p90 {percentile(lat, 90):6.1f} ms  "
                f"p99 {percentile(lat, 99):6.1f} ms  max {lat[-1] if lat else float('nan'):6.1f} ms   "
                f"(targets p50 < 30, p99 < 150)  "
                f"{'OK' if lat and percentile(lat, 50) < 30 and percentile(lat, 99) < 150 else 'MISSED'}"
            )
            for label, values in (
                ("send() call (producer: render, INSERT, COMMIT, publish)", calls),
                ("send() return -> worker starts the task (Redis, Celery)", [x * 1000 for x in r["queue_seconds"]]),
                ("worker start -> accepted (claim COMMIT, MIME, SMTP)", [x * 1000 for x in r["worker_seconds"]]),
            ):
                log(
                    f"    {label:58} p50 {percentile(values, 50):6.1f}  p90 {percentile(values, 90):6.1f}  "
                    f"p99 {percentile(values, 99):6.1f}  max {values[-1] if values else float('nan'):6.1f} ms"
                )
            log(f"  SMTP connections opened by the workers: {r['sessions']} (warm-up included)")
            log(f"  {r['cpu']}")
        return 0
    except KeyboardInterrupt as exc:
        bench.failed = True
        log(f"interrupted ({exc}); stopping children")
        return 130
    except BenchError as exc:
        bench.failed = True
        log(f"error: {exc}")
        return 1
    except BaseException:
        bench.failed = True
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the clean-up even if asked again
        bench.teardown()


if __name__ == "__main__":
    sys.exit(main())
