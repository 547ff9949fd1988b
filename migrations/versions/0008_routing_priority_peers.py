"""Routing and operations: a unit's priority (stat ahead of routine), the rule that routed it, the unit whose
instances it sends (one unit per destination of a study routed to several peers); per-peer settings: the
destinations a peer serves, its concurrent transfers, the directions allowed and its transfer windows

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25 22:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("study_units", sa.Column("priority", sa.String(8), nullable=False, server_default="routine"))
    op.add_column("study_units", sa.Column("rule", sa.String(64), nullable=True))
    op.add_column("study_units", sa.Column("instances_of", sa.Integer(), nullable=True))
    op.add_column("peers", sa.Column("destinations", sa.Text(), nullable=False, server_default=""))
    op.add_column("peers", sa.Column("max_concurrent", sa.Integer(), nullable=False, server_default="1"))
    op.add_column("peers", sa.Column("directions", sa.String(8), nullable=False, server_default="both"))
    op.add_column("peers", sa.Column("schedule", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    for column in ("schedule", "directions", "max_concurrent", "destinations"):
        op.drop_column("peers", column)  # SQLite >= 3.35 drops a column in place
    for column in ("instances_of", "rule", "priority"):
        op.drop_column("study_units", column)
