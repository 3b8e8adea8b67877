"""Database engine and sessions: SQLite (WAL, busy timeout) for development, PostgreSQL (psycopg 3) in production."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import psycopg
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.orm import Session, sessionmaker

from smartmail import runtime
from smartmail.config import get_settings

# Characters PostgreSQL's COPY text format needs escaped; rows built with f-strings check for them.
COPY_SPECIAL = re.compile(r"[\\\t\n\r]")


def utcnow() -> datetime:
    """Naive UTC: stored the same way on SQLite and PostgreSQL (`timestamp without time zone`)."""
    return datetime.now(UTC).replace(tzinfo=None)


def as_stored(moment: datetime) -> datetime:
    """A moment as times are stored: naive UTC (an aware one converted, a naive one taken as UTC)."""
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo is not None else moment


def _configure_sqlite(dbapi_connection, _record) -> None:
    # WAL lets the producer write while workers read; busy_timeout makes concurrent writers wait
    # instead of failing; synchronous=NORMAL is durable across process crashes in WAL mode
    # (https://www.sqlite.org/pragma.html#pragma_synchronous).
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
    # Let SQLAlchemy, not the driver, emit BEGIN (see _begin_immediate).
    dbapi_connection.isolation_level = None


def _begin_immediate(connection) -> None:
    if connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return  # read-only work (rendering) must not hold the write lock
    # A WAL transaction that reads and then writes fails at once with SQLITE_BUSY if another
    # process wrote in between; taking the write lock at BEGIN makes writers queue on
    # busy_timeout instead (https://www.sqlite.org/lang_transaction.html, SQLAlchemy's
    # "Serializable isolation / Savepoints / Transactional DDL" recipe for pysqlite).
    connection.exec_driver_sql("BEGIN IMMEDIATE")


_json = json.JSONDecoder()


def json_loads(data: str | bytes):
    """JSON columns as read: psycopg hands over UTF-8 bytes, which json.loads first inspects for
    their encoding (a claimed campaign row has two JSON columns: it adds up)."""
    return _json.decode(data if isinstance(data, str) else data.decode())


# Connections a PostgreSQL engine keeps open; more are opened past it (overflow) and closed on return.
POOL_SIZE = 5
_pool_size = POOL_SIZE


def serve_threads(count: int) -> None:
    """Size both engines' pools for `count` threads that may each hold a connection at once (a web
    process's request threads): past its pool_size, a QueuePool closes every connection returned to
    it, so under load each request would open a new PostgreSQL backend."""
    global _pool_size
    _pool_size = max(POOL_SIZE, count)
    # Made again on first use, with the new size.
    for getter in (session_factory, get_engine, _statement_engine):
        getter.forget()


def _default_pool_size(_close: bool = True) -> None:
    global _pool_size
    _pool_size = POOL_SIZE


runtime.on_reset(_default_pool_size)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, json_deserializer=json_loads
        )
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _begin_immediate)
        return engine
    # No pool_pre_ping: it costs a round trip per transaction on the hot path. A connection the
    # server dropped fails one transaction (SQLAlchemy then invalidates the pool); tasks retry.
    return create_engine(url, pool_size=_pool_size, max_overflow=5, pool_recycle=1800, json_deserializer=json_loads)


def _dispose(engine: Engine, close: bool) -> None:
    engine.dispose(close=close)


@runtime.per_process(close=_dispose)
def get_engine() -> Engine:
    return make_engine(get_settings().database_url)


# Settings of the statement engine's sessions; see statement_connection.
_STATEMENT_SESSION = "-c plan_cache_mode=force_generic_plan -c enable_seqscan=off"


@runtime.per_process(close=_dispose)
def _statement_engine() -> Engine:
    url = get_settings().database_url
    given = make_url(url).query.get("options")
    options = " ".join(filter(None, [given if isinstance(given, str) else None, _STATEMENT_SESSION]))
    # No reset (ROLLBACK) on return: an autocommit connection has no transaction to end.
    return create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        pool_size=_pool_size,
        max_overflow=5,
        pool_recycle=1800,
        json_deserializer=json_loads,
        pool_reset_on_return=None,
        connect_args={"options": options},
    )


def reader() -> Connection:
    """A connection for reads. On SQLite it runs in autocommit, since SmartMail's engine otherwise
    opens every transaction with BEGIN IMMEDIATE (db._begin_immediate) and a long read (an export,
    a segment count) would hold the one write lock."""
    engine = get_engine()
    connection = engine.connect()
    if engine.dialect.name == "sqlite":
        connection = connection.execution_options(isolation_level="AUTOCOMMIT")
    return connection


def statement_connection() -> Connection:
    """A connection for the hot path's one-statement round trips that find rows by key (send()'s
    INSERT, delivery's record-and-claim): autocommit, so a statement is one round trip.

    On PostgreSQL it comes from a pool of its own, whose sessions keep one generic plan per
    statement (psycopg prepares a statement run five times; plan_cache_mode forces the plan
    generic): planning the record-and-claim cost more PostgreSQL CPU than running it. Sequential
    scans are off there, so that one
    plan is the key lookup whatever the statistics were when it was made: a generic plan made
    while `messages` held three rows scanned it whole. Use it for nothing that must scan a table.
    """
    if get_settings().database_url.startswith("sqlite"):
        return reader()
    return _statement_engine().connect()


@runtime.per_process()
def session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: commit on success, roll back on error."""
    session = session_factory()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def insert_else_upsert(cursor, insert: str, upsert: str, params) -> list | None:
    """PostgreSQL: run `insert`, a plain INSERT, in a savepoint, and `upsert` (the same with ON
    CONFLICT) only if a row conflicts after all. For batches that should all be new: a plain
    INSERT skips ON CONFLICT's speculative insertion, a large share of an import batch's or a
    fan-out page's statement. The rows the statement that took effect returned, if any."""
    cursor.execute("SAVEPOINT smartmail_insert")
    try:
        cursor.execute(insert, params)
    except psycopg.errors.UniqueViolation:
        cursor.execute("ROLLBACK TO SAVEPOINT smartmail_insert")
        cursor.execute(upsert, params)
        return cursor.fetchall() if cursor.description else None
    returned = cursor.fetchall() if cursor.description else None
    cursor.execute("RELEASE SAVEPOINT smartmail_insert")
    return returned


# A table is analyzed first when it was never analyzed, has grown by more than a tenth since
# (its pages, which do not wait for the statistics collector), or had more than a tenth of its
# rows changed (counters that backends report a few seconds late).
_STALE = text("""SELECT c.relname FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.relname = ANY(:tables) AND (c.reltuples < 0
    OR pg_relation_size(c.oid) / current_setting('block_size')::int > 1.1 * greatest(c.relpages, 10)
    OR s.n_mod_since_analyze > 0.1 * greatest(s.n_live_tup, 1000))""")


def refresh_statistics(connection, tables: list[str]) -> list[str]:
    """ANALYZE those of `tables` (PostgreSQL) that changed much since their last analyze; which.

    Autovacuum analyzes a table some time after it changes; a campaign launched right after a
    large import would be planned on the statistics of the table before it: the audience page
    query then walked the whole list for each page instead of a page of rows in id order.
    """
    if connection.dialect.name != "postgresql":
        return []
    stale = list(connection.execute(_STALE, {"tables": tables}).scalars())
    for table in stale:
        connection.exec_driver_sql(f'ANALYZE "{table}"')
    return stale
