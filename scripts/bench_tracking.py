#!/usr/bin/env python3
"""Benchmark: click redirects against a bare route, and what tracking and the event stream cost a campaign.

    .venv/bin/python scripts/bench_tracking.py                  # PostgreSQL; ~15 minutes
    .venv/bin/python scripts/bench_tracking.py --recipients 20000 --rounds 1 --click-seconds 5   # a quick look
    .venv/bin/python scripts/bench_tracking.py --before-tree /work/wt-bench-before   # default: /tmp/smartmail-before

Needs PostgreSQL with trust auth (databases `smartmail_bench` and `smartmail_bench_before` are
created and dropped), Redis (database 12 by default, FLUSHED; one is started if none answers), wrk
(Debian package `wrk`) and Postfix's smtp-sink. The commit before issue 19 (281c7c4) must be
checked out in --before-tree (`git worktree add DIR 281c7c4`) for part 3; --skip-before leaves it out.

In one run, on PostgreSQL:
1. Click redirects: `smartmail web --workers 2` (GET /t/c/<token>, valid tokens of --click-messages
   stored messages, 3 links each, shuffled; wrk's Lua script rotates over all of them with a
   browser's User-Agent) and one events worker (`smartmail worker --queues events --concurrency 1`),
   against scripts/bench_tracking_app.py's bare FastAPI route answering the same 302 (uvicorn, 2
   workers, as `smartmail web` runs it) and the same route inside the product app (its middleware),
   alternating, --click-rounds times each. Per tracked run: req/s, p99, the stream's backlog
   (entries added to the Redis stream and not yet rows of `events`, sampled every 0.25 s) during
   and after the run until it is 0, and events written per second. Target: >= 70% of the bare route.
2. Campaigns of --recipients contacts (the `welcome` template with 3 more links: `welcome-links`,
   4 http links and the unsubscribe link), tracked (the default) and untracked
   (`campaigns.tracking = false`), and
3. the same untracked campaign on the commit before this issue (--before-tree: its worker, its
   fan-out, its schema), alternating tracked / untracked / before, --rounds times; msg/s from
   launch to the sink's last acceptance, as scripts/bench_campaign.py times it. Targets: tracked
   >= 85% of untracked; untracked within 10% of before.
Each side's best run is its least disturbed one (the machine is shared); medians are reported too.
Reuses scripts/bench_send.py's database, sink, worker and CPU accounting and bench_api.py's wrk runner.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import bench_results

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(SCRIPTS))

from bench_api import finish_py_spy, start_py_spy  # noqa: E402
from bench_send import (  # noqa: E402
    WORKER_FLAGS,
    Bench,
    BenchError,
    CpuMeter,
    SmtpSink,
    Worker,
    free_port,
    log,
    process_cpu,
    run_guarded,
    wait_for,
    wait_port,
)

TEMPLATE = "welcome-links"
BROWSER = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.0 Safari/605.1.15"
)
# The shipped welcome template has one link; these three make link rewriting do the work of a real
# newsletter's (4 links, the text part's too).
EXTRA_LINKS = (
    "  <p><a href=\"https://example.com/pricing?plan={{ plan | default('free') }}\">Your plan</a> &middot;\n"
    '     <a href="https://example.com/docs/getting-started">Getting started</a> &middot;\n'
    '     <a href="https://example.com/blog/welcome">What is new</a></p>\n'
)
LINK_URLS = (
    "https://example.com/login",
    "https://example.com/docs/getting-started",
    "https://example.com/blog/welcome",
)

# wrk: each thread starts at its own place in the shuffled token list and walks it; one JSON line
# with the figures at the end (µs), as bench_api.py's script prints them.
WRK_SCRIPT = """
local tokens = {}
local counter = 0
local prefix = os.getenv("BENCH_PREFIX")
wrk.headers["User-Agent"] = os.getenv("BENCH_UA")
wrk.headers["Accept"] = "text/html"
function setup(thread) counter = counter + 1; thread:set("id", counter) end
function init(args)
  for line in io.lines(os.getenv("BENCH_TOKENS")) do tokens[#tokens + 1] = line end
  n = math.floor(#tokens * (id - 1) / 8)
end
function request()
  n = n % #tokens + 1
  return wrk.format("GET", prefix .. tokens[n])
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


class TreeWorker(Worker):
    """bench_send's Worker, started from a given checkout (cwd and PYTHONPATH: `python -m` puts the
    working directory first on sys.path) with a given argv."""

    def __init__(self, bench: Bench, label: str, argv: list[str], queues: list[str], env: dict, tree: Path) -> None:
        self.bench, self.label, self.queues = bench, label, queues
        self.log_path = bench.workdir / f"worker-{label}.log"
        env = dict(env, PYTHONPATH=str(tree))
        self.process = bench.children.start(argv, env=env, log_path=self.log_path, cwd=tree)
        wait_for(self._declared, timeout=60, what=f"the {label} worker to declare its queues", alive=self.check)


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bench = Bench(args)
        self.results: dict[str, Any] = {}
        self.before_url: str | None = None
        self.profiled: dict[str, bool] = {}  # which runs were profiled already (--profile: the first of each)

    @property
    def workdir(self) -> Path:
        return self.bench.workdir

    # --- set-up ---------------------------------------------------------------------------------

    def setup(self) -> None:
        from sqlalchemy import text

        bench = self.bench
        if shutil.which("wrk") is None:
            raise BenchError("wrk not found (Debian: apt-get install wrk)")
        bench.setup()
        templates = self.workdir / "templates"
        shutil.copytree(ROOT / "templates", templates)
        shutil.copytree(templates / "welcome", templates / TEMPLATE)
        body = templates / TEMPLATE / "body.html"
        body.write_text(body.read_text().replace("</body>", EXTRA_LINKS + "</body>"))
        os.environ.update(
            {
                "SMARTMAIL_TEMPLATES_DIR": str(templates),
                "SMARTMAIL_LOG_LEVEL": "WARNING",
                "PYTHONPATH": str(ROOT),
            }
        )
        from smartmail.config import get_settings

        get_settings.forget()
        self.url = bench.database.url
        if not self.args.skip_before:
            tree = Path(self.args.before_tree)
            if not (tree / "smartmail").is_dir():
                raise BenchError(
                    f"--before-tree {tree} has no checkout: git -C {ROOT} worktree add {tree} 281c7c4 "
                    "(or --skip-before)"
                )
            self.before_commit = subprocess.run(
                ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
            with bench.database.admin.connect() as conn:
                conn.execute(text('DROP DATABASE IF EXISTS "smartmail_bench_before" WITH (FORCE)'))
                conn.execute(text('CREATE DATABASE "smartmail_bench_before"'))
            self.before_url = self.url.rsplit("/", 1)[0] + "/smartmail_bench_before"
            self.child(tree, "migrate", self.before_url)
        log(f"audience: {self.args.recipients} contacts on list `bench` (template {TEMPLATE}: 4 links)")
        self.child(ROOT, "audience", self.url, str(self.args.recipients))
        if self.before_url:
            self.child(Path(self.args.before_tree), "audience", self.before_url, str(self.args.recipients))

    def child_env(self, tree: Path, url: str) -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=str(tree), SMARTMAIL_DATABASE_URL=url)

    def child(self, tree: Path, *argv: str) -> None:
        out = subprocess.run(
            [sys.executable, str(SCRIPTS / "bench_tracking_child.py"), *argv],
            env=self.child_env(tree, argv[1]),
            cwd=tree,
            capture_output=True,
            text=True,
        )
        if out.returncode:
            raise BenchError(f"bench_tracking_child.py {argv[0]} failed in {tree}:\n{out.stderr[-3000:]}")

    def teardown(self) -> None:
        from sqlalchemy import text

        self.bench.children.stop_all()
        if self.before_url and self.bench.database is not None and self.bench.database.admin is not None:
            try:
                with self.bench.database.admin.connect() as conn:
                    conn.execute(text('DROP DATABASE IF EXISTS "smartmail_bench_before" WITH (FORCE)'))
            except Exception as exc:  # noqa: BLE001 - cleanup must go on
                log(f"  (could not drop smartmail_bench_before: {exc})")
        self.bench.teardown()

    def backends(self, database: str) -> set[int]:
        from sqlalchemy import text

        with self.bench.database.admin.connect() as conn:
            rows = conn.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = :d"), {"d": database})
            return set(rows.scalars())

    def group(self, process: subprocess.Popen) -> set[int]:
        out = subprocess.run(["ps", "-o", "pid=", "-g", str(process.pid)], capture_output=True, text=True)
        return {int(p) for p in out.stdout.split()}

    def redis_pid(self) -> set[int]:
        try:
            return {int(self.bench.redis.info("server")["process_id"])}
        except Exception:  # noqa: BLE001 - a remote Redis: not ours to count
            return set()

    # --- profiles (--profile) -------------------------------------------------------------------------

    def start_profile(self, name: str, pid: int, seconds: float) -> tuple[subprocess.Popen, Path] | None:
        """py-spy on pid and its children for `seconds`, when --profile names a folder."""
        return start_py_spy(self.args, name, pid, seconds) if self.args.profile else None

    def finish_profile(self, spy: tuple[subprocess.Popen, Path] | None) -> None:
        finish_py_spy(spy, self.results)

    # --- 1. click redirects -----------------------------------------------------------------------

    def click_messages(self) -> Path:
        """--click-messages stored `sent` messages of the audience's contacts, delivered an hour ago
        (no click is `too_soon`); their 3 links' tokens, shuffled, one path per line."""
        from datetime import timedelta

        from sqlalchemy import create_engine, insert, select

        from smartmail.content.tracking_links import click_url
        from smartmail.store.engine import utcnow
        from smartmail.store.ids import new_ids
        from smartmail.store.models import Contact, Message

        n = self.args.click_messages
        engine = create_engine(self.url)
        sent_at = utcnow() - timedelta(hours=1)
        tokens: list[str] = []
        with engine.begin() as connection:
            contacts = list(connection.scalars(select(Contact.id).order_by(Contact.id).limit(n)))
            ids = new_ids(len(contacts))
            rows = [
                {
                    "id": mid,
                    "state": "sent",
                    "sender": "bench@bench.example.com",
                    "recipient": f"user{i}@example.com",
                    "subject": "Welcome",
                    "text": "Welcome",
                    "headers": {},
                    "tags": [],
                    "message_id_header": f"<{mid}@bench.example.com>",
                    "created_at": sent_at,
                    "finished_at": sent_at,
                    "contact_id": contact,
                    "attempts": 1,
                }
                for i, (mid, contact) in enumerate(zip(ids, contacts))
            ]
            for start in range(0, len(rows), 5000):
                connection.execute(insert(Message), rows[start : start + 5000])
        engine.dispose()
        for mid in ids:
            for link, url in enumerate(LINK_URLS, start=1):
                tokens.append(click_url(mid, link, url).split("/t/c/", 1)[1])
        random.Random(19).shuffle(tokens)
        path = self.workdir / "tokens.txt"
        path.write_text("\n".join(tokens) + "\n")
        return path

    def start_server(self, argv: list[str], label: str) -> tuple[subprocess.Popen, str]:
        import httpx

        port = free_port()
        process = self.bench.children.start(
            [*argv, "--port", str(port)], env=dict(os.environ), log_path=self.workdir / f"{label}.log", cwd=ROOT
        )
        wait_port(port, 60, process)
        url = f"http://127.0.0.1:{port}"
        wait_for(
            lambda: _healthy(httpx, f"{url}/healthz"),
            timeout=60,
            what=f"{label} to answer /healthz",
            alive=lambda: None if process.poll() is None else (_ for _ in ()).throw(BenchError(f"{label} exited")),
            interval=0.1,
        )
        return process, url

    def wrk(self, url: str, prefix: str, seconds: float, tokens: Path) -> dict[str, Any]:
        script = self.workdir / "click.lua"
        script.write_text(WRK_SCRIPT)
        env = dict(os.environ, BENCH_TOKENS=str(tokens), BENCH_PREFIX=prefix, BENCH_UA=BROWSER)
        argv = ["wrk", "-t", str(self.args.threads), "-c", str(self.args.connections), "-d", f"{seconds:g}s"]
        argv += ["--timeout", "10s", "-s", str(script), url]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        lines = [line for line in out.stdout.splitlines() if line.startswith("BENCH ")]
        if out.returncode != 0 or not lines:
            raise BenchError(f"wrk failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}")
        figures = json.loads(lines[-1][6:])
        figures["command"] = " ".join([*argv[:-3], "-s", "click.lua", url + prefix + "<token>"])
        figures["rps"] = figures["requests"] / (figures["duration_us"] / 1e6)
        figures["errors"] = sum(figures[k] for k in ("connect", "read", "write", "status", "timeout"))
        return figures

    def clicks(self) -> None:
        args = self.args
        tokens = self.click_messages()
        log(
            f"\n1. click redirects: {args.click_messages} messages x 3 links = {3 * args.click_messages} tokens; "
            f"wrk -t {args.threads} -c {args.connections}, {args.click_seconds:g} s a run"
        )
        self.bench.fresh_broker()
        events_worker = TreeWorker(
            self.bench,
            "events",
            [
                sys.executable,
                "-m",
                "smartmail.cli",
                "worker",
                "--queues",
                "events",
                "--concurrency",
                "1",
                "-l",
                "WARNING",
            ],
            ["events"],
            dict(os.environ),
            ROOT,
        )
        # As `smartmail web` runs uvicorn: 2 workers, no access log, no Server header, no proxy headers.
        options = ["--app-dir", str(SCRIPTS), "--workers", "2", "--no-access-log", "--no-server-header"]
        options += ["--no-proxy-headers", "--log-level", "warning"]
        uvicorn = [sys.executable, "-m", "uvicorn"]
        servers = {
            "tracked": self.start_server([sys.executable, "-m", "smartmail.cli", "web", "--workers", "2"], "web"),
            "bare": self.start_server([*uvicorn, "bench_tracking_app:bare", *options], "bare"),
            "in_app": self.start_server([*uvicorn, "bench_tracking_app:in_app", *options], "in-app"),
        }
        prefixes = {"tracked": "/t/c/", "bare": "/bench-bare/", "in_app": "/bench-bare/"}
        runs: dict[str, list[dict]] = {name: [] for name in servers}
        try:
            for name, (_, url) in servers.items():  # warm-up: workers imported, pools and Redis connections open
                self.wrk(url, prefixes[name], 2, tokens)
            self.wait_drained(events_worker, timeout=120)
            for _ in range(args.click_rounds):
                for name, (process, url) in servers.items():
                    self.bench.quiet()
                    runs[name].append(self.click_run(name, process, url, prefixes[name], tokens, events_worker))
        finally:
            for process, _ in servers.values():
                self.bench.children.stop(process, grace=10)
            events_worker.stop()
        best = {name: max(rs, key=lambda f: f["rps"]) for name, rs in runs.items()}
        tracked = runs["tracked"]
        out = {
            "runs": runs,
            "best_rps": {name: b["rps"] for name, b in best.items()},
            "best_p99_ms": {name: b["p99_us"] / 1000 for name, b in best.items()},
            "ratio_best": best["tracked"]["rps"] / best["bare"]["rps"],
            "ratio_median": statistics.median(t["rps"] for t in tracked)
            / statistics.median(b["rps"] for b in runs["bare"]),
            "ratio_in_app_best": best["tracked"]["rps"] / best["in_app"]["rps"],
            "least_serving_cpu_us": {
                name: min(f["serving_cpu_us_per_request"] for f in rs) for name, rs in runs.items()
            },
            "events_per_s_during": max(t["events_per_s_during"] for t in tracked),
            "backlog_peak": max(t["backlog_peak"] for t in tracked),
            "backlog_at_end": max(t["backlog_at_end"] for t in tracked),
            "drain_after_s": max(t["drain_after_s"] for t in tracked),
            "events_stored": sum(t["events_stored"] for t in tracked),
            "requests": sum(t["requests"] for t in tracked),
        }
        out["ok"] = out["ratio_best"] >= 0.70
        out["cpu_ratio"] = out["least_serving_cpu_us"]["bare"] / out["least_serving_cpu_us"]["tracked"]
        self.results["clicks"] = out
        log(
            f"  best: tracked {out['best_rps']['tracked']:.0f} req/s p99 {out['best_p99_ms']['tracked']:.1f} ms | "
            f"bare FastAPI {out['best_rps']['bare']:.0f} req/s p99 {out['best_p99_ms']['bare']:.1f} ms | "
            f"bare route in the product app {out['best_rps']['in_app']:.0f} req/s "
            f"p99 {out['best_p99_ms']['in_app']:.1f} ms\n"
            f"  tracked / bare: {out['ratio_best']:.0%} best, {out['ratio_median']:.0%} median (target >= 70%) "
            f"{'OK' if out['ok'] else 'MISSED'}; tracked / bare-in-app {out['ratio_in_app_best']:.0%}\n"
            f"  CPU per request (web, events worker, PostgreSQL, Redis; least of the runs): "
            + ", ".join(f"{name} {us:.0f} µs" for name, us in out["least_serving_cpu_us"].items())
            + f"; bare / tracked {out['cpu_ratio']:.0%}\n"
            f"  events worker: up to {out['events_per_s_during']:.0f} events/s written during a run, backlog peak "
            f"{out['backlog_peak']}, {out['backlog_at_end']} at the end of a run, "
            f"0 after {out['drain_after_s']:.1f} s; "
            f"{out['events_stored']} events for {out['requests']} requests"
        )

    def stream_state(self) -> tuple[int, int, int, str]:
        """(entries ever added to the stream, its length now, `clicked` rows in events, the checkpoint)."""
        from sqlalchemy import text

        from smartmail.feedback import engagement

        key = engagement.stream_key()
        try:
            info = self.bench.redis.xinfo_stream(key)
            added, length = int(info.get("entries-added", info.get("length", 0))), int(info["length"])
        except Exception:  # noqa: BLE001 - no stream yet
            added, length = 0, 0
        with self.bench.database.engine.connect() as conn:
            stored = conn.execute(text("SELECT count(*) FROM events WHERE type = 'clicked'")).scalar() or 0
            checkpoint = conn.execute(
                text("SELECT position FROM stream_checkpoints WHERE name = :n"), {"n": engagement.CHECKPOINT}
            ).scalar()
        return added, length, int(stored), checkpoint or ""

    def wait_drained(self, worker: Worker, timeout: float) -> list[tuple[float, int]]:
        """Wait until every hit added to the stream is a row. A web process asks for a drain at most
        once a second (SET NX PX 1000), so the hits of a burst's last second can wait for beat's
        periodic drain (every 30 s; no beat runs here): after --nudge-after seconds without progress
        the bench asks for a drain as beat would. Returns (seconds waited, backlog) at each nudge."""
        from smartmail.feedback import engagement
        from smartmail.workers.dispatch import publish

        nudges: list[tuple[float, int]] = []
        started = time.monotonic()
        progress = (started, -1)

        def drained() -> bool:
            nonlocal progress
            added, _, stored, _ = self.stream_state()
            now = time.monotonic()
            if stored != progress[1]:
                progress = (now, stored)
            elif now - progress[0] >= self.args.nudge_after and stored < added:
                nudges.append((now - started, added - stored))
                publish(engagement.DRAIN_TASK)
                progress = (now, stored)
            return stored >= added

        wait_for(
            drained, timeout=timeout, what="the events worker to drain the stream", alive=worker.check, interval=0.25
        )
        return nudges

    def click_run(
        self, name: str, process: subprocess.Popen, url: str, prefix: str, tokens: Path, events_worker: Worker
    ) -> dict[str, Any]:
        roles = lambda: {  # noqa: E731
            "web": self.group(process),
            "events worker": set(events_worker.pids()),
            "postgres": self.backends("smartmail_bench"),
            "redis": self.redis_pid(),
        }
        added0, _, stored0, _ = self.stream_state()
        cpu0 = {role: process_cpu(pids) for role, pids in roles().items()}
        samples: list[tuple[float, int, int, int]] = []  # (seconds since start, backlog, stream length, stored)
        stop = threading.Event()
        started = time.perf_counter()

        def sample() -> None:
            while not stop.is_set():
                added, length, stored, _ = self.stream_state()
                samples.append((time.perf_counter() - started, added - stored, length, stored - stored0))
                stop.wait(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        spy = None
        if not self.profiled.get(f"click-{name}"):
            self.profiled[f"click-{name}"] = True
            spy = self.start_profile(f"click-{name}-web", process.pid, self.args.click_seconds)
            if name == "tracked":
                events_spy = self.start_profile(
                    "click-events-worker", events_worker.process.pid, self.args.click_seconds + 2
                )
        if name == "tracked":
            sampler.start()
        figures = self.wrk(url, prefix, self.args.click_seconds, tokens)
        self.finish_profile(spy)
        if spy is not None and name == "tracked":
            self.finish_profile(events_spy)
        ended = time.perf_counter() - started
        cpu = {
            role: sum(v - cpu0.get(role, {}).get(pid, 0.0) for pid, v in process_cpu(pids).items())
            for role, pids in roles().items()
        }
        figures["cpu_us_per_request"] = {role: s * 1e6 / max(figures["requests"], 1) for role, s in cpu.items()}
        # Everything serving a click costs: the web processes, and for a tracked one its recording too.
        figures["serving_cpu_us_per_request"] = sum(figures["cpu_us_per_request"].values())
        line = (
            f"  {name:8} {figures['rps']:7.0f} req/s  p50 {figures['p50_us'] / 1000:5.1f} ms  "
            f"p99 {figures['p99_us'] / 1000:5.1f} ms  errors {figures['errors']}  CPU µs/request: "
            + ", ".join(f"{role} {us:.0f}" for role, us in figures["cpu_us_per_request"].items() if us >= 1)
        )
        if name == "tracked":
            nudges = self.wait_drained(events_worker, timeout=self.args.drain_timeout)
            drained_at = time.perf_counter() - started
            stop.set()
            sampler.join()
            added, length, stored, checkpoint = self.stream_state()
            during = [s for s in samples if s[0] <= ended]
            at_end = during[-1] if during else (ended, 0, 0, 0)
            stored_run = stored - stored0
            figures.update(
                {
                    "hits_added": added - added0,
                    "events_stored": stored_run,
                    "backlog_peak": max((s[1] for s in samples), default=0),
                    "backlog_at_end": at_end[1],
                    "stream_length_peak": max((s[2] for s in samples), default=0),
                    "stream_length_after": length,
                    "drain_after_s": drained_at - ended,
                    "events_per_s_during": at_end[3] / max(at_end[0], 1e-6),
                    "events_per_s_overall": stored_run / drained_at,
                    "checkpoint_after": checkpoint,
                    "drain_nudges": nudges,
                    "samples": [[round(t, 2), b, n, s] for t, b, n, s in samples],
                }
            )
            line += (
                f"\n           hits {figures['hits_added']} -> events {stored_run}; backlog peak "
                f"{figures['backlog_peak']}, {figures['backlog_at_end']} when wrk stopped, "
                f"0 {figures['drain_after_s']:.1f} s "
                f"later; {figures['events_per_s_during']:.0f} events/s written during the run "
                f"({figures['events_per_s_overall']:.0f}/s to the last)"
            )
            if nudges:
                line += (
                    "\n           no drain was asked for the last hits: the bench asked (as beat does every 30 s) "
                    + ", ".join(f"after {t:.1f} s with {b} waiting" for t, b in nudges)
                )
        log(line)
        return figures

    # --- 2 and 3. campaigns ---------------------------------------------------------------------------

    def campaign(self, variant: str, serial: int) -> dict[str, Any]:
        n = self.args.recipients
        tree = Path(self.args.before_tree) if variant == "before" else ROOT
        url = self.before_url if variant == "before" else self.url
        database = "smartmail_bench_before" if variant == "before" else "smartmail_bench"
        self.bench.fresh_broker()
        sink = SmtpSink(self.bench.children, self.workdir / f"smtp-sink-{variant}-{serial}.log")
        self.bench.sinks.append(sink)
        env = dict(self.child_env(tree, url), SMARTMAIL_SMTP_URL=f"smtp://127.0.0.1:{sink.port}?tls=none")
        argv = [sys.executable, "-m", "celery", "-A", "smartmail.workers.app", "worker", *WORKER_FLAGS]
        argv += ["-n", f"bench-{variant}-{uuid.uuid4().hex[:6]}@%h", "-Q", "bulk,default"]
        worker = TreeWorker(self.bench, f"campaign-{variant}-{serial}", argv, ["bulk", "default"], env, tree)
        launcher = subprocess.Popen(
            [
                sys.executable,
                str(SCRIPTS / "bench_tracking_child.py"),
                "campaign",
                url,
                f"bench-{serial}",
                TEMPLATE,
                variant,
            ],
            env=env,
            cwd=tree,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(self.workdir / f"launcher-{variant}-{serial}.log").open("wb"),
            text=True,
        )
        try:
            ready = launcher.stdout.readline().strip()
            if not ready.startswith("ready"):
                raise BenchError(f"the {variant} launcher failed; see {self.workdir}/launcher-{variant}-{serial}.log")
            self.bench.quiet()
            marks = (n // 10, n * 9 // 10, n)
            for mark in marks:
                sink.expect(mark)
            meter = CpuMeter(
                lambda: {
                    "worker": set(worker.pids()),
                    "postgres": self.backends(database),
                    "redis": self.redis_pid(),
                    "sink": {sink.process.pid},
                }
            )
            started = time.perf_counter()
            spy = None
            if not self.profiled.get(f"campaign-{variant}"):
                self.profiled[f"campaign-{variant}"] = True
                spy = self.start_profile(f"campaign-{variant}-worker", worker.process.pid, self.args.profile_seconds)
                started = time.perf_counter()  # the second py-spy waits to attach is not the campaign's
            launcher.stdin.write("go\n")
            launcher.stdin.flush()
            done = sink.wait(
                n,
                timeout=self.args.timeout,
                stall=self.args.stall_timeout,
                what=f"{variant} campaign",
                alive=worker.check,
            )
            self.finish_profile(spy)
            tenth, ninetieth = (sink.wait(m, timeout=1, stall=1, what="a mark", alive=worker.check) for m in marks[:2])
            cpu = meter.summary(n)
            used = cpu_used(meter)
            states = self.sent_states(url, n, worker)
            events = self.event_rows(url) if variant != "before" else None
        finally:
            if launcher.poll() is None:
                try:
                    launcher.stdin.write("\n")
                    launcher.stdin.flush()
                except OSError:
                    pass
                try:
                    launcher.wait(10)
                except subprocess.TimeoutExpired:
                    launcher.kill()
            worker.stop()
            sink.stop()
            self.bench.sinks.remove(sink)
        seconds = done - started
        result = {
            "variant": variant,
            "tracking_column": ready.split("=", 1)[1] if "=" in ready else None,
            "recipients": n,
            "seconds": seconds,
            "msg_s": n / seconds,
            "steady_msg_s": (marks[1] - marks[0]) / max(ninetieth - tenth, 1e-6),
            "cpu": cpu,
            "cpu_ms_each": {role: seconds * 1000 / n for role, seconds in used.items()},
            # The worker's and PostgreSQL's CPU per message: steadier than msg/s on a shared machine.
            "serving_cpu_ms_each": (used.get("worker", 0.0) + used.get("postgres", 0.0)) * 1000 / n,
            "states": states,
            "event_rows": events,
        }
        log(
            f"  {variant:9} {result['msg_s']:7.0f} msg/s ({seconds:.1f} s from launch to the last acceptance; "
            f"10-90%: {result['steady_msg_s']:.0f} msg/s) tracking={result['tracking_column']} "
            f"events={events if events is not None else '-'}\n            {cpu}"
        )
        return result

    def sent_states(self, url: str, n: int, worker: Worker) -> dict[str, int]:
        from sqlalchemy import create_engine, text

        engine = create_engine(url)
        try:

            def states() -> dict[str, int]:
                with engine.connect() as conn:
                    return dict(conn.execute(text("SELECT state, count(*) FROM messages GROUP BY state")).all())

            wait_for(
                lambda: states().get("sent", 0) >= n,
                timeout=120,
                what="every row recorded sent",
                alive=worker.check,
                interval=0.2,
            )
            return states()
        finally:
            engine.dispose()

    def event_rows(self, url: str) -> dict[str, int]:
        from sqlalchemy import create_engine, text

        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                return dict(conn.execute(text("SELECT type, count(*) FROM events GROUP BY type")).all())
        finally:
            engine.dispose()

    def campaigns(self) -> None:
        variants = ["tracked", "untracked"] + ([] if self.args.skip_before else ["before"])
        log(
            f"\n2./3. campaigns of {self.args.recipients} recipients ({TEMPLATE}), {', '.join(variants)} alternating, "
            f"{self.args.rounds} round(s)"
            + ("" if self.args.skip_before else f"; before = {self.before_commit} in {self.args.before_tree}")
        )
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        serial = 0
        for r in range(self.args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]  # each variant early and late in a round
            for variant in order:
                serial += 1
                runs[variant].append(self.campaign(variant, serial))
        best = {v: max(rs, key=lambda x: x["msg_s"]) for v, rs in runs.items()}
        median = {v: statistics.median(x["msg_s"] for x in rs) for v, rs in runs.items()}
        least_cpu = {v: min(x["serving_cpu_ms_each"] for x in rs) for v, rs in runs.items()}
        out: dict[str, Any] = {
            "runs": runs,
            "best_msg_s": {v: b["msg_s"] for v, b in best.items()},
            "median_msg_s": median,
            "tracked_ratio_best": best["tracked"]["msg_s"] / best["untracked"]["msg_s"],
            "tracked_ratio_median": median["tracked"] / median["untracked"],
            "least_serving_cpu_ms_each": least_cpu,
            "tracked_cpu_ratio": least_cpu["untracked"] / least_cpu["tracked"],
        }
        out["tracked_ok"] = out["tracked_ratio_best"] >= 0.85
        log(
            f"  tracked / untracked: {out['tracked_ratio_best']:.0%} best ({best['tracked']['msg_s']:.0f} / "
            f"{best['untracked']['msg_s']:.0f} msg/s), {out['tracked_ratio_median']:.0%} median (target >= 85%) "
            f"{'OK' if out['tracked_ok'] else 'MISSED'}\n"
            f"  worker + PostgreSQL CPU per message (least of the runs): "
            + ", ".join(f"{v} {ms:.3f} ms" for v, ms in least_cpu.items())
            + f"; untracked / tracked {out['tracked_cpu_ratio']:.0%}"
        )
        if "before" in runs:
            out["stream_cpu_ratio"] = least_cpu["before"] / least_cpu["untracked"]
            out["stream_ratio_best"] = best["untracked"]["msg_s"] / best["before"]["msg_s"]
            out["stream_ratio_median"] = median["untracked"] / median["before"]
            out["stream_ok"] = out["stream_ratio_best"] >= 0.90
            out["before_commit"] = self.before_commit
            log(
                f"  untracked (event stream on) / before ({self.before_commit}): {out['stream_ratio_best']:.0%} best "
                f"({best['untracked']['msg_s']:.0f} / {best['before']['msg_s']:.0f} msg/s), "
                f"{out['stream_ratio_median']:.0%} median (target >= 90%) {'OK' if out['stream_ok'] else 'MISSED'}; "
                f"CPU before / untracked {out['stream_cpu_ratio']:.0%}"
            )
        self.results["campaigns"] = out


def cpu_used(meter: CpuMeter) -> dict[str, float]:
    """CPU seconds by role since the meter started (CpuMeter.summary's figures, as numbers)."""
    return {
        role: sum(v - meter.own0.get(role, {}).get(pid, 0.0) for pid, v in process_cpu(pids).items())
        for role, pids in meter.own_pids().items()
    }


def _healthy(httpx, url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipients", type=int, default=100_000, help="campaign audience (default 100000)")
    parser.add_argument("--rounds", type=int, default=2, help="campaign rounds, each variant once a round (default 2)")
    parser.add_argument(
        "--click-messages", type=int, default=20_000, help="messages whose links are clicked (x3 tokens)"
    )
    parser.add_argument("--click-seconds", type=float, default=10.0, help="length of each wrk run (default 10)")
    parser.add_argument("--click-rounds", type=int, default=2, help="wrk runs of each route (default 2)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--drain-timeout", type=float, default=180.0, help="max wait for the backlog to reach 0")
    parser.add_argument(
        "--nudge-after", type=float, default=2.0, help="ask for a drain after this long without progress (default 2 s)"
    )
    parser.add_argument("--before-tree", default="/tmp/smartmail-before", help="checkout of the commit before issue 19")
    parser.add_argument(
        "--skip-before", action="store_true", help="leave out part 3 (the comparison with --before-tree)"
    )
    parser.add_argument("--skip-clicks", action="store_true", help="leave out part 1")
    parser.add_argument("--skip-campaigns", action="store_true", help="leave out parts 2 and 3")
    parser.add_argument("--postgres-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12", help="FLUSHED; default db 12")
    parser.add_argument("--timeout", type=float, default=900.0, help="limit per campaign, seconds")
    parser.add_argument("--stall-timeout", type=float, default=60.0)
    parser.add_argument("--idle-wait", type=float, default=20.0, help="wait up to this long for the machine to go idle")
    parser.add_argument(
        "--profile", default=None, help="a folder: py-spy profiles of the first run of each kind (they slow it)"
    )
    parser.add_argument("--py-spy", default="py-spy", help="py-spy's path, if not on PATH")
    parser.add_argument("--profile-seconds", type=float, default=10.0, help="length of each campaign profile")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    args.database = "postgresql"
    if args.skip_campaigns:
        args.skip_before = True

    run = Run(args)

    def body() -> None:
        run.setup()
        run.bench.environment()
        if not args.skip_clicks:
            run.clicks()
        if not args.skip_campaigns:
            run.campaigns()
        bench_results.save("bench_tracking", args, run.results)

    return run_guarded(run.bench, body, run.teardown)


if __name__ == "__main__":
    sys.exit(main())
