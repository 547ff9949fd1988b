"""Which of this gateway's identities each peer pins, as its last offer said (``peer_signing``).

During a key rotation's overlap (`dicomgw keys rotate`) a peer may still pin the previous certificate; its
verdicts and delivery receipts must be signed with that key, or the peer refuses them. The offer names what the
peer pins; the receipt of the study it brought may be sent after a restart, or by another process of the site
(PostgreSQL), neither of which saw the offer: so the choice is kept here, not only in the receiving process.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-01 02:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "peer_signing",
        sa.Column("peer_jid", sa.String(255), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("peer_signing")
