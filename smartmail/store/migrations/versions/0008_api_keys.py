"""HTTP API keys; custom events carry the sender's own id, so ingesting one twice stores it once

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 06:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("rate_limit", sa.Float(), nullable=True),
        sa.Column("burst", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_used_at", sa.DateTime(), nullable=True),
        sa.Column("expires_at", sa.DateTime(), nullable=True),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
    )
    op.add_column("events", sa.Column("client_event_id", sa.String(200), nullable=True))
    has_id = sa.text("client_event_id IS NOT NULL")
    op.create_index(
        "ix_events_client_event_id",
        "events",
        ["client_event_id"],
        unique=True,
        postgresql_where=has_id,
        sqlite_where=has_id,
    )


def downgrade() -> None:
    op.drop_index("ix_events_client_event_id", table_name="events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("client_event_id")
    op.drop_table("api_keys")
