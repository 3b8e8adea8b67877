"""campaign fan-out lease and owner

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 04:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(sa.Column("fan_out_until", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("fan_out_owner", sa.String(length=26), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_column("fan_out_owner")
        batch.drop_column("fan_out_until")
