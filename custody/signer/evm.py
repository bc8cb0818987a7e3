"""EVM signing: eth-account builds every byte, libsecp256k1 (coincurve) signs the digest.

Accepted: legacy (EIP-155, a chain id is required), EIP-2930 and EIP-1559
transactions; EIP-191 ``personal_sign`` of text; EIP-712 typed data as the full
document (domain, types, primaryType, message). Refused with
``unsupported_signing_method``: a bare hash, a pre-hashed EIP-712 message, EIP-7702
authorizations (type-4 transactions), and blob transactions.

eth-account validates and encodes the transaction or message and computes the digest to
sign, exactly as its own ``sign_transaction`` / ``sign_message`` do; only the curve
operation is done here, with a :class:`EvmKey` built once per opened private key (eth-account
re-derives the key object, public key included, on every call). The ``v`` value follows
eth-account: ``recovery id + 35 + 2 × chainId`` for legacy transactions (EIP-155), the bare
recovery id for typed transactions, ``27 + recovery id`` for messages. libsecp256k1 only
produces low-s signatures (EIP-2). tests/signer/test_evm_key.py and
tests/battery/test_signing_vectors.py compare every returned byte with eth-account.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import coincurve
from eth_account._utils.legacy_transactions import (
    Transaction,
    encode_transaction,
    serializable_unsigned_transaction_from_dict,
)
from eth_account._utils.signing import to_eth_v
from eth_account.messages import _hash_eip191_message, encode_defunct, encode_typed_data
from eth_account.typed_transactions.access_list_transaction import AccessListTransaction
from eth_account.typed_transactions.dynamic_fee_transaction import DynamicFeeTransaction
from eth_account.typed_transactions.typed_transaction import TypedTransaction
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

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


class EvmKey:
    """An opened secp256k1 private key, built once: signs digests, knows its address.

    Its repr shows the address only; the key bytes live inside the coincurve object.
    """

    __slots__ = ("_key", "address", "public_key")

    def __init__(self, private_key: bytes) -> None:
        if len(private_key) != 32:
            raise ValueError("not a valid secp256k1 private key")
        try:
            self._key = coincurve.PrivateKey(private_key)
        except ValueError:
            raise ValueError("not a valid secp256k1 private key") from None
        #: The uncompressed public point x ‖ y (64 bytes, without the 0x04 prefix).
        self.public_key: bytes = self._key.public_key.format(compressed=False)[1:]
        self.address: str = to_checksum_address(keccak(self.public_key)[-20:])

    def __repr__(self) -> str:
        return f"EvmKey(address={self.address!r})"

    def unsafe_sign_hash(self, digest: bytes) -> tuple[int, int, int]:
        """``(recovery id, r, s)`` over a 32-byte digest. Only for digests eth-account computed here."""
        signature: bytes = self._key.sign_recoverable(digest, hasher=None)
        return signature[64], int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big")


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


def _signed_transaction_bytes(key: EvmKey, tx: dict[str, Any]) -> tuple[bytes, int, int, int]:
    """What eth-account's ``sign_transaction_dict`` does, with the key's own curve operation."""
    unsigned = serializable_unsigned_transaction_from_dict(tx)  # type inferred, checked, formatted
    recovery_id, r, s = key.unsafe_sign_hash(unsigned.hash())
    if isinstance(unsigned, TypedTransaction):
        body = unsigned.transaction
        if not isinstance(body, AccessListTransaction | DynamicFeeTransaction):
            raise TypeError(f"transaction type {unsigned.transaction_type} is not supported")
        # The checked, formatted fields plus the signature, encoded by eth-account's class for
        # the type (encode_transaction would check and format every field a second time).
        signed = type(body)(body.dictionary | {"v": recovery_id, "r": r, "s": s})
        return TypedTransaction(unsigned.transaction_type, signed).encode(), recovery_id, r, s
    v = to_eth_v(recovery_id, unsigned.v if isinstance(unsigned, Transaction) else None)
    return encode_transaction(unsigned, vrs=(v, r, s)), v, r, s


def sign_transaction(key: EvmKey, tx: Mapping[str, Any]) -> dict[str, Any]:
    normalized = normalize_transaction(tx)
    sender = normalized.pop("from", None)
    if sender is not None and (not isinstance(sender, str) or sender.lower() != key.address.lower()):
        raise InvalidTransaction("'from' is not this wallet's address")
    try:
        raw, v, r, s = _signed_transaction_bytes(key, normalized)
    except (TypeError, ValueError, KeyError) as exc:
        raise InvalidTransaction(f"transaction rejected by the encoder: {type(exc).__name__}: {exc}") from None
    return {
        "raw_transaction": "0x" + raw.hex(),
        "hash": "0x" + keccak(raw).hex(),
        "r": hex(r),
        "s": hex(s),
        "v": v,
    }


def _sign_message_hash(key: EvmKey, message_hash: bytes) -> dict[str, Any]:
    recovery_id, r, s = key.unsafe_sign_hash(message_hash)
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([27 + recovery_id])
    return {"signature": "0x" + signature.hex(), "message_hash": "0x" + message_hash.hex()}


def sign_typed_data(key: EvmKey, document: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(document, Mapping):
        raise InvalidRequest("typed data must be an object")
    missing = [name for name in _TYPED_DATA_KEYS if name not in document]
    if missing:
        raise UnsupportedSigningMethod("typed data must be the full EIP-712 document; missing " + ", ".join(missing))
    try:
        message_hash = _hash_eip191_message(encode_typed_data(full_message=dict(document)))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise InvalidRequest(f"typed data rejected by the encoder: {type(exc).__name__}: {exc}") from None
    return _sign_message_hash(key, bytes(message_hash))


def sign_text_message(key: EvmKey, text: object) -> dict[str, Any]:
    if not isinstance(text, str):
        raise UnsupportedSigningMethod("only text messages are signed (EIP-191 personal_sign)")
    return _sign_message_hash(key, bytes(_hash_eip191_message(encode_defunct(text=text))))
