"""One stream of events: campaign, machine flag and stream position on events; first opens and
clicks; stream checkpoints; tracking, UTM and preheader settings on campaigns and templates

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 12:30:00
"""

import sqlalchemy as sa
from alembic import op

from smartmail.store.sql.event_stream import current_transaction

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # On SQLite the table is rebuilt with AUTOINCREMENT: ids are never handed out twice.
    with op.batch_alter_table("events", recreate="always", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.add_column(sa.Column("campaign_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("machine", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("xact", sa.BigInteger(), nullable=False, server_default=current_transaction()))
    op.drop_index("ix_events_type_occurred_at_contact_id", table_name="events")
    op.create_index(
        "ix_events_type_machine_occurred_at_contact_id", "events", ["type", "machine", "occurred_at", "contact_id"]
    )
    op.create_index("ix_events_message_id", "events", ["message_id"])
    op.create_index("ix_events_xact_id", "events", ["xact", "id"])
    op.execute("UPDATE events SET type = 'opened' WHERE type = 'open'")
    op.execute("UPDATE events SET type = 'clicked' WHERE type = 'click'")
    op.execute("UPDATE events SET type = 'unsubscribed' WHERE type = 'unsubscribe'")
    op.create_table(
        "engagement_firsts",
        sa.Column("message_id", sa.String(26), primary_key=True),
        sa.Column("link", sa.Integer(), primary_key=True),
        sa.Column("machine", sa.Boolean(), primary_key=True),
        sa.Column("occurred_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "stream_checkpoints",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("position", sa.String(100), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(sa.Column("tracking", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch.add_column(sa.Column("utm", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("preheader", sa.Text(), nullable=True))
    with op.batch_alter_table("templates") as batch:
        batch.add_column(sa.Column("preheader", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("templates") as batch:
        batch.drop_column("preheader")
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_column("preheader")
        batch.drop_column("utm")
        batch.drop_column("tracking")
    op.drop_table("stream_checkpoints")
    op.drop_table("engagement_firsts")
    op.execute("UPDATE events SET type = 'open' WHERE type = 'opened'")
    op.execute("UPDATE events SET type = 'click' WHERE type = 'clicked'")
    op.execute("UPDATE events SET type = 'unsubscribe' WHERE type = 'unsubscribed'")
    op.drop_index("ix_events_xact_id", table_name="events")
    op.drop_index("ix_events_message_id", table_name="events")
    op.drop_index("ix_events_type_machine_occurred_at_contact_id", table_name="events")
    op.create_index("ix_events_type_occurred_at_contact_id", "events", ["type", "occurred_at", "contact_id"])
    with op.batch_alter_table("events") as batch:
        batch.drop_column("xact")
        batch.drop_column("machine")
        batch.drop_column("campaign_id")
