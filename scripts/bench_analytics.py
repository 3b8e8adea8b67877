#!/usr/bin/env python3
"""Benchmark: analytics roll-ups over a generated history: one tick over a minute of new events, and KPIs vs raw rows.

    .venv/bin/python scripts/bench_analytics.py                       # 10,000,000 messages, 20,000,000 events
    .venv/bin/python scripts/bench_analytics.py --messages 200000 --events 400000 --campaigns 20   # quick

Needs PostgreSQL with trust auth: database `smartmail_bench_analytics` (--database-name) is created,
migrated and dropped at the end (--keep-database leaves it). Redis is not used.

1. History, generated in SQL (INSERT … SELECT generate_series; every index and foreign key of the
   schema in place; VACUUM ANALYZE after): --contacts contacts over a long tail of recipient
   domains; --campaigns campaigns started over the 90 days before now (the last one 2 days ago);
   --messages campaign messages, the same number per campaign, each sent over 30 minutes; for
   each message a `sent` event (1% `failed`; 2% `deferred` first), then bounces (hard 0.8%, soft
   0.7%), human opens (1-3 for ~25% of messages; the first `unique`, as engagement_firsts marks it),
   machine opens (~35%: privacy proxies), human clicks (1-2 for 15% of openers), scanner clicks
   (~5%), unsubscribes (1% of openers) and complaints (0.05%); the open and click rates scaled so
   the events come to about --events. Messages and events are written in --chunk messages at a
   time, campaigns in time order, each chunk's events in one statement ordered by occurred_at: one
   transaction (one `xact`) per chunk, ids in time order within it, as the stream reads them.
2. The history rolled up once (timed): by `rollups.roll_up` until it is done (--history roll_up, the
   default: what beat's task runs, a page of 1,000 events per transaction), or (--history sql, a
   faster set-up) by one INSERT … SELECT computing the same counters, the analytics checkpoint
   moved to the stream's end in the same transaction.
3. --tick-rounds times: --tick-events events of the last minute (60% the `sent` events of a
   campaign going out now, whose messages are written first as its fan-out would; the rest opens,
   clicks and bounces of the last 3 campaigns' messages) written in transactions of --tick-batch
   rows, then ONE tick: `rollups.roll_up(max_seconds=SMARTMAIL_ANALYTICS_INTERVAL)`, timed in wall
   time and database time (the driver's time in every statement and commit), with the PostgreSQL
   backend's CPU. Target < 1 s.
4. A campaign's KPI page (the middle campaign): `kpis.campaign_kpis` (median of --kpi-repeats,
   target < 50 ms) against the same counters from raw rows, median of --raw-repeats: over the
   campaign's messages joined to their events (indexes: uq_messages_campaign_id_contact_id,
   ix_events_message_id), and over events by their campaign_id (no index: a scan). The KPIs of
   both must be equal; the EXPLAIN (ANALYZE, BUFFERS) of each is recorded.
Results go to bench/results/bench_analytics-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bench_results

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(SCRIPTS))

import bench_send  # noqa: E402
from bench_automations import SqlClock  # noqa: E402
from bench_send import BenchError, log  # noqa: E402

DAYS = 90  # the history's span: campaigns start from DAYS days ago to LAST_DAYS ago
LAST_DAYS = 2  # the last campaign's opens and clicks have happened by now
SEND_SECONDS = 1800.0  # each campaign goes out over 30 minutes
TARGET_TICK_S, TARGET_KPI_S = 1.0, 0.050

# Rates per message; OPEN, MACHINE_OPEN and MACHINE_CLICK are scaled to reach --events.
FAILED, DEFERRED = 0.01, 0.02  # of messages; deferred ones are sent later
HARD, BOUNCED = 0.008, 0.015  # of sent messages: hard bounces, and hard + soft
OPEN, MACHINE_OPEN, MACHINE_CLICK = 0.25, 0.35, 0.05  # of delivered messages
CLICK, UNSUBSCRIBE = 0.15, 0.01  # of human-opened messages
COMPLAIN = 0.0005  # of delivered messages
OPENS_MAX, CLICKS_MAX = 3, 2  # a human opener opens 1-3 times and a clicker clicks 1-2 times

# The new minute's mix, per 100 events.
TICK_MIX = (("sent", 60), ("open", 20), ("machine_open", 12), ("click", 5), ("machine_click", 2), ("bounce", 1))

_UA = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.1 Safari/605.1.15"
)
# Rows lo … hi-1, as bigint: an integer series would overflow in the arithmetic on it.
_RANGE = "generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint) - 1)"
# A long tail of recipient domains: the big mailbox providers, then 500 company domains.
_DOMAIN = """(CASE WHEN {i} % 100 < 35 THEN 'gmail.com' WHEN {i} % 100 < 50 THEN 'yahoo.com'
  WHEN {i} % 100 < 60 THEN 'outlook.com' WHEN {i} % 100 < 66 THEN 'hotmail.com'
  WHEN {i} % 100 < 70 THEN 'icloud.com' WHEN {i} % 100 < 73 THEN 'aol.com' WHEN {i} % 100 < 75 THEN 'gmx.de'
  WHEN {i} % 100 < 77 THEN 'web.de' WHEN {i} % 100 < 79 THEN 'orange.fr'
  ELSE 'corp' || ({i} / 100) % 500 || '.example' END)"""


def email_sql(index: str) -> str:
    """The address of the contact with this 0-based index, as SQL."""
    return f"('u' || {index} || '@' || {_DOMAIN.format(i=index)})"


def uniform(seed: str, salt: int) -> str:
    """A uniform number in [0, 1) from a hash of `seed` (SQL): the same message always draws the same."""
    return f"((hashint8extended({seed}, {salt}) & 2147483647)::float8 / 2147483648.0)"


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: dict[str, Any] = {}
        self.database: bench_send.Database | None = None
        self.now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
        args.per_campaign = math.ceil(args.messages / args.campaigns)
        args.campaigns = math.ceil(args.messages / args.per_campaign)
        sends = self.tick_sends()
        args.contacts = args.contacts or max(args.per_campaign, args.messages // 10, sends)
        if args.contacts < max(args.per_campaign, sends):
            raise BenchError("--contacts must hold a campaign's audience and the tick's sends (one message each)")
        self.scale = self.engagement_scale()

    # --- set-up -----------------------------------------------------------------------------------

    def setup(self) -> None:
        workdir = Path(tempfile.mkdtemp(prefix="bench-analytics-"))
        args = self.args
        self.database = bench_send.Database("postgresql", args.postgres_admin_url, workdir, args.database_name)
        os.environ["SMARTMAIL_DATABASE_URL"] = self.database.url
        os.environ["SMARTMAIL_REDIS_URL"] = self.args.redis_url  # required by the settings; nothing is written
        os.environ.setdefault("SMARTMAIL_DEFAULT_SENDER", bench_send.SENDER)
        os.environ.setdefault("SMARTMAIL_SECRET_KEY", "bench-secret-key-0123456789")
        from smartmail.config import get_settings

        get_settings.forget()
        self.settings = get_settings()

    def teardown(self) -> None:
        if self.database is not None and not self.args.keep_database:
            self.database.drop()

    def sql(self, statement: str, params: dict[str, Any] | None = None) -> list[Any]:
        """Run one statement in its own transaction (autocommit); its rows, if any."""
        from sqlalchemy import text

        assert self.database is not None
        with self.database.engine.connect() as conn:
            result = conn.execute(text(statement), params or {})
            return list(result.all()) if result.returns_rows else []

    def timed(self, what: str, fn: Callable[[], Any]) -> float:
        began = time.perf_counter()
        fn()
        seconds = time.perf_counter() - began
        log(f"  {what}: {seconds:.1f} s")
        return seconds

    def environment(self) -> None:
        import platform

        assert self.database is not None
        machine = {
            "cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_at_start": os.getloadavg(),
            "database": self.database.version,
            "analytics_interval_s": self.settings.analytics_interval,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
        self.results["machine"] = machine
        log("environment")
        for key, value in machine.items():
            log(f"  {key:22} {value}")
        log()

    # --- 1. the history ---------------------------------------------------------------------------

    def engagement_scale(self) -> float:
        """The factor on the open and machine rates that brings the events to about --events."""
        delivered = (1 - FAILED) * (1 - HARD)
        fixed = 1 + DEFERRED + (1 - FAILED) * BOUNCED + delivered * COMPLAIN
        per_unit = delivered * (
            OPEN * (OPENS_MAX + 1) / 2 * (1 + CLICK * (CLICKS_MAX + 1) / 2 + UNSUBSCRIBE) + MACHINE_OPEN + MACHINE_CLICK
        )
        wanted = self.args.events / self.args.messages - fixed
        if wanted <= 0:
            raise BenchError(f"--events must be more than {fixed:.3f} × --messages (a sent event per message and more)")
        scale = wanted / per_unit
        if max(OPEN, MACHINE_OPEN, MACHINE_CLICK) * scale > 0.95:
            raise BenchError("--events is too many for --messages: more than ~4 events per message")
        return scale

    def generate(self) -> None:
        args = self.args
        log(
            f"1. history: {args.messages:,} messages in {args.campaigns:,} campaigns of {args.per_campaign:,}, "
            f"{args.contacts:,} contacts, about {args.events:,} events (engagement ×{self.scale:.3f}), "
            f"chunks of {args.chunk:,} messages"
        )
        timings: dict[str, float] = {}
        timings["contacts_s"] = self.timed("contacts", self.insert_contacts)
        timings["campaigns_s"] = self.timed("campaigns", lambda: self.insert_campaigns(0, args.campaigns))
        messages_s = events_s = 0.0
        for lo in range(0, args.messages, args.chunk):
            hi = min(lo + args.chunk, args.messages)
            began = time.perf_counter()
            self.insert_messages(lo, hi)
            middle = time.perf_counter()
            self.insert_events(lo, hi)
            messages_s += middle - began
            events_s += time.perf_counter() - middle
            log(f"  messages {hi:,} of {args.messages:,}: {messages_s:.1f} s; their events {events_s:.1f} s")
        timings["messages_s"], timings["events_s"] = messages_s, events_s
        timings["vacuum_analyze_s"] = self.timed("VACUUM ANALYZE", lambda: self.sql("VACUUM ANALYZE"))
        counts = {name: int(self.sql(f"SELECT count(*) FROM {name}")[0][0]) for name in ("messages", "events")}
        by_type = {
            f"{kind}{' (machine)' if machine else ''}": int(n)
            for kind, machine, n in self.sql("SELECT type, machine, count(*) FROM events GROUP BY 1, 2 ORDER BY 3 DESC")
        }
        sizes = {
            name: self.sql(f"SELECT pg_size_pretty(pg_total_relation_size('{name}'))")[0][0]
            for name in ("messages", "events", "contacts")
        }
        self.results["history"] = {
            **timings,
            "rows": counts,
            "events_by_type": by_type,
            "sizes": sizes,
            "xacts": int(self.sql("SELECT count(DISTINCT xact) FROM events")[0][0]),
        }
        log(f"  {counts['messages']:,} messages, {counts['events']:,} events ({sizes}); by type {by_type}\n")

    def insert_contacts(self) -> None:
        self.sql(
            f"INSERT INTO contacts (id, email, status, attributes, created_at, updated_at) "
            f"SELECT g + 1, {email_sql('g')}, 'subscribed', jsonb_build_object('first_name', 'User' || g), "
            f":at, :at FROM generate_series(0, CAST(:count AS bigint) - 1) AS g",
            {"count": self.args.contacts, "at": self.now - timedelta(days=DAYS + 30)},
        )
        self.sql("SELECT setval(pg_get_serial_sequence('contacts', 'id'), :n)", {"n": self.args.contacts})

    def campaign_start(self, c: int) -> datetime:
        span = (DAYS - LAST_DAYS) * 86400.0
        return self.now - timedelta(days=DAYS) + timedelta(seconds=c * span / max(self.args.campaigns - 1, 1))

    def insert_campaigns(self, first: int, count: int, *, started: datetime | None = None) -> None:
        """Campaigns with ids first+1 … first+count, `sent`, started as the history's schedule says
        (or at `started`)."""
        span = (DAYS - LAST_DAYS) * 86400.0 / max(self.args.campaigns - 1, 1)
        start = "CAST(:at AS timestamp)" if started else f"(CAST(:t0 AS timestamp) + make_interval(secs => g * {span}))"
        self.sql(
            "INSERT INTO campaigns (id, name, state, template_name, lists, sender, tags, window_timezone, "
            "resend_unknown, tracking, hard_bounces, soft_bounces, complaints, cursor, fanned_out, created_at, "
            "launched_at, finished_at) "
            f"SELECT g + 1, 'bench-' || (g + 1), 'sent', 'welcome', '[\"newsletter\"]', 'news@example.com', '[]', "
            f"'UTC', false, true, 0, 0, 0, 0, true, {start}, {start}, {start} + interval '30 minutes' "
            "FROM generate_series(:first, :first + :count - 1) AS g",
            {"first": first, "count": count, "t0": self.now - timedelta(days=DAYS), "at": started},
        )
        self.sql("SELECT setval(pg_get_serial_sequence('campaigns', 'id'), (SELECT max(id) FROM campaigns))")

    def message_columns(self) -> str:
        """SQL over `m` (the message's 0-based index): its campaign index, contact index, send time."""
        args = self.args
        span = (DAYS - LAST_DAYS) * 86400.0 / max(args.campaigns - 1, 1)
        per = args.per_campaign
        return (
            f"m, m / {per} AS c, (m % {per} + (m / {per}) * 7919) % {args.contacts} AS who, "
            f"CAST(:t0 AS timestamp) + make_interval(secs => (m / {per}) * {span} "
            f"+ (m % {per}) * {SEND_SECONDS / per}) AS sent_at"
        )

    def insert_messages(self, lo: int, hi: int) -> None:
        """Messages lo … hi-1 in one statement: as a campaign's fan-out writes them, then delivered."""
        self.sql(
            "INSERT INTO messages (id, state, sender, recipient, subject, text, headers, tags, message_id_header, "
            "template_name, template_version, attempts, created_at, enqueued_at, claimed_at, finished_at, smtp_code, "
            "smtp_reply, campaign_id, contact_id) "
            f"SELECT 'b' || lpad(m::text, 25, '0'), CASE WHEN {uniform('m', 1)} < {FAILED} THEN 'failed' ELSE 'sent' "
            f"END, 'news@example.com', {email_sql('who')}, '', '', '{{}}', '[]', '<b' || m || '@example.com>', "
            "'welcome', 1, 1, sent_at - interval '1 minute', sent_at - interval '1 minute', sent_at, sent_at, "
            f"CASE WHEN {uniform('m', 1)} < {FAILED} THEN 550 ELSE 250 END, NULL, c + 1, who + 1 "
            f"FROM (SELECT {self.message_columns()} FROM {_RANGE} AS m) AS b ORDER BY m",
            {"lo": lo, "hi": hi, "t0": self.now - timedelta(days=DAYS)},
        )

    def insert_events(self, lo: int, hi: int) -> None:
        """The events of messages lo … hi-1 in one statement (one xact), in occurred_at order."""
        s = self.scale
        h = {n: uniform("m", n) for n in range(1, 17)}
        delivered = f"{h[1]} >= {FAILED} AND {h[2]} >= {HARD}"
        first_open = f"(sent_at + make_interval(secs => 60 + {h[6]} * 129600))"  # within 36 hours
        opened = f"{delivered} AND {h[4]} < {OPEN * s}"
        ip = "'203.0.113.' || m % 250"
        kinds = [
            # the relay's answer
            f"SELECT m, c, who, CASE WHEN {h[1]} < {FAILED} THEN 'failed' ELSE 'sent' END AS type, sent_at AS at, "
            f"false AS machine, CASE WHEN {h[1]} < {FAILED} THEN jsonb_build_object('smtp_code', 550, 'reply', "
            "'550 5.1.1 <' || m || '>: Recipient address rejected: User unknown') ELSE jsonb_build_object("
            "'smtp_code', 250, 'reply', '250 2.0.0 Ok: queued as ' || upper(to_hex(m * 7919))) END AS properties "
            "FROM b",
            f"SELECT m, c, who, 'deferred', sent_at - interval '10 minutes', false, jsonb_build_object('smtp_code', "
            f"451, 'reply', '451 4.7.1 Try again later', 'next_attempt_at', sent_at) FROM b "
            f"WHERE {h[1]} >= {FAILED} AND {h[1]} < {FAILED + DEFERRED}",
            f"SELECT m, c, who, 'bounced', sent_at + make_interval(secs => 90 + {h[3]} * 3600), false, "
            "jsonb_build_object('source', 'dsn', 'recipient', 'u' || who, 'kind', "
            f"CASE WHEN {h[2]} < {HARD} THEN 'hard' ELSE 'soft' END, 'about', 'mailbox', 'status', "
            f"CASE WHEN {h[2]} < {HARD} THEN '5.1.1' ELSE '4.2.2' END) FROM b "
            f"WHERE {h[1]} >= {FAILED} AND {h[2]} < {BOUNCED}",
            # human opens: the first one unique (engagement_firsts' mark), then again hours or days later
            f"SELECT m, c, who, 'opened', {first_open} + make_interval(secs => i * (3600 + {h[7]} * 86400)), false, "
            f"jsonb_build_object('unique', i = 0, 'ip', {ip}, 'user_agent', '{_UA}') FROM b, "
            f"generate_series(0, floor({h[5]} * {OPENS_MAX})::int) AS i WHERE {opened}",
            f"SELECT m, c, who, 'opened', sent_at + make_interval(secs => 30 + {h[9]} * 600), true, "
            "jsonb_build_object('unique', true, 'machine_reason', 'apple-privacy-proxy', 'ip', '17.58.0.' || m % 250) "
            f"FROM b WHERE {delivered} AND {h[8]} < {MACHINE_OPEN * s}",
            # human clicks: link 1 first (unique), then link 1 again or link 2 (unique)
            f"SELECT m, c, who, 'clicked', {first_open} + make_interval(secs => 20 + i * 300), false, "
            "jsonb_build_object('unique', i = 0 OR l = 2, 'link', l, 'url', 'https://example.com/p/' || l, "
            f"'ip', {ip}, 'user_agent', '{_UA}') FROM b, generate_series(0, floor({h[11]} * {CLICKS_MAX})::int) AS i, "
            f"LATERAL (SELECT CASE WHEN i = 0 THEN 1 ELSE 1 + floor({h[12]} * 2)::int END AS l) AS link "
            f"WHERE {opened} AND {h[10]} < {CLICK}",
            f"SELECT m, c, who, 'clicked', sent_at + make_interval(secs => 5 + {h[14]} * 10), true, "
            "jsonb_build_object('unique', true, 'link', 1, 'url', 'https://example.com/p/1', 'machine_reason', "
            f"'clicked-right-after-delivery', 'ip', '198.51.100.' || m % 250) FROM b "
            f"WHERE {delivered} AND {h[13]} < {MACHINE_CLICK * s}",
            f"SELECT m, c, who, 'unsubscribed', {first_open} + interval '1 minute', false, "
            f"jsonb_build_object('source', 'link') FROM b WHERE {opened} AND {h[15]} < {UNSUBSCRIBE}",
            f"SELECT m, c, who, 'complained', sent_at + make_interval(secs => 10800 + {h[16]} * 86400), false, "
            "jsonb_build_object('source', 'arf', 'recipient', 'u' || who, 'feedback_type', 'abuse') "
            f"FROM b WHERE {delivered} AND {h[16]} < {COMPLAIN}",
        ]
        union = " UNION ALL ".join(f"({kind})" for kind in kinds)
        self.sql(
            f"WITH b AS MATERIALIZED (SELECT {self.message_columns()} FROM {_RANGE} AS m) "
            "INSERT INTO events (type, contact_id, message_id, campaign_id, properties, occurred_at, machine) "
            "SELECT e.type, e.who + 1, 'b' || lpad(e.m::text, 25, '0'), e.c + 1, e.properties, e.at, e.machine "
            f"FROM ({union}) AS e(m, c, who, type, at, machine, properties) ORDER BY e.at, e.m",
            {"lo": lo, "hi": hi, "t0": self.now - timedelta(days=DAYS)},
        )

    # --- 2. the history rolled up -----------------------------------------------------------------

    def roll_up_history(self) -> None:
        from smartmail.analytics import rollups

        how = self.args.history
        if how == "roll_up":
            log("2. the history rolled up by rollups.roll_up (pages of 1,000 events, a transaction each)")
        else:
            log("2. the history rolled up in SQL (the same counters in one statement; the checkpoint moved to the end)")
        began = time.perf_counter()
        if how == "roll_up":
            events = rollups.roll_up(max_seconds=math.inf).events
        else:
            events = self.roll_up_in_sql()
        seconds = time.perf_counter() - began
        self.sql("VACUUM ANALYZE rollups")
        rows = int(self.sql("SELECT count(*) FROM rollups")[0][0])
        self.results["roll_up_history"] = {
            "how": how,
            "events": events,
            "seconds": seconds,
            "events_per_s": events / seconds,
            "rollup_rows": rows,
            "rollups_size": self.sql("SELECT pg_size_pretty(pg_total_relation_size('rollups'))")[0][0],
        }
        log(f"  {events:,} events in {seconds:.1f} s ({events / seconds:,.0f}/s); {rows:,} roll-up rows\n")

    def roll_up_in_sql(self) -> int:
        """The counters rollups.roll_up would add for the whole stream, in one INSERT … SELECT, and the
        analytics checkpoint moved to the stream's end in the same transaction; the events read."""
        from sqlalchemy import text

        from smartmail.analytics import rollups
        from smartmail.audience import event_stream
        from smartmail.store import checkpoints
        from smartmail.store.engine import get_engine

        domain = "NULLIF(lower(btrim(substring({} from '@([^@]*)$'))), '')"
        metrics = (
            "CASE WHEN e.type IN ('sent', 'deferred', 'failed', 'unsubscribed', 'complained') THEN ARRAY[e.type] "
            "WHEN e.type = 'bounced' THEN ARRAY[CASE WHEN e.properties->>'kind' = 'hard' THEN 'bounced_hard' "
            "ELSE 'bounced_soft' END] "
            "WHEN e.type IN ('opened', 'clicked') AND e.machine THEN ARRAY[e.type || '_machine'] "
            "WHEN e.type IN ('opened', 'clicked') THEN array_remove(ARRAY[e.type || '_human', CASE WHEN "
            "e.properties->'unique' = 'true'::jsonb THEN e.type || '_unique_human' END], NULL) END"
        )
        # A message's first human click in stream order is its clicked_messages_human.
        first_clicks = (
            "SELECT DISTINCT ON (e.message_id) e.id FROM events e WHERE e.type = 'clicked' AND NOT e.machine "
            "AND e.message_id IS NOT NULL ORDER BY e.message_id, e.xact, e.id"
        )
        statement = f"""
WITH counted AS (
  SELECT e.occurred_at, e.campaign_id, COALESCE({domain.format("m.recipient")}, {domain.format("c.email")}) AS domain,
    {metrics} || CASE WHEN f.id IS NULL THEN ARRAY[]::text[] ELSE ARRAY['clicked_messages_human'] END AS metrics
  FROM events e LEFT JOIN messages m ON m.id = e.message_id LEFT JOIN contacts c ON c.id = e.contact_id
    LEFT JOIN ({first_clicks}) f ON f.id = e.id
)
INSERT INTO rollups (dimension, value, granularity, bucket_start, metric, count)
SELECT d.dimension, d.value, g.granularity, date_trunc(g.granularity, x.occurred_at), metric, count(*)
FROM counted x CROSS JOIN LATERAL unnest(x.metrics) AS metric
  CROSS JOIN LATERAL (VALUES ('all', ''), ('campaign', x.campaign_id::text), ('domain', x.domain))
    AS d(dimension, value)
  CROSS JOIN (VALUES ('hour'), ('day')) AS g(granularity)
WHERE d.value IS NOT NULL
GROUP BY 1, 2, 3, 4, 5
ON CONFLICT (dimension, value, granularity, bucket_start, metric)
  DO UPDATE SET count = rollups.count + excluded.count"""
        with get_engine().begin() as connection:
            checkpoints.lock(connection, rollups.CHECKPOINT, initial=str(event_stream.START))
            connection.execute(text(statement))
            end = event_stream.end(connection)
            checkpoints.move(connection, rollups.CHECKPOINT, str(end))
            return int(connection.execute(text("SELECT count(*) FROM events")).scalar_one())

    # --- 3. one tick over a minute of new events --------------------------------------------------

    def tick_sends(self) -> int:
        """How many of the tick's events are `sent` (a new message each)."""
        share = dict(TICK_MIX)["sent"]
        full, rest = divmod(self.args.tick_events, 100)
        return full * share + min(rest, share)

    def insert_minute(self, round_: int) -> float:
        """--tick-events events over the last minute, in transactions of --tick-batch rows; the new
        campaign's messages first. The seconds it took to write them."""
        args = self.args
        campaign = args.campaigns + round_  # 0-based index of this round's campaign
        started = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=60)
        self.insert_campaigns(campaign, 1, started=started)
        sends = self.tick_sends()
        prefix = f"t{round_:02d}"
        # Its messages, sent to the first contacts after a shift (one message per contact).
        self.sql(
            "INSERT INTO messages (id, state, sender, recipient, subject, text, headers, tags, message_id_header, "
            "template_name, template_version, attempts, created_at, enqueued_at, claimed_at, finished_at, smtp_code, "
            "campaign_id, contact_id) "
            f"SELECT :prefix || lpad(n::text, 23, '0'), 'sent', 'news@example.com', {email_sql('who')}, '', '', "
            "'{}', '[]', '<' || :prefix || n || '@example.com>', 'welcome', 1, 1, :at, :at, :at, :at, 250, "
            ":campaign, who + 1 "
            f"FROM (SELECT n, (n + :shift) % {args.contacts} AS who "
            "FROM generate_series(0, CAST(:sends AS bigint) - 1) AS n) AS s",
            {"prefix": prefix, "at": started, "campaign": campaign + 1, "sends": sends, "shift": round_ * 104729},
        )
        # Engagement on the last 3 history campaigns' messages.
        recent_lo = max(args.campaigns - 3, 0) * args.per_campaign
        recent = args.messages - recent_lo
        bounds, lo = [], 0
        for kind, share in TICK_MIX:
            bounds.append((kind, lo, lo + share))
            lo += share
        kind_sql = " ".join(f"WHEN g % 100 < {hi} THEN '{kind}'" for kind, _, hi in bounds)
        sent_share = dict(TICK_MIX)["sent"]
        old = f"({recent_lo} + (hashint8extended(g, {round_}) % {recent} + {recent}) % {recent})"
        statement = (
            "INSERT INTO events (type, contact_id, message_id, campaign_id, properties, occurred_at, machine) "
            "SELECT CASE WHEN k IN ('open', 'machine_open') THEN 'opened' WHEN k IN ('click', 'machine_click') THEN "
            "'clicked' WHEN k = 'bounce' THEN 'bounced' ELSE 'sent' END, "
            f"CASE WHEN k = 'sent' THEN (n + :shift) % {args.contacts} ELSE "
            f"(old % {args.per_campaign} + (old / {args.per_campaign}) * 7919) % {args.contacts} END + 1, "
            "CASE WHEN k = 'sent' THEN :prefix || lpad(n::text, 23, '0') ELSE 'b' || lpad(old::text, 25, '0') END, "
            f"CASE WHEN k = 'sent' THEN :campaign ELSE old / {args.per_campaign} + 1 END, "
            "CASE WHEN k = 'sent' THEN jsonb_build_object('smtp_code', 250, 'reply', '250 2.0.0 Ok: queued as ' || g) "
            "WHEN k = 'bounce' THEN jsonb_build_object('source', 'dsn', 'kind', 'soft', 'status', '4.2.2') "
            "WHEN k IN ('click', 'machine_click') THEN jsonb_build_object('unique', false, 'link', 1, 'url', "
            f"'https://example.com/p/1', 'user_agent', '{_UA}') "
            f"ELSE jsonb_build_object('unique', false, 'user_agent', '{_UA}') END, "
            f"CAST(:started AS timestamp) + make_interval(secs => g * 60.0 / {args.tick_events}), "
            "k IN ('machine_open', 'machine_click') "
            f"FROM (SELECT g, CASE {kind_sql} END AS k, (g / 100) * {sent_share} + g % 100 AS n, {old} AS old "
            f"FROM {_RANGE} AS g) AS s ORDER BY g"
        )
        began = time.perf_counter()
        for lo in range(0, args.tick_events, args.tick_batch):
            self.sql(
                statement,
                {
                    "lo": lo,
                    "hi": min(lo + args.tick_batch, args.tick_events),
                    "prefix": prefix,
                    "campaign": campaign + 1,
                    "shift": round_ * 104729,
                    "started": started,
                },
            )
        return time.perf_counter() - began

    def ticks(self) -> None:
        from smartmail.analytics import rollups
        from smartmail.store.engine import get_engine

        args = self.args
        assert self.database is not None
        log(
            f"3. one roll-up tick over {args.tick_events:,} events of the last minute (transactions of "
            f"{args.tick_batch:,}), {args.tick_rounds} rounds; target < {TARGET_TICK_S:.0f} s"
        )
        clock = SqlClock(get_engine())
        rounds = []
        for round_ in range(args.tick_rounds):
            write_s = self.insert_minute(round_)
            with clock.recording():
                backends = bench_send.process_cpu(self.database.backend_pids())
                began = time.perf_counter()
                done = rollups.roll_up(max_seconds=self.settings.analytics_interval)
                wall = time.perf_counter() - began
                backend_cpu = sum(
                    seconds - backends.get(pid, 0.0)
                    for pid, seconds in bench_send.process_cpu(self.database.backend_pids()).items()
                )
                statements, commits = clock.statements(), sum(clock.commits)
                breakdown = clock.breakdown()
            if done.events != args.tick_events or done.more:
                raise BenchError(f"the tick read {done.events:,} events (more: {done.more}), not {args.tick_events:,}")
            result = {
                "events": done.events,
                "written_in_s": write_s,
                "wall_s": wall,
                "database_s": statements + commits,
                "sql_s": statements,
                "commit_s": commits,
                "python_s": wall - statements - commits,
                "backend_cpu_s": backend_cpu,
                "by_statement": breakdown,
            }
            rounds.append(result)
            top = ", ".join(
                f"{kind} {figures['seconds'] * 1000:.0f} ms ×{figures['count']}" for kind, figures in breakdown.items()
            )
            log(
                f"  round {round_ + 1}: wall {wall * 1000:.0f} ms, database {result['database_s'] * 1000:.0f} ms "
                f"(PostgreSQL CPU {backend_cpu * 1000:.0f} ms), Python {result['python_s'] * 1000:.0f} ms; "
                f"written in {write_s:.1f} s\n    {top}"
            )
        wall = statistics.median(r["wall_s"] for r in rounds)
        self.results["tick"] = {
            "rounds": rounds,
            "wall_median_s": wall,
            "wall_best_s": min(r["wall_s"] for r in rounds),
            "database_median_s": statistics.median(r["database_s"] for r in rounds),
            "target_s": TARGET_TICK_S,
            "target_met": wall < TARGET_TICK_S,
        }
        log(f"  median wall {wall * 1000:.0f} ms: {'OK' if wall < TARGET_TICK_S else 'MISSED'}\n")

    # --- 4. a campaign's KPIs ---------------------------------------------------------------------

    def raw_counts(self, campaign_id: int, *, by: str) -> dict[str, int]:
        """The roll-ups' counters for one campaign, counted from raw rows: `join` (its messages, then
        their events by message id) or `scan` (events by their campaign_id, which has no index)."""
        rows = self.sql(self.raw_statement(by), {"campaign": campaign_id})
        counts: dict[str, int] = {}
        for kind, machine, total, unique, hard, messages in rows:
            if kind in ("sent", "deferred", "failed", "unsubscribed", "complained"):
                counts[kind] = counts.get(kind, 0) + total
            elif kind == "bounced":
                counts["bounced_hard"] = counts.get("bounced_hard", 0) + hard
                counts["bounced_soft"] = counts.get("bounced_soft", 0) + total - hard
            elif kind in ("opened", "clicked"):
                if machine:
                    counts[f"{kind}_machine"] = total
                else:
                    counts[f"{kind}_human"] = total
                    counts[f"{kind}_unique_human"] = unique
                    if kind == "clicked":
                        counts["clicked_messages_human"] = messages
        return {metric: n for metric, n in counts.items() if n}

    @staticmethod
    def raw_statement(by: str) -> str:
        source = (
            "messages m JOIN events e ON e.message_id = m.id WHERE m.campaign_id = :campaign"
            if by == "join"
            else "events e WHERE e.campaign_id = :campaign"
        )
        return (
            "SELECT e.type, e.machine, count(*), count(*) FILTER (WHERE e.properties->>'unique' = 'true'), "
            "count(*) FILTER (WHERE e.properties->>'kind' = 'hard'), count(DISTINCT e.message_id) "
            f"FROM {source} GROUP BY e.type, e.machine"
        )

    def explain(self, statement: str, params: dict[str, Any]) -> list[str]:
        return [row[0] for row in self.sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, params)]

    def kpi_page(self) -> None:
        from sqlalchemy import func, select
        from sqlalchemy.dialects import postgresql

        from smartmail.analytics import kpis
        from smartmail.analytics.rollups import CAMPAIGN, DAY
        from smartmail.store.models import Rollup

        args = self.args
        campaign_id = args.campaigns // 2 + 1
        messages = int(self.sql("SELECT count(*) FROM messages WHERE campaign_id = :c", {"c": campaign_id})[0][0])
        log(
            f"4. campaign {campaign_id}'s KPI page ({messages:,} messages): kpis.campaign_kpis, median of "
            f"{args.kpi_repeats}, against raw rows, median of {args.raw_repeats}; target < {TARGET_KPI_S * 1000:.0f} ms"
        )
        first = time.perf_counter()
        page = kpis.campaign_kpis(campaign_id)
        first_s = time.perf_counter() - first
        times = []
        for _ in range(args.kpi_repeats):
            began = time.perf_counter()
            kpis.campaign_kpis(campaign_id)
            times.append(time.perf_counter() - began)
        result: dict[str, Any] = {
            "campaign_id": campaign_id,
            "messages": messages,
            "rollups": {
                "first_ms": first_s * 1000,
                "median_ms": median_ms(times),
                "best_ms": min(times) * 1000,
                "repeats": len(times),
                "rows_read": int(
                    self.sql(
                        "SELECT count(*) FROM rollups WHERE dimension = :d AND value = :v AND granularity = :g",
                        {"d": CAMPAIGN, "v": str(campaign_id), "g": DAY},
                    )[0][0]
                ),
            },
            "counts_from_rollups": page["counts"],
            "kpis": {name: kpi["value"] for name, kpi in page["kpis"].items()},
        }
        # kpis.campaign_counts' statement, with the id written in, for EXPLAIN.
        statement = (
            select(Rollup.metric, func.sum(Rollup.count))
            .where(Rollup.dimension == CAMPAIGN, Rollup.value == str(campaign_id), Rollup.granularity == DAY)
            .group_by(Rollup.metric)
        )
        compiled = statement.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
        result["rollups"]["plan"] = self.explain(str(compiled), {})
        log(
            f"  from roll-ups: median {result['rollups']['median_ms']:.2f} ms (first {first_s * 1000:.1f} ms, "
            f"best {min(times) * 1000:.2f} ms; {result['rollups']['rows_read']} daily rows): "
            f"{'OK' if statistics.median(times) < TARGET_KPI_S else 'MISSED'}"
        )
        for by in args.raw:
            raw_times, counts = [], {}
            for _ in range(args.raw_repeats):
                began = time.perf_counter()
                counts = self.raw_counts(campaign_id, by=by)
                kpis.kpis_of(counts)
                raw_times.append(time.perf_counter() - began)
            equal = counts == page["counts"]
            result[f"raw_{by}"] = {
                "median_ms": median_ms(raw_times),
                "best_ms": min(raw_times) * 1000,
                "times_ms": [t * 1000 for t in raw_times],
                "repeats": len(raw_times),
                "counts": counts,
                "equal_to_rollups": equal,
                "plan": self.explain(self.raw_statement(by), {"campaign": campaign_id}),
                "times_rollups": statistics.median(raw_times) / statistics.median(times),
            }
            log(
                f"  from raw rows ({by}): median {median_ms(raw_times):,.1f} ms (best {min(raw_times) * 1000:,.1f}), "
                f"{result[f'raw_{by}']['times_rollups']:,.0f}× the roll-ups; counters "
                f"{'equal' if equal else 'DIFFERENT: ' + str(counts)}"
            )
            if not equal:
                raise BenchError(f"raw counts ({by}) differ from the roll-ups: {counts} vs {page['counts']}")
        result["target_ms"] = TARGET_KPI_S * 1000
        result["target_met"] = statistics.median(times) < TARGET_KPI_S
        self.results["kpi_page"] = result
        log()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10_000_000, help="campaign messages (default 10000000)")
    parser.add_argument("--events", type=int, default=20_000_000, help="events, about (default 20000000)")
    parser.add_argument("--campaigns", type=int, default=200, help="campaigns over the 90 days (default 200)")
    parser.add_argument("--contacts", type=int, default=0, help="default: messages/10, at least one campaign's")
    parser.add_argument("--chunk", type=int, default=500_000, help="messages (and their events) per statement")
    parser.add_argument(
        "--history",
        default="roll_up",
        choices=("roll_up", "sql"),
        help="roll the history up with rollups.roll_up (default; timed) or in one SQL statement (faster set-up)",
    )
    parser.add_argument("--tick-events", type=int, default=100_000, help="the new minute's events (default 100000)")
    parser.add_argument("--tick-batch", type=int, default=1000, help="of which per transaction (default 1000)")
    parser.add_argument("--tick-rounds", type=int, default=3, help="minutes written and ticks timed (default 3)")
    parser.add_argument("--kpi-repeats", type=int, default=50, help="KPI pages from roll-ups, median (default 50)")
    parser.add_argument("--raw-repeats", type=int, default=5, help="KPIs from raw rows, median (default 5)")
    parser.add_argument("--raw", default="join,scan", help="raw KPI queries: join (indexed), scan, or both")
    parser.add_argument("--postgres-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--database-name", default="smartmail_bench_analytics")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12", help="for the settings only; unused")
    parser.add_argument("--keep-database", action="store_true", help="leave the database for a look afterwards")
    args = parser.parse_args()
    args.raw = [part.strip() for part in args.raw.split(",") if part.strip()]
    if set(args.raw) - {"join", "scan"}:
        parser.error("--raw takes join,scan")
    if min(args.messages, args.campaigns, args.chunk, args.tick_events, args.tick_batch, args.tick_rounds) < 1:
        parser.error("sizes must be positive")

    try:
        run = Run(args)
    except BenchError as exc:
        parser.error(str(exc))
    began = time.perf_counter()
    try:
        run.setup()
        run.environment()
        run.generate()
        run.roll_up_history()
        run.ticks()
        run.kpi_page()
        run.results["total_s"] = time.perf_counter() - began
        log(f"done in {run.results['total_s']:.0f} s")
        bench_results.save("bench_analytics", args, run.results)
        return 0
    except BenchError as exc:
        log(f"benchmark failed: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        run.teardown()


if __name__ == "__main__":
    sys.exit(main())
