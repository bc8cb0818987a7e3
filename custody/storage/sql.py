"""SQL implementations of the storage ports (SQLite and PostgreSQL, one code path)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from sqlalchemy import Table, and_, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from custody.errors import Conflict
from custody.keys.envelope import KeyEnvelope
from custody.storage.db import reading
from custody.storage.interfaces import Operator, Wallet
from custody.storage.models import OperatorRow, WalletKeyRow, WalletRow
from custody.storage.types import as_utc

wallets: Table = WalletRow.__table__  # type: ignore[attr-defined]
wallet_keys: Table = WalletKeyRow.__table__  # type: ignore[attr-defined]
operators: Table = OperatorRow.__table__  # type: ignore[attr-defined]


def _wallet(row: Any) -> Wallet:
    return Wallet(row.id, row.name, row.address, row.public_key, row.key_version, as_utc(row.created_at))


def _envelope(row: Any) -> KeyEnvelope:
    return KeyEnvelope(row.wallet_id, row.key_version, row.kek_version, bytes(row.wrapped_dek), bytes(row.ciphertext))


# Built once: building a statement costs about as much as running it.
_WITH_ENVELOPE = (
    select(wallets, wallet_keys.c.kek_version, wallet_keys.c.wrapped_dek, wallet_keys.c.ciphertext)
    .join(
        wallet_keys,
        and_(wallets.c.id == wallet_keys.c.wallet_id, wallets.c.key_version == wallet_keys.c.key_version),
    )
    .where(wallets.c.id == bindparam("wallet"))
)


class SqlWalletStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def add(self, wallet: Wallet, envelope: KeyEnvelope) -> None:
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(wallets).values(
                        id=wallet.id,
                        name=wallet.name,
                        address=wallet.address,
                        public_key=wallet.public_key,
                        key_version=wallet.key_version,
                        created_at=wallet.created_at,
                    )
                )
                await conn.execute(
                    insert(wallet_keys).values(
                        wallet_id=envelope.wallet_id,
                        key_version=envelope.key_version,
                        kek_version=envelope.kek_version,
                        wrapped_dek=envelope.wrapped_dek,
                        ciphertext=envelope.ciphertext,
                        created_at=wallet.created_at,
                    )
                )
        except IntegrityError:
            raise Conflict("a wallet with this name or address already exists") from None

    async def list(self) -> list[Wallet]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(wallets).order_by(wallets.c.created_at, wallets.c.id))
            return [_wallet(row) for row in rows]

    async def get(self, wallet_id: str) -> Wallet | None:
        async with reading(self.engine) as conn:
            row = (await conn.execute(select(wallets).where(wallets.c.id == wallet_id))).first()
        return _wallet(row) if row else None

    async def get_by_name(self, name: str) -> Wallet | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(wallets).where(wallets.c.name == name))).first()
        return _wallet(row) if row else None

    async def envelope(self, wallet_id: str) -> KeyEnvelope | None:
        query = (
            select(wallet_keys)
            .join(
                wallets,
                and_(wallets.c.id == wallet_keys.c.wallet_id, wallets.c.key_version == wallet_keys.c.key_version),
            )
            .where(wallet_keys.c.wallet_id == wallet_id)
        )
        async with reading(self.engine) as conn:
            row = (await conn.execute(query)).first()
        return _envelope(row) if row else None

    async def with_envelope(self, wallet_id: str) -> tuple[Wallet, KeyEnvelope] | None:
        async with reading(self.engine) as conn:
            row = (await conn.execute(_WITH_ENVELOPE, {"wallet": wallet_id})).first()
        if row is None:
            return None
        key = KeyEnvelope(row.id, row.key_version, row.kek_version, bytes(row.wrapped_dek), bytes(row.ciphertext))
        return _wallet(row), key

    async def envelopes(self, *, below_kek_version: int | None = None) -> AsyncIterator[KeyEnvelope]:
        # Paged by primary key so a large table is never held in memory or in one transaction.
        last_id = 0
        while True:
            query = select(wallet_keys).where(wallet_keys.c.id > last_id).order_by(wallet_keys.c.id).limit(500)
            if below_kek_version is not None:
                query = query.where(wallet_keys.c.kek_version < below_kek_version)
            async with self.engine.connect() as conn:
                rows = list(await conn.execute(query))
            if not rows:
                return
            for row in rows:
                yield _envelope(row)
            last_id = rows[-1].id

    async def count_envelopes(self, *, below_kek_version: int | None = None) -> int:
        query = select(func.count()).select_from(wallet_keys)
        if below_kek_version is not None:
            query = query.where(wallet_keys.c.kek_version < below_kek_version)
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def replace_wrapped(self, old: KeyEnvelope, new: KeyEnvelope) -> bool:
        statement = (
            update(wallet_keys)
            .where(
                wallet_keys.c.wallet_id == old.wallet_id,
                wallet_keys.c.key_version == old.key_version,
                wallet_keys.c.kek_version == old.kek_version,
                wallet_keys.c.wrapped_dek == old.wrapped_dek,
            )
            .values(kek_version=new.kek_version, wrapped_dek=new.wrapped_dek)
        )
        async with self.engine.begin() as conn:
            result = await conn.execute(statement)
        return bool(result.rowcount == 1)


class SqlOperatorStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def add(self, operator: Operator) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(operators).values(
                    id=operator.id,
                    name=operator.name,
                    role=operator.role,
                    secret_hash=operator.secret_hash,
                    created_at=operator.created_at,
                    revoked_at=operator.revoked_at,
                )
            )

    async def get(self, operator_id: str) -> Operator | None:
        async with reading(self.engine) as conn:
            row = (await conn.execute(select(operators).where(operators.c.id == operator_id))).first()
        if row is None:
            return None
        revoked = as_utc(row.revoked_at) if row.revoked_at else None
        return Operator(row.id, row.name, row.role, row.secret_hash, as_utc(row.created_at), revoked)

    async def get_by_name(self, name: str) -> Operator | None:
        async with self.engine.connect() as conn:
            query = select(operators.c.id).where(operators.c.name == name).order_by(operators.c.created_at)
            row = (await conn.execute(query)).first()
        return None if row is None else await self.get(row.id)

    async def count(self) -> int:
        async with self.engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(operators))).scalar_one())

    async def list(self) -> list[Operator]:
        async with self.engine.connect() as conn:
            ids = [row.id for row in await conn.execute(select(operators.c.id).order_by(operators.c.created_at))]
        return [op for op in [await self.get(i) for i in ids] if op is not None]

    async def revoke(self, operator_id: str, at: datetime) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(operators)
                .where(operators.c.id == operator_id, operators.c.revoked_at.is_(None))
                .values(revoked_at=at)
            )
        return bool(result.rowcount == 1)
