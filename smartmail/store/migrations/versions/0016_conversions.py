"""Analytics conversions: the message each goal event converted, once per message

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-04 22:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conversions",
        sa.Column("message_id", sa.String(26), nullable=False),
        sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("converted_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("message_id"),
    )
    op.create_index("ix_conversions_converted_at", "conversions", ["converted_at"])


def downgrade() -> None:
    op.drop_index("ix_conversions_converted_at", table_name="conversions")
    op.drop_table("conversions")
