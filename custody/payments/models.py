"""Tables of the payment path. Changing one needs an Alembic migration."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, DateTime, Index, Integer, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from custody.storage.types import BigInt


def _ts(nullable: bool = False) -> Column[datetime]:
    return Column(DateTime(timezone=True), nullable=nullable)


class AgentRow(SQLModel, table=True):
    __tablename__ = "agents"

    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=100, unique=True)
    created_at: datetime = Field(sa_column=_ts())


class AgentKeyRow(SQLModel, table=True):
    """An agent's API key: shown once, stored as a SHA-256 digest, scoped to wallets."""

    __tablename__ = "agent_keys"

    id: str = Field(primary_key=True, max_length=40)
    agent_id: str = Field(foreign_key="agents.id", max_length=40, index=True)
    secret_hash: str = Field(max_length=64)
    wallet_ids: str = Field(sa_column=Column(Text, nullable=False), description="JSON list")
    created_at: datetime = Field(sa_column=_ts())
    expires_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    revoked_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))


class PolicyVersionRow(SQLModel, table=True):
    """Every version of a wallet's policy, kept; the highest version is in force."""

    __tablename__ = "wallet_policies"

    wallet_id: str = Field(foreign_key="wallets.id", primary_key=True, max_length=40)
    version: int = Field(primary_key=True)
    document: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_column=_ts())
    created_by: str = Field(max_length=60)


class GrantRow(SQLModel, table=True):
    __tablename__ = "agent_grants"

    agent_id: str = Field(foreign_key="agents.id", primary_key=True, max_length=40)
    wallet_id: str = Field(foreign_key="wallets.id", primary_key=True, max_length=40)
    version: int
    document: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_column=_ts())
    created_by: str = Field(max_length=60)


class PaymentRow(SQLModel, table=True):
    """One signing request and what became of it."""

    __tablename__ = "payments"
    __table_args__ = (
        Index("ix_payments_wallet_payee", "wallet_id", "payee"),
        Index("ix_payments_status", "status"),
        Index("ix_payments_status_updated_at", "status", "updated_at"),
    )

    id: str = Field(primary_key=True, max_length=40)
    wallet_id: str = Field(foreign_key="wallets.id", max_length=40)
    agent_id: str = Field(foreign_key="agents.id", max_length=40, index=True)
    key_id: str | None = Field(default=None, max_length=40, description="the agent key that asked")
    method: str = Field(max_length=20)
    request: str = Field(sa_column=Column(Text, nullable=False), description="the request body (JSON)")
    payee: str | None = Field(default=None, max_length=42)
    status: str = Field(max_length=20)
    decision: str = Field(sa_column=Column(Text, nullable=False), description="the engine's decision (JSON)")
    result: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    quorum_group: str | None = Field(default=None, max_length=100)
    quorum_m: int | None = None
    created_at: datetime = Field(sa_column=_ts())
    updated_at: datetime = Field(sa_column=_ts())
    expires_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))


class LedgerEntryRow(SQLModel, table=True):
    """A debit of a reserved or signed payment on one counter (asset, USD, payment count)."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        Index("ix_ledger_window", "wallet_id", "counter", "at"),
        Index("ix_ledger_agent_window", "wallet_id", "agent_id", "counter", "at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    payment_id: str = Field(foreign_key="payments.id", max_length=40, index=True)
    wallet_id: str = Field(max_length=40)
    agent_id: str = Field(max_length=40)
    counter: str = Field(max_length=80)
    amount: int = Field(sa_column=Column(BigInt, nullable=False))
    at: datetime = Field(sa_column=_ts())


class IdempotencyRow(SQLModel, table=True):
    """The first response to an agent's Idempotency-Key, replayed for the same body."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_created_at", "created_at"),)

    agent_id: str = Field(primary_key=True, max_length=40)
    key: str = Field(primary_key=True, max_length=200)
    body_hash: str = Field(max_length=64)
    status_code: int | None = None
    response: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(sa_column=_ts())
    # Which request holds the claim (a random token), and the payment it decided, if any:
    # after a crash, a retry resolves the claim from the payment instead of waiting forever.
    owner: str | None = Field(default=None, max_length=32)
    payment_id: str | None = Field(default=None, max_length=40)


class ApprovalVoteRow(SQLModel, table=True):
    __tablename__ = "approval_votes"
    __table_args__ = (UniqueConstraint("payment_id", "operator_id"),)

    id: int | None = Field(default=None, primary_key=True)
    payment_id: str = Field(foreign_key="payments.id", max_length=40, index=True)
    operator_id: str = Field(max_length=40)
    vote: str = Field(max_length=10)
    comment: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    at: datetime = Field(sa_column=_ts())


class FreezeRow(SQLModel, table=True):
    """A kill switch in force: scope "all", "wallet" or "agent"."""

    __tablename__ = "freezes"

    scope: str = Field(primary_key=True, max_length=10)
    target: str = Field(primary_key=True, max_length=40)
    frozen_at: datetime = Field(sa_column=_ts())
    frozen_by: str = Field(max_length=60)
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class LedgerBucketRow(SQLModel, table=True):
    """Totals of ledger_entries per counter and agent, by the hour and by the minute.

    A window's sum reads one row per hour of the window, at most 30 minute rows and one
    minute of entries at its start, and the entries after its end within that hour (none
    when the window ends in the future, as a policy's do). See ``custody.payments.ledger``.
    """

    __tablename__ = "ledger_buckets"
    __table_args__ = (Index("ix_ledger_buckets_agent", "wallet_id", "agent_id", "counter", "span", "bucket"),)

    # Key order serves the wallet-wide sums (a range of buckets over every agent); the index serves one agent's.
    wallet_id: str = Field(primary_key=True, max_length=40)
    counter: str = Field(primary_key=True, max_length=80)
    span: int = Field(sa_column=Column(Integer, primary_key=True, autoincrement=False))  # seconds: 3600 or 60
    bucket: datetime = Field(sa_column=Column(DateTime(timezone=True), primary_key=True))
    agent_id: str = Field(primary_key=True, max_length=40)
    amount: int = Field(sa_column=Column(BigInt, nullable=False))
