"""Retention of rows (``[retention] keep_rows_days``): the instance and transfer rows of units delivered (and their
spool files purged) longer ago than that move to ``instances_archive`` / ``transfers_archive``, so that the live
tables hold the live work; ``study_units.archived_at`` says when (the unit row and its audit trail stay).

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-30 12:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("study_units", sa.Column("archived_at", sa.DateTime(), nullable=True))
    op.create_index("ix_study_units_archived_changed", "study_units", ["archived_at", "state_changed_at"])
    op.create_index("ix_study_units_instances_of", "study_units", ["instances_of"])  # "does a copy still need them"
    op.create_table(
        "instances_archive",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("unit_id", sa.Integer(), nullable=False, index=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, index=True),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("series_description", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("spool_path", sa.Text(), nullable=False),
        sa.Column("conflict", sa.Boolean(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("pacs_status", sa.Integer(), nullable=True),
        sa.Column("pacs_verdict", sa.String(16), nullable=True),
        sa.Column("pacs_detail", sa.Text(), nullable=True),
        sa.Column("imported_at", sa.DateTime(), nullable=True),
    )
    op.create_table(
        "transfers_archive",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("unit_id", sa.Integer(), nullable=True, index=True),
        sa.Column("sid", sa.String(128), nullable=False),
        sa.Column("peer_jid", sa.String(255), nullable=False),
        sa.Column("direction", sa.String(8), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("offset_bytes", sa.BigInteger(), nullable=False),
        sa.Column("bytes_moved", sa.BigInteger(), nullable=False),
        sa.Column("wire_bytes", sa.BigInteger(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=False, index=True),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("stream_s", sa.Float(), nullable=True),
    )


def downgrade() -> None:
    """The archived rows go back to the live tables first: nothing is lost by a downgrade."""
    for live, archive in (("instances", "instances_archive"), ("transfers", "transfers_archive")):
        columns = ", ".join(c["name"] for c in sa.inspect(op.get_bind()).get_columns(archive))
        op.execute(f"INSERT INTO {live} ({columns}) SELECT {columns} FROM {archive}")
        op.drop_table(archive)
    op.drop_index("ix_study_units_instances_of", table_name="study_units")
    op.drop_index("ix_study_units_archived_changed", table_name="study_units")
    op.drop_column("study_units", "archived_at")  # not batch mode: recreating the table would drop 0015's triggers
