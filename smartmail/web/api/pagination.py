"""Cursor pagination: `?limit=&cursor=`, a page is `{data, next_cursor}`; cursors are opaque keyset positions."""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any, Generic, TypeVar

from fastapi import HTTPException, Query
from pydantic import BaseModel

from smartmail.audience.contacts import check_storable
from smartmail.errors import InvalidInput

T = TypeVar("T")

MAX_LIMIT = 1000


class Page(BaseModel, Generic[T]):
    data: list[T]
    next_cursor: str | None = None


Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page.")]
Cursor = Annotated[str | None, Query(min_length=1, max_length=512, description="`next_cursor` of the previous page.")]


def encode_cursor(position: list[Any]) -> str:
    """The last item's sort key, opaque to clients (base64url JSON)."""
    return base64.urlsafe_b64encode(json.dumps(position, separators=(",", ":")).encode()).decode().rstrip("=")


def _storable(value: Any) -> bool:
    # What the database can compare: a BIGINT, a string it can store.
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    try:
        check_storable(value, "cursor")
    except InvalidInput:
        return False
    return True


def decode_cursor(cursor: str | None, types: tuple[type, ...]) -> list[Any] | None:
    """The position a cursor holds, each value of the type given; 422 naming `cursor` otherwise."""
    if cursor is None:
        return None
    try:
        position = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(position, list) or len(position) != len(types):
            raise ValueError
        for value, kind in zip(position, types):
            if not isinstance(value, kind) or isinstance(value, bool) or not _storable(value):
                raise ValueError
    except ValueError:
        raise HTTPException(422, "cursor: is not a cursor this API returned") from None
    return position


def page(items: list[T], limit: int, key: Any) -> Page[T]:
    """A page from up to limit + 1 items fetched: the extra one only says another page exists."""
    more = len(items) > limit
    items = items[:limit]
    return Page(data=items, next_cursor=encode_cursor(key(items[-1])) if more and items else None)
