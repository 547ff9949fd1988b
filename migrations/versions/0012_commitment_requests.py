"""Storage Commitment requests from modalities (the gateway as SCP, PS3.4 J), kept until reported

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "commitment_requests",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("transaction_uid", sa.String(64), nullable=False, index=True),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("address", sa.String(64), nullable=False, server_default=""),
        sa.Column("requested_at", sa.DateTime(), nullable=False),
        sa.Column("refs", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="pending", index=True),
        sa.Column("event_type", sa.Integer(), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("reported_at", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("commitment_requests")
