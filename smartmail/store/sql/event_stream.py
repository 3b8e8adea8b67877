"""The event stream's order: the writing transaction of a row, and the horizon below which every writer has ended."""

from __future__ import annotations

from sqlalchemy import BigInteger
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement


class stream_horizon(FunctionElement):
    """The lowest transaction id still running when the statement's snapshot was taken: every
    `events.xact` below it belongs to a transaction that has committed or rolled back, so no row
    can appear there later. A reader that stops at it never passes a row that commits late."""

    type = BigInteger()
    inherit_cache = True


@compiles(stream_horizon, "postgresql")
def _stream_horizon_postgresql(element, compiler, **kw) -> str:
    return "(pg_snapshot_xmin(pg_current_snapshot())::text::bigint)"


@compiles(stream_horizon)
def _stream_horizon_other(element, compiler, **kw) -> str:
    # SQLite writes xact 0 and has one writer at a time: ids are in commit order, nothing is ahead.
    return "9223372036854775807"


class current_transaction(FunctionElement):
    """The id of the transaction writing a row (0 on SQLite). Stream readers take events in
    (xact, id) order, only from transactions older than every running one: ids are handed out
    before commit, so reading by id alone skips a row whose transaction commits after a later id's."""

    type = BigInteger()
    inherit_cache = True


@compiles(current_transaction, "postgresql")
def _current_transaction_postgresql(element, compiler, **kw) -> str:
    return "(pg_current_xact_id()::text::bigint)"


@compiles(current_transaction)
def _current_transaction_other(element, compiler, **kw) -> str:
    return "0"  # SQLite has one writer at a time: ids are in commit order
