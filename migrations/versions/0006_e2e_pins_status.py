"""Peer certificate pins (end-to-end channel), the XMPP connection status for `dicomgw status`, and a
repeat count on audit rows (refusals from one sender are aggregated per minute)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25 18:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("peers", sa.Column("fingerprint", sa.String(64), nullable=True))
    op.add_column("audit_log", sa.Column("repeat_count", sa.Integer(), nullable=False, server_default="1"))
    op.create_table(
        "runtime_status",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("runtime_status")
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_column("repeat_count")
    with op.batch_alter_table("peers") as batch:
        batch.drop_column("fingerprint")
