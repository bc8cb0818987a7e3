"""``CustodyAccount``: an eth-account ``BaseAccount`` whose key stays in the custody service.

Needs eth-account (imported here only, so ``import custody.client`` works without it).
Every signature that comes back is checked before it is returned: the transaction or
message hash is recomputed locally and the signer's address is recovered from the
signature, so a wrong answer can never pass for this wallet's signature.

A payment held for human approval raises :class:`ApprovalPending` (web3.py and other
eth-account callers expect a signature right away). Wait for the human, then finish::

    try:
        signed = account.sign_transaction(tx)
    except ApprovalPending as pending:
        signed = account.wait_for_transaction(pending.payment_id, timeout=600)
    w3.eth.send_raw_transaction(signed.raw_transaction)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import rlp  # type: ignore[import-untyped]  # pyrlp ships no type information
from eth_account import Account
from eth_account.datastructures import SignedMessage, SignedTransaction
from eth_account.messages import SignableMessage, encode_typed_data
from eth_account.signers.base import BaseAccount
from eth_account.typed_transactions.typed_transaction import TypedTransaction
from eth_keys.datatypes import Signature
from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from eth_utils.encoding import big_endian_to_int
from hexbytes import HexBytes

from custody.client._client import CustodyClient
from custody.client._exceptions import (
    ApprovalPending,
    InvalidResponse,
    NotFound,
    UnsupportedSigningMethod,
)
from custody.client._models import MessageSignature, SignResult, TransactionSignature

__all__ = ["CustodyAccount", "register_with_web3"]

_DOMAIN_FIELD_ORDER = (
    ("name", "string"),
    ("version", "string"),
    ("chainId", "uint256"),
    ("verifyingContract", "address"),
    ("salt", "bytes32"),
)
_PERSONAL_SIGN_HEADER = b"thereum Signed Message:\n"


def _bytes(hex_value: str, what: str) -> bytes:
    try:
        return bytes(HexBytes(hex_value))
    except (TypeError, ValueError):
        raise InvalidResponse(f"the service returned a {what} that is not hex") from None


def _primary_type(types: Mapping[str, Any]) -> str:
    """The one struct no other struct refers to (what eth-account derives when none is given)."""
    names = set(types) - {"EIP712Domain"}
    referenced = set()
    for name in names:
        for entry in types[name]:
            core = str(entry["type"]).split("[", 1)[0]
            if core in names and core != name:
                referenced.add(core)
    candidates = names - referenced
    if len(candidates) != 1:
        raise ValueError("cannot tell the primary type of this typed data; pass full_message with primaryType")
    return candidates.pop()


def build_typed_data(
    domain_data: Mapping[str, Any] | None = None,
    message_types: Mapping[str, Any] | None = None,
    message_data: Mapping[str, Any] | None = None,
    full_message: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The full EIP-712 document, from either call style of eth-account's ``sign_typed_data``."""
    if full_message is not None:
        if domain_data is not None or message_types is not None or message_data is not None:
            raise ValueError("pass either full_message or domain_data, message_types and message_data, not both")
        for key in ("types", "domain", "message"):
            if key not in full_message:
                raise ValueError(f"full_message has no '{key}'")
        document = dict(full_message)
        domain = dict(document["domain"])
        types = dict(document["types"])
    else:
        if domain_data is None or message_types is None or message_data is None:
            raise ValueError("pass domain_data, message_types and message_data (or full_message)")
        domain = dict(domain_data)
        types = dict(message_types)
        document = {"domain": domain, "message": dict(message_data)}
    if "EIP712Domain" not in types:
        unknown = set(domain) - {name for name, _ in _DOMAIN_FIELD_ORDER}
        if unknown:
            raise ValueError(f"unknown EIP712Domain fields: {sorted(unknown)}")
        types = {
            "EIP712Domain": [{"name": name, "type": kind} for name, kind in _DOMAIN_FIELD_ORDER if name in domain],
            **types,
        }
    document["types"] = types
    document.setdefault("primaryType", _primary_type(types))
    return document


