#!/usr/bin/env python3
"""Benchmark: the traffic-shaping limiter against a real Redis, next to a plain round trip measured in the same run.

    .venv/bin/python scripts/bench_limiter.py [--redis-url redis://127.0.0.1:6379/12] [--calls 20000]

Prints, for one process and for two at once:
- baseline: PING round trips per second (what any Redis call costs here);
- acquire(site, 1): GCRA token takes per second, and their latency p50/p99;
- acquire(site, 10): batch takes per second (tokens per second = 10x);
- the latency traffic shaping adds to one message on the send path: a rate-limited site's
  per-message token (acquire 1), and an unlimited site's per-window check shared by a window of
  SMARTMAIL_CLAIM_WINDOW messages. Target: under 0.5 ms at p50.
The database this uses is FLUSHED.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _clients(url: str):
    import redis

    from smartmail.workers.limiter import SiteThrottle
    from smartmail.workers.outcomes import RetrySchedule
    from smartmail.workers.policy import Site

    client = redis.Redis.from_url(url)
    throttle = SiteThrottle(client, "bench:")
    limited = Site("bench-limited", 1e7, 1_000_000, 50, 100, RetrySchedule())  # never refuses: we time the call
    unlimited = Site("bench-unlimited", None, 1, 50, 100, RetrySchedule())
    return client, throttle, limited, unlimited


def _measure(url: str, kind: str, calls: int, barrier=None) -> tuple[float, list[float]]:
    """(calls per second, per-call latencies in seconds) for one kind of call."""
    client, throttle, limited, unlimited = _clients(url)
    call = {
        "ping": client.ping,
        "acquire1": lambda: throttle.acquire(limited, 1),
        "acquire10": lambda: throttle.acquire(limited, 10),
        "window": lambda: throttle.acquire(unlimited, 10),
    }[kind]
    for _ in range(200):  # warm: connection, script cache
        call()
    if barrier is not None:
        barrier.wait()
    latencies = []
    started = time.perf_counter()
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t0)
    return calls / (time.perf_counter() - started), latencies


def _worker(url, kind, calls, barrier, queue):
    queue.put(_measure(url, kind, calls, barrier)[0])


def _two_processes(url: str, kind: str, calls: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, kind, calls, barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    rates = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=10, help="messages per claim window (SMARTMAIL_CLAIM_WINDOW)")
    args = parser.parse_args()

    import redis

    redis.Redis.from_url(args.redis_url).flushdb()
    print(f"limiter: {args.calls} calls per measurement against {args.redis_url}")
    results = {}
    for kind, label in (
        ("ping", "baseline: PING round trip"),
        ("acquire1", "acquire(site, 1)"),
        ("acquire10", "acquire(site, 10) batch"),
        ("window", "unlimited site, per window"),
    ):
        rate, latencies = _measure(args.redis_url, kind, args.calls)
        both = _two_processes(args.redis_url, kind, args.calls)
        results[kind] = latencies
        print(
            f"  {label:28} 1 process {rate:8.0f}/s   2 processes {both:8.0f}/s   "
            f"p50 {pct(latencies, 50) * 1e6:6.0f} us   p99 {pct(latencies, 99) * 1e6:6.0f} us"
        )
    ping50 = pct(results["ping"], 50)
    per_message_limited = pct(results["acquire1"], 50)
    per_message_unlimited = pct(results["window"], 50) / args.window
    print(f"  GCRA work over a plain round trip: {(per_message_limited - ping50) * 1e6:.0f} us at p50")
    print("added latency per message on the send path (target p50 < 0.5 ms):")
    print(
        f"  rate-limited site (a token per message)       p50 {per_message_limited * 1e3:.3f} ms  "
        f"{'OK' if per_message_limited < 0.0005 else 'MISSED'}"
    )
    print(
        f"  unlimited site (one check per {args.window}-message window) p50 {per_message_unlimited * 1e3:.3f} ms  "
        f"{'OK' if per_message_unlimited < 0.0005 else 'MISSED'}"
    )
    redis.Redis.from_url(args.redis_url).flushdb()
    return 0


if __name__ == "__main__":
    sys.exit(main())
