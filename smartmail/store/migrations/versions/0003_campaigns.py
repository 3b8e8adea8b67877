"""campaigns; campaign and contact ids on messages

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 01:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("template_name", sa.String(length=200), nullable=False),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("html", sa.Text(), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("template_version", sa.Integer(), nullable=True),
        sa.Column("lists", sa.JSON(), nullable=False),
        sa.Column("segment", sa.String(length=200), nullable=True),
        sa.Column("sender", sa.String(length=320), nullable=False),
        sa.Column("reply_to", sa.String(length=320), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("send_at", sa.DateTime(), nullable=True),
        sa.Column("window_start", sa.String(length=5), nullable=True),
        sa.Column("window_end", sa.String(length=5), nullable=True),
        sa.Column("window_timezone", sa.String(length=64), nullable=False),
        sa.Column("rate_cap", sa.Float(), nullable=True),
        sa.Column("cursor", _BigId, nullable=False),
        sa.Column("fanned_out", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("launched_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_index("ix_campaigns_state_send_at", "campaigns", ["state", "send_at"])
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("campaign_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("contact_id", _BigId, nullable=True))
        batch.create_index("uq_messages_campaign_id_contact_id", ["campaign_id", "contact_id"], unique=True)
        batch.create_index("ix_messages_campaign_id_state", ["campaign_id", "state"])


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_index("ix_messages_campaign_id_state")
        batch.drop_index("uq_messages_campaign_id_contact_id")
        batch.drop_column("contact_id")
        batch.drop_column("campaign_id")
    op.drop_index("ix_campaigns_state_send_at", table_name="campaigns")
    op.drop_table("campaigns")
