#!/usr/bin/env python3
"""Benchmark: transactional latency (send() to SMTP acceptance) alone, then while a large campaign runs.

    .venv/bin/python scripts/bench_latency_under_load.py                 # PostgreSQL, 100,000 recipients
    .venv/bin/python scripts/bench_latency_under_load.py --recipients 20000 --rate 100

The Procfile's process types, one of each: `worker` (transactional,default) sends into a stamping
sink that records each message's arrival; `worker-bulk` (bulk,default) sends the campaign into
Postfix's C smtp-sink, so the campaign is limited by SmartMail, not by a Python sink. Both run on
this machine's two cores with the database and Redis. The same latency run is made first with no
campaign (the baseline of this run), then once the campaign is delivering. Reuses
scripts/bench_send.py (sinks, workers, the latency run) and scripts/bench_campaign.py (the audience).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import bench_results

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_send  # noqa: E402
from bench_campaign import make_audience  # noqa: E402
from bench_send import Bench, BenchError, SmtpSink, Worker, log, percentile  # noqa: E402


def summary(label: str, r: dict) -> dict:
    lat = [x * 1000 for x in r["latencies"]]
    figures = {p: percentile(lat, p) for p in (50, 90, 99)}
    log(
        f"{label:28} {r['received']}/{r['total']} at {r['achieved_rate']:.0f}/s: "
        f"p50 {figures[50]:6.1f} ms  p90 {figures[90]:6.1f} ms  p99 {figures[99]:6.1f} ms"
    )
    return {"sent": r["total"], "matched": r["received"], "latency_ms": figures}


def under_campaign(bench: Bench, n: int) -> tuple[dict, dict]:
    from smartmail.campaigns import lifecycle as campaigns

    bench.fresh_broker()
    bench.database.clear()
    make_audience(bench, n)
    sink = SmtpSink(bench.children, bench.workdir / "smtp-sink-campaign.log")
    bench.sinks.append(sink)
    env = dict(os.environ, SMARTMAIL_SMTP_URL=f"smtp://127.0.0.1:{sink.port}?tls=none")
    worker = Worker(bench, "worker-bulk", "smartmail.workers.app", ["bulk", "default"], env)
    try:
        campaigns.create_campaign("under-load", template=bench_send.TEMPLATE, lists=["bench"])
        sink.expect(min(n, 2000))
        started = time.perf_counter()
        campaigns.launch_campaign("under-load")
        sink.wait(min(n, 2000), timeout=300, stall=60, what="the campaign under way", alive=worker.check)
        result = bench.latency(fresh=False)
        during = campaigns.campaign_status("under-load")
        progress = {"sent_when_done": during.counts.get("sent", 0), "seconds": time.perf_counter() - started}
        if during.counts.get("sent", 0) >= n:
            log("warning: the campaign ended before the latency run did; use more --recipients")
        return result, progress
    finally:
        worker.stop()
        sink.stop()
        bench.sinks.remove(sink)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipients", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=100.0, help="send() calls per second")
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--postgres-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12", help="FLUSHED; default db 12")
    parser.add_argument("--stall-timeout", type=float, default=60.0)
    parser.add_argument("--idle-wait", type=float, default=60.0)
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    args.messages, args.warmup, args.batch = 0, 40, 1000  # what bench_send's Bench reads
    args.timeout = 1800.0

    bench = Bench(args)
    try:
        bench.setup()
        bench.environment()
        bench.quiet()
        alone = summary("no campaign", bench.latency())
        result, progress = under_campaign(bench, args.recipients)
        loaded = summary(f"campaign of {args.recipients:,}", result)
        log(f"  the campaign had sent {progress['sent_when_done']:,} messages {progress['seconds']:.0f} s after launch")
        p99 = loaded["latency_ms"][99]
        log(f"  p99 under load {p99:.1f} ms (target < 150) {'OK' if p99 < 150 else 'MISSED'}")
        bench_results.save("bench_latency_under_load", args, {"alone": alone, "under_campaign": loaded, **progress})
        return 0
    except BenchError as exc:
        bench.failed = True
        log(f"benchmark failed: {exc}")
        return 1
    finally:
        bench.teardown()


if __name__ == "__main__":
    sys.exit(main())
