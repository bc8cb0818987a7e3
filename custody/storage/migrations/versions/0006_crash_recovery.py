"""Crash recovery: an idempotency claim names its owner and its payment; interrupted payments are found fast.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.add_column(sa.Column("owner", sa.String(32), nullable=True))
        batch.add_column(sa.Column("payment_id", sa.String(40), nullable=True))
    op.create_index("ix_payments_status_updated_at", "payments", ["status", "updated_at"])
    # The sweep looks for abandoned claims by age.
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_created_at", table_name="idempotency_keys")
    op.drop_index("ix_payments_status_updated_at", table_name="payments")
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_column("payment_id")
        batch.drop_column("owner")
