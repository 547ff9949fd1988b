"""An index on study_units.owner: finding the claims of processes that are gone (each claim) reads the few owned
units, not every unit the queue ever held (bench/queue_scale: a claim took 24x longer at 100k studies than at 1k)

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30 11:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_study_units_owner", "study_units", ["owner"])


def downgrade() -> None:
    op.drop_index("ix_study_units_owner", table_name="study_units")
