"""Deliverability feedback: inbound mail spool, feedback marks, campaign bounce and complaint counters

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 15:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_PENDING = sa.text("state = 'pending'")


def upgrade() -> None:
    op.create_table(
        "inbound_messages",
        sa.Column("id", sa.String(26), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("peer", sa.String(64), nullable=True),
        sa.Column("mail_from", sa.String(320), nullable=False),
        sa.Column("recipients", sa.JSON(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("processed_at", sa.DateTime(), nullable=True),
        sa.Column("verdict", sa.String(16), nullable=True),
        sa.Column("outcome", sa.JSON(), nullable=True),
    )
    op.create_index(
        "ix_inbound_messages_pending_received_at",
        "inbound_messages",
        ["received_at"],
        postgresql_where=_PENDING,
        sqlite_where=_PENDING,
    )
    op.create_table(
        "feedback_marks",
        sa.Column("key", sa.String(400), primary_key=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_feedback_marks_created_at", "feedback_marks", ["created_at"])
    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(sa.Column("hard_bounces", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("soft_bounces", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("complaints", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("paused_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_column("paused_reason")
        batch.drop_column("complaints")
        batch.drop_column("soft_bounces")
        batch.drop_column("hard_bounces")
    op.drop_index("ix_feedback_marks_created_at", table_name="feedback_marks")
    op.drop_table("feedback_marks")
    op.drop_index("ix_inbound_messages_pending_received_at", table_name="inbound_messages")
    op.drop_table("inbound_messages")
