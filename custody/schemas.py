"""Wire models shared by the API, the CLI and the SDK (pydantic only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from custody.storage.interfaces import Wallet


class WalletOut(BaseModel):
    """A wallet as operators see it. There is no field for key material, by construction."""

    id: str
    name: str
    address: str = Field(description="EIP-55 checksummed address")
    public_key: str = Field(description="uncompressed secp256k1 public key, 0x04-prefixed hex")
    key_version: int
    created_at: str

    @classmethod
    def of(cls, wallet: Wallet) -> WalletOut:
        return cls(
            id=wallet.id,
            name=wallet.name,
            address=wallet.address,
            public_key=wallet.public_key,
            key_version=wallet.key_version,
            created_at=wallet.created_at.isoformat(),
        )


class WalletList(BaseModel):
    wallets: list[WalletOut]


class WalletCreate(BaseModel):
    name: str = Field(min_length=1, max_length=100, examples=["research-agent"])
