"""Wire models shared by the API, the CLI and the SDK (pydantic only)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from custody.storage.interfaces import Wallet


def _check_unicode(value: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (a lone surrogate is not)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_unicode(item)


class RequestBody(BaseModel):
    """A request body: a field the model does not name is refused (400), never silently ignored.

    A misspelt ``expires_at`` or a server-owned field (an id, a status, a role) must not pass
    as if it had been applied. Text anywhere in it, free-form documents included, must be valid
    Unicode: JSON can escape a lone surrogate, which nothing can store, sign or send back.
    """

    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        _check_unicode(value)
        return value


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


class WalletCreate(RequestBody):
    name: str = Field(min_length=1, max_length=100, examples=["research-agent"])
