"""What the API returns, as frozen pydantic models.

Integers that may exceed 2**53 travel as decimal strings; here they are ``int`` again.
Unknown members are kept (``extra="allow"``) so a newer server does not break an older SDK.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

# "reserved": approved and being signed; "failed": signing failed or was interrupted, nothing signed.
PaymentStatus = Literal["pending_approval", "reserved", "signed", "rejected", "expired", "denied", "failed"]
FINAL_STATUSES: frozenset[str] = frozenset({"signed", "rejected", "expired", "denied"})


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")


class Wallet(_Model):
    id: str
    name: str
    address: str


class Reason(_Model):
    """One reason a policy gave: the rule, a stable code, and the budget left (base units)."""

    code: str
    message: str
    rule_id: str | None = None
    counter: str | None = None
    limit: int | None = None
    remaining: int | None = None
    resets_at: datetime | None = None


class Quorum(_Model):
    group: str
    m: int


class TransactionSignature(_Model):
    """A signed transaction: ``raw_transaction`` is ready for ``eth_sendRawTransaction``."""

    raw_transaction: str
    hash: str


class MessageSignature(_Model):
    """A 65-byte ``signature`` (r ‖ s ‖ v) over ``message_hash`` (EIP-191 or EIP-712)."""

    signature: str
    message_hash: str


ResultT = TypeVar("ResultT", TransactionSignature, MessageSignature)


class SignResult(_Model, Generic[ResultT]):
    """The answer to a sign call: signed (``result`` set) or waiting for a human (``pending``)."""

    status: Literal["signed", "pending_approval"]
    payment_id: str
    result: ResultT | None = None
    expires_at: datetime | None = None
    quorum: Quorum | None = None
    reasons: list[Reason] = []

    @property
    def pending(self) -> bool:
        """True when a human must approve first: wait with ``client.wait_for_approval(payment_id)``."""
        return self.status == "pending_approval"

    @property
    def signed(self) -> bool:
        return self.status == "signed"


class Payment(_Model):
    """A payment's state; ``result`` is set once it is signed."""

    payment_id: str
    status: PaymentStatus
    result: TransactionSignature | MessageSignature | None = None
    reasons: list[Reason] = []
    expires_at: datetime | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def pending(self) -> bool:
        return self.status == "pending_approval"


class Limit(_Model):
    """A cumulative limit and what is left of it in the current window (base units)."""

    rule_id: str
    counter: str
    limit: int
    remaining: int
    window_start: datetime | None = None
    window_end: datetime | None = None
    resets_at: datetime | None = None


def parse_reasons(raw: Any) -> list[Reason]:
    if not isinstance(raw, list):
        return []
    return [Reason.model_validate(item) for item in raw if isinstance(item, dict)]
