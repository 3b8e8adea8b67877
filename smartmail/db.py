"""Database engine and sessions: SQLite (WAL, busy timeout) for development, PostgreSQL (psycopg 3) in production."""
from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

import psycopg
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from smartmail.config import get_settings

# Characters PostgreSQL's COPY text format needs escaped; rows built with f-strings check for them.
COPY_SPECIAL = re.compile(r"[\\\t\n\r]")


def utcnow() -> datetime:
    """Naive UTC: stored the same way on SQLite and PostgreSQL (`timestamp without time zone`)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


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


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _begin_immediate)
        return engine
    # No pool_pre_ping: it costs a round trip per transaction on the hot path. A connection the
    # server dropped fails one transaction (SQLAlchemy then invalidates the pool); tasks retry.
    return create_engine(url, pool_size=5, max_overflow=5, pool_recycle=1800)


@functools.lru_cache(maxsize=1)
def get_engine() -> Engine:
    return make_engine(get_settings().database_url)


@functools.lru_cache(maxsize=1)
def _session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: commit on success, roll back on error."""
    session = _session_factory()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def reset_after_fork() -> None:
    """Drop pooled connections inherited from a parent process (Celery prefork children)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)


def upsert_insert(dialect_name: str):
    """The dialect's INSERT, which has `on_conflict_do_nothing` on both SQLite and PostgreSQL."""
    return postgresql.insert if dialect_name == "postgresql" else sqlite.insert


def insert_else_upsert(cursor, insert: str, upsert: str, params) -> list | None:
    """PostgreSQL: run `insert`, a plain INSERT, in a savepoint, and `upsert` (the same with ON
    CONFLICT) only if a row conflicts after all. For batches that should all be new: a plain
    INSERT skips ON CONFLICT's speculative insertion (~35% of an import batch's statement, ~15% of
    a fan-out page's PostgreSQL CPU). The rows the statement that took effect returned, if any."""
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
    query then walked the whole list for each page of 1,000 (400 ms a page, measured with 100,000
    contacts) instead of 1,000 rows in id order.
    """
    if connection.dialect.name != "postgresql":
        return []
    stale = list(connection.execute(_STALE, {"tables": tables}).scalars())
    for table in stale:
        connection.exec_driver_sql(f'ANALYZE "{table}"')
    return stale
