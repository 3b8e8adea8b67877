"""claims name their owner (a worker process); campaigns may re-send messages left unknown by a crash

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 01:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("claimed_by", sa.String(64), nullable=True))
    op.add_column("campaigns", sa.Column("resend_unknown", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_column("resend_unknown")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("claimed_by")
