"""partial indexes on messages: by state only for the states they serve; campaign rows only

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 08:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_PARTIAL = (
    ("ix_messages_waiting_next_attempt_at", ["next_attempt_at"], "state IN ('deferred', 'scheduled')", False),
    ("ix_messages_queued_enqueued_at", ["enqueued_at"], "state = 'queued'", False),
    ("ix_messages_sending_claimed_at", ["claimed_at"], "state = 'sending'", False),
    ("uq_messages_campaign_id_contact_id", ["campaign_id", "contact_id"], "campaign_id IS NOT NULL", True),
)
_FULL = (
    ("ix_messages_state_next_attempt_at", ["state", "next_attempt_at"], False),
    ("ix_messages_state_enqueued_at", ["state", "enqueued_at"], False),
    ("ix_messages_state_claimed_at", ["state", "claimed_at"], False),
    ("uq_messages_campaign_id_contact_id", ["campaign_id", "contact_id"], True),
    ("ix_messages_campaign_id_state", ["campaign_id", "state"], False),
)


def upgrade() -> None:
    for name, _, _ in _FULL:
        op.drop_index(name, table_name="messages")
    for name, columns, where, unique in _PARTIAL:
        op.create_index(name, "messages", columns, unique=unique, postgresql_where=sa.text(where),
                        sqlite_where=sa.text(where))


def downgrade() -> None:
    for name, _, _, _ in _PARTIAL:
        op.drop_index(name, table_name="messages")
    for name, columns, unique in _FULL:
        op.create_index(name, "messages", columns, unique=unique)
