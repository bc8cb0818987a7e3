"""The request as the engine sees it: a normalized, chain-aware intent.

Decoders (``custody.chain.decode``) build intents from transactions, EIP-712 documents and
messages. Canonical forms: addresses and token assets are lowercase ``0x…`` hex; the native coin
is the asset ``"native"``; selectors are lowercase ``0x`` + 8 hex digits; amounts are integers in
base units.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies._values import NATIVE, Address, Amount, AssetKey, Selector


class IntentKind(StrEnum):
    """What signing would do."""

    NATIVE_TRANSFER = "native_transfer"
    TOKEN_TRANSFER = "token_transfer"  # noqa: S105  # nosec B105 # an intent kind, not a password
    ALLOWANCE = "allowance"
    PAYMENT_AUTHORIZATION = "payment_authorization"
    CONTRACT_CALL = "contract_call"
    TYPED_DATA = "typed_data"
    MESSAGE = "message"
    DELEGATION = "delegation"
    """An EIP-7702 authorization: the wallet's code is delegated to a contract."""


class AllowanceType(StrEnum):
    """How an allowance is granted."""

    ERC20_APPROVE = "erc20_approve"
    ERC20_INCREASE_ALLOWANCE = "erc20_increase_allowance"
    SET_APPROVAL_FOR_ALL = "set_approval_for_all"
    EIP2612_PERMIT = "eip2612_permit"
    PERMIT2 = "permit2"


class DangerousOperation(StrEnum):
    """Operations that are refused unless an ``allow_dangerous`` rule names them."""

    UNLIMITED_ALLOWANCE = "unlimited_allowance"
    SET_APPROVAL_FOR_ALL = "set_approval_for_all"
    PERMIT2 = "permit2"
    MESSAGE_SIGNING = "message_signing"
    EIP7702_DELEGATION = "eip7702_delegation"


class TypedDataDomain(BaseModel):
    """The EIP-712 domain fields the policy can match on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = None
    version: str | None = None
    chain_id: int | None = None
    verifying_contract: Address | None = None


class Intent(BaseModel):
    """A normalized description of what signing would do.

    ``amount`` is what moves (or may move) in ``asset``: the value of a transfer, the amount of
    an allowance or authorization. ``max_gas_cost`` (gas limit × max fee, in native base units)
    counts against the native budget as well. ``unlimited`` marks an allowance too large to
    measure (a decoder sets it for amounts of 2**128 or more, or ``setApprovalForAll``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: IntentKind
    chain_id: int = Field(ge=1)
    wallet_id: str = Field(min_length=1)
    agent_id: str | None = None
    asset: AssetKey = NATIVE
    amount: Amount = 0
    payee: Address | None = None
    spender: Address | None = None
    unlimited: bool = False
    allowance_type: AllowanceType | None = None
    target: Address | None = None
    selector: Selector | None = None
    calldata: str | None = Field(default=None, pattern="^0x([0-9a-fA-F]{2})*$")
    domain: TypedDataDomain | None = None
    primary_type: str | None = None
    valid_after: datetime | None = None
    valid_before: datetime | None = None
    max_gas_cost: Amount = 0
    purpose: str | None = None
    origin: str | None = None

    @model_validator(mode="after")
    def _check_shape(self) -> Intent:
        if (self.kind is IntentKind.ALLOWANCE) != (self.allowance_type is not None):
            raise ValueError("allowance_type is required for, and only for, kind 'allowance'")
        if self.kind is IntentKind.CONTRACT_CALL and (self.target is None or self.selector is None):
            raise ValueError("a contract_call needs a target and a selector")
        if self.kind is IntentKind.TYPED_DATA and (self.domain is None or self.primary_type is None):
            raise ValueError("typed_data needs a domain and a primary_type")
        return self

    @property
    def counterparty(self) -> str | None:
        """Who receives value or rights: the payee, else the spender (or delegate)."""
        return self.payee if self.payee is not None else self.spender

    @property
    def dangerous_operations(self) -> frozenset[DangerousOperation]:
        """The dangerous operations signing this intent would perform."""
        ops: set[DangerousOperation] = set()
        if self.kind is IntentKind.MESSAGE:
            ops.add(DangerousOperation.MESSAGE_SIGNING)
        if self.kind is IntentKind.DELEGATION:
            ops.add(DangerousOperation.EIP7702_DELEGATION)
        if self.allowance_type is AllowanceType.PERMIT2:
            ops.add(DangerousOperation.PERMIT2)
        if self.allowance_type is AllowanceType.SET_APPROVAL_FOR_ALL:
            if self.unlimited:
                ops.add(DangerousOperation.SET_APPROVAL_FOR_ALL)
        elif self.unlimited:
            ops.add(DangerousOperation.UNLIMITED_ALLOWANCE)
        return frozenset(ops)

    @property
    def moves_value(self) -> bool:
        """True when a measurable amount of ``asset`` moves or may move (a "payment")."""
        return self.amount > 0 and not self.unlimited
