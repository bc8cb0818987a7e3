"""Agents and their keys, wallet policies and grants, payments, the spend ledger, approvals, freezes.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from custody.storage.types import BigInt

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _ts(name: str, nullable: bool = False) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        _ts("created_at"),
    )
    op.create_table(
        "agent_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("agent_id", sa.String(40), sa.ForeignKey("agents.id"), nullable=False, index=True),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("wallet_ids", sa.Text, nullable=False),
        _ts("created_at"),
        _ts("expires_at", True),
        _ts("revoked_at", True),
    )
    op.create_table(
        "wallet_policies",
        sa.Column("wallet_id", sa.String(40), sa.ForeignKey("wallets.id"), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("document", sa.Text, nullable=False),
        _ts("created_at"),
        sa.Column("created_by", sa.String(60), nullable=False),
    )
    op.create_table(
        "agent_grants",
        sa.Column("agent_id", sa.String(40), sa.ForeignKey("agents.id"), primary_key=True),
        sa.Column("wallet_id", sa.String(40), sa.ForeignKey("wallets.id"), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("document", sa.Text, nullable=False),
        _ts("created_at"),
        sa.Column("created_by", sa.String(60), nullable=False),
    )
    op.create_table(
        "payments",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("wallet_id", sa.String(40), sa.ForeignKey("wallets.id"), nullable=False),
        sa.Column("agent_id", sa.String(40), sa.ForeignKey("agents.id"), nullable=False, index=True),
        sa.Column("method", sa.String(20), nullable=False),
        sa.Column("request", sa.Text, nullable=False),
        sa.Column("payee", sa.String(42), nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("decision", sa.Text, nullable=False),
        sa.Column("result", sa.Text, nullable=True),
        sa.Column("quorum_group", sa.String(100), nullable=True),
        sa.Column("quorum_m", sa.Integer, nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("expires_at", True),
    )
    op.create_index("ix_payments_wallet_payee", "payments", ["wallet_id", "payee"])
    op.create_index("ix_payments_status", "payments", ["status"])
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("payment_id", sa.String(40), sa.ForeignKey("payments.id"), nullable=False, index=True),
        sa.Column("wallet_id", sa.String(40), nullable=False),
        sa.Column("agent_id", sa.String(40), nullable=False),
        sa.Column("counter", sa.String(80), nullable=False),
        sa.Column("amount", BigInt, nullable=False),
        _ts("at"),
    )
    op.create_index("ix_ledger_window", "ledger_entries", ["wallet_id", "counter", "at"])
    op.create_index("ix_ledger_agent_window", "ledger_entries", ["wallet_id", "agent_id", "counter", "at"])
    op.create_table(
        "idempotency_keys",
        sa.Column("agent_id", sa.String(40), primary_key=True),
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("body_hash", sa.String(64), nullable=False),
        sa.Column("status_code", sa.Integer, nullable=True),
        sa.Column("response", sa.Text, nullable=True),
        _ts("created_at"),
    )
    op.create_table(
        "approval_votes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("payment_id", sa.String(40), sa.ForeignKey("payments.id"), nullable=False, index=True),
        sa.Column("operator_id", sa.String(40), nullable=False),
        sa.Column("vote", sa.String(10), nullable=False),
        sa.Column("comment", sa.Text, nullable=True),
        _ts("at"),
        sa.UniqueConstraint("payment_id", "operator_id"),
    )
    op.create_table(
        "freezes",
        sa.Column("scope", sa.String(10), primary_key=True),
        sa.Column("target", sa.String(40), primary_key=True),
        _ts("frozen_at"),
        sa.Column("frozen_by", sa.String(60), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
    )


def downgrade() -> None:
    for table in (
        "freezes",
        "approval_votes",
        "idempotency_keys",
        "ledger_entries",
        "payments",
        "agent_grants",
        "wallet_policies",
        "agent_keys",
        "agents",
    ):
        op.drop_table(table)
