"""Automations: workflows and their versions, enrolments, step runs, segment presence; list joins by time

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_ACTIVE = sa.text("state = 'active'")
_RUNNING = sa.text("state != 'ended'")


def upgrade() -> None:
    op.create_table(
        "workflows",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("scanned_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "workflow_versions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("workflow_id", sa.Integer(), sa.ForeignKey("workflows.id", ondelete="CASCADE"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("workflow_id", "version", name="uq_workflow_versions_workflow_version"),
    )
    op.create_table(
        "enrolments",
        sa.Column("id", _BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("workflow_id", sa.Integer(), sa.ForeignKey("workflows.id", ondelete="CASCADE"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("contact_id", _BIG_ID, sa.ForeignKey("contacts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("entry_key", sa.String(100), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("step", sa.String(100), nullable=False),
        sa.Column("due_at", sa.DateTime(), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("awaiting", sa.String(64), nullable=True),
        sa.Column("wait_started_at", sa.DateTime(), nullable=True),
        sa.Column("awaited_at", sa.DateTime(), nullable=True),
        sa.Column("last_message_id", sa.String(26), nullable=True),
        sa.Column("context", sa.JSON(), nullable=False),
        sa.Column("entered_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("ended_reason", sa.String(32), nullable=True),
        sa.UniqueConstraint("workflow_id", "contact_id", "entry_key", name="uq_enrolments_workflow_contact_entry"),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_enrolments_active_due_at",
        "enrolments",
        ["due_at", "id"],
        postgresql_where=_ACTIVE,
        sqlite_where=_ACTIVE,
    )
    op.create_index(
        "ix_enrolments_running_contact_id",
        "enrolments",
        ["contact_id"],
        postgresql_where=_RUNNING,
        sqlite_where=_RUNNING,
    )
    op.create_index("ix_enrolments_workflow_id_state_step", "enrolments", ["workflow_id", "state", "step"])
    op.create_table(
        "workflow_step_runs",
        sa.Column("enrolment_id", _BIG_ID, sa.ForeignKey("enrolments.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("run", sa.Integer(), primary_key=True),
        sa.Column("workflow_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("contact_id", _BIG_ID, nullable=False),
        sa.Column("ran_at", sa.DateTime(), nullable=False),
        sa.Column("message_id", sa.String(26), nullable=True),
        sa.Column("outcome", sa.String(200), nullable=True),
    )
    op.create_index("ix_workflow_step_runs_contact_id_ran_at", "workflow_step_runs", ["contact_id", "ran_at"])
    op.create_index("ix_workflow_step_runs_message_id", "workflow_step_runs", ["message_id"])
    op.create_table(
        "workflow_segment_presence",
        sa.Column("workflow_id", sa.Integer(), sa.ForeignKey("workflows.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("contact_id", _BIG_ID, sa.ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True),
    )
    op.create_index("ix_list_memberships_list_id_joined_at", "list_memberships", ["list_id", "joined_at"])


def downgrade() -> None:
    op.drop_index("ix_list_memberships_list_id_joined_at", table_name="list_memberships")
    op.drop_table("workflow_segment_presence")
    op.drop_table("workflow_step_runs")
    op.drop_table("enrolments")
    op.drop_table("workflow_versions")
    op.drop_table("workflows")
