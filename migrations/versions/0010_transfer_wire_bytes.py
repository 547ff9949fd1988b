"""Wire bytes beside study bytes: ``transfers.bytes_moved`` counts the bundle's own (plaintext) bytes at both
ends; ``wire_bytes`` what went on the stream when it was compressed (NULL: the same as ``bytes_moved``)

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 09:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("transfers") as batch:
        batch.add_column(sa.Column("wire_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("transfers") as batch:
        batch.drop_column("wire_bytes")
