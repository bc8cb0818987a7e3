"""Storage ports. The service depends on these; :mod:`custody.storage.sql` implements them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from custody.keys.envelope import KeyEnvelope


@dataclass(frozen=True)
class Wallet:
    id: str
    name: str
    address: str
    public_key: str
    key_version: int
    created_at: datetime


@dataclass(frozen=True)
class Operator:
    id: str
    name: str
    role: str
    secret_hash: str
    created_at: datetime
    revoked_at: datetime | None


class WalletStore(Protocol):
    async def add(self, wallet: Wallet, envelope: KeyEnvelope) -> None:
        """Store a wallet and its encrypted key; :class:`Conflict` if name or address exists."""

    async def list(self) -> list[Wallet]: ...

    async def get(self, wallet_id: str) -> Wallet | None: ...

    async def get_by_name(self, name: str) -> Wallet | None: ...

    async def envelope(self, wallet_id: str) -> KeyEnvelope | None:
        """The current encrypted key of a wallet."""

    async def with_envelope(self, wallet_id: str) -> tuple[Wallet, KeyEnvelope] | None:
        """A wallet and its current encrypted key, read together (the payment path's one lookup)."""

    def envelopes(self, *, below_kek_version: int | None = None) -> AsyncIterator[KeyEnvelope]:
        """Every stored key envelope (optionally only those under an older KEK)."""
        ...

    async def replace_wrapped(self, old: KeyEnvelope, new: KeyEnvelope) -> bool:
        """Swap a rewrapped data key in, only if the row still holds ``old``."""
        ...

    async def count_envelopes(self, *, below_kek_version: int | None = None) -> int: ...


class OperatorStore(Protocol):
    async def add(self, operator: Operator) -> None: ...

    async def get(self, operator_id: str) -> Operator | None: ...

    async def get_by_name(self, name: str) -> Operator | None: ...

    async def count(self) -> int: ...
