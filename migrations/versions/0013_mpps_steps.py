"""Modality Performed Procedure Steps (the gateway as MPPS SCP, PS3.4 F.7): a completed step makes its study stable

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30 11:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mpps_steps",
        sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("study_uids", sa.Text(), nullable=False, server_default="[]"),
        sa.Column("refs", sa.Text(), nullable=False, server_default="[]"),
        sa.Column("reason", sa.Text(), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("settled", sa.Boolean(), nullable=False, server_default=sa.false(), index=True),
    )


def downgrade() -> None:
    op.drop_table("mpps_steps")
