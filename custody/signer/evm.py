"""EVM signing with eth-account, and the refusals that keep it safe.

Accepted: legacy (EIP-155, a chain id is required), EIP-2930 and EIP-1559
transactions; EIP-191 ``personal_sign`` of text; EIP-712 typed data as the full
document (domain, types, primaryType, message). Refused with
``unsupported_signing_method``: a bare hash, a pre-hashed EIP-712 message, EIP-7702
authorizations (type-4 transactions), and blob transactions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data
from eth_account.signers.local import LocalAccount

from custody.errors import InvalidRequest, InvalidTransaction, UnsupportedSigningMethod

_REFUSED_TX_FIELDS = {
    "authorizationList": "EIP-7702 authorizations are refused",
    "blobVersionedHashes": "blob transactions are not supported",
    "maxFeePerBlobGas": "blob transactions are not supported",
}
_TYPED_DATA_KEYS = ("types", "primaryType", "domain", "message")
_ALLOWED_TX_TYPES = {0, 1, 2}
# Integer fields that may arrive as decimal strings (safe for JavaScript clients).
_NUMERIC_FIELDS = frozenset(
    {"nonce", "gas", "gasPrice", "maxFeePerGas", "maxPriorityFeePerGas", "value", "chainId", "type"}
)


def account_for(private_key: bytes) -> LocalAccount:
    account: LocalAccount = Account.from_key(private_key)
    return account


def _tx_type(tx: Mapping[str, Any]) -> int:
    raw = tx.get("type")
    if raw is None:
        return 2 if "maxFeePerGas" in tx else (1 if "accessList" in tx else 0)
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):
        try:
            return int(raw, 16) if raw.startswith("0x") else int(raw)
        except ValueError:
            pass
    raise InvalidTransaction("transaction type is not a number")


def normalize_transaction(tx: Mapping[str, Any]) -> dict[str, Any]:
    """Check and normalise a transaction dict; decimal strings become integers."""
    if not isinstance(tx, Mapping):
        raise InvalidTransaction("transaction must be an object")
    for field, reason in _REFUSED_TX_FIELDS.items():
        if field in tx:
            raise UnsupportedSigningMethod(reason)
    tx_type = _tx_type(tx)
    if tx_type == 4:
        raise UnsupportedSigningMethod("EIP-7702 authorizations are refused")
    if tx_type not in _ALLOWED_TX_TYPES:
        raise UnsupportedSigningMethod(f"transaction type {tx_type} is not supported")
    out: dict[str, Any] = {}
    for key, value in tx.items():
        if key in _NUMERIC_FIELDS and isinstance(value, str) and value.isdigit():
            out[key] = int(value)
        else:
            out[key] = value
    chain_id = out.get("chainId")
    if isinstance(chain_id, str):
        try:
            chain_id = int(chain_id, 16) if chain_id.lower().startswith("0x") else int(chain_id)
        except ValueError:
            raise InvalidTransaction("chainId is not a number") from None
        out["chainId"] = chain_id
    if not isinstance(chain_id, int) or isinstance(chain_id, bool) or chain_id < 1:
        raise InvalidTransaction(
            "chainId is required and must be at least 1 (unprotected transactions can be replayed)"
        )
    for field in ("value", "gas", "gasPrice", "maxFeePerGas", "maxPriorityFeePerGas", "nonce"):
        amount = out.get(field)
        if isinstance(amount, int) and not isinstance(amount, bool) and not 0 <= amount < 2**256:
            raise InvalidTransaction(f"{field} is outside 0 .. 2**256-1")
    fee = out.get("maxFeePerGas", out.get("gasPrice", 0))
    if isinstance(fee, int) and isinstance(out.get("gas"), int) and out["gas"] * fee >= 2**256:
        raise InvalidTransaction("gas × fee overflows 256 bits")
    if tx_type == 0:
        out.pop("type", None)  # eth-account infers legacy transactions from their fields
    return out


def sign_transaction(account: LocalAccount, tx: Mapping[str, Any]) -> dict[str, Any]:
    normalized = normalize_transaction(tx)
    sender = normalized.pop("from", None)
    if sender is not None and (not isinstance(sender, str) or sender.lower() != account.address.lower()):
        raise InvalidTransaction("'from' is not this wallet's address")
    try:
        signed = account.sign_transaction(normalized)
    except (TypeError, ValueError, KeyError) as exc:
        raise InvalidTransaction(f"transaction rejected by the encoder: {type(exc).__name__}: {exc}") from None
    return {
        "raw_transaction": "0x" + bytes(signed.raw_transaction).hex(),
        "hash": "0x" + bytes(signed.hash).hex(),
        "r": hex(signed.r),
        "s": hex(signed.s),
        "v": signed.v,
    }


def sign_typed_data(account: LocalAccount, document: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(document, Mapping):
        raise InvalidRequest("typed data must be an object")
    missing = [key for key in _TYPED_DATA_KEYS if key not in document]
    if missing:
        raise UnsupportedSigningMethod("typed data must be the full EIP-712 document; missing " + ", ".join(missing))
    try:
        signable = encode_typed_data(full_message=dict(document))
        signed = account.sign_message(signable)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise InvalidRequest(f"typed data rejected by the encoder: {type(exc).__name__}: {exc}") from None
    return {"signature": "0x" + bytes(signed.signature).hex(), "message_hash": "0x" + bytes(signed.message_hash).hex()}


def sign_text_message(account: LocalAccount, text: object) -> dict[str, Any]:
    if not isinstance(text, str):
        raise UnsupportedSigningMethod("only text messages are signed (EIP-191 personal_sign)")
    signed = account.sign_message(encode_defunct(text=text))
    return {"signature": "0x" + bytes(signed.signature).hex(), "message_hash": "0x" + bytes(signed.message_hash).hex()}
