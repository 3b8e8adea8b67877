"""Beat jobs: queue messages whose time has come, and reconcile the database with what Redis may have lost."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from kombu.exceptions import KombuError
from redis.exceptions import RedisError
from sqlalchemy import or_, select, update

from smartmail.config import get_settings
from smartmail.outage import Outage
from smartmail.store.engine import session_scope, utcnow
from smartmail.store.models import QUEUED, SENDING, WAITING, Campaign, Message, MessageState
from smartmail.workers import ownership
from smartmail.workers.dispatch import BULK, TRANSACTIONAL, enqueue, get_outbox

log = structlog.get_logger("smartmail.maintenance")
# Beat's jobs run every few seconds: a Redis outage is one warning line, and the database work
# (deferred rows due, stuck `sending` rows) still runs; rows left `queued` are pushed once Redis is back.
_redis = Outage("maintenance.redis", log)
_REDIS_ERRORS = (RedisError, KombuError, OSError)

_PAGE = 5000  # rows per statement, so one run never holds a huge transaction
# Beat's UPDATEs take only rows no worker has locked (PostgreSQL; SQLite has one writer anyway).
# A worker records a window's outcomes and claims the next in one statement; an UPDATE here that
# waited for it could hold a row that statement needs: READ COMMITTED locks the newest version of
# a row it re-checks (a `queued` row a worker claimed meanwhile), whether or not it then updates
# it: a deadlock between the reconciler and a worker. Rows locked by others are skipped.


@dataclass
class ReconcileReport:
    requeued: int = 0
    unknown: int = 0


_LOST_AFTER_DATA = "worker lost during the SMTP transaction; not re-sent automatically"
# Campaigns whose messages a crash left `unknown` are sent again (at-least-once).
_RESENDING = select(Campaign.id).where(Campaign.resend_unknown.is_(True))
_NOT_RESENT = or_(Message.campaign_id.is_(None), Message.campaign_id.not_in(_RESENDING))


def _requeue(where, now: datetime) -> list[tuple[str, int | None]]:
    """Move matching rows to queued (conditionally); return (id, campaign id) pairs, a page at a time."""
    with session_scope() as session:
        ids = list(session.scalars(select(Message.id).where(*where).limit(_PAGE).with_for_update(skip_locked=True)))
        if not ids:
            return []
        moved = session.execute(
            update(Message)
            .where(Message.id.in_(ids), *where)
            .values(state=MessageState.QUEUED.value, enqueued_at=now)
            .returning(Message.id, Message.campaign_id),
            execution_options={"synchronize_session": False},
        ).all()
    return [(row[0], row[1]) for row in moved]


def _dispatch_by_stream(moved: list[tuple[str, int | None]]) -> None:
    """Campaign messages go to the bulk outbox, the others to the transactional one. Without Redis
    the rows stay `queued` in the database, and the reconciler pushes them later."""
    for stream, ids in (
        (TRANSACTIONAL, [i for i, campaign in moved if campaign is None]),
        (BULK, [i for i, campaign in moved if campaign is not None]),
    ):
        if ids:  # an empty push would only repeat restart_drains' round trip
            _with_redis(enqueue, ids, stream)


def _with_redis(call, *args) -> bool:
    """Run a Redis step of a beat job; False if Redis failed (noted once per outage)."""
    try:
        call(*args)
    except _REDIS_ERRORS as exc:
        _redis.failed(exc)
        return False
    _redis.ok()
    return True


def _outboxes_busy() -> bool:
    return any(o.backlog() > 0 and o.active_drains() > 0 for o in (get_outbox(TRANSACTIONAL), get_outbox(BULK)))


def _requeue_all(where, now: datetime) -> int:
    """_requeue page after page, each page pushed to its outbox; how many rows moved."""
    total = 0
    while moved := _requeue(where, now):
        _dispatch_by_stream(moved)
        total += len(moved)
        if len(moved) < _PAGE:
            break
    return total


def restart_drains() -> None:
    """Start drains for ids that drains lost with their worker left in either outbox."""
    for stream in (TRANSACTIONAL, BULK):
        _with_redis(enqueue, [], stream)


def recover_lost_claims(now: datetime | None = None) -> ReconcileReport:
    """Messages claimed by a worker process whose lease lapsed (killed, or frozen past it): those
    it marked as transmitted become `unknown`, the rest are queued again for other workers. When
    Redis lost the marks, all of them become `unknown`: the relay may have any of them."""
    now = now or utcnow()
    report = ReconcileReport()
    with session_scope() as session:
        owners = [owner for owner in session.scalars(select(Message.claimed_by).where(SENDING).distinct()) if owner]
    if not owners:
        return report
    settings = get_settings()
    client = get_outbox(TRANSACTIONAL).client
    try:  # without Redis no lease can be seen to lapse: nothing is recovered, nothing is wrongly taken
        lost = ownership.inspect(client, settings.redis_key_prefix, owners)
    except _REDIS_ERRORS as exc:
        _redis.failed(exc)
        return report
    for owner, marked in lost.items():
        mine = (SENDING, Message.claimed_by == owner)
        with session_scope() as session:
            may_have_gone = mine if marked is None else (*mine, Message.id.in_(list(marked)))
            result = session.execute(
                update(Message)
                .where(*may_have_gone, _NOT_RESENT)
                .values(state=MessageState.UNKNOWN.value, finished_at=now, reason=_LOST_AFTER_DATA),
                execution_options={"synchronize_session": False},
            )
            unknown = result.rowcount  # type: ignore[attr-defined]  # an UPDATE's CursorResult
            moved = session.execute(
                update(Message)
                .where(*mine)
                .values(state=MessageState.QUEUED.value, claimed_by=None, enqueued_at=now)
                .returning(Message.id, Message.campaign_id),
                execution_options={"synchronize_session": False},
            ).all()
        _dispatch_by_stream([(row[0], row[1]) for row in moved])
        report.requeued += len(moved)
        report.unknown += unknown
        log.warning("maintenance.claims_recovered", owner=owner, requeued=len(moved), unknown=unknown)
    _with_redis(ownership.forget, client, settings.redis_key_prefix, lost)
    return report


def enqueue_due(now: datetime | None = None) -> int:
    """Deferred and scheduled messages whose next_attempt_at has passed: back to queued, published;
    and the claims of workers that died, recovered."""
    now = now or utcnow()
    restart_drains()
    recover_lost_claims(now)
    total = _requeue_all((WAITING, Message.next_attempt_at <= now), now)
    if total:
        log.info("maintenance.enqueued_due", count=total)
    return total


def reconcile(now: datetime | None = None) -> ReconcileReport:
    """Redis only says what to pick up; the database is the truth.

    - `queued` rows older than SMARTMAIL_RECONCILE_QUEUED_AFTER are published again (a lost task,
      or a producer that died between commit and publish). A duplicate task is harmless: the
      claim is conditional, so only one can send.
    - `sending` rows older than SMARTMAIL_SENDING_TIMEOUT belonged to a worker that died during
      the SMTP transaction: they become `unknown` and are not re-sent, since the relay may have
      accepted them.
    """
    settings = get_settings()
    now = now or utcnow()
    report = ReconcileReport()
    restart_drains()  # first restart drains for ids that dead drains left in the outboxes
    stale_queued = (QUEUED, Message.enqueued_at < now - timedelta(seconds=settings.reconcile_queued_after))
    # While drains are working through a backlog, old `queued` rows are most likely still in it:
    # pushing them again would only double the backlog. Lost ids are pushed once it is drained.
    busy = True  # without Redis nothing could be pushed: only the database part runs
    try:
        busy = _outboxes_busy()
    except _REDIS_ERRORS as exc:
        _redis.failed(exc)
    if not busy:
        report.requeued += _requeue_all(stale_queued, now)
    stuck = (SENDING, Message.claimed_at < now - timedelta(seconds=settings.sending_timeout))
    with session_scope() as session:
        result = session.execute(
            update(Message)
            .where(
                Message.id.in_(select(Message.id).where(*stuck).with_for_update(skip_locked=True).scalar_subquery()),
                *stuck,
            )
            .values(
                state=MessageState.UNKNOWN.value,
                finished_at=now,
                reason=_LOST_AFTER_DATA,
            ),
            execution_options={"synchronize_session": False},
        )
        report.unknown = result.rowcount  # type: ignore[attr-defined]  # an UPDATE's CursorResult
    report.requeued += _requeue_all(
        (Message.state == MessageState.UNKNOWN.value, Message.campaign_id.in_(_RESENDING)), now
    )
    if report.requeued or report.unknown:
        log.warning("maintenance.reconciled", requeued=report.requeued, unknown=report.unknown)
    return report
