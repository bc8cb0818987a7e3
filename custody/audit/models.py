"""SQLModel tables of the audit log (created by migration 0002)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, DateTime, Integer, Text
from sqlmodel import Field, SQLModel


class AuditEventRow(SQLModel, table=True):
    """One record of the chain. ``hash`` covers every other column (see docs/audit.md)."""

    __tablename__ = "audit_events"

    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    kind: str = Field(max_length=64)
    actor: str = Field(max_length=100)
    subject: str | None = Field(default=None, max_length=100, index=True)
    data: str = Field(sa_column=Column(Text, nullable=False))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class AuditHeadRow(SQLModel, table=True):
    """The single row (id 1) naming the newest record, so a truncated tail is detected."""

    __tablename__ = "audit_head"

    id: int = Field(primary_key=True)
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    hash: str = Field(max_length=64)


class AuditPendingRow(SQLModel, table=True):
    """A record written in its writer's transaction, not yet chained (migration 0007).

    :meth:`custody.audit.log.AuditLog.seal` moves these into ``audit_events`` in id order.
    """

    __tablename__ = "audit_pending"

    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    )
    at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    kind: str = Field(max_length=64)
    actor: str = Field(max_length=100)
    subject: str | None = Field(default=None, max_length=100)
    data: str = Field(sa_column=Column(Text, nullable=False))
