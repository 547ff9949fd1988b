"""Transfer attempts record how long the byte stream itself took (apart from offer and verification)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 05:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("transfers", sa.Column("stream_s", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("transfers", "stream_s")
