"""The one place that asks which SQL dialect a connection speaks; store/sql/ picks its statements with it."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite

POSTGRESQL, SQLITE = "postgresql", "sqlite"


def name_of(bind: Any) -> str:
    """ "postgresql" or "sqlite", for an Engine, Connection or Session."""
    if hasattr(bind, "get_bind"):
        bind = bind.get_bind()
    return bind.dialect.name


def is_postgresql(bind: Any) -> bool:
    return name_of(bind) == POSTGRESQL


def insert(bind: Any):
    """The dialect's INSERT construct, which has `on_conflict_do_nothing` / `on_conflict_do_update` on both."""
    return postgresql.insert if is_postgresql(bind) else sqlite.insert
