"""Claims with an owner and a lease, so several gateway processes can share one queue: the process that works
on a study unit (sending it, importing it) owns it until its lease runs out; inbound streams are claimed per
bundle so that one bundle is received by one process at a time

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25 19:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("study_units", sa.Column("owner", sa.String(128), nullable=True))
    op.add_column("study_units", sa.Column("lease_until", sa.DateTime(), nullable=True))
    op.create_table(
        "stream_claims",
        sa.Column("bundle_sha256", sa.String(64), primary_key=True),
        sa.Column("peer_jid", sa.String(255), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("lease_until", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("stream_claims")
    op.drop_column("study_units", "lease_until")  # SQLite >= 3.35 drops a column in place
    op.drop_column("study_units", "owner")
