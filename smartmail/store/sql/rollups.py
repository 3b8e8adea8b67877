"""Roll-up SQL that differs by dialect: hour buckets, an address's domain part, JSON text and array elements."""

from __future__ import annotations

from typing import Any

from sqlalchemy import DateTime, String, case, cast, func, literal, type_coerce
from sqlalchemy.dialects.postgresql import JSON as PG_JSON
from sqlalchemy.sql.elements import ColumnElement

from smartmail.store import dialect


class Rollups:
    """A dialect's expressions for counting events in SQL (smartmail.analytics.rollups)."""

    def hour(self, moment: Any) -> ColumnElement:
        """The start of the hour holding `moment`, as a naive datetime."""
        raise NotImplementedError

    def domain_part(self, address: Any) -> ColumnElement:
        """The text after the address's last '@', as stored (not trimmed nor lower-cased); NULL without '@'."""
        raise NotImplementedError

    def json_text(self, column: Any, name: str) -> ColumnElement:
        """A top-level attribute of a JSON object as JSON text ('"x"', '1', 'null'); NULL when absent."""
        raise NotImplementedError

    def array_elements(self, text: Any) -> Any:
        """A table of the elements of a JSON array given as text (none when it is not an array),
        column `value`: a string element's text."""
        raise NotImplementedError


class PostgresRollups(Rollups):
    """See `Rollups`."""

    def hour(self, moment):
        return func.date_trunc("hour", moment, type_=DateTime)

    def domain_part(self, address):
        # strpos on the reversed text: the same as substring(a from '@([^@]*)$'), at a quarter of its cost.
        return case((func.strpos(address, "@") > 0, func.right(address, func.strpos(func.reverse(address), "@") - 1)))

    def json_text(self, column, name):
        return cast(column.op("->")(literal(name, String)), String)

    def array_elements(self, text):
        # The CASE keeps a non-array from raising.
        column = cast(text, PG_JSON)
        array = case((func.json_typeof(column) == "array", column), else_=cast(literal("[]"), PG_JSON))
        return func.json_array_elements_text(array).table_valued("value")


class SqliteRollups(Rollups):
    """See `Rollups`."""

    def hour(self, moment):
        return type_coerce(func.strftime("%Y-%m-%d %H:00:00", moment), DateTime)

    def domain_part(self, address):
        # rtrim(a, a-without-'@') strips back to the last '@'.
        start = func.length(func.rtrim(address, func.replace(address, "@", ""))) + 1
        return case((func.instr(address, "@") > 0, func.substr(address, start)))

    def json_text(self, column, name):
        return column.op("->", return_type=String)(literal('$."' + name + '"', String))

    def array_elements(self, text):
        array = case((func.json_type(text) == "array", text), else_=literal("[]"))
        return func.json_each(array).table_valued("value")


_BY_DIALECT: dict[str, Rollups] = {dialect.POSTGRESQL: PostgresRollups(), dialect.SQLITE: SqliteRollups()}


def for_bind(bind: Any) -> Rollups:
    """The roll-up SQL of the dialect an Engine, Connection or Session speaks."""
    return _BY_DIALECT[dialect.name_of(bind)]
