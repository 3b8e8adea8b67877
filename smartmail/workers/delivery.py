"""Delivery: claim queued messages, hand them to the transport, and record each outcome with bulk UPDATEs."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog
from redis.exceptions import RedisError
from sqlalchemy.exc import OperationalError

from smartmail.addresses import bare_address
from smartmail.config import get_settings
from smartmail.content import dkim, return_path
from smartmail.content.mime import build_mime
from smartmail.store.engine import get_engine, utcnow
from smartmail.store.models import MessageState
from smartmail.workers import campaign_rows as campaign_delivery
from smartmail.workers import claims, metrics, ownership
from smartmail.workers.dispatch import TRANSACTIONAL, enqueue, enqueue_later
from smartmail.workers.outcomes import Reply, RetrySchedule, Verdict, classify
from smartmail.workers.policy import Site
from smartmail.workers.shaping import Hold, Shaper, get_shaper
from smartmail.workers.smtp_window import Marker
from smartmail.workers.transports import AT_CONNECTION_LIMIT, NOT_SENT, Outgoing, Transport, get_transport

log = structlog.get_logger("smartmail.delivery")

# Sites up to this rate (messages/s) take a token per message; see _shaped_window.
PER_MESSAGE_TOKENS_UP_TO = 1000.0
# Waits up to this long are timed in Redis (enqueue_later) rather than left to beat's next round.
SHORT_WAIT = timedelta(seconds=60)
# A message not transmitted for want of its write-ahead mark waits this long (seconds), not counted as an attempt.
NOT_SENT_WAIT = 2.0
RULE_BOUNCE = "bounced by a policy response rule"


@dataclass
class DeliveryReport:
    claimed: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    site_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # site -> counter -> n


@dataclass(slots=True)  # not frozen: a frozen dataclass sets each field through object.__setattr__
class _Result:
    id: str
    recipient: str
    state: MessageState
    reply: Reply
    next_attempt_at: datetime | None = None
    reason: str | None = None
    suppress: bool = False
    site: str | None = None
    attempted: bool = True
    latency: float | None = None  # sent: seconds from when the message was due to the relay's 2xx
    campaign_id: int | None = None  # for the outcome's log line, set by _send_claimed
    contact_id: int | None = None


def retry_schedule() -> RetrySchedule:
    """The retry schedule when traffic shaping is off (with it on, each site has its own)."""
    return RetrySchedule.from_settings(get_settings())


def _decide(
    row, reply: Reply, schedule: RetrySchedule, now: datetime, site: str | None = None, bounce: bool = False
) -> _Result:
    if reply.stage == NOT_SENT:
        return _hold(row, Hold(NOT_SENT_WAIT, reply.text), schedule.max_age, now, site)
    outcome = classify(reply)
    if outcome.verdict is Verdict.SENT:
        latency = (now - (row.send_at or row.created_at)).total_seconds()
        return _Result(row.id, row.recipient, MessageState.SENT, reply, site=site, latency=latency)
    if outcome.verdict is Verdict.UNKNOWN:
        return _Result(
            row.id,
            row.recipient,
            MessageState.UNKNOWN,
            reply,
            site=site,
            reason="connection lost after the message was sent; the relay may have accepted it",
        )
    if bounce:
        return _Result(row.id, row.recipient, MessageState.FAILED, reply, site=site, reason=RULE_BOUNCE)
    if outcome.verdict is Verdict.DEFERRED:
        # The maximum age counts from when the message was due, not when it was created.
        due = schedule.next_attempt(row.attempts, row.send_at or row.created_at, now)
        if due is not None:
            return _Result(row.id, row.recipient, MessageState.DEFERRED, reply, next_attempt_at=due, site=site)
        return _Result(
            row.id,
            row.recipient,
            MessageState.FAILED,
            reply,
            site=site,
            reason=f"expired: still deferred after {row.attempts} attempts",
        )
    reason = "hard bounce" if outcome.suppress else "policy rejection" if outcome.policy else "rejected"
    return _Result(
        row.id, row.recipient, MessageState.FAILED, reply, reason=reason, suppress=outcome.suppress, site=site
    )


def _hold(row, hold: Hold, max_age: float, now: datetime, site: str | None = None) -> _Result:
    """A message held back (traffic shaping, a campaign's window or cap): deferred to its slot, not
    counted as an attempt, or failed once past its maximum age."""
    due = now + timedelta(seconds=hold.seconds)
    reply = Reply(None, hold.reason, AT_CONNECTION_LIMIT)
    if due > (row.send_at or row.created_at) + timedelta(seconds=max_age):
        return _Result(
            row.id,
            row.recipient,
            MessageState.FAILED,
            reply,
            site=site,
            attempted=False,
            reason=f"expired: {hold.reason}",
        )
    return _Result(
        row.id,
        row.recipient,
        MessageState.DEFERRED,
        reply,
        next_attempt_at=due,
        reason=hold.reason,
        site=site,
        attempted=False,
    )


def deliver(
    message_ids: Sequence[str],
    transport: Transport | None = None,
    shaper: Shaper | None = None,
    stream: str = TRANSACTIONAL,
    more: Iterable[Sequence[str]] = (),
) -> DeliveryReport:
    """Send the given messages that are still queued (or deferred and due), then the batches of
    `more` (a drain's later pops from the outbox).

    Works in windows of SMARTMAIL_CLAIM_WINDOW messages. While a window is sent, one statement
    records the outcomes of the window before it and claims the window after it (on PostgreSQL in
    a helper thread: waiting for that statement was a large share of a campaign worker's time).
    Claims name this process's owner (workers/ownership.py), and content goes out only once its
    write-ahead mark is made: a worker killed mid-window leaves up to two windows of rows in
    `sending`, which beat settles once its lease lapses: the marked become `unknown` (never
    re-sent), the others are queued again. With traffic shaping on, each window takes its sites'
    rate tokens first; messages that may not go yet are deferred to their slot and handed back to
    the outbox when it comes.
    """
    settings = get_settings()
    transport = transport or get_transport()
    if shaper is None and settings.shaping:
        shaper = get_shaper()
    schedule = retry_schedule()
    report = DeliveryReport()
    size = settings.claim_window if stream == TRANSACTIONAL else settings.bulk_claim_window
    engine = get_engine()
    owner = ownership.current()
    statements = claims.statement_runner(engine)
    windows = _windows(itertools.chain([message_ids], more), size)
    pending: list[_Result] = []
    window = next(windows, None)
    claimed = _next_window(engine, owner, [], *window, report, stream) if window else []
    while window is not None:
        window = next(windows, None)
        following = statements.submit(_next_window, engine, owner, pending, *(window or ([], [])), report, stream)
        try:
            pending = _send_claimed(claimed, transport, shaper, schedule, owner.mark)
        except BaseException:
            futures.wait([following])  # its claim stands: the reconciler settles those rows
            raise
        claimed = following.result()
    _next_window(engine, owner, pending, [], [], report, stream)
    if shaper is not None and report.site_counts:
        try:  # once per call, not per window: the counters are for metrics, a round trip each adds up
            shaper.throttle.count(report.site_counts)
        except RedisError as exc:
            log.warning("shaping.counters_lost", error=str(exc))
    return report


def _windows(batches: Iterable[Sequence[str]], size: int) -> Iterator[tuple[Sequence[str], Sequence[str]]]:
    """Each window's ids, with the ids of its batch not claimed before it (given back on a failure)."""
    for batch in batches:
        for start in range(0, len(batch), size):
            yield batch[start : start + size], batch[start:]


def _send_claimed(
    claimed: list, transport: Transport, shaper: Shaper | None, schedule: RetrySchedule, marker: Marker | None = None
) -> list[_Result]:
    """Send a claimed window, marking each message before its content goes; the outcomes to record."""
    now = utcnow()
    skipped: list[_Result] = []
    every = claimed
    if any(row.campaign_id is not None for row in claimed):
        claimed, skipped = _prepare_campaign_rows(claimed, schedule, now)
    if shaper is None:
        replies = _send_window(transport, [(row, None, None) for row in claimed], marker)
        done = utcnow()
        results = [_decide(row, reply, schedule, done) for row, reply in zip(claimed, replies)] + skipped
    else:
        results = _shaped_window(claimed, transport, shaper, now, marker) + skipped
    rows = {row.id: row for row in every}
    for result in results:  # the ids an outcome's log line carries, so one grep follows the message
        row = rows[result.id]
        result.campaign_id, result.contact_id = row.campaign_id, row.contact_id
    return results


def _next_window(
    engine,
    owner: ownership.Owner,
    pending: list[_Result],
    ids: Sequence[str],
    unclaimed: Sequence[str],
    report: DeliveryReport,
    stream: str,
) -> list:
    """Record the previous window's outcomes and claim `ids` for `owner`; on a database failure,
    give back `unclaimed` (the ids of this batch not yet claimed) to the outbox."""
    if not pending and not ids:
        return []
    if ids and owner.lost.is_set():  # its claims would only wait for recovery: another worker takes them
        enqueue(list(ids), stream)
        ids = []
    try:
        claimed = claims.record_and_claim(engine, pending, ids, utcnow(), owner.id)
    except OperationalError:
        # The outcomes in `pending` are lost and those rows end `unknown` via the reconciler,
        # which is why claims.record_and_claim retried first.
        enqueue(list(unclaimed), stream)
        raise
    owner.recorded([result.id for result in pending])
    _after_recording(pending, report, stream)
    _count(pending, stream)
    if claimed:  # queued/deferred → sending: one line per window (its outcomes follow, one per message)
        log.info("message.claimed", state="sending", message_ids=[row.id for row in claimed], owner=owner.id)
    report.claimed += len(claimed)
    return claimed


def _prepare_campaign_rows(claimed, schedule: RetrySchedule, now: datetime) -> tuple[list, list[_Result]]:
    """Campaign rows re-checked, windowed, capped and rendered (campaign_delivery.py); the rows to
    send, and the results of those that will not go now."""
    prepared = campaign_delivery.prepare(claimed, now)
    skipped = [
        _Result(row.id, row.recipient, MessageState.SUPPRESSED, Reply(None, reason), reason=reason, attempted=False)
        for row, reason in prepared.suppressed
    ]
    skipped += [
        _Result(row.id, row.recipient, MessageState.FAILED, Reply(None, reason), reason=reason)
        for row, reason in prepared.failed
    ]
    skipped += [_hold(row, Hold(seconds, reason), schedule.max_age, now) for row, seconds, reason in prepared.held]
    return prepared.ready, skipped


def _shaped_window(
    claimed, transport: Transport, shaper: Shaper, now: datetime, marker: Marker | None = None
) -> list[_Result]:
    """Send one window under traffic shaping: rate tokens per site, then the sends, then the rules.

    A site with a configured rate up to PER_MESSAGE_TOKENS_UP_TO takes each message's token in the
    transport, once the message is built and a session is open, right before MAIL FROM:
    tokens taken earlier (for a whole window, or before building and connecting) let the delays
    in between (milliseconds, more on a busy host) bunch messages up at the receiver beyond
    rate + burst. Faster or unlimited sites take the window's tokens in one call (which
    still honours suspensions and slow-downs): a round trip per message would cost them more
    throughput than the few-percent bunching is worth.
    """
    by_site: dict[str, tuple[Site, list]] = {}
    for row in claimed:
        site = shaper.site_for(bare_address(row.recipient).rpartition("@")[2])
        by_site.setdefault(site.name, (site, []))[1].append(row)
    results: list[_Result] = []
    admitted: list[tuple[object, Site]] = []
    for site, rows in by_site.values():
        if _per_message(site):
            admitted += [(row, site) for row in rows]
            continue
        granted, holds = _admit(shaper, site, len(rows))
        admitted += [(row, site) for row in rows[:granted]]
        results += [_hold(row, hold, site.retry.max_age, now, site.name) for row, hold in zip(rows[granted:], holds)]

    refused: dict[int, Hold] = {}

    def token_taker(index: int, site: Site):
        def take_token() -> bool:  # called by the transport with a session open, right before MAIL
            granted, holds = _admit(shaper, site, 1)
            if not granted:
                refused[index] = holds[0]
            return bool(granted)

        return take_token

    replies = _send_window(
        transport,
        [(row, site, token_taker(i, site) if _per_message(site) else None) for i, (row, site) in enumerate(admitted)],
        marker,
    )
    reacted: set[str] = set()
    done = utcnow()
    for i, ((row, site), reply) in enumerate(zip(admitted, replies)):
        hold = refused.get(i)
        if hold is not None:
            results.append(_hold(row, hold, site.retry.max_age, done, site.name))
        elif reply.stage == AT_CONNECTION_LIMIT:
            results.append(_hold(row, shaper.connection_hold(site), site.retry.max_age, done, site.name))
        else:
            bounce = False
            if reply.code is not None and reply.code // 100 != 2:
                try:
                    bounce = shaper.react(site, reply, reacted) == "bounce"
                except RedisError as exc:
                    log.error("shaping.rule_not_applied", site=site.name, error=str(exc), reply=str(reply)[:200])
            results.append(_decide(row, reply, site.retry, done, site.name, bounce))
    return results


def _per_message(site: Site) -> bool:
    return site.rate is not None and site.rate <= PER_MESSAGE_TOKENS_UP_TO


def _admit(shaper: Shaper, site: Site, count: int) -> tuple[int, list[Hold]]:
    try:
        return shaper.admit(site, count)
    except RedisError as exc:
        # Without the shared limiter no rate can be kept: hold the site's messages briefly.
        log.error("shaping.limiter_unavailable", site=site.name, error=str(exc))
        return 0, [Hold(5.0, "throttled: rate limiter unavailable")] * count


def _after_recording(results: list[_Result], report: DeliveryReport, stream: str) -> None:
    """Once a window's outcomes are committed: count and log them, and time the short waits."""
    soon = utcnow() + SHORT_WAIT
    wake = []
    for result in results:
        state = result.state.value
        report.counts[state] = report.counts.get(state, 0) + 1
        if result.site:
            counter = state if result.attempted else "throttled"
            by_site = report.site_counts.setdefault(result.site, {})
            by_site[counter] = by_site.get(counter, 0) + 1
        # One line per message and outcome, held back ones included: they changed state too.
        log.info(
            "message.outcome",
            message_id=result.id,
            campaign_id=result.campaign_id,
            contact_id=result.contact_id,
            state=state,
            smtp_code=result.reply.code,
            reply=result.reply.text[:200],
            site=result.site,
            attempted=result.attempted,
        )
        if result.next_attempt_at is not None and result.next_attempt_at <= soon:
            wake.append((result.id, result.next_attempt_at.replace(tzinfo=UTC).timestamp()))
    try:
        enqueue_later(wake, stream)
    except RedisError as exc:  # beat's enqueue_due still finds the deferred rows when due
        log.error("dispatch.later_failed", error=str(exc), count=len(wake))


def _count(results: list[_Result], stream: str) -> None:
    """Add a recorded window's outcomes to the operator metrics (workers/metrics.py), one call per label set."""
    outcomes: dict[tuple[str, str], int] = {}
    held: dict[str, int] = {}
    for result in results:
        site = result.site or metrics.NO_SITE
        if not result.attempted and result.state is MessageState.DEFERRED:
            held[site] = held.get(site, 0) + 1
            continue
        outcome = result.state.value
        if result.state is MessageState.FAILED and (result.suppress or result.reason == RULE_BOUNCE):
            outcome = "bounced"
        outcomes[outcome, site] = outcomes.get((outcome, site), 0) + 1
    metrics.count_messages(outcomes)
    metrics.count_throttled(held)
    metrics.observe_accept_latency(stream, [r.latency for r in results if r.latency is not None])


def _send_window(transport: Transport, jobs: list[tuple], marker: Marker | None = None) -> list[Reply]:
    """Build each (row, site, ready) message and hand the window to the transport; the replies."""
    replies: list[Reply | None] = [None] * len(jobs)
    outgoing: list[Outgoing] = []
    positions: list[int] = []
    for i, (row, site, ready) in enumerate(jobs):
        try:
            data = build_mime(
                sender=row.sender,
                recipient=row.recipient,
                subject=row.subject,
                text=row.text,
                html=row.html,
                message_id=row.message_id_header,
                reply_to=row.reply_to,
                headers=row.headers,
            )
        except (ValueError, UnicodeError) as exc:  # content that cannot be encoded will never send
            replies[i] = Reply(554, f"5.6.0 message could not be built: {exc}", "build")
            continue
        try:
            data = dkim.sign(data, row.sender)
        except dkim.KeyFileError as exc:  # a configuration fault: the message waits for a fixed key (RFC 3463 4.3.5)
            replies[i] = Reply(451, f"4.3.5 message not signed: {exc}", "build")
            continue
        # Stored addresses were validated by the producer; only the bare address goes in the envelope,
        # and the return path is the message's VERP address when a bounce domain is set.
        envelope_sender = return_path.bounce_address(row.id) or bare_address(row.sender)
        outgoing.append(Outgoing(envelope_sender, bare_address(row.recipient), data, site, ready, row.id))
        positions.append(i)
    try:
        sent = transport.send_window(outgoing, get_settings().smtp_parallelism, marker)
    except Exception as exc:  # noqa: BLE001 - a transport bug must not lose the window's outcomes
        log.exception("transport.error", message_ids=[jobs[i][0].id for i in positions])
        sent = [Reply(None, f"transport error: {exc!r}", "data")] * len(outgoing)
    for i, reply in zip(positions, sent):
        replies[i] = reply
    return replies  # type: ignore[return-value]
