"""Stream readers' checkpoints: locked for the transaction that stores what was read, moved in it."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from smartmail.store import dialect
from smartmail.store.engine import utcnow
from smartmail.store.models import StreamCheckpoint


def lock(connection: Connection, name: str, *, initial: str = "") -> str:
    """The checkpoint `name` (made `initial` when new), its row locked until commit: readers of one
    stream take turns (an UPDATE first: on SQLite it takes the write lock before the read, on
    PostgreSQL the row, and a reader that waited then reads its turn's position)."""
    insert = dialect.insert(connection)(StreamCheckpoint)
    connection.execute(
        insert.values(name=name, position=initial, updated_at=utcnow()).on_conflict_do_nothing(index_elements=["name"])
    )
    connection.execute(update(StreamCheckpoint).where(StreamCheckpoint.name == name).values(updated_at=utcnow()))
    return connection.execute(select(StreamCheckpoint.position).where(StreamCheckpoint.name == name)).scalar_one()


def move(connection: Connection, name: str, position: str) -> None:
    """Move the checkpoint, in the transaction that stored what was read up to `position`."""
    connection.execute(
        update(StreamCheckpoint).where(StreamCheckpoint.name == name).values(position=position, updated_at=utcnow())
    )
