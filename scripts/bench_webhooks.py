#!/usr/bin/env python3
"""Benchmark: outbound webhook deliveries per second, against a naive Celery baseline, and with one endpoint down.

    .venv/bin/python scripts/bench_webhooks.py                                  # 100,000 events; ~10 minutes
    .venv/bin/python scripts/bench_webhooks.py --events 5000 --baseline-events 2000 --skip-down   # a quick look

Needs PostgreSQL with trust auth (database `smartmail_bench_webhooks` is created and dropped) and
Redis (database 9 by default, FLUSHED, keys prefixed `bench-webhooks:`; one is started if none answers).

In one run, every endpoint on scripts/bench_webhooks_receiver.py (its own process: asyncio + uvloop,
HTTP/1.1 keep-alive on loopback, `200 ok` to every POST, requests counted per port):
1. Baseline: scripts/naive_webhooks.py, one Celery task per event doing one `requests.post` (a new
   connection each, signed with `standardwebhooks`), one worker with 2 prefork processes;
   --baseline-events tasks enqueued by this process; tasks/s from the first enqueue to the
   receiver's last request.
2. SmartMail as production runs it (the Procfile's process types): `smartmail worker --queues
   webhooks --pool threads -c 8`, `smartmail worker --queues default` (prefork, 2 processes) and
   `smartmail beat` (the tick every SMARTMAIL_WEBHOOK_POLL_INTERVAL, 1 s) are started first; then
   one endpoint is created (defaults: max_in_flight 10) and --events events are loaded with the
   store's bulk loader (COPY) in one transaction. The tick fans them out and asks for drains.
   Deliveries/s from the receiver's first request to the last delivery's `delivered_at`
   (the headline, batch_size 1), and end to end from the events' commit. Target: >= 10x the baseline.
   The same with batch_size --batch-size (100): deliveries (events) per second.
3. One endpoint down (--skip-down leaves it out): endpoints A and B both subscribed, B on a port that
   accepts connections and never answers (`hang`) or on a closed port (`refused`), and B healthy on
   its own port (`both up`, the control: two endpoints double the fan-out's rows). A's deliveries/s
   against A alone (part 2). Target: unchanged within noise.
CPU by process (workers, beat, PostgreSQL backends, Redis, receiver) is reported for each run.
Reuses scripts/bench_send.py's database, worker and CPU accounting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from datetime import UTC
from pathlib import Path
from typing import Any

import bench_results

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(SCRIPTS))

from bench_api import finish_py_spy, start_py_spy  # noqa: E402
from bench_send import (  # noqa: E402
    Bench,
    CpuMeter,
    Worker,
    free_port,
    log,
    run_guarded,
    wait_for,
    wait_port,
)
from bench_tracking import TreeWorker  # noqa: E402

KEY_PREFIX = "bench-webhooks:"
WEBHOOKS_WORKER = ["--queues", "webhooks", "--pool", "threads", "-c", "8"]  # as the Procfile's worker-webhooks
DEFAULT_WORKER = ["--queues", "default", "--pool", "prefork", "-c", "2"]  # the Procfile's `worker`, default queue
WARMUP = 200  # baseline tasks before the clock starts: both pool processes forked and connected


class Receiver:
    """scripts/bench_webhooks_receiver.py in its own process: ports answering 200, ports that hang."""

    def __init__(self, bench: Bench, ok: int, hang: int) -> None:
        self.ok_ports = [free_port() for _ in range(ok)]
        self.hang_ports = [free_port() for _ in range(hang)]
        self.stats_port = free_port()
        argv = [sys.executable, str(SCRIPTS / "bench_webhooks_receiver.py"), "--stats", str(self.stats_port)]
        argv += [arg for port in self.ok_ports for arg in ("--ok", str(port))]
        argv += [arg for port in self.hang_ports for arg in ("--hang", str(port))]
        self.process = bench.children.start(argv, env=dict(os.environ), log_path=bench.workdir / "receiver.log")
        for port in [*self.ok_ports, *self.hang_ports, self.stats_port]:
            wait_port(port, 30, self.process)

    def stats(self) -> dict[int, tuple[int, int, float, float]]:
        """Per answering port: (requests, body bytes, first request, last request) as Unix times."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats", timeout=10) as answer:
            return {int(port): tuple(values) for port, values in json.load(answer).items()}  # type: ignore[misc]

    def requests(self, port: int) -> int:
        return self.stats()[port][0]