def _recover(message_hash: bytes, r: int, s: int, v: int) -> str:
    recovery_id = v - 27 if v >= 27 else v
    signature = Signature(vrs=(recovery_id, r, s))
    return str(signature.recover_public_key_from_msg_hash(message_hash).to_checksum_address())


class CustodyAccount(BaseAccount):
    """An eth-account account that asks the custody service for every signature.

    ``purpose`` and ``origin`` are sent with every request (they appear in approvals and the audit log).
    """

    def __init__(
        self,
        client: CustodyClient,
        wallet_id: str,
        address: str,
        *,
        purpose: str | None = None,
        origin: str | None = None,
    ) -> None:
        self.client = client
        self.wallet_id = wallet_id
        self._address = to_checksum_address(address)
        self.purpose = purpose
        self.origin = origin

    @classmethod
    def from_client(
        cls, client: CustodyClient, wallet_id: str, *, purpose: str | None = None, origin: str | None = None
    ) -> CustodyAccount:
        """Look the wallet's address up (``NotFound`` if this API key may not use it)."""
        for wallet in client.wallets():
            if wallet.id == wallet_id:
                return cls(client, wallet_id, wallet.address, purpose=purpose, origin=origin)
        raise NotFound(f"no wallet {wallet_id} for this API key")

    def __repr__(self) -> str:
        return f"CustodyAccount(wallet_id={self.wallet_id!r}, address={self._address!r})"

    @property
    def address(self) -> ChecksumAddress:
        return self._address

    # -- transactions

    def sign_transaction(self, transaction_dict: Mapping[str, Any]) -> SignedTransaction:
        """Sign through the service; the result is what ``LocalAccount.sign_transaction`` returns."""
        outcome = self.client.sign_transaction(
            self.wallet_id, transaction_dict, purpose=self.purpose, origin=self.origin
        )
        return self.signed_transaction(self._signed(outcome))

    def signed_transaction(self, result: TransactionSignature | MessageSignature | None) -> SignedTransaction:
        """An eth-account ``SignedTransaction`` from the service's result, after checking it."""
        if not isinstance(result, TransactionSignature):
            raise InvalidResponse("expected a signed transaction")
        raw = _bytes(result.raw_transaction, "transaction")
        if not raw:
            raise InvalidResponse("the service returned an empty transaction")
        try:
            if raw[0] <= 0x7F:  # EIP-2718 typed transaction
                typed = TypedTransaction.from_bytes(HexBytes(raw))
                v, r, s = typed.vrs()
            else:  # legacy: an RLP list ending in v, r, s
                v, r, s = _legacy_vrs(raw)
            sender = Account.recover_transaction(raw)
        except Exception as exc:  # rlp, eth-account and eth-keys raise several types for malformed bytes
            raise InvalidResponse(f"the service returned a transaction that does not decode: {exc}") from None
        tx_hash = keccak(raw)
        if _bytes(result.hash, "hash") != tx_hash:
            raise InvalidResponse("the transaction hash does not match the raw transaction")
        if sender != self._address:
            raise InvalidResponse(f"the transaction was signed by {sender}, not {self._address}")
        return SignedTransaction(raw_transaction=HexBytes(raw), hash=HexBytes(tx_hash), r=r, s=s, v=v)

    def wait_for_transaction(self, payment_id: str, *, timeout: float = 300.0) -> SignedTransaction:
        """After ``ApprovalPending``: wait for the human, then the checked ``SignedTransaction``."""
        return self.signed_transaction(self.client.wait_for_approval(payment_id, timeout=timeout).result)

    # -- messages

    def sign_message(self, signable_message: SignableMessage) -> SignedMessage:
        """EIP-191 ``personal_sign`` of text only (``encode_defunct(text=...)``); other versions are refused."""
        if bytes(signable_message.version) != b"E":
            raise UnsupportedSigningMethod(
                "only personal_sign text messages are signed; for EIP-712 use sign_typed_data with the full document"
            )
        body = bytes(signable_message.body)
        if bytes(signable_message.header) != _PERSONAL_SIGN_HEADER + str(len(body)).encode():
            raise UnsupportedSigningMethod("the personal_sign header does not match the message")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise UnsupportedSigningMethod("only text messages are signed (the body is not UTF-8)") from None
        outcome = self.client.sign_message(self.wallet_id, text, purpose=self.purpose, origin=self.origin)
        return self.signed_message(self._signed(outcome), signable_message)

    def sign_typed_data(
        self,
        domain_data: dict[str, Any] | None = None,
        message_types: dict[str, Any] | None = None,
        message_data: dict[str, Any] | None = None,
        full_message: dict[str, Any] | None = None,
    ) -> SignedMessage:
        """EIP-712, as ``LocalAccount.sign_typed_data``; the service always receives the full document."""
        document = build_typed_data(domain_data, message_types, message_data, full_message)
        signable = encode_typed_data(full_message=document)  # validates locally and gives the hash to check
        outcome = self.client.sign_typed_data(self.wallet_id, document, purpose=self.purpose, origin=self.origin)
        return self.signed_message(self._signed(outcome), signable)

    def signed_message(
        self, result: TransactionSignature | MessageSignature | None, signable_message: SignableMessage
    ) -> SignedMessage:
        """An eth-account ``SignedMessage`` from the service's result, checked against ``signable_message``."""
        if not isinstance(result, MessageSignature):
            raise InvalidResponse("expected a message signature")
        signature = _bytes(result.signature, "signature")
        if len(signature) != 65:
            raise InvalidResponse("the signature is not 65 bytes")
        message_hash = keccak(
            b"\x19" + bytes(signable_message.version) + bytes(signable_message.header) + bytes(signable_message.body)
        )
        if _bytes(result.message_hash, "message hash") != message_hash:
            raise InvalidResponse("the service signed a different message")
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:64], "big")
        v = signature[64]
        try:
            signer = _recover(message_hash, r, s, v)
        except Exception as exc:  # eth-keys raises several types for a malformed signature
            raise InvalidResponse(f"the signature does not recover: {type(exc).__name__}") from None
        if signer != self._address:
            raise InvalidResponse(f"the message was signed by {signer}, not {self._address}")
        return SignedMessage(message_hash=HexBytes(message_hash), r=r, s=s, v=v, signature=HexBytes(signature))

    def unsafe_sign_hash(self, message_hash: Any) -> SignedMessage:
        """Refused: a bare hash could be anything (a transaction, a permit); the policy must see the payment."""
        raise UnsupportedSigningMethod("signing a bare hash is refused; send the transaction, message or typed data")

    # -- shared

    @staticmethod
    def _signed(outcome: SignResult[Any]) -> TransactionSignature | MessageSignature:
        if outcome.pending:
            raise ApprovalPending(
                f"payment {outcome.payment_id} needs human approval; "
                "wait with client.wait_for_approval(payment_id) or account.wait_for_transaction(payment_id)",
                payment_id=outcome.payment_id,
                result=outcome,
            )
        if outcome.result is None:
            raise InvalidResponse("a signed response without a result")
        result: TransactionSignature | MessageSignature = outcome.result
        return result


def _legacy_vrs(raw: bytes) -> tuple[int, int, int]:
    fields = rlp.decode(raw)
    if not isinstance(fields, list) or len(fields) != 9:
        raise ValueError("a legacy transaction has nine fields")
    v, r, s = (big_endian_to_int(item) for item in fields[6:])
    return v, r, s


def register_with_web3() -> None:
    """Let web3.py's signing middleware accept a ``CustodyAccount`` (call once; safe to repeat).

    ``web3.middleware.signing.to_account`` is a ``functools.singledispatch`` that knows only
    ``LocalAccount`` and raw keys; this registers ``CustodyAccount`` as itself.
    """
    from web3.middleware.signing import to_account

    to_account.register(CustodyAccount, _as_is)


def _as_is(account: Any) -> Any:
    return account
