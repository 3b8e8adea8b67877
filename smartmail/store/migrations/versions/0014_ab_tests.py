"""A/B tests for campaigns: the test's settings, frozen variants and winner on campaigns; each message's variant

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04 20:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable without a default: on PostgreSQL adding these is a catalog change, messages is not rewritten.
    op.add_column("messages", sa.Column("variant", sa.String(32), nullable=True))
    op.add_column("campaigns", sa.Column("ab_test", sa.JSON(), nullable=True))
    op.add_column("campaigns", sa.Column("ab_frozen", sa.JSON(), nullable=True))
    op.add_column("campaigns", sa.Column("ab_decide_at", sa.DateTime(), nullable=True))
    op.add_column("campaigns", sa.Column("ab_winner", sa.String(32), nullable=True))
    op.add_column("campaigns", sa.Column("ab_decided_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    for column in ("ab_decided_at", "ab_winner", "ab_decide_at", "ab_frozen", "ab_test"):
        op.drop_column("campaigns", column)
    op.drop_column("messages", "variant")
