"""The event stream's horizon: below it every writing transaction has ended (PostgreSQL: the snapshot's xmin)."""

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
