"""Import into the local PACS and delivery receipts: per-instance C-STORE status, bundle digest, receipt,
storage commitment transaction and spool purge times

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UNIT_COLUMNS = (
    ("bundle_sha256", sa.String(64)),
    ("receipt_at", sa.DateTime()),
    ("commit_uid", sa.String(64)),
    ("purged_at", sa.DateTime()),
)
INSTANCE_COLUMNS = (
    ("pacs_status", sa.Integer()),
    ("pacs_verdict", sa.String(16)),
    ("pacs_detail", sa.Text()),
    ("imported_at", sa.DateTime()),
)


def upgrade() -> None:
    for name, kind in UNIT_COLUMNS:
        op.add_column("study_units", sa.Column(name, kind, nullable=True))
    for name, kind in INSTANCE_COLUMNS:
        op.add_column("instances", sa.Column(name, kind, nullable=True))
    op.create_index("ix_study_units_bundle_sha256", "study_units", ["bundle_sha256"])
    op.create_index("ix_study_units_commit_uid", "study_units", ["commit_uid"])


def downgrade() -> None:
    op.drop_index("ix_study_units_commit_uid", "study_units")
    op.drop_index("ix_study_units_bundle_sha256", "study_units")
    for name, _kind in reversed(INSTANCE_COLUMNS):
        op.drop_column("instances", name)
    for name, _kind in reversed(UNIT_COLUMNS):
        op.drop_column("study_units", name)
