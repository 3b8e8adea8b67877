#!/usr/bin/env python3
"""Benchmark: DSNs per second through `smartmail inbound` and the events worker, SMTP in to effects committed.

    .venv/bin/python scripts/bench_inbound.py                      # PostgreSQL, 10,000 DSNs
    .venv/bin/python scripts/bench_inbound.py --dsns 2000          # a quick look

Needs PostgreSQL with trust auth (database `smartmail_bench` is created and dropped), Redis
(database 12 by default, FLUSHED; one is started if none answers) and Postfix's smtp-sink.

In one run:
1. --dsns sent messages are stored (as a campaign's delivery leaves them), each with its VERP
   return path, and a Postfix-style DSN (RFC 3464, 5.1.1) is built for each.
2. Baseline: the same SMTP client (--connections threads, one connection each, many mails per
   connection) delivers every DSN to Postfix's smtp-sink: what the client and SMTP cost alone.
3. The same DSNs to `smartmail inbound` with one events worker (`--queues events`, --concurrency
   processes): accepted/s (stored, acknowledged), and end to end/s, from the first MAIL to the
   last mail `processed` (every message `bounced`, its address suppressed, its event written).
   Target: >= 500 DSNs/s end to end.
Reuses scripts/bench_send.py's database, sink and worker handling.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import sys
import threading
import time
from pathlib import Path

import bench_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_send import Bench, BenchError, SmtpSink, Worker, free_port, log, wait_for, wait_port  # noqa: E402

BOUNCE_DOMAIN = "bounces.bench.example.com"


def store_messages(count: int) -> list[tuple[str, str, str]]:
    """`count` sent messages; (id, recipient, VERP return path) of each."""
    from sqlalchemy import insert

    from smartmail.content import return_path
    from smartmail.store.engine import session_scope
    from smartmail.store.ids import new_ids
    from smartmail.store.models import Message

    ids = new_ids(count)
    rows = [
        (message_id, f"r{i}@example.org", return_path.bounce_address(message_id)) for i, message_id in enumerate(ids)
    ]
    with session_scope() as session:
        for start in range(0, count, 5000):
            session.execute(
                insert(Message),
                [
                    {
                        "id": message_id,
                        "state": "sent",
                        "sender": "news@bench.example.com",
                        "recipient": recipient,
                        "subject": "News",
                        "text": "Hello",
                        "headers": {},
                        "tags": [],
                        "message_id_header": f"<{message_id}@bench.example.com>",
                    }
                    for message_id, recipient, _ in rows[start : start + 5000]
                ],
            )
    return rows  # type: ignore[return-value]


def dsn(message_id: str, recipient: str, verp: str) -> bytes:
    """A Postfix-style DSN (RFC 3464) for one message, with its returned headers."""
    return (
        "From: MAILER-DAEMON@mx.example.org (Mail Delivery System)\r\n"
        f"To: {verp}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n\r\n"
        "--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.org\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: Recipient address rejected: User unknown\r\n\r\n"
        "--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: news@bench.example.com\r\nTo: {recipient}\r\nSubject: News\r\n"
        f"Message-ID: <{message_id}@bench.example.com>\r\n\r\n"
        "--b--\r\n"
    ).encode()


def deliver_all(port: int, mails: list[tuple[str, bytes]], connections: int) -> float:
    """Deliver (rcpt, data) pairs over `connections` SMTP connections at once; seconds taken."""
    errors: list[BaseException] = []

    def client(part: list[tuple[str, bytes]]) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
                for rcpt, data in part:
                    smtp.sendmail("", [rcpt], data)
        except BaseException as exc:  # noqa: BLE001 - reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(mails[i::connections],)) for i in range(connections)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError(f"delivery failed: {errors[0]!r}")
    return time.perf_counter() - started


def counts(bench: Bench) -> tuple[int, int]:
    """(inbound mail processed, messages bounced)."""
    from sqlalchemy import text

    with bench.database.engine.connect() as conn:
        processed = conn.execute(text("SELECT count(*) FROM inbound_messages WHERE state = 'processed'")).scalar()
        bounced = conn.execute(text("SELECT count(*) FROM messages WHERE state = 'bounced'")).scalar()
    return int(processed or 0), int(bounced or 0)


def run(args: argparse.Namespace) -> dict:
    bench = Bench(args)
    try:
        bench.setup()
        os.environ["SMARTMAIL_BOUNCE_DOMAIN"] = BOUNCE_DOMAIN
        os.environ["SMARTMAIL_INBOUND_RATE_PER_IP"] = "100000"  # one client address sends everything here
        os.environ["SMARTMAIL_INBOUND_MAX_CONNECTIONS_PER_IP"] = str(args.connections + 4)
        from smartmail.config import get_settings

        get_settings.forget()
        log(f"database {args.database}: {bench.database.version}; load avg {os.getloadavg()[0]:.2f}")
        rows = store_messages(args.dsns)
        mails = [(verp, dsn(message_id, recipient, verp)) for message_id, recipient, verp in rows]
        size = sum(len(data) for _, data in mails) / len(mails)
        log(f"{args.dsns} DSNs of {size:.0f} bytes on average, {args.connections} SMTP connections")

        sink = SmtpSink(bench.children, bench.workdir / "sink.log")
        bench.sinks.append(sink)
        bench.quiet()
        sink.expect(args.dsns)
        baseline = deliver_all(sink.port, mails, args.connections)
        log(f"baseline  smtp-sink: {args.dsns / baseline:,.0f} DSNs/s ({baseline:.2f} s)")
        sink.stop()
        bench.sinks.remove(sink)

        port = free_port()
        server = bench.children.start(
            [sys.executable, "-m", "smartmail.cli", "inbound", "--host", "127.0.0.1", "--port", str(port)],
            env=dict(os.environ),
            log_path=bench.workdir / "inbound.log",
        )
        wait_port(port, 30, server)
        worker = Worker(bench, "events", "smartmail.workers.app", ["events"], dict(os.environ))
        bench.quiet()
        started = time.perf_counter()
        accepted = deliver_all(port, mails, args.connections)
        log(f"inbound   accepted: {args.dsns / accepted:,.0f} DSNs/s ({accepted:.2f} s, stored before each 250)")
        wait_for(
            lambda: counts(bench)[0] >= args.dsns,
            timeout=args.timeout,
            what="every DSN processed",
            alive=worker.check,
        )
        total = time.perf_counter() - started
        processed, bounced = counts(bench)
        if bounced != args.dsns:
            raise BenchError(f"{bounced} of {args.dsns} messages bounced")
        log(f"inbound   end to end: {args.dsns / total:,.0f} DSNs/s ({total:.2f} s, SMTP in to effects committed)")
        worker.stop()
        return {
            "dsns": args.dsns,
            "connections": args.connections,
            "database": args.database,
            "baseline_smtp_sink_per_s": args.dsns / baseline,
            "inbound_accepted_per_s": args.dsns / accepted,
            "end_to_end_per_s": args.dsns / total,
            "end_to_end_seconds": total,
            "bounced": bounced,
        }
    except BaseException:
        bench.failed = True
        raise
    finally:
        bench.teardown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsns", type=int, default=10_000, help="DSNs to deliver (default 10000)")
    parser.add_argument("--connections", type=int, default=4, help="concurrent SMTP client connections (default 4)")
    parser.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--postgres-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12", help="FLUSHED; default db 12")
    parser.add_argument("--timeout", type=float, default=600.0, help="limit for processing, seconds")
    parser.add_argument("--idle-wait", type=float, default=20.0, help="max seconds to wait for a quiet machine")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp directory with the logs")
    args = parser.parse_args()
    try:
        results = run(args)
    except BenchError as exc:
        sys.exit(f"benchmark failed: {exc}")
    log(f"results: {bench_results.save('bench_inbound', args, results)}")


if __name__ == "__main__":
    main()
