"""Claims: record a window's outcomes and claim the next window, on the connection they need, with retries."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent import futures
from datetime import datetime
from typing import Protocol

import structlog
from sqlalchemy.exc import OperationalError

from smartmail import runtime
from smartmail.addresses import bare_address, normalize_address
from smartmail.store import dialect
from smartmail.store.engine import statement_connection
from smartmail.store.models import MessageState, Suppression
from smartmail.store.sql import claims as claims_sql
from smartmail.store.sql.claims import OUTCOME_COLUMNS
from smartmail.workers.outcomes import Reply

log = structlog.get_logger("smartmail.delivery")


class Outcome(Protocol):
    """What delivery decided for one claimed message (delivery._Result)."""

    id: str
    recipient: str
    state: MessageState
    reply: Reply
    next_attempt_at: datetime | None
    reason: str | None
    suppress: bool
    attempted: bool


def outcome_columns(results: Sequence[Outcome], now: datetime) -> dict[str, list]:
    """The outcome columns (OUTCOME_COLUMNS), each a list with one entry per result."""
    rows = [
        (
            r.id,
            r.state.value,
            r.next_attempt_at,
            None if r.state is MessageState.DEFERRED else now,
            r.reply.code,
            r.reply.text[:2000],
            r.reason,
            0 if r.attempted else 1,
        )
        for r in results
    ]
    return (
        {name: list(values) for name, values in zip(OUTCOME_COLUMNS, zip(*rows))}
        if rows
        else dict.fromkeys(OUTCOME_COLUMNS, [])
    )


def record_and_claim_on(
    connection, results: Sequence[Outcome], now: datetime, ids: Sequence[str] = (), owner: str = ""
) -> list:
    """Write the outcomes of rows `owner` claimed, then claim `ids` for it; the claimed rows, with their contacts."""
    sql = claims_sql.for_bind(connection)
    deferred = [r.id for r in results if r.state is MessageState.DEFERRED]
    if deferred:
        sql.lock_campaigns_of(connection, deferred)
    claimed = sql.record_and_claim(connection, outcome_columns(results, now), ids, now, owner)
    if deferred:
        sql.cancel_deferred_of_cancelled(connection, deferred, now)
    bounces = {normalize_address(bare_address(r.recipient)): r for r in results if r.suppress}
    if bounces:
        suppress = dialect.insert(connection)(Suppression.__table__).on_conflict_do_nothing(index_elements=["email"])
        connection.execute(
            suppress,
            [
                {
                    "email": email,
                    "reason": "hard_bounce",
                    "detail": str(r.reply)[:2000],
                    "source_message_id": r.id,
                    "created_at": now,
                }
                for email, r in bounces.items()
            ],
        )
    return claimed


def record_and_claim(
    engine, pending: Sequence[Outcome], ids: Sequence[str], now: datetime, owner: str, attempts: int = 4
) -> list:
    """The previous window's outcomes, then the next window's claim for `owner`, atomically. Both
    are conditional on the current state, so retrying after a failed attempt is safe."""
    sql = claims_sql.for_bind(engine)
    # One statement is atomic by itself on some dialects (atomic_alone); deferrals and bounces add
    # statements that must see the outcomes (see cancel_deferred_of_cancelled).
    alone = sql.atomic_alone and not any(r.suppress or r.state is MessageState.DEFERRED for r in pending)
    for attempt in range(attempts):
        try:
            if alone:
                with statement_connection() as connection:
                    return record_and_claim_on(connection, pending, now, ids, owner)
            with sql.transaction(engine) as connection:
                return record_and_claim_on(connection, pending, now, ids, owner)
        except OperationalError:
            if attempt == attempts - 1:
                raise
            log.warning("delivery.database_retry", attempt=attempt + 1)
            time.sleep(0.5 * 2**attempt)
    return []


class _Inline:
    """An executor that runs each call at once (where the claim gains nothing from a thread)."""

    @staticmethod
    def submit(fn, *args) -> futures.Future:
        future: futures.Future = futures.Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed over to result(), as a thread's would be
            future.set_exception(exc)
        return future


@runtime.per_process(close=lambda executor, close: executor.shutdown(wait=close))
def _statement_thread() -> futures.ThreadPoolExecutor:
    return futures.ThreadPoolExecutor(1, thread_name_prefix="record-and-claim")


def statement_runner(engine) -> futures.Executor | _Inline:
    """Where a window's record-and-claim runs while the window before it is sent."""
    return _statement_thread() if claims_sql.for_bind(engine).in_helper_thread else _Inline()
