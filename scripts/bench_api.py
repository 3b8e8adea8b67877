#!/usr/bin/env python3
"""Benchmark: the HTTP API's send endpoints (`smartmail web`, wrk) against send()/send_many() in-process, in one run.

    .venv/bin/python scripts/bench_api.py                     # PostgreSQL, 2 web workers, 3 rounds: 4-8 minutes
    .venv/bin/python scripts/bench_api.py --profile /tmp/prof   # and py-spy profiles of the servers
    git worktree add /tmp/before HEAD~1 && .venv/bin/python scripts/bench_api.py --ab-tree /tmp/before

Needs PostgreSQL with trust auth (a database `smartmail_bench_api` is created and dropped), Redis
(database 14 by default, FLUSHED; one is started if none answers) and wrk (Debian package `wrk`).
No worker runs: messages are stored `queued` and their ids pushed to a Redis outbox nobody reads,
which is flushed at the end; nothing is delivered.

1. --rounds rounds, each back to back: `smartmail.send()` in a loop for --seconds, wrk on
   POST /v1/messages (`smartmail web --workers 2`, --connections keep-alive connections) as long
   (target: >= 60% of send()'s rate), `send_many()` of --batch specs --batches times, and
   POST /v1/messages/batch of --batch from --batch-clients clients (target: >= 80% of send_many()'s).
2. POST /v1/messages at a constant --rate (a small asyncio generator here: wrk 4 has no
   constant-rate mode); latency from each request's due time, so a stall counts in full
   (target p99 < 50 ms).
3. The auth + rate-limit layer: scripts/bench_api_app.py serves the same handler with and without
   `Security(authorize)`; wrk at full load and on one connection, each route twice, alternating.
Each phase also reports the PostgreSQL sessions opened (pg_stat_database.sessions), which shows
connection churn between the web processes' thread pool and their SQLAlchemy pools.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import bench_results

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(SCRIPTS))

from bench_api_app import OPEN_PATH  # noqa: E402
from bench_send import (  # noqa: E402
    BenchError,
    Children,
    free_port,
    log,
    machine_cpu,
    percentile,
    process_cpu,
    wait_port,
    wait_until_idle,
)

DATABASE = "smartmail_bench_api"
SENDER = "SmartMail Bench <bench@bench.example.com>"
TEMPLATE = "welcome"

# wrk's Lua side: each request a new recipient; at the end one JSON line with the figures (µs).
WRK_SCRIPT = """
local counter = 0
local body = os.getenv("BENCH_BODY")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local token = os.getenv("BENCH_TOKEN")
if token ~= "" then wrk.headers["Authorization"] = "Bearer " .. token end
function setup(thread) counter = counter + 1; thread:set("id", counter) end
function init(args) n = 0 end
function request()
  n = n + 1
  return wrk.format(nil, nil, nil, (body:gsub("XNX", id .. "x" .. n)))
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"mean_us":%.1f,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
"""


def message_spec(i: int | str) -> dict[str, Any]:
    address = f"user{i}@example.com"
    return {"to": address, "template": TEMPLATE, "context": {"first_name": f"User{i}", "email": address, "plan": "pro"}}


# wrk fills in the thread and request numbers: a distinct recipient per request.
WRK_BODY = json.dumps(message_spec("XNX"))


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.children = Children()
        self.workdir = Path(tempfile.mkdtemp(prefix="smartmail-bench-api-"))
        self.redis_process = None
        self.admin = None
        self.engine = None
        self.results: dict[str, Any] = {}
        self.server: subprocess.Popen | None = None  # the web server being measured, if any
        self.serial = 0  # makes each batch run's recipients new
        self.profile_target: subprocess.Popen | None = None  # the server --profile samples
        self.profile_next: str | None = None  # the name of the profile the next wrk run records

    # --- set-up -------------------------------------------------------------------------------

    def setup(self) -> None:
        import redis
        from sqlalchemy import create_engine, text

        from smartmail.devtools import localredis

        if shutil.which("wrk") is None:
            raise BenchError("wrk not found (Debian: apt-get install wrk)")
        self.redis_url, self.redis_process = localredis.ensure(self.args.redis_url, self.workdir / "redis")
        self.redis = redis.Redis.from_url(self.redis_url)
        self.redis.flushdb()
        self.admin = create_engine(self.args.postgres_admin_url, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            self.pg_version = conn.execute(text("select version()")).scalar().split(" on ")[0]
            conn.execute(text(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{DATABASE}"'))
        self.url = self.args.postgres_admin_url.rsplit("/", 1)[0] + f"/{DATABASE}"
        from smartmail.store import migrate

        migrate.upgrade(self.url)
        self.engine = create_engine(self.url, pool_size=1, isolation_level="AUTOCOMMIT")
        self.env = {
            "SMARTMAIL_DATABASE_URL": self.url,
            "SMARTMAIL_REDIS_URL": self.redis_url,
            "SMARTMAIL_DEFAULT_SENDER": SENDER,
            "SMARTMAIL_SECRET_KEY": "bench-secret-key-0123456789",
            "SMARTMAIL_TEMPLATES_DIR": str(ROOT / "templates"),
            "SMARTMAIL_LOG_LEVEL": "WARNING",
        }
        if self.args.web_threads:
            self.env["SMARTMAIL_WEB_THREADS"] = str(self.args.web_threads)
        os.environ.update(self.env)
        from smartmail.access import keys
        from smartmail.config import get_settings

        get_settings.forget()
        # A limit far above what the machine can serve: the limiter does its work, never says 429.
        self.token = keys.create_key("bench", ["messages:send"], rate_limit=1_000_000.0, burst=1_000_000)[1]

    def teardown(self) -> None:
        from sqlalchemy import text

        self.children.stop_all()
        try:
            from smartmail import runtime

            runtime.reset()
        except Exception as exc:  # noqa: BLE001 - cleanup must go on
            log(f"  (could not reset the runtime: {exc})")
        if self.engine is not None:
            self.engine.dispose()
        if self.admin is not None:
            with self.admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)'))
            self.admin.dispose()
        try:
            self.redis.flushdb()  # the outbox nobody read
        except Exception:  # noqa: BLE001
            pass
        if self.redis_process is not None:
            self.redis_process.terminate()
            self.redis_process.wait(10)
        if self.args.keep_logs:
            log(f"logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- database ------------------------------------------------------------------------------

    def clear(self) -> None:
        """Every phase starts from an empty, analyzed messages table."""
        from sqlalchemy import text

        with self.engine.connect() as conn:
            conn.execute(text("DELETE FROM messages"))
            conn.execute(text("VACUUM ANALYZE messages"))
        self.redis.flushdb()  # the outbox nobody reads, and the key's rate bucket

    def stored(self) -> int:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM messages")).scalar()

    def sessions(self) -> int:
        """Sessions PostgreSQL has opened on our database so far (PostgreSQL 14+)."""
        from sqlalchemy import text

        with self.admin.connect() as conn:
            conn.execute(text("SELECT pg_stat_clear_snapshot()"))
            value = conn.execute(
                text("SELECT sessions FROM pg_stat_database WHERE datname = :name"), {"name": DATABASE}
            ).scalar()
        return int(value or 0)

    def backend_pids(self) -> set[int]:
        from sqlalchemy import text

        with self.admin.connect() as conn:
            rows = conn.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = :name"), {"name": DATABASE})
            return set(rows.scalars())

    def phase(self, label: str, *, serving: str, wait: bool = True) -> Phase:
        return Phase(self, label, serving, wait)

    # --- in-process baselines --------------------------------------------------------------------

    # --- in-process baselines --------------------------------------------------------------------

    def send_loop(self, label: str) -> dict[str, Any]:
        import smartmail

        self.clear()
        with self.phase(label, serving="this process") as p:
            n = 0
            end = time.perf_counter() + self.args.seconds
            while time.perf_counter() < end:
                smartmail.send(**_send_kwargs(n))
                n += 1
            p.count(n)
            smartmail.flush()
        return p.figures(rate=n / p.wall, unit="messages/s")

    def send_many_run(self, label: str) -> dict[str, Any]:
        import smartmail

        self.clear()
        # New recipients in every batch and run, as over HTTP: parsed addresses are cached per process.
        self.serial += 1
        batches = [
            [message_spec(f"b{self.serial}-{b}-{i}") for i in range(self.args.batch)] for b in range(self.args.batches)
        ]
        with self.phase(label, serving="this process") as p:
            for batch in batches:
                smartmail.send_many(batch)
            smartmail.flush()
            p.count(self.args.batch * self.args.batches)
        return p.figures(rate=self.args.batch * self.args.batches / p.wall, unit="messages/s")

    # --- the web process -------------------------------------------------------------------------

    def start_web(self, argv: list[str], label: str, tree: Path = ROOT) -> tuple[Any, str]:
        port = free_port()
        process = self.children.start(
            [*argv, "--port", str(port)],
            env=dict(os.environ, **self.env),
            log_path=self.workdir / f"{label}.log",
            cwd=tree,  # `python -m` imports smartmail from the working directory first
        )
        wait_port(port, 60, process)
        url = f"http://127.0.0.1:{port}"
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{label} never answered /healthz; see {self.workdir / (label + '.log')}")
            time.sleep(0.1)
        return process, url

    def wrk(self, url: str, *, token: str | None, connections: int, seconds: float, threads: int = 2) -> dict:
        script = self.workdir / "post.lua"
        script.write_text(WRK_SCRIPT)
        env = dict(os.environ, BENCH_BODY=WRK_BODY, BENCH_TOKEN=token or "")
        argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s", "--timeout", "10s"]
        spy = self.start_profile(seconds)
        out = subprocess.run([*argv, "-s", str(script), url], env=env, capture_output=True, text=True, check=False)
        self.finish_profile(spy)
        lines = [line for line in out.stdout.splitlines() if line.startswith("BENCH ")]
        if out.returncode != 0 or not lines:
            raise BenchError(f"wrk failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}")
        figures = json.loads(lines[-1][6:])
        figures["command"] = " ".join([*argv, "-s", "post.lua", url])
        figures["rps"] = figures["requests"] / (figures["duration_us"] / 1e6)
        return figures

    # --- profiles (--profile) ------------------------------------------------------------------------

    def start_profile(self, seconds: float) -> tuple[subprocess.Popen, Path] | None:
        """py-spy on the serving processes for the next wrk run, when --profile asked for that one."""
        if self.profile_target is None or self.profile_next is None:
            return None
        path = Path(self.args.profile) / f"{self.profile_next}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        argv = ["py-spy", "record", "--pid", str(self.profile_target.pid), "--subprocesses", "--nonblocking"]
        argv += ["--rate", "200", "--format", "raw", "--duration", f"{seconds:.0f}", "--output", str(path)]
        spy = subprocess.Popen(
            [str(Path(sys.executable).parent / argv[0]), *argv[1:]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # attached before the load starts
        self.profile_next = None
        return spy, path

    def finish_profile(self, spy: tuple[subprocess.Popen, Path] | None) -> None:
        if spy is None:
            return
        process, path = spy
        process.wait(60)
        self.results.setdefault("profiles", {})[path.stem] = summarize_profile(path)
        log(f"    profile: {path}")
        for line in self.results["profiles"][path.stem]:
            log(f"      {line}")

    def http_send(self, url: str, label: str) -> dict[str, Any]:
        self.clear()
        with self.phase(label, serving="web server") as p:
            figures = self.wrk(url, token=self.token, connections=self.args.connections, seconds=self.args.seconds)
            p.count(figures["requests"])
        stored = self.stored()
        errors = figures["status"] + figures["timeout"] + figures["read"]
        log(
            f"    p50 {figures['p50_us'] / 1000:.1f} ms  p99 {figures['p99_us'] / 1000:.1f} ms  "
            f"errors {errors}  stored {stored}"
        )
        return {**p.figures(rate=figures["rps"], unit="requests/s"), "wrk": figures, "stored": stored}

    def http_batch(self, url: str, label: str, clients: int) -> dict[str, Any]:
        self.clear()
        with self.phase(label, serving="web server") as p:
            spy = self.start_profile(self.args.batches * 0.5)
            self.serial += 1
            batch = asyncio.run(
                post_batches(url, self.token, self.args.batch, self.args.batches, clients, f"h{self.serial}")
            )
            self.finish_profile(spy)
            p.count(batch["accepted"])
        stored = self.stored()
        rate = batch["accepted"] / batch["seconds"]
        return {**p.figures(rate=rate, unit="messages/s"), **batch, "stored": stored}

    def rounds(self) -> None:
        """Each round measures in-process and HTTP back to back, so other work on a shared machine falls
        on both sides of a ratio alike; each side's best round is its least disturbed one."""
        import smartmail

        for i in range(200):  # warm-up: templates compiled, pools opened, plans cached
            smartmail.send(**_send_kwargs(f"w{i}"))
        smartmail.flush()
        argv = [sys.executable, "-m", "smartmail.cli", "web", "--workers", str(self.args.workers)]
        process, url = self.start_web(argv, "smartmail-web")
        self.server = process
        log(f"smartmail web --workers {self.args.workers} at {url}")
        one, batch = f"{url}/v1/messages", f"{url}/v1/messages/batch"
        rounds: list[dict[str, Any]] = []
        try:
            self.wrk(one, token=self.token, connections=self.args.connections, seconds=3)  # warm-up
            for r in range(self.args.rounds):
                log(f"round {r + 1} of {self.args.rounds}")
                figures = {"send": self.send_loop("send()")}
                if self.args.profile and r == 0:
                    self.profile_target, self.profile_next = process, "smartmail-web-post-messages"
                figures["http_send"] = self.http_send(one, "POST /v1/messages")
                figures["send_many"] = self.send_many_run("send_many()")
                if self.args.profile and r == 0:
                    self.profile_target, self.profile_next = process, "smartmail-web-post-messages-batch"
                figures["http_batch"] = self.http_batch(batch, "POST /v1/messages/batch", self.args.batch_clients)
                figures["ratio_send"] = figures["http_send"]["rate"] / figures["send"]["rate"]
                figures["ratio_batch"] = figures["http_batch"]["rate"] / figures["send_many"]["rate"]
                log(
                    f"    round {r + 1}: HTTP/send() {figures['ratio_send']:.0%}, "
                    f"batch/send_many() {figures['ratio_batch']:.0%}"
                )
                rounds.append(figures)

            self.clear()
            with self.phase("POST /v1/messages at a constant rate", serving="web server") as p:
                constant = asyncio.run(
                    constant_rate(one, self.token, self.args.rate, self.args.rate_seconds, self.args.connections)
                )
                p.count(constant["sent"])
            self.results["http_send_constant_rate"] = {**p.figures(rate=constant["achieved_rate"]), **constant}
            log(
                f"    {constant['ok']}/{constant['sent']} at {constant['achieved_rate']:.0f}/s: "
                f"p50 {constant['p50_ms']:.1f} ms  p99 {constant['p99_ms']:.1f} ms  max {constant['max_ms']:.1f} ms "
                f"(from the scheduled start; from the actual send p99 {constant['service_p99_ms']:.1f} ms)"
            )
        finally:
            self.server = None
            self.children.stop(process, grace=10)
        self.results["rounds"] = rounds
        best = {
            name: max(rounds, key=lambda f: f[name]["rate"])[name]
            for name in ("send", "http_send", "send_many", "http_batch")
        }
        self.results["best"] = best
        self.results["ratio_send_best"] = best["http_send"]["rate"] / best["send"]["rate"]
        self.results["ratio_batch_best"] = best["http_batch"]["rate"] / best["send_many"]["rate"]
        # Serving CPU per message (the least of the rounds), in-process over HTTP: the throughput
        # ratio two dedicated cores would show if both sides were CPU-bound.
        least = {
            name: min(f[name]["serving_cpu_ms_each"] for f in rounds)
            for name in ("send", "http_send", "send_many", "http_batch")
        }
        self.results["serving_cpu_ms_each"] = least
        self.results["cpu_ratio_send"] = least["send"] / least["http_send"]
        self.results["cpu_ratio_batch"] = least["send_many"] / least["http_batch"]
        self.results["ratio_send_median"] = statistics.median(f["ratio_send"] for f in rounds)
        self.results["ratio_batch_median"] = statistics.median(f["ratio_batch"] for f in rounds)

    def ab(self) -> None:
        """--ab-tree: this checkout's `smartmail web` and another's (the commit before a change) side
        by side on one database, wrk on POST /v1/messages at each in turn, --rounds times."""
        other = Path(self.args.ab_tree).resolve()
        argv = [sys.executable, "-m", "smartmail.cli", "web", "--workers", str(self.args.workers)]
        servers = {name: self.start_web(argv, f"web-{name}", tree) for name, tree in (("this", ROOT), ("other", other))}
        log(f"A/B: this checkout against {other}")
        runs: dict[str, list[dict]] = {name: [] for name in servers}
        try:
            for _, url in servers.values():
                self.wrk(f"{url}/v1/messages", token=self.token, connections=self.args.connections, seconds=3)
            for _ in range(self.args.rounds):
                for name, (process, url) in servers.items():
                    self.server = process
                    runs[name].append(self.http_send(f"{url}/v1/messages", f"{name}: POST /v1/messages"))
        finally:
            self.server = None
            for process, _ in servers.values():
                self.children.stop(process, grace=10)
        self.results["ab"] = {"other_tree": str(other), "runs": runs}
        for name, figures in runs.items():
            log(
                f"  {name:6} best {max(f['rate'] for f in figures):.0f} requests/s, least CPU "
                f"{min(f['serving_cpu_ms_each'] for f in figures):.2f} ms, PostgreSQL sessions opened "
                f"{sum(f['pg_sessions_opened'] for f in figures)}"
            )

    def auth_cost(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "bench_api_app:app",
            "--app-dir",
            str(SCRIPTS),
            "--workers",
            str(self.args.workers),
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        process, url = self.start_web(argv, "bench-app")
        self.server = process
        log(f"auth + rate-limit layer (scripts/bench_api_app.py, {self.args.workers} workers)")
        try:
            routes = {"authenticated": (f"{url}/v1/messages", self.token), "open": (f"{url}{OPEN_PATH}", None)}
            for target, token in routes.values():
                self.wrk(target, token=token, connections=self.args.connections, seconds=2)  # warm-up
            out: dict[str, Any] = {}
            # Alternating, twice each: drift on a shared machine falls on both routes alike.
            for mode, connections, threads in (("saturated", self.args.connections, 2), ("one_connection", 1, 1)):
                runs: dict[str, list[dict]] = {name: [] for name in routes}
                for _ in range(2):
                    for name, (target, token) in routes.items():
                        self.clear()
                        if self.args.profile and mode == "one_connection" and not runs[name]:
                            self.profile_target, self.profile_next = process, f"bench-app-{name}-one-connection"
                        with self.phase(f"{name}, {mode}", serving="web server", wait=False) as p:
                            figures = self.wrk(
                                target,
                                token=token,
                                connections=connections,
                                threads=threads,
                                seconds=self.args.auth_seconds,
                            )
                            p.count(figures["requests"])
                        runs[name].append({**figures, **p.figures(rate=figures["rps"])})
                best = {name: max(r, key=lambda f: f["rps"]) for name, r in runs.items()}
                auth, open_ = best["authenticated"], best["open"]
                out[mode] = {
                    "runs": runs,
                    "authenticated_rps": auth["rps"],
                    "open_rps": open_["rps"],
                    # On a saturated machine 1/throughput is the machine time one request takes.
                    "machine_us_per_request": 1e6 / auth["rps"] - 1e6 / open_["rps"],
                    "latency_us_mean": auth["mean_us"] - open_["mean_us"],
                    "latency_us_p50": auth["p50_us"] - open_["p50_us"],
                    # CPU of the web server and PostgreSQL per request, the least of each route's runs.
                    "cpu_us_per_request": 1000
                    * (
                        min(f["serving_cpu_ms_each"] for f in runs["authenticated"])
                        - min(f["serving_cpu_ms_each"] for f in runs["open"])
                    ),
                }
                log(
                    f"  {mode:15} authenticated {auth['rps']:7.0f}/s mean {auth['mean_us']:7.0f} µs | "
                    f"open {open_['rps']:7.0f}/s mean {open_['mean_us']:7.0f} µs | layer: "
                    f"{out[mode]['cpu_us_per_request']:.0f} µs of server CPU, "
                    f"{out[mode]['machine_us_per_request']:.0f} µs of machine time, "
                    f"{out[mode]['latency_us_mean']:.0f} µs of latency per request"
                )
            self.results["auth_layer"] = out
        finally:
            self.server = None
            self.children.stop(process, grace=10)


def _send_kwargs(i: int | str) -> dict[str, Any]:
    spec = message_spec(i)
    return {"to": spec["to"], "template": spec["template"], "context": spec["context"]}


class Phase:
    """Wall time, machine CPU, CPU time of each of our processes and PostgreSQL sessions opened over
    one measured phase. On a shared machine the CPU time a message costs is the steadier figure:
    other work stretches wall time, not CPU time (much)."""

    def __init__(self, run: Run, label: str, serving: str, wait: bool) -> None:
        self.run, self.label, self.n = run, label, 0
        self.serving, self.wait = serving, wait  # whose CPU is the serving side's: this process or the web server

    def pids(self) -> dict[str, set[int]]:
        roles = {"this process": {os.getpid()}, "postgresql": self.run.backend_pids()}
        if self.run.server is not None:
            out = subprocess.run(["ps", "-o", "pid=", "-g", str(self.run.server.pid)], capture_output=True, text=True)
            roles["web server"] = {int(p) for p in out.stdout.split()}
        return roles

    def __enter__(self) -> Phase:
        # Other work on a shared machine would be measured as ours: start when it is quiet.
        self.busy_before = wait_until_idle(self.run.args.idle_wait if self.wait else 0)
        self.sessions0 = self.run.sessions()
        self.cpu0 = {role: process_cpu(pids) for role, pids in self.pids().items()}
        self.children0 = _children_cpu()
        self.busy0, self.total0 = machine_cpu()
        self.t0 = time.perf_counter()
        return self

    def count(self, n: int) -> None:
        self.n = n

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        busy1, total1 = machine_cpu()
        self.busy = (busy1 - self.busy0) / max(total1 - self.total0, 1e-9)
        # Backends that ended during the phase (connection churn) are not counted: an underestimate.
        self.cpu = {
            role: sum(v - self.cpu0.get(role, {}).get(pid, 0.0) for pid, v in process_cpu(pids).items())
            for role, pids in self.pids().items()
        }
        self.cpu["wrk and py-spy"] = _children_cpu() - self.children0
        self.opened = self.run.sessions() - self.sessions0

    def figures(self, *, rate: float, unit: str = "requests/s") -> dict[str, Any]:
        per_item = {role: seconds * 1000 / max(self.n, 1) for role, seconds in self.cpu.items()}
        serving = per_item.get(self.serving, 0.0) + per_item["postgresql"]
        log(
            f"  {self.label:24} {self.n:7d} in {self.wall:5.1f} s = {rate:8.0f} {unit}  "
            f"(machine {self.busy:.0%} busy, {self.opened} PostgreSQL sessions opened)\n"
            f"    CPU ms each: {self.serving} + PostgreSQL {serving:.2f} ("
            + ", ".join(f"{role} {ms:.2f}" for role, ms in per_item.items() if ms)
            + ")"
        )
        return {
            "count": self.n,
            "seconds": self.wall,
            "rate": rate,
            "unit": unit,
            "machine_busy": self.busy,
            "machine_busy_before": self.busy_before,
            "pg_sessions_opened": self.opened,
            "cpu_ms_each": per_item,
            # The producer (this process in-process, the web server over HTTP) and PostgreSQL.
            "serving_cpu_ms_each": serving,
            "serving": self.serving,
        }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def constant_rate(url: str, token: str, rate: float, seconds: float, connections: int) -> dict[str, Any]:
    """POST on a fixed schedule (request i due at start + i/rate) over `connections` keep-alive
    connections, each taking the next due request when it is free. Latency counts from the due time,
    so a request held up behind a slow one is charged its wait (wrk2's correction for coordinated
    omission). Plain HTTP/1.1 on asyncio streams: the generator's own CPU stays small on 2 cores."""
    parts = urlsplit(url)
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    total = int(rate * seconds)
    warmup = int(rate)  # the first second: connections opening
    latencies: list[float] = []
    service: list[float] = []
    failures: dict[str, int] = {}
    next_due = 0
    start = time.perf_counter() + 0.2

    async def connection() -> None:
        nonlocal next_due
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            while next_due < total:
                i, next_due = next_due, next_due + 1
                due = start + i / rate
                body = json.dumps(message_spec(f"c{i}")).encode()
                request = head.replace("{length}", str(len(body))).encode() + body
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent = time.perf_counter()
                writer.write(request)
                response = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", response).group(1))
                await reader.readexactly(length)
                done = time.perf_counter()
                status = response[9:12].decode()
                if status != "202":
                    failures[status] = failures.get(status, 0) + 1
                elif i >= warmup:
                    latencies.append(done - due)
                    service.append(done - sent)
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    service.sort()
    return {
        "sent": total,
        "connections": connections,
        "ok": total - sum(failures.values()),
        "failures": failures,
        "achieved_rate": total / elapsed,
        "measured": len(latencies),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p90_ms": percentile(latencies, 90) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": (latencies[-1] if latencies else float("nan")) * 1000,
        "service_p50_ms": percentile(service, 50) * 1000,
        "service_p99_ms": percentile(service, 99) * 1000,
    }


async def post_batches(url: str, token: str, size: int, count: int, clients: int, prefix: str) -> dict[str, Any]:
    """`count` batches of `size` messages, from `clients` concurrent keep-alive connections."""
    import httpx

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    bodies = [
        json.dumps({"messages": [message_spec(f"{prefix}-{b}-{i}") for i in range(size)]}).encode()
        for b in range(count)
    ]
    queue = list(reversed(bodies))
    accepted = 0
    seconds: list[float] = []
    async with httpx.AsyncClient(headers=headers, timeout=120, limits=httpx.Limits(max_connections=clients)) as client:

        async def worker() -> None:
            nonlocal accepted
            while queue:
                body = queue.pop()
                started = time.perf_counter()
                response = await client.post(url, content=body)
                seconds.append(time.perf_counter() - started)
                if response.status_code != 200:
                    raise BenchError(f"batch answered {response.status_code}: {response.text[:500]}")
                accepted += response.json()["accepted"]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    seconds.sort()
    log(f"    {count} batches of {size} from {clients} client(s): median {percentile(seconds, 50) * 1000:.0f} ms each")
    return {
        "clients": clients,
        "batches": count,
        "batch_size": size,
        "accepted": accepted,
        "seconds": elapsed,
        "batch_ms_p50": percentile(seconds, 50) * 1000,
    }


_FRAME = re.compile(r"^(.+) \(([^()]+):\d+\)$")
# A thread whose innermost frame is one of these waits for work: not time spent serving.
_WAITING = ("Condition.wait", "Queue.get", "Event.wait", "select", "poll", "_run_once")


def start_py_spy(args: argparse.Namespace, name: str, pid: int, seconds: float) -> tuple[subprocess.Popen, Path]:
    """py-spy on pid and its children for `seconds`, written to <--profile>/<name>.txt (py-spy from
    PATH or --py-spy)."""
    spy = shutil.which("py-spy") or getattr(args, "py_spy", None)
    if not spy or not Path(spy).exists():
        raise BenchError("--profile needs py-spy (pip install py-spy; or --py-spy PATH)")
    path = Path(args.profile) / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = [spy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate", "200"]
    argv += ["--format", "raw", "--duration", f"{max(seconds, 1):.0f}", "--output", str(path)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the load starts
    return process, path


def finish_py_spy(spy: tuple[subprocess.Popen, Path] | None, results: dict[str, Any]) -> None:
    """Wait for start_py_spy's profile and put its summary in results["profiles"]."""
    if spy is None:
        return
    process, path = spy
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
    if not path.exists():
        log(f"    (no profile written to {path})")
        return
    lines = summarize_profile(path, top=30)
    results.setdefault("profiles", {})[path.stem] = lines
    log(f"    profile: {path}")
    for line in lines:
        log(f"      {line}")


def summarize_profile(path: Path, top: int = 20) -> list[str]:
    """Where the serving threads' samples were, from py-spy's raw output (`frames... count` per
    line): the functions most often innermost (self), then the project's and its libraries' frames
    most often on the stack (inclusive), each with its share of the busy samples."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [
            f"{m.group(1)} ({m.group(2).split('site-packages/')[-1]})"
            for m in map(_FRAME.match, stack.split(";"))
            if m is not None
        ]
        if not count.isdigit() or not frames or frames[-1].split(" (")[0].endswith(_WAITING):
            continue
        n = int(count)
        total += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            if frame.split("(")[1].startswith(("smartmail/", "fastapi/", "starlette/", "sqlalchemy/", "redis/")):
                inclusive[frame] = inclusive.get(frame, 0) + n
    if not total:
        return []
    lines = [f"{total} busy samples; self:"]
    lines += [f"{n / total:6.1%}  {f}" for f, n in sorted(own.items(), key=lambda kv: -kv[1])[: top // 2]]
    lines.append("inclusive:")
    lines += [f"{n / total:6.1%}  {f}" for f, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each send() loop and wrk run (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="in-process/HTTP rounds (default 3)")
    parser.add_argument("--batch-clients", type=int, default=2, help="concurrent batch requests (default 2)")
    parser.add_argument("--connections", type=int, default=32, help="wrk keep-alive connections (default 32)")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (default 2)")
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s of the constant-rate run (default 200)")
    parser.add_argument("--rate-seconds", type=float, default=20.0, help="length of the constant-rate run")
    parser.add_argument("--batch", type=int, default=1000, help="messages per batch (default 1000)")
    parser.add_argument("--batches", type=int, default=10, help="batches per batch run (default 20)")
    parser.add_argument("--auth-seconds", type=float, default=8.0, help="length of each auth-layer wrk run")
    parser.add_argument(
        "--web-threads", type=int, default=None, help="SMARTMAIL_WEB_THREADS for the web processes (default: unset)"
    )
    parser.add_argument("--postgres-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/14", help="this Redis database is FLUSHED (default /14)"
    )
    parser.add_argument(
        "--idle-wait", type=float, default=20.0, help="wait up to this long (s) for the machine to go idle per phase"
    )
    parser.add_argument(
        "--profile", default=None, help="a folder: py-spy profiles of the servers under the first wrk runs"
    )
    parser.add_argument(
        "--ab-tree",
        default=None,
        help="another checkout (`git worktree add DIR COMMIT`): only compare its smartmail web with this one's",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp directory with the web logs")
    args = parser.parse_args()

    # Stopped by a signal, the run still stops its servers and drops its database (a shell starts a
    # background job with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run = Run(args)
    try:
        run.setup()
        wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
        log(f"environment: {run.pg_version}; {wrk_version.strip()}; {os.cpu_count()} CPUs; all on this host")
        if args.ab_tree:
            run.ab()
        else:
            run.rounds()
            run.auth_cost()
    except BenchError as exc:
        log(f"failed: {exc}")
        run.args.keep_logs = True
        run.teardown()
        return 1
    except BaseException:
        run.args.keep_logs = True
        run.teardown()
        raise
    run.teardown()
    r = run.results
    if args.ab_tree:
        bench_results.save("bench_api", args, r)
        return 0
    best = r["best"]
    verdict = {
        "send_per_s": best["send"]["rate"],
        "http_send_per_s": best["http_send"]["rate"],
        "http_send_p50_ms": best["http_send"]["wrk"]["p50_us"] / 1000,
        "http_send_p99_ms": best["http_send"]["wrk"]["p99_us"] / 1000,
        "http_send_ratio_best": r["ratio_send_best"],
        "http_send_ratio_median": r["ratio_send_median"],
        "http_send_ratio_ok": r["ratio_send_best"] >= 0.60,
        "http_send_cpu_ratio": r["cpu_ratio_send"],
        "constant_rate_p99_ms": r["http_send_constant_rate"]["p99_ms"],
        "constant_rate_p99_ok": r["http_send_constant_rate"]["p99_ms"] < 50,
        "send_many_per_s": best["send_many"]["rate"],
        "http_batch_per_s": best["http_batch"]["rate"],
        "batch_ratio_best": r["ratio_batch_best"],
        "batch_ratio_median": r["ratio_batch_median"],
        "batch_ratio_ok": r["ratio_batch_best"] >= 0.80,
        "batch_cpu_ratio": r["cpu_ratio_batch"],
        "auth_layer_cpu_us": r["auth_layer"]["saturated"]["cpu_us_per_request"],
        "auth_layer_machine_us": r["auth_layer"]["saturated"]["machine_us_per_request"],
        "auth_layer_latency_us": r["auth_layer"]["one_connection"]["latency_us_mean"],
    }
    r["targets"] = verdict
    r["environment"] = {"postgresql": run.pg_version, "wrk": wrk_version.strip()}
    log(json.dumps(verdict, indent=2))
    bench_results.save("bench_api", args, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
