"""SQLModel tables. Changing one needs an Alembic migration in ``migrations/versions``."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, DateTime, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel


def _ts() -> Column[datetime]:
    return Column(DateTime(timezone=True), nullable=False)


class WalletRow(SQLModel, table=True):
    __tablename__ = "wallets"

    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=100, unique=True)
    address: str = Field(max_length=42, unique=True)
    public_key: str = Field(max_length=132)
    key_version: int = Field(default=1)
    created_at: datetime = Field(sa_column=_ts())


class WalletKeyRow(SQLModel, table=True):
    """A wallet's private key, encrypted: ciphertext under a data key wrapped by the KEK."""

    __tablename__ = "wallet_keys"
    __table_args__ = (UniqueConstraint("wallet_id", "key_version"),)

    id: int | None = Field(default=None, primary_key=True)
    wallet_id: str = Field(foreign_key="wallets.id", max_length=40, index=True)
    key_version: int
    kek_version: int = Field(index=True)
    wrapped_dek: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    ciphertext: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(sa_column=_ts())


class OperatorRow(SQLModel, table=True):
    """A human operator's credential. Only a SHA-256 digest of the secret is stored."""

    __tablename__ = "operators"

    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=100)
    role: str = Field(max_length=20)
    secret_hash: str = Field(max_length=64)
    created_at: datetime = Field(sa_column=_ts())
    revoked_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
