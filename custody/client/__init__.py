"""The Agent Custody SDK: ask the custody service for signatures, within policy.

Needs only httpx and pydantic. :class:`CustodyAccount` (an eth-account ``BaseAccount``)
and :func:`register_with_web3` need eth-account (and web3); they are imported on first use.

    from custody.client import CustodyClient, PolicyDenied

    with CustodyClient("http://127.0.0.1:8700", api_key) as custody:
        wallet = custody.wallets()[0]
        try:
            outcome = custody.sign_transaction(wallet.id, tx, purpose="pay invoice 42")
        except PolicyDenied as denied:
            for reason in denied.reasons:
                print(reason.code, reason.remaining, reason.resets_at)
        else:
            if outcome.pending:                      # a human must approve first
                payment = custody.wait_for_approval(outcome.payment_id)

Testing without a service: :mod:`custody.client.testing` (``FakeCustody``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from custody.client._client import DEFAULT_TIMEOUT, AsyncCustodyClient, CustodyClient
from custody.client._exceptions import (
    ApprovalError,
    ApprovalExpired,
    ApprovalPending,
    ApprovalRejected,
    ApprovalTimeout,
    Conflict,
    CustodyConnectionError,
    CustodyError,
    DatabaseUnavailable,
    DependencyUnavailable,
    Forbidden,
    Frozen,
    IdempotencyConflict,
    InvalidRequest,
    InvalidResponse,
    InvalidTransaction,
    KeyDecryptionError,
    NotFound,
    PayloadTooLarge,
    PolicyDenied,
    RateLimited,
    SignerSealed,
    SignerUnavailable,
    Unauthorized,
    UnsupportedSigningMethod,
)
from custody.client._models import (
    Limit,
    MessageSignature,
    Payment,
    PaymentStatus,
    Quorum,
    Reason,
    SignResult,
    TransactionSignature,
    Wallet,
)

if TYPE_CHECKING:
    from custody.client._account import CustodyAccount, register_with_web3

__all__ = [
    "DEFAULT_TIMEOUT",
    "ApprovalError",
    "ApprovalExpired",
    "ApprovalPending",
    "ApprovalRejected",
    "ApprovalTimeout",
    "AsyncCustodyClient",
    "Conflict",
    "CustodyAccount",
    "CustodyClient",
    "CustodyConnectionError",
    "CustodyError",
    "DatabaseUnavailable",
    "DependencyUnavailable",
    "Forbidden",
    "Frozen",
    "IdempotencyConflict",
    "InvalidRequest",
    "InvalidResponse",
    "InvalidTransaction",
    "KeyDecryptionError",
    "Limit",
    "MessageSignature",
    "NotFound",
    "PayloadTooLarge",
    "Payment",
    "PaymentStatus",
    "PolicyDenied",
    "Quorum",
    "RateLimited",
    "Reason",
    "SignResult",
    "SignerSealed",
    "SignerUnavailable",
    "TransactionSignature",
    "Unauthorized",
    "UnsupportedSigningMethod",
    "Wallet",
    "register_with_web3",
]

_LAZY = {"CustodyAccount", "register_with_web3"}


def __getattr__(name: str) -> Any:
    # CustodyAccount needs eth-account, which the SDK's base install does not have.
    if name in _LAZY:
        from custody.client import _account

        return getattr(_account, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
