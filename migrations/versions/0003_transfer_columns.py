"""Transfer columns on study units: origin peer, destination retry schedule, progress and method

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 05:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


# Plain ADD/DROP COLUMN (SQLite >= 3.35 has both): a batch table rebuild would trip the foreign keys
# that point at study_units.


def upgrade() -> None:
    op.add_column("study_units", sa.Column("origin_peer", sa.String(length=255), nullable=True))
    op.add_column("study_units", sa.Column("method", sa.String(length=16), nullable=True))
    op.add_column("study_units", sa.Column("progress_bytes", sa.BigInteger(), nullable=False, server_default="0"))
    op.add_column("study_units", sa.Column("bundle_bytes", sa.BigInteger(), nullable=False, server_default="0"))
    op.add_column("study_units", sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("study_units", sa.Column("next_attempt_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    for column in ("next_attempt_at", "attempts", "bundle_bytes", "progress_bytes", "method", "origin_peer"):
        op.drop_column("study_units", column)
