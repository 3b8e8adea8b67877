"""Engagement score: the contacts' decayed score of human opens and clicks, and its indexed log-space key

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04 20:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("contacts") as batch:
        batch.add_column(sa.Column("engagement_score", sa.Double(), nullable=True))
        batch.add_column(sa.Column("engagement_scored_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("engagement_key", sa.Double(), nullable=True))
    op.create_index("ix_contacts_engagement_key", "contacts", ["engagement_key"])


def downgrade() -> None:
    op.drop_index("ix_contacts_engagement_key", table_name="contacts")
    with op.batch_alter_table("contacts") as batch:
        batch.drop_column("engagement_key")
        batch.drop_column("engagement_scored_at")
        batch.drop_column("engagement_score")
    # The reader's checkpoint goes with the scores: an upgrade again re-reads the stream from its start.
    op.execute("DELETE FROM stream_checkpoints WHERE name = 'engagement_score'")