def event_rows(count: int) -> list[dict[str, Any]]:
    """`count` click events as the tracking drain writes them (no contact: no rows to create first)."""
    from smartmail.store.engine import utcnow
    from smartmail.store.ids import new_ids

    now = utcnow()
    return [
        {
            "type": "clicked",
            "contact_id": None,
            "message_id": message_id,
            "campaign_id": 1 + i % 5,
            "properties": {
                "unique": i % 3 == 0,
                "link": 1 + i % 4,
                "url": "https://example.com/docs/getting-started",
                "ip": "203.0.113.7",
                "user_agent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15",
            },
            "occurred_at": now,
            "machine": False,
        }
        for i, message_id in enumerate(new_ids(count))
    ]


def payloads(count: int) -> list[str]:
    """The bodies SmartMail would deliver for `count` events (for the baseline's tasks)."""
    from smartmail.webhooks.fan_out import payload_of

    out = []
    for i, row in enumerate(event_rows(count)):
        event = dict(row, id=i + 1, position=f"1.{i + 1}", email=None)
        event["occurred_at"] = row["occurred_at"].replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")
        out.append(payload_of(event))
    return out


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bench = Bench(args)
        self.results: dict[str, Any] = {}

    @property
    def workdir(self) -> Path:
        return self.bench.workdir

    def setup(self) -> None:
        self.bench.setup()
        os.environ.update(
            {
                "SMARTMAIL_REDIS_KEY_PREFIX": KEY_PREFIX,
                "NAIVE_KEY_PREFIX": KEY_PREFIX + "naive:",
                "SMARTMAIL_WEBHOOK_ALLOW_HTTP": "true",
                "SMARTMAIL_WEBHOOK_ALLOW_NETWORKS": '["127.0.0.0/8"]',
                "SMARTMAIL_LOG_LEVEL": "WARNING",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            }
        )
        from smartmail.config import get_settings

        get_settings.forget()
        self.settings = get_settings()

    def environment(self) -> None:
        import platform

        import celery
        import httpx
        import requests

        database = self.bench.database
        machine = {
            "cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_at_start": os.getloadavg(),
            "database": database.version,
            "redis": f"{self.bench.redis.info('server').get('redis_version', '?')} at {self.bench.redis_url}",
            "celery": celery.__version__,
            "httpx": httpx.__version__,
            "requests": requests.__version__,
            "webhooks_worker": "smartmail worker " + " ".join(WEBHOOKS_WORKER),
            "default_worker": "smartmail worker " + " ".join(DEFAULT_WORKER),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
        self.results["machine"] = machine
        log("environment")
        for key, value in machine.items():
            log(f"  {key:18} {value}")
        log()

    def roles(self, workers: dict[str, Worker], receiver: Receiver, extra: dict[str, set[int]]) -> dict:
        roles = {label: set(worker.pids()) for label, worker in workers.items()}
        roles.update(extra)
        roles["postgres"] = self.bench.database.backend_pids()
        roles["receiver"] = {receiver.process.pid}
        try:
            roles["redis"] = {int(self.bench.redis.info("server")["process_id"])}
        except Exception:  # noqa: BLE001 - a remote Redis: not ours to count
            pass
        return roles

    # --- 1. the naive baseline ----------------------------------------------------------------------

    def baseline(self) -> None:
        n = self.args.baseline_events
        log(f"1. baseline: {n} events, a Celery task and a requests.post each, 2 prefork processes")
        self.bench.fresh_broker()
        receiver = Receiver(self.bench, ok=1, hang=0)
        port = receiver.ok_ports[0]
        url = f"http://127.0.0.1:{port}/hook"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SCRIPTS), os.environ["PYTHONPATH"]]))
        env["NAIVE_BROKER_URL"] = self.bench.redis_url
        os.environ["NAIVE_BROKER_URL"] = self.bench.redis_url
        worker = Worker(self.bench, "naive", "naive_webhooks", ["celery"], env)
        try:
            import naive_webhooks
            from standardwebhooks import Webhook  # noqa: F401 - imported before the clock, as a worker's is

            from smartmail.webhooks.signatures import new_secret

            secret = new_secret()
            bodies = payloads(n + WARMUP)
            for body in bodies[:WARMUP]:
                naive_webhooks.deliver.delay(url, body, secret)
            wait_for(lambda: receiver.requests(port) >= WARMUP, timeout=120, what="warm-up", alive=worker.check)
            time.sleep(0.5)
            self.bench.quiet()
            meter = CpuMeter(lambda: self.roles({"naive worker": worker}, receiver, {"producer": {os.getpid()}}))
            started = time.time()
            for body in bodies[WARMUP:]:
                naive_webhooks.deliver.delay(url, body, secret)
            enqueued = time.time()
            wait_for(
                lambda: receiver.requests(port) >= WARMUP + n,
                timeout=self.args.timeout,
                what="the baseline's requests",
                alive=worker.check,
                interval=0.1,
            )
            last = receiver.stats()[port][3]
            seconds = last - started
            cpu = meter.summary(n)
        finally:
            worker.stop()
            self.bench.children.stop(receiver.process)
        self.results["baseline"] = {
            "events": n,
            "seconds": seconds,
            "enqueue_seconds": enqueued - started,
            "per_s": n / seconds,
            "cpu": cpu,
        }
        log(f"  baseline  {n / seconds:8,.0f} tasks/s ({seconds:.1f} s, enqueue {enqueued - started:.1f} s)\n  {cpu}")

    # --- 2 and 3. SmartMail ---------------------------------------------------------------------------

    def clear(self) -> None:
        """Every table this benchmark fills emptied: each run starts from the same tables."""
        from sqlalchemy import text

        with self.bench.database.engine.connect() as conn:
            conn.execute(text("TRUNCATE webhook_attempts, webhook_deliveries, webhook_endpoints, events"))
            conn.execute(text("VACUUM ANALYZE webhook_attempts, webhook_deliveries, webhook_endpoints, events"))

    def start_smartmail(self) -> dict[str, Worker]:
        env = dict(os.environ)
        cli = [sys.executable, "-m", "smartmail.cli", "worker"]
        webhooks = TreeWorker(
            self.bench, "webhooks", [*cli, *WEBHOOKS_WORKER, "-l", "WARNING"], ["webhooks"], env, ROOT
        )
        default = TreeWorker(self.bench, "default", [*cli, *DEFAULT_WORKER, "-l", "WARNING"], ["default"], env, ROOT)
        return {"webhooks worker": webhooks, "default worker": default}

    def start_beat(self) -> Any:
        argv = [sys.executable, "-m", "smartmail.cli", "beat", "-l", "WARNING"]
        argv += ["--schedule", str(self.workdir / f"beat-schedule-{time.monotonic_ns()}")]
        return self.bench.children.start(argv, env=dict(os.environ), log_path=self.workdir / "beat.log")

    def delivered(self, endpoint_id: int) -> tuple[int, float | None]:
        """(succeeded deliveries, the last one's delivered_at as a Unix time)."""
        from sqlalchemy import text

        with self.bench.database.engine.connect() as conn:
            count, last = conn.execute(
                text(
                    "SELECT count(*), max(delivered_at) FROM webhook_deliveries "
                    "WHERE endpoint_id = :e AND state = 'succeeded'"
                ),
                {"e": endpoint_id},
            ).one()
        return int(count), (last.replace(tzinfo=UTC).timestamp() if last else None)

    def fanned_out(self) -> int:
        from sqlalchemy import text

        with self.bench.database.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM webhook_deliveries")).scalar() or 0)

    def start_profile(self, name: str, pid: int) -> tuple[subprocess.Popen, Path]:
        """py-spy on the webhooks worker for --profile-seconds (it slows the run: its figures are marked)."""
        spy = start_py_spy(self.args, f"webhooks-worker-{name.split()[0]}", pid, self.args.profile_seconds)
        return spy

    def finish_profile(self, spy: tuple[subprocess.Popen, Path] | None) -> None:
        finish_py_spy(spy, self.results)

    def smartmail(self, name: str, batch_size: int, other: str | None, profile: bool = False) -> dict[str, Any]:
        """One run: endpoint A (and B, `other`: up | hang | refused) and --events events (--down-events with B)."""
        from smartmail.store.engine import get_engine
        from smartmail.store.sql import events as events_sql
        from smartmail.webhooks import endpoints

        n = self.args.events if other is None else self.args.down_events
        self.clear()
        self.bench.fresh_broker()
        receiver = Receiver(self.bench, ok=2 if other == "up" else 1, hang=1 if other == "hang" else 0)
        a_port = receiver.ok_ports[0]
        workers = self.start_smartmail()
        beat = self.start_beat()
        rows = event_rows(n)
        try:
            fields = {"batch_size": batch_size, "max_in_flight": self.args.max_in_flight}
            a, _ = endpoints.create_endpoint(f"http://127.0.0.1:{a_port}/hook", **fields)
            if other is not None:
                b_port = {"up": lambda: receiver.ok_ports[1], "hang": lambda: receiver.hang_ports[0]}.get(
                    other, free_port
                )()
                endpoints.create_endpoint(f"http://127.0.0.1:{b_port}/hook", **fields)
            time.sleep(1.5)  # beat's first ticks: both workers have run a task, imported everything
            self.bench.quiet()
            meter = CpuMeter(lambda: self.roles(workers, receiver, {"beat": {beat.pid}}))
            spy = self.start_profile(name, workers["webhooks worker"].process.pid) if profile else None
            loading = time.time()
            with get_engine().begin() as connection:
                events_sql.for_bind(connection).load(connection, rows)
            committed = time.time()
            expected = n * (1 if other is None else 2)
            fan_out_done: list[float] = []

            def done() -> bool:
                if not fan_out_done and self.fanned_out() >= expected:
                    fan_out_done.append(time.time())
                return self.delivered(a["id"])[0] >= n

            alive = lambda: [w.check() for w in workers.values()]  # noqa: E731
            wait_for(done, timeout=self.args.timeout, what=f"{name}: A's deliveries", alive=alive, interval=0.2)
            cpu = meter.summary(n)
            self.finish_profile(spy)
            _, last = self.delivered(a["id"])
            requests, body_bytes, first, _ = receiver.stats()[a_port]
            states = self.states()
        finally:
            self.bench.children.stop(beat, grace=5)
            for worker in workers.values():
                self.bench.children.stop(worker.process, grace=5)
                problems = worker.problems()
                if problems:
                    log(f"  warning: {problems} error line(s) in {worker.log_path}:\n{worker.tail(10)}")
            self.bench.children.stop(receiver.process)
        assert last is not None
        result = {
            "name": name,
            "events": n,
            "batch_size": batch_size,
            "other_endpoint": other,
            "per_s": n / (last - first),
            "end_to_end_per_s": n / (last - committed),
            "seconds": last - first,
            "first_request_after_commit_s": first - committed,
            "fan_out_seconds": (fan_out_done[0] - committed) if fan_out_done else None,
            "load_seconds": committed - loading,
            "requests_to_a": requests,
            "bytes_per_request": body_bytes / max(requests, 1),
            "states": states,
            "cpu": cpu,
            "profiled": bool(spy),
        }
        log(
            f"  {name:18} {result['per_s']:8,.0f} deliveries/s ({result['seconds']:.1f} s first to last; "
            f"{result['end_to_end_per_s']:,.0f}/s from the events' commit; fan-out done after "
            + (f"{result['fan_out_seconds']:.1f} s" if fan_out_done else "-")
            + f"; {requests} requests of {result['bytes_per_request']:.0f} B) states {states}\n  {cpu}"
        )
        return result

    def states(self) -> dict[str, dict[str, int]]:
        from sqlalchemy import text

        with self.bench.database.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT endpoint_id, state, count(*) FROM webhook_deliveries GROUP BY endpoint_id, state")
            ).all()
        found: dict[str, dict[str, int]] = {}
        for endpoint_id, state, count in rows:
            found.setdefault(str(endpoint_id), {})[state] = count
        return found

    def run(self) -> None:
        args = self.args
        if not args.skip_baseline:
            self.baseline()
        log(
            f"\n2. SmartMail: {args.events} events to one endpoint (max_in_flight {args.max_in_flight}); "
            "webhooks worker (threads, 8), default worker, beat"
        )
        runs = {"unbatched": self.smartmail("unbatched", 1, None)}
        if args.batch_size > 1:
            runs["batched"] = self.smartmail(f"batched ({args.batch_size})", args.batch_size, None)
        if args.profile:  # a run of its own: py-spy slows what it samples
            for batch_size in sorted({1, args.batch_size}):
                label = "unbatched" if batch_size == 1 else f"batched ({batch_size})"
                runs[f"profiled_{batch_size}"] = self.smartmail(f"{label} profiled", batch_size, None, profile=True)
        if not args.skip_down:
            log(f"\n3. endpoint A with endpoint B subscribed too (batch_size 1): B {', '.join(args.down)}")
            for other in args.down:
                runs[f"b_{other}"] = self.smartmail(f"A, B {other}", 1, other)
        self.results["smartmail"] = runs
        self.summary()

    def summary(self) -> None:
        runs = self.results["smartmail"]
        alone = runs["unbatched"]["per_s"]  # with --down-events != --events, A alone ran another size
        table = [("run", "deliveries/s", "vs baseline", "vs A alone")]
        baseline = self.results.get("baseline", {}).get("per_s")
        if baseline:
            table.append(("baseline (naive Celery)", f"{baseline:,.0f}", "1.0x", ""))
        for key, figures in runs.items():
            if figures["profiled"]:
                continue
            ratio = f"{figures['per_s'] / baseline:.1f}x" if baseline else ""
            versus = f"{figures['per_s'] / alone:.0%}" if key.startswith("b_") else ""
            table.append((figures["name"], f"{figures['per_s']:,.0f}", ratio, versus))
        figures = {"unbatched_vs_baseline": alone / baseline if baseline else None}
        figures["unbatched_ok"] = bool(baseline) and alone >= 10 * baseline
        for key in [k for k in runs if k.startswith("b_")]:
            figures[f"a_with_{key}_vs_alone"] = runs[key]["per_s"] / alone
        self.results["summary"] = figures
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        log("\nsummary")
        for row in table:
            log("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if baseline:
            log(
                f"  unbatched / baseline: {alone / baseline:.1f}x (target >= 10x) "
                f"{'OK' if figures['unbatched_ok'] else 'MISSED'}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000, help="events per SmartMail run (default 100000)")
    parser.add_argument("--down-events", type=int, default=None, help="events per part-3 run (default --events)")
    parser.add_argument("--baseline-events", type=int, default=10_000, help="naive tasks (default 10000)")
    parser.add_argument("--batch-size", type=int, default=100, help="the batched run's batch_size (1: no such run)")
    parser.add_argument("--max-in-flight", type=int, default=10, help="the endpoints' max_in_flight (default 10)")
    parser.add_argument(
        "--down",
        nargs="+",
        choices=("up", "hang", "refused"),
        default=["up", "hang", "refused"],
        help="part 3's endpoint B: healthy (the control), never answering, connection refused",
    )
    parser.add_argument("--skip-down", action="store_true", help="leave out part 3")
    parser.add_argument("--skip-baseline", action="store_true", help="leave out part 1")
    parser.add_argument(
        "--profile", default=None, help="a folder: extra runs with py-spy on the webhooks worker (they are slower)"
    )
    parser.add_argument("--py-spy", default="py-spy", help="py-spy's path, if not on PATH")
    parser.add_argument("--profile-seconds", type=float, default=10.0, help="length of each profile (default 10)")
    parser.add_argument("--postgres-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9", help="FLUSHED; default db 9")
    parser.add_argument("--timeout", type=float, default=900.0, help="limit per run, seconds")
    parser.add_argument("--idle-wait", type=float, default=20.0, help="wait up to this long for the machine to go idle")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    args.down_events = args.down_events or args.events
    args.database = "postgresql"
    args.database_name = "smartmail_bench_webhooks"

    run = Run(args)

    def body() -> None:
        run.setup()
        run.environment()
        run.run()
        bench_results.save("bench_webhooks", args, run.results)

    return run_guarded(run.bench, body, run.bench.teardown)


if __name__ == "__main__":
    sys.exit(main())
