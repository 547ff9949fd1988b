"""An instance's source as text: a watched-folder path ("folder:<path>") may be longer than 80 characters
(on PostgreSQL a longer one failed the insert, and the file was retried for ever)

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 06:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.alter_column("source", type_=sa.Text(), existing_type=sa.String(80), existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.alter_column("source", type_=sa.String(80), existing_type=sa.Text(), existing_nullable=False,
                           postgresql_using="left(source, 80)")
