"""A peer's pin may hold two fingerprints while it rotates its key (comma-separated, ``gateway.pins.pin_set``)

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("peers") as batch:
        batch.alter_column("fingerprint", type_=sa.String(200), existing_type=sa.String(64), existing_nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("peers") as batch:  # the first fingerprint stays
        batch.alter_column("fingerprint", type_=sa.String(64), existing_type=sa.String(200), existing_nullable=True,
                           postgresql_using="left(fingerprint, 64)")
