"""Hourly ledger totals, so a decision's cost does not grow with the history; the key behind a payment.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

from custody.storage.types import BigInt

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ledger_buckets",
        sa.Column("wallet_id", sa.String(40), primary_key=True),
        sa.Column("counter", sa.String(80), primary_key=True),
        sa.Column("agent_id", sa.String(40), primary_key=True),
        sa.Column("bucket", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("amount", BigInt, nullable=False),
    )
    with op.batch_alter_table("payments") as batch:
        batch.add_column(sa.Column("key_id", sa.String(40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("payments") as batch:
        batch.drop_column("key_id")
    op.drop_table("ledger_buckets")
