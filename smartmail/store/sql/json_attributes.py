"""Typed tests on a JSON column's top-level attributes, and the text functions segment rules use, per SQL dialect."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Float, String, and_, case, cast, false, func, literal, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import ColumnElement

from smartmail.store.dialect import POSTGRESQL, SQLITE, name_of


def guard(condition, test) -> ColumnElement:
    # CASE fixes the order: the cast in `test` only runs on values of the right JSON type
    # (PostgreSQL may evaluate AND operands in any order).
    return case((condition, test), else_=false())


class JsonAttribute:
    """Typed access to one top-level attribute of a JSON column. Every test is guarded by the JSON
    type (a string "5" never equals the number 5) and is never NULL, so `not` is a plain negation.
    Values are checked scalars: a string, a bool or a finite number."""

    column: Any
    name: str
    text: ColumnElement
    type_: ColumnElement

    def __init__(self, column: Any, name: str) -> None:
        raise NotImplementedError

    def is_string(self) -> ColumnElement:
        raise NotImplementedError

    def is_number(self) -> ColumnElement:
        raise NotImplementedError

    def is_bool(self, value: bool) -> ColumnElement:
        raise NotImplementedError

    def is_array(self) -> ColumnElement:
        return self.type_ == "array"

    def number(self) -> ColumnElement:
        raise NotImplementedError

    def string(self) -> ColumnElement:
        raise NotImplementedError

    def exists(self) -> ColumnElement:
        return func.coalesce(self.type_, "null") != "null"

    def equals(self, value: Any) -> ColumnElement:
        """Typed equality with a scalar: "30" is not 30, "pro" is not ["pro"]."""
        if isinstance(value, bool):
            return func.coalesce(self.is_bool(value), false())
        if isinstance(value, (int, float)):
            return guard(self.is_number(), self.number() == value)
        return guard(self.is_string(), self.string() == value)

    def array_contains(self, value: Any) -> ColumnElement:
        raise NotImplementedError

    def position(self, value: str) -> ColumnElement:
        """Where `value` first occurs in the attribute's text (1-based; 0 if nowhere)."""
        raise NotImplementedError


class PostgresqlAttribute(JsonAttribute):
    """JSONB operators: `->` for the node, `->>` for its text, jsonb_typeof for its type."""

    def __init__(self, column, name: str) -> None:
        self.column, self.name = column, name
        self.node = column.op("->", return_type=JSONB)(literal(name, String))
        self.type_ = func.jsonb_typeof(self.node, type_=String)
        self.text = column.op("->>", return_type=String)(literal(name, String))

    def is_string(self):
        return self.type_ == "string"

    def is_number(self):
        return self.type_ == "number"

    def is_bool(self, value: bool):
        return and_(self.type_ == "boolean", self.text == ("true" if value else "false"))

    def number(self):
        return cast(self.text, Float)

    def string(self):
        # Byte order on both databases: SQLite's BINARY collation, PostgreSQL's "C" (a database's
        # default collation may be locale-aware and sort 'b' before 'C').
        return self.text.collate("C")

    def equals(self, value: Any):
        # jsonb containment of {"name": value} is exactly typed equality of a top-level scalar
        # (numbers by value, "30" is not 30, "pro" is not ["pro"]), and cheaper per row than the
        # typeof/extract pair; a GIN index on attributes could serve it too.
        return self.column.op("@>", is_comparison=True)(cast(literal(json.dumps({self.name: value})), JSONB))

    def array_contains(self, value: Any):
        return self.node.op("@>", is_comparison=True)(cast(literal(json.dumps([value])), JSONB))

    def position(self, value: str):
        return func.strpos(self.text, value)


class SqliteAttribute(JsonAttribute):
    """JSON1 functions: json_extract for the value, json_type for its type."""

    def __init__(self, column, name: str) -> None:
        self.column, self.name = column, name
        # A quoted key in the JSON path, so names with dots or spaces stay one key.
        self.path = literal('$."' + name + '"', String)
        self.type_ = func.json_type(column, self.path)
        self.text = func.json_extract(column, self.path)

    def is_string(self):
        return self.type_ == "text"

    def is_number(self):
        return self.type_.in_(("integer", "real"))

    def is_bool(self, value: bool):
        return self.type_ == ("true" if value else "false")

    def number(self):
        return self.text

    def string(self):
        return self.text

    def array_contains(self, value: Any):
        each = func.json_each(self.column, self.path).table_valued("value", "type")
        if isinstance(value, bool):
            test = each.c.type == ("true" if value else "false")
        elif isinstance(value, (int, float)):
            test = and_(each.c.type.in_(("integer", "real")), each.c.value == value)
        else:
            test = and_(each.c.type == "text", each.c.value == value)
        return select(literal(1)).select_from(each).where(test).exists()

    def position(self, value: str):
        return func.instr(self.text, value)


class JsonAttributes:
    """A dialect's JSON attribute access and text functions, for compiling segment rules."""

    name: str
    _attribute: type[JsonAttribute]

    def attribute(self, column, name: str) -> JsonAttribute:
        return self._attribute(column, name)

    def recipient_address(self, recipient) -> ColumnElement:
        """A recipient ('addr' or 'Name <addr>') as a contact's email key: the text between the
        last '<' and the closing '>', lower-cased; the same on both databases."""
        return func.lower(case((recipient.like("%<%>"), self._inner_address(recipient)), else_=recipient))

    def _inner_address(self, recipient) -> ColumnElement:
        raise NotImplementedError


class PostgresqlJsonAttributes(JsonAttributes):
    name, _attribute = POSTGRESQL, PostgresqlAttribute

    def _inner_address(self, recipient):
        return func.substring(recipient, "<([^<]*)>$")


class SqliteJsonAttributes(JsonAttributes):
    name, _attribute = SQLITE, SqliteAttribute

    def _inner_address(self, recipient):
        # rtrim(r, r-without-'<') strips back to the last '<', giving where the address starts.
        start = func.length(func.rtrim(recipient, func.replace(recipient, "<", ""))) + 1
        return func.rtrim(func.substr(recipient, start), ">")


_BY_DIALECT = {POSTGRESQL: PostgresqlJsonAttributes(), SQLITE: SqliteJsonAttributes()}


def for_bind(bind: Any) -> JsonAttributes:
    """The implementation for an Engine, Connection, Session or SQLAlchemy Dialect."""
    return _BY_DIALECT[bind.name if isinstance(bind, Dialect) else name_of(bind)]
