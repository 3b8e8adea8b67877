#!/usr/bin/env python3
"""Benchmark: contact import rows/s on SQLite and PostgreSQL against a plain executemany baseline,
and a three-rule segment count over 1,000,000 contacts and 5,000,000 events.

    .venv/bin/python scripts/bench_import.py [--rows 1000000] [--events 5000000] [--only sqlite|postgresql]

PostgreSQL: SMARTMAIL_BENCH_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test);
a throwaway database is created and dropped. SQLite: a file in a temporary directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import bench_results
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def generate(path: Path, rows: int) -> None:
    plans = ["free", "pro", "team"]
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["email", "first_name", "age", "plan", "country"])
        for i in range(rows):
            writer.writerow(
                [f"user{i}@example{i % 97}.com", f"Name{i}", 18 + i % 70, plans[i % 3], ["FR", "DE", "US", "BR"][i % 4]]
            )


def use_database(url: str) -> None:
    os.environ["SMARTMAIL_DATABASE_URL"] = url
    os.environ.setdefault("SMARTMAIL_DEFAULT_SENDER", "bench@example.com")
    os.environ.setdefault("SMARTMAIL_SECRET_KEY", "bench-secret-0123456789")
    os.environ.setdefault("SMARTMAIL_LOG_LEVEL", "WARNING")
    from smartmail import runtime

    runtime.reset()


def baseline(url: str, path: Path) -> float:
    """The same rows, parsed with csv and inserted with one executemany per 5,000 (no validation)."""
    from smartmail.store.engine import get_engine, utcnow

    engine = get_engine()
    reset()
    now = utcnow()
    sql = text(
        "INSERT INTO contacts (email, status, attributes, created_at, updated_at) "
        "VALUES (:email, 'subscribed', :attributes, :now, :now)"
    )
    started = time.perf_counter()
    rows = 0
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        next(reader)
        batch = []
        for email, first_name, age, plan, country in reader:
            batch.append(
                {
                    "email": email,
                    "now": now,
                    "attributes": json.dumps(
                        {"first_name": first_name, "age": int(age), "plan": plan, "country": country}
                    ),
                }
            )
            if len(batch) == 5000:
                with engine.begin() as conn:
                    conn.execute(sql, batch)
                rows += len(batch)
                batch = []
        if batch:
            with engine.begin() as conn:
                conn.execute(sql, batch)
            rows += len(batch)
    elapsed = time.perf_counter() - started
    reset()
    return rows / elapsed


def reset() -> None:
    from smartmail.store.engine import get_engine

    engine = get_engine()
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # fresh storage, as a real table would not be 3x bloated
            conn.execute(text("TRUNCATE import_errors, import_jobs, list_memberships, lists, contacts CASCADE"))
            return
        for table in ("import_errors", "import_jobs", "list_memberships", "lists", "contacts"):
            conn.execute(text(f"DELETE FROM {table}"))


def smartmail_import(path: Path, list_name: str | None) -> tuple[float, dict]:
    """`smartmail contacts import FILE [--list bench] --type age=integer`, in this process."""
    from smartmail.audience import contacts, imports

    if list_name:
        contacts.create_list(list_name)
    started = time.perf_counter()
    status = imports.run_job(imports.create_job(path, list=list_name, types={"age": "integer"}, batch_size=10000))
    elapsed = time.perf_counter() - started
    assert status["failed"] == 0, status
    return (status["created"] + status["updated"]) / elapsed, status


def load_events(url: str, count: int, contacts_total: int) -> float:
    """Events for the segment benchmark: opens, clicks and custom events over the last year."""
    from smartmail.store.engine import get_engine, utcnow

    engine = get_engine()
    now = utcnow()
    rng = random.Random(7)
    types = ["open"] * 5 + ["click"] * 2 + ["order_placed"]
    started = time.perf_counter()
    with engine.begin() as conn:
        first_id = conn.execute(text("SELECT min(id) FROM contacts")).scalar()
    chunk = 200_000
    for start in range(0, count, chunk):
        rows = [
            (
                rng.choice(types),
                first_id + rng.randrange(contacts_total),
                now - timedelta(seconds=rng.randrange(365 * 86400)),
            )
            for _ in range(min(chunk, count - start))
        ]
        with engine.begin() as conn:
            raw = conn.connection.driver_connection
            if engine.dialect.name == "postgresql":
                with raw.cursor().copy("COPY events (type, contact_id, occurred_at, properties) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row((*row, "{}"))
            else:
                raw.executemany(
                    "INSERT INTO events (type, contact_id, occurred_at, properties) VALUES (?, ?, ?, '{}')",
                    [(t, c, o.strftime("%Y-%m-%d %H:%M:%S.%f")) for t, c, o in rows],
                )
    # Statistics, and on PostgreSQL the visibility map that index-only scans need: what autovacuum
    # would have done by the time anyone counts a segment.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE" if engine.dialect.name == "postgresql" else "ANALYZE"))
    return time.perf_counter() - started


def segment_count() -> tuple[int, float, str]:
    from smartmail.audience import segments
    from smartmail.store.engine import get_engine

    rules = {"all": [{"attr": "plan", "op": "eq", "value": "pro"}, {"list": "bench"}, {"opened_within": 30}]}
    segments.count(rules)  # warm the cache, as a repeated count would find it
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        total = segments.count(rules)
        timings.append(time.perf_counter() - started)
    engine = get_engine()
    plan = ""
    if engine.dialect.name == "postgresql":
        query = segments.audience_query(rules)
        compiled = query.compile(engine, compile_kwargs={"literal_binds": True})
        with engine.connect() as conn:
            plan = "\n".join(
                r[0] for r in conn.execute(text(f"EXPLAIN (ANALYZE, COSTS OFF) SELECT count(*) FROM ({compiled}) q"))
            )
    return total, min(timings), plan


def run(name: str, url: str, path: Path, rows: int, events: int, show_plan: bool) -> dict:
    from smartmail.store import migrate

    migrate.upgrade(url)
    use_database(url)
    base = baseline(url, path)
    print(f"{name:10} baseline (csv + executemany INSERT by 5,000, no checks): {base:,.0f} rows/s", flush=True)
    rate, _ = smartmail_import(path, None)
    figures_new = rate
    print(f"{name:10} import {rows:,} new contacts: {rate:,.0f} rows/s ({rate / base:.2f}x the baseline)", flush=True)
    again, _ = smartmail_import(path, None)
    print(f"{name:10} the same file again (all updates): {again:,.0f} rows/s ({again / base:.2f}x)", flush=True)
    reset()
    rate, status = smartmail_import(path, "bench")
    print(f"{name:10} import {rows:,} new contacts joining a list: {rate:,.0f} rows/s ({rate / base:.2f}x)", flush=True)
    figures = {"baseline_rows_s": base, "new_rows_s": figures_new, "updates_rows_s": again, "list_join_rows_s": rate}
    if events:
        took = load_events(url, events, status["created"])
        total, best, plan = segment_count()
        print(
            f"{name:10} segment count (plan=pro, list, opened within 30 days) over {rows:,} contacts and "
            f"{events:,} events: {total:,} contacts in {best * 1000:.0f} ms (events loaded in {took:.0f} s)",
            flush=True,
        )
        figures["segment_count_ms"] = best * 1000
        if show_plan and plan:
            print(plan)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--only", choices=["sqlite", "postgresql"])
    parser.add_argument("--plan", action="store_true", help="print PostgreSQL's query plan for the count")
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "contacts.csv"
        generate(path, args.rows)
        print(f"generated {args.rows:,} rows ({path.stat().st_size / 1e6:.0f} MB)", flush=True)
        if args.only in (None, "postgresql"):
            admin_url = os.environ.get(
                "SMARTMAIL_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
            )
            name = f"smartmail_bench_{uuid.uuid4().hex[:8]}"
            admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            try:
                results["postgresql"] = run(
                    "postgresql", admin_url.rsplit("/", 1)[0] + f"/{name}", path, args.rows, args.events, args.plan
                )
            finally:
                use_database("sqlite://")
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if args.only in (None, "sqlite"):
            results["sqlite"] = run(
                "sqlite", f"sqlite:///{Path(tmp) / 'bench.db'}", path, args.rows, args.events, args.plan
            )
    bench_results.save("bench_import", args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
