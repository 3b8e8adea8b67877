"""the idempotency key's unique index holds only the messages that have a key

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 16:40:00
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_INDEX = "uq_messages_idempotency_key"
_HAS_KEY = sa.text("idempotency_key IS NOT NULL")
# 0001 left the constraint unnamed: PostgreSQL named it itself; on SQLite the batch copy of the
# table names it by this convention so it can be left out (Alembic's documented way to drop an
# unnamed constraint there).
_SQLITE_NAMES = {"uq": "uq_%(table_name)s_%(column_0_name)s"}
# The batch copy on SQLite would recreate these from reflection; they are partial, so they are
# dropped first and created again as 0005 made them.
_PARTIAL = (
    ("ix_messages_waiting_next_attempt_at", ["next_attempt_at"], "state IN ('deferred', 'scheduled')", False),
    ("ix_messages_queued_enqueued_at", ["enqueued_at"], "state = 'queued'", False),
    ("ix_messages_sending_claimed_at", ["claimed_at"], "state = 'sending'", False),
    ("uq_messages_campaign_id_contact_id", ["campaign_id", "contact_id"], "campaign_id IS NOT NULL", True),
)


def _full_constraint(add: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        if add:
            op.create_unique_constraint("messages_idempotency_key_key", "messages", ["idempotency_key"])
        else:
            op.drop_constraint("messages_idempotency_key_key", "messages", type_="unique")
        return
    for name, _, _, _ in _PARTIAL:
        op.drop_index(name, table_name="messages")
    with op.batch_alter_table("messages", naming_convention=_SQLITE_NAMES) as batch:
        if add:
            batch.create_unique_constraint("uq_messages_idempotency_key", ["idempotency_key"])
        else:
            batch.drop_constraint("uq_messages_idempotency_key", type_="unique")
    for name, columns, where, unique in _PARTIAL:
        op.create_index(name, "messages", columns, unique=unique, sqlite_where=sa.text(where))


def upgrade() -> None:
    _full_constraint(add=False)
    op.create_index(_INDEX, "messages", ["idempotency_key"], unique=True,
                    postgresql_where=_HAS_KEY, sqlite_where=_HAS_KEY)


def downgrade() -> None:
    op.drop_index(_INDEX, table_name="messages")
    _full_constraint(add=True)
