"""Message-row SQL that differs by dialect: inserting transactional messages, a recipient's domain, a tag test."""

from __future__ import annotations

import functools
import json
from typing import Any

import psycopg
from sqlalchemy import String, bindparam, case, cast, func, literal, null, select, true
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DBAPIError

from smartmail.store import dialect
from smartmail.store.models import HAS_KEY, Message, MessageState, Suppression

# The columns a suppressed recipient sets (see producer.sending._store) instead of the values given for the row.
_SET_WHEN_SUPPRESSED = ("state", "reason", "finished_at", "enqueued_at", "next_attempt_at", "send_at")


def _insert_many_statement(insert):
    # Core executemany without RETURNING: psycopg pipelines one prepared INSERT per row, where a
    # multi-row INSERT … RETURNING cost far more (client-side parsing of a statement with a
    # placeholder per value). Which rows a conflicting idempotency key skipped is read back.
    return insert(Message.__table__).on_conflict_do_nothing(index_elements=["idempotency_key"], index_where=HAS_KEY)


@functools.lru_cache(maxsize=4)
def _insert_one_statement(insert, columns: tuple[str, ...]):
    """INSERT … SELECT of one message that looks up its recipient's suppression in the same
    statement: a send() is one autocommit round trip, where a transaction of SELECT and INSERT
    took four (BEGIN, SELECT, INSERT, COMMIT) and half the producer's CPU."""
    table = Message.__table__
    probe = select(bindparam("_email", type_=String()).label("email")).subquery("probe")
    source = probe.outerjoin(Suppression.__table__, Suppression.email == probe.c.email)
    suppressed = Suppression.reason.is_not(None)
    given = {key: bindparam(key, type_=table.c[key].type) for key in columns}
    when_suppressed = {
        **{key: null() for key in _SET_WHEN_SUPPRESSED},
        "state": literal(MessageState.SUPPRESSED.value),
        "reason": literal("recipient suppressed: ") + Suppression.reason,
        "finished_at": given["created_at"],
    }
    values = [
        case((suppressed, when_suppressed[key]), else_=given[key]) if key in _SET_WHEN_SUPPRESSED else given[key]
        for key in columns
    ]
    # SQLite needs a WHERE on an upsert's SELECT, to tell its ON from a join's.
    query = select(*values).select_from(source).where(true())
    statement = insert(table).from_select(columns, query)
    statement = statement.on_conflict_do_nothing(index_elements=["idempotency_key"], index_where=HAS_KEY)
    return statement.returning(table.c.state, table.c.reason)


class Messages:
    """A dialect's statements on message rows."""

    def insert_many(self, connection, rows: list[dict[str, Any]]) -> None:
        """Insert `rows` (send_many); a row whose idempotency key is taken is skipped."""
        raise NotImplementedError

    def insert_one(self, connection, row: dict[str, Any], email: str) -> tuple | None:
        """Insert `row` (send()) in one autocommit statement, suppressed if `email` is: its
        (state, reason), or None if its idempotency key is taken."""
        raise NotImplementedError

    def domain_of(self, recipient):
        """The SQL expression for the part of `recipient` (an address expression) after its "@"."""
        raise NotImplementedError

    def has_tag(self, tags, tag: str):
        """The SQL test that the JSON array `tags` holds the string `tag`."""
        raise NotImplementedError


_INSERT_MANY_SQLITE = _insert_many_statement(sqlite.insert)


class SqliteMessages(Messages):
    def has_tag(self, tags, tag: str):
        each = func.json_each(tags).table_valued("value")
        return select(literal(1)).select_from(each).where(each.c.value == tag).exists()

    """See `Messages`."""

    def insert_many(self, connection, rows: list[dict[str, Any]]) -> None:
        connection.execute(_INSERT_MANY_SQLITE, rows)

    def insert_one(self, connection, row: dict[str, Any], email: str) -> tuple | None:
        # SQLite's parameters need SQLAlchemy's processing (datetimes stored as its strings).
        statement = _insert_one_statement(sqlite.insert, tuple(row))
        return connection.execute(statement, {**row, "_email": email}).first()

    def domain_of(self, recipient):
        return func.substr(recipient, func.instr(recipient, "@") + 1)


_INSERT_MANY_PG = _insert_many_statement(postgresql.insert)
_JSON_COLUMNS = ("headers", "tags")  # the only columns whose values SQLAlchemy would process for psycopg


@functools.lru_cache(maxsize=4)
def _insert_one_sql(sql_dialect, columns: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """_insert_one_statement as psycopg runs it, and its constant parameters."""
    compiled = _insert_one_statement(postgresql.insert, columns).compile(dialect=sql_dialect)
    constants = {name: value for name, value in compiled.params.items() if name not in columns and name != "_email"}
    return str(compiled), constants


class PostgresMessages(Messages):
    def has_tag(self, tags, tag: str):
        return cast(tags, JSONB).op("@>", is_comparison=True)(cast(literal(json.dumps([tag])), JSONB))

    """See `Messages`."""

    def insert_many(self, connection, rows: list[dict[str, Any]]) -> None:
        connection.execute(_INSERT_MANY_PG, rows)

    def insert_one(self, connection, row: dict[str, Any], email: str) -> tuple | None:
        """Run on the connection's psycopg cursor, compiled once: per call, Connection.execute
        derived the statement's cache key (walking its CASE-laden columns) and built a result
        object, which cost more CPU than the cursor. Errors are raised and a lost connection
        discarded as SQLAlchemy would have."""
        sql, constants = _insert_one_sql(connection.dialect, tuple(row))
        parameters = {**row, **constants, "_email": email, **{c: json.dumps(row[c]) for c in _JSON_COLUMNS}}
        driver = connection.connection.driver_connection
        assert driver.autocommit, "send()'s INSERT must commit by itself"
        try:
            with driver.cursor() as cursor:
                cursor.execute(sql, parameters)
                return cursor.fetchone()
        except psycopg.Error as exc:
            lost = connection.dialect.is_disconnect(exc, driver, None)
            if lost:
                connection.invalidate(exc)
            raise DBAPIError.instance(
                sql, parameters, exc, psycopg.Error, connection_invalidated=lost, dialect=connection.dialect
            ) from exc

    def domain_of(self, recipient):
        return func.split_part(recipient, "@", 2)


_BY_DIALECT: dict[str, Messages] = {dialect.POSTGRESQL: PostgresMessages(), dialect.SQLITE: SqliteMessages()}


def for_bind(bind) -> Messages:
    """The message-row SQL of the dialect an Engine, Connection or Session speaks."""
    return _BY_DIALECT[dialect.name_of(bind)]
