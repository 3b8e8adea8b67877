#!/usr/bin/env python3
"""Benchmark: a campaign from launch to the sink's last acceptance, vs the naive baseline and the sink's ceiling.

    .venv/bin/python scripts/bench_campaign.py                       # PostgreSQL, 10,000 then 100,000 recipients
    .venv/bin/python scripts/bench_campaign.py --database sqlite --sizes 10000,100000

In one run, into Postfix's C smtp-sink (Debian package `postfix`):
1. ceiling: Postfix's `smtp-source` over 2 reused connections into the same kind of sink;
2. baseline: scripts/naive_baseline.py, one Celery task and one new SMTP connection per email, one
   worker with 2 prefork processes (--baseline-messages emails);
3. campaigns of each --sizes recipients (contacts on one list, the shipped `welcome` template,
   personalized), one `smartmail worker -Q bulk,default` with 2 prefork processes, timed from
   launch_campaign() to the sink's last acceptance; CPU per message by process, and the peak
   memory (VmHWM) of the worker's pool processes, which should not grow with the audience.
Reuses scripts/bench_send.py's sink, worker, database and CPU accounting.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import bench_results

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_send  # noqa: E402
from bench_send import Bench, BenchError, CpuMeter, SmtpSink, Worker, log, wait_for  # noqa: E402


def peak_rss_mb(pids: list[int]) -> float:
    """The largest VmHWM (peak resident set) among the processes, in MB."""
    peak = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
    return peak / 1024


def ceiling(bench: Bench, messages: int) -> float:
    """smtp-source's own rate into smtp-sink: 2 sessions at a time, each reusing its connection (-d)."""
    source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not Path(source).exists():
        raise BenchError("Postfix's smtp-source not found (Debian: apt-get install postfix)")
    sink = SmtpSink(bench.children, bench.workdir / "smtp-sink-ceiling.log")
    try:
        sink.expect(messages)
        started = time.perf_counter()
        # -s 2: two sessions at a time; -d: keep each connection for the next message; -m: messages in
        # all; -l: payload size, about that of the rendered welcome message.
        subprocess.run(
            [
                source,
                "-d",
                "-s",
                "2",
                "-m",
                str(messages),
                "-l",
                "4000",
                "-f",
                "bench@bench.example.com",
                "-t",
                "user@example.com",
                f"127.0.0.1:{sink.port}",
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
        done = sink.wait(messages, timeout=60, stall=30, what="ceiling", alive=lambda: None)
        return messages / (done - started)
    finally:
        sink.stop()
        bench.sinks.remove(sink) if sink in bench.sinks else None


def make_audience(bench: Bench, n: int) -> None:
    from sqlalchemy import create_engine, insert, select, text

    from smartmail.store.engine import utcnow
    from smartmail.store.models import Contact, ContactList, ListMembership

    engine = create_engine(bench.database.url)
    now = utcnow()
    with engine.begin() as connection:
        for table in ("list_memberships", "messages", "campaigns", "contacts", "lists"):
            connection.execute(text(f"DELETE FROM {table}"))
        connection.execute(insert(ContactList).values(name="bench", created_at=now))
        list_id = connection.scalar(select(ContactList.id).where(ContactList.name == "bench"))
        for start in range(0, n, 10_000):
            rows = [
                {
                    "email": f"user{i}@example.com",
                    "status": "subscribed",
                    "created_at": now,
                    "updated_at": now,
                    "attributes": bench_send.recipient(i)[1],
                }
                for i in range(start, min(n, start + 10_000))
            ]
            connection.execute(insert(Contact), rows)
        ids = list(connection.scalars(select(Contact.id)))
        for start in range(0, len(ids), 10_000):
            connection.execute(
                insert(ListMembership),
                [
                    {"list_id": list_id, "contact_id": i, "status": "subscribed", "joined_at": now}
                    for i in ids[start : start + 10_000]
                ],
            )
    engine.dispose()


def campaign_run(bench: Bench, n: int) -> dict:
    import os

    from smartmail.campaigns import lifecycle as campaigns

    bench.fresh_broker()
    make_audience(bench, n)
    sink = SmtpSink(bench.children, bench.workdir / f"smtp-sink-campaign-{n}.log")
    bench.sinks.append(sink)
    env = dict(os.environ, SMARTMAIL_SMTP_URL=f"smtp://127.0.0.1:{sink.port}?tls=none")
    worker = Worker(bench, f"campaign-{n}", "smartmail.workers.app", ["bulk", "default"], env)
    try:
        name = f"bench-{n}"
        campaigns.create_campaign(name, template=bench_send.TEMPLATE, lists=["bench"])
        bench.quiet()
        marks = (1, n // 10, n * 9 // 10)
        for mark in (*marks, n):
            sink.expect(mark)
        meter = CpuMeter(lambda: bench.own_pids(worker, sink.process.pid))
        started = time.perf_counter()
        campaigns.launch_campaign(name)
        done = sink.wait(
            n, timeout=bench.args.timeout, stall=bench.args.stall_timeout, what=f"campaign of {n}", alive=worker.check
        )
        seconds = done - started
        first, tenth, ninetieth = (
            sink.wait(mark, timeout=1, stall=1, what="a mark", alive=worker.check) for mark in marks
        )
        cpu = meter.summary(n)
        wait_for(
            lambda: campaigns.campaign_status(name).counts.get("sent", 0) >= n,
            timeout=120,
            what="every row recorded sent",
            alive=worker.check,
            interval=0.2,
        )
        pool = [pid for pid in worker.pids() if pid != worker.process.pid]
        return {
            "n": n,
            "seconds": seconds,
            "rate": n / seconds,
            "cpu": cpu,
            "peak_mb": peak_rss_mb(pool),
            "first": first - started,
            "steady_rate": (marks[2] - marks[1]) / max(ninetieth - tenth, 1e-6),
            "phases": (tenth - started, ninetieth - tenth, done - ninetieth),
            "states": campaigns.campaign_status(name).counts,
        }
    finally:
        worker.stop()
        sink.stop()
        bench.sinks.remove(sink)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="audience sizes, comma-separated")
    parser.add_argument("--baseline-messages", type=int, default=5000)
    parser.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--postgres-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12", help="FLUSHED; default db 12")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--stall-timeout", type=float, default=60.0)
    parser.add_argument("--idle-wait", type=float, default=60.0)
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    # bench_send's Bench reads these for its baseline run.
    args.messages, args.warmup, args.batch = args.baseline_messages, 40, 1000

    bench = Bench(args)
    try:
        bench.setup()
        bench.environment()
        bench.quiet()
        top = ceiling(bench, 50_000)
        log(f"ceiling   smtp-source -> smtp-sink, 2 reused sessions: {top:8.0f} msg/s")
        bench.quiet()
        base = bench.throughput("baseline")
        base_rate = args.baseline_messages / base["seconds"]
        log(
            f"baseline  naive Celery task + new connection per email: {base_rate:8.0f} msg/s "
            f"({args.baseline_messages} messages)\n          {base['cpu']}"
        )
        results = []
        for n in sizes:
            r = campaign_run(bench, n)
            results.append(r)
            log(
                f"campaign  {n:>7} recipients: {r['rate']:8.0f} msg/s ({r['seconds']:.1f} s from launch to the last "
                f"acceptance); {r['rate'] / base_rate:5.1f}x baseline (target >= 10) "
                f"{'OK' if r['rate'] >= 10 * base_rate else 'MISSED'}; {r['rate'] / top:.0%} of the ceiling; "
                f"worker pool peak RSS {r['peak_mb']:.0f} MB\n          first acceptance {r['first']:.2f} s after "
                f"launch; from 10% to 90% of the audience {r['steady_rate']:.0f} msg/s "
                f"(launch to 10%, 10-90%, 90-100%: {', '.join(f'{t:.2f}' for t in r['phases'])} s)\n"
                f"          {r['cpu']}"
            )
            if set(r["states"]) != {"sent"}:
                log(f"          states: {r['states']}")
        if len(results) > 1:
            log(
                f"worker memory: peak RSS {results[0]['peak_mb']:.0f} MB at {results[0]['n']} recipients, "
                f"{results[-1]['peak_mb']:.0f} MB at {results[-1]['n']}"
            )
        bench_results.save(
            "bench_campaign",
            args,
            {
                "ceiling_msg_s": top,
                "baseline_msg_s": base_rate,
                "campaigns": [
                    {
                        "recipients": r["n"],
                        "msg_s": r["rate"],
                        "ratio": r["rate"] / base_rate,
                        "steady_msg_s": r["steady_rate"],
                        "first_acceptance_s": r["first"],
                        "phases_s": r["phases"],
                        "peak_rss_mb": r["peak_mb"],
                        "states": r["states"],
                    }
                    for r in results
                ],
            },
        )
        return 0
    except BenchError as exc:
        bench.failed = True
        log(f"benchmark failed: {exc}")
        return 1
    finally:
        bench.teardown()


if __name__ == "__main__":
    sys.exit(main())
