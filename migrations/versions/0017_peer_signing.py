"""Which of this gateway's identities each peer pins, as its last completed exchange showed (``peer_signing``).

During a key rotation's overlap (`dicomgw keys rotate`) a peer may still pin the previous certificate; its
delivery receipts must be signed with that key, or the peer refuses them. A stream's verdict is signed with the
key its handshake presented; the receipt of the study may be sent after a restart, or by another process of the
site (PostgreSQL), neither of which saw that stream: so the key is kept here once an exchange completed under it
(a bundle received and verified under the handshake, or the peer's signed verdict on one we sent; an offer's
own claim could be forged on the way).

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
