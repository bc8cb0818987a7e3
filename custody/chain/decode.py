"""Decoders: what signing a transaction, an EIP-712 document or a message would do, as an Intent.

The policy sees the real payee and amount inside ERC-20 calldata and inside EIP-712 payment
signatures, not only the ``to`` of a transaction. Anything that cannot be parsed raises
``DecodeError`` with a stable ``code``; it never turns into an allow.

Codes: ``malformed_transaction``, ``malformed_calldata``, ``malformed_typed_data``,
``unsupported_transaction_type``, ``unsupported_typed_data``, ``chain_mismatch``,
``signer_mismatch``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from eth_abi.abi import decode as abi_decode
from eth_account.messages import encode_typed_data
from pydantic import ValidationError

from policies import AllowanceType, Intent, IntentKind, TypedDataDomain

UNLIMITED_THRESHOLD: Final = 2**128
"""Allowances of this many base units or more are treated as unlimited (no real supply is near)."""

PERMIT2_ADDRESS: Final = "0x000000000022d473030f116ddee9f6b43ac78ba3"

TRANSFER: Final = "0xa9059cbb"  # transfer(address,uint256)
TRANSFER_FROM: Final = "0x23b872dd"  # transferFrom(address,address,uint256)
APPROVE: Final = "0x095ea7b3"  # approve(address,uint256)
INCREASE_ALLOWANCE: Final = "0x39509351"  # increaseAllowance(address,uint256)
SET_APPROVAL_FOR_ALL: Final = "0xa22cb465"  # setApprovalForAll(address,bool)
PERMIT2_APPROVE: Final = "0x87517c45"  # Permit2.approve(address,address,uint160,uint48)

_HEX = re.compile(r"0x([0-9a-fA-F]{2})*")


class DecodeError(Exception):
    """The request cannot be understood; ``code`` is stable, ``message`` says what is wrong."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- small parsers


def _int(value: Any, field: str, code: str = "malformed_transaction") -> int:
    """An integer field given as int or as a hex (``0x…``) or decimal string."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DecodeError(code, f"{field} must be an integer")
    if isinstance(value, int):
        result = value
    else:
        try:
            result = int(value, 16) if value.lower().startswith("0x") else int(value, 10)
        except ValueError:
            raise DecodeError(code, f"{field} must be an integer, got {value!r}") from None
    if result < 0:
        raise DecodeError(code, f"{field} must not be negative")
    return result


def _address(value: Any, field: str, code: str) -> str:
    if not isinstance(value, str) or re.fullmatch(r"0x[0-9a-fA-F]{40}", value) is None:
        raise DecodeError(code, f"{field} must be a 20-byte hex address")
    return value.lower()


def _bytes(value: Any, field: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str) or _HEX.fullmatch(value) is None:
        raise DecodeError("malformed_calldata", f"{field} must be 0x-prefixed hex with whole bytes")
    return bytes.fromhex(value[2:])


def _timestamp(value: int) -> datetime | None:
    """A unix timestamp as an aware datetime; values beyond year 9999 mean 'no end'."""
    try:
        return datetime.fromtimestamp(value, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _build(code: str, **fields: Any) -> Intent:
    try:
        return Intent(**fields)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "request"
        raise DecodeError(code, f"cannot describe the request: {where}: {first['msg']}") from None


# --------------------------------------------------------------------------- transactions


def _abi(types: list[str], body: bytes, name: str) -> tuple[Any, ...]:
    try:
        values = abi_decode(types, body, strict=True)
    except Exception as error:  # eth-abi raises several unrelated types for bad input
        raise DecodeError("malformed_calldata", f"{name}: calldata does not decode ({error})") from None
    if len(body) != 32 * len(types):
        raise DecodeError("malformed_calldata", f"{name}: {len(body)} argument bytes, expected {32 * len(types)}")
    return tuple(values)


def _call_fields(target: str, selector: str, body: bytes, value: int) -> dict[str, Any]:
    """Intent fields for calldata: a known token call, or an opaque contract call."""
    if selector in (TRANSFER, TRANSFER_FROM, APPROVE, INCREASE_ALLOWANCE, SET_APPROVAL_FOR_ALL) and value:
        raise DecodeError("malformed_transaction", "a token call must not also send the native coin")
    if selector == TRANSFER:
        payee, amount = _abi(["address", "uint256"], body, "transfer")
        return {"kind": IntentKind.TOKEN_TRANSFER, "asset": target, "payee": payee, "amount": amount}
    if selector == TRANSFER_FROM:
        _, payee, amount = _abi(["address", "address", "uint256"], body, "transferFrom")
        return {"kind": IntentKind.TOKEN_TRANSFER, "asset": target, "payee": payee, "amount": amount}
    if selector in (APPROVE, INCREASE_ALLOWANCE):
        spender, amount = _abi(["address", "uint256"], body, "approve")
        kind = AllowanceType.ERC20_APPROVE if selector == APPROVE else AllowanceType.ERC20_INCREASE_ALLOWANCE
        return _allowance(kind, target, spender, amount)
    if selector == SET_APPROVAL_FOR_ALL:
        operator, approved = _abi(["address", "bool"], body, "setApprovalForAll")
        return {
            "kind": IntentKind.ALLOWANCE,
            "allowance_type": AllowanceType.SET_APPROVAL_FOR_ALL,
            "asset": target,
            "spender": operator,
            "unlimited": approved,
        }
    if selector == PERMIT2_APPROVE and target == PERMIT2_ADDRESS and not value:
        token, spender, amount, expiration = _abi(["address", "address", "uint160", "uint48"], body, "Permit2.approve")
        return {**_allowance(AllowanceType.PERMIT2, token, spender, amount), "valid_before": _timestamp(expiration)}
    return {"kind": IntentKind.CONTRACT_CALL, "amount": value}


def _allowance(kind: AllowanceType, token: str, spender: str, amount: int) -> dict[str, Any]:
    unlimited = amount >= UNLIMITED_THRESHOLD
    return {
        "kind": IntentKind.ALLOWANCE,
        "allowance_type": kind,
        "asset": token,
        "spender": spender,
        "amount": 0 if unlimited else amount,
        "unlimited": unlimited,
    }


def decode_transaction(
    tx: Mapping[str, Any],
    *,
    chain_id: int,
    wallet_id: str,
    agent_id: str | None,
    purpose: str | None = None,
    origin: str | None = None,
) -> Intent:
    """Describe an eth-account transaction dict (legacy, EIP-2930, EIP-1559 or EIP-7702)."""
    if not isinstance(tx, Mapping):
        raise DecodeError("malformed_transaction", "a transaction must be an object")
    tx_type = _int(tx.get("type", 2 if "maxFeePerGas" in tx else 0), "type")
    if "chainId" not in tx:
        raise DecodeError("malformed_transaction", "chainId is required (no replayable transactions)")
    if _int(tx["chainId"], "chainId") != chain_id:
        raise DecodeError("chain_mismatch", f"the transaction is for chain {tx['chainId']}, not {chain_id}")
    common: dict[str, Any] = {
        "chain_id": chain_id,
        "wallet_id": wallet_id,
        "agent_id": agent_id,
        "purpose": purpose,
        "origin": origin,
    }
    if "authorizationList" in tx or tx_type == 4:
        return _delegation(tx, common)
    if tx_type not in (0, 1, 2):
        raise DecodeError("unsupported_transaction_type", f"transaction type {tx_type} is not supported")
    to = tx.get("to")
    if to in (None, "", b""):
        raise DecodeError("unsupported_transaction_type", "contract creation is not supported")
    target = _address(to, "to", "malformed_transaction")
    value = _int(tx.get("value", 0), "value")
    fee_field = "maxFeePerGas" if tx_type == 2 else "gasPrice"
    if "gas" not in tx or fee_field not in tx:
        raise DecodeError("malformed_transaction", f"gas and {fee_field} are required")
    max_gas_cost = _int(tx["gas"], "gas") * _int(tx[fee_field], fee_field)
    data = _bytes(tx.get("data", "0x"), "data")
    common["max_gas_cost"] = max_gas_cost
    if not data:
        return _build("malformed_transaction", kind=IntentKind.NATIVE_TRANSFER, payee=target, amount=value, **common)
    if len(data) < 4:
        raise DecodeError("malformed_calldata", f"calldata of {len(data)} bytes has no function selector")
    selector = "0x" + data[:4].hex()
    fields = _call_fields(target, selector, data[4:], value)
    return _build(
        "malformed_calldata", target=target, selector=selector, calldata="0x" + data.hex(), **common, **fields
    )


def _delegation(tx: Mapping[str, Any], common: dict[str, Any]) -> Intent:
    """An EIP-7702 transaction: the wallet's code would be delegated. Always dangerous."""
    authorizations = tx.get("authorizationList")
    if not isinstance(authorizations, list | tuple) or not authorizations:
        raise DecodeError("malformed_transaction", "an EIP-7702 transaction needs a non-empty authorizationList")
    delegates = set()
    for entry in authorizations:
        if not isinstance(entry, Mapping):
            raise DecodeError("malformed_transaction", "each authorization must be an object")
        delegates.add(_address(entry.get("address"), "authorizationList[].address", "malformed_transaction"))
    return _build(
        "malformed_transaction",
        kind=IntentKind.DELEGATION,
        # With several delegates no single one is named, so scoped allow rules cannot match.
        spender=delegates.pop() if len(delegates) == 1 else None,
        **common,
    )


# --------------------------------------------------------------------------- typed data

_EIP3009_FIELDS: Final = [
    ("from", "address"),
    ("to", "address"),
    ("value", "uint256"),
    ("validAfter", "uint256"),
    ("validBefore", "uint256"),
    ("nonce", "bytes32"),
]
_EIP2612_FIELDS: Final = [
    ("owner", "address"),
    ("spender", "address"),
    ("value", "uint256"),
    ("nonce", "uint256"),
    ("deadline", "uint256"),
]
# DAI's permit: all-or-nothing (``allowed``), with ``expiry`` 0 meaning "never expires".
_DAI_PERMIT_FIELDS: Final = [
    ("holder", "address"),
    ("spender", "address"),
    ("nonce", "uint256"),
    ("expiry", "uint256"),
    ("allowed", "bool"),
]
_PERMIT2_TYPES: Final = {
    "PermitSingle",
    "PermitBatch",
    "PermitTransferFrom",
    "PermitWitnessTransferFrom",
    "PermitBatchTransferFrom",
    "PermitBatchWitnessTransferFrom",
}


def _fields(types: Mapping[str, Any], name: str) -> list[tuple[str, str]]:
    return [(field["name"], field["type"]) for field in types.get(name, [])]


def _domain(raw: Mapping[str, Any]) -> TypedDataDomain:
    verifying = raw.get("verifyingContract")
    return TypedDataDomain(
        name=raw.get("name"),
        version=raw.get("version"),
        chain_id=None if raw.get("chainId") is None else _int(raw["chainId"], "domain.chainId", "malformed_typed_data"),
        verifying_contract=None
        if verifying is None
        else _address(verifying, "domain.verifyingContract", "malformed_typed_data"),
    )


def _payment_fields(message: Mapping[str, Any], token: str) -> dict[str, Any]:
    return {
        "kind": IntentKind.PAYMENT_AUTHORIZATION,
        "asset": token,
        "payee": message["to"],
        "amount": _int(message["value"], "message.value", "malformed_typed_data"),
        "valid_after": _timestamp(_int(message["validAfter"], "message.validAfter", "malformed_typed_data")),
        "valid_before": _timestamp(_int(message["validBefore"], "message.validBefore", "malformed_typed_data")),
    }


def _permit2_fields(primary: str, message: Mapping[str, Any]) -> dict[str, Any]:
    if primary == "PermitSingle":
        details = message["details"]
        fields = _allowance(
            AllowanceType.PERMIT2,
            details["token"],
            message["spender"],
            _int(details["amount"], "details.amount", "malformed_typed_data"),
        )
        expiration = _int(details["expiration"], "details.expiration", "malformed_typed_data")
        return {**fields, "valid_before": _timestamp(expiration)}
    if primary in ("PermitTransferFrom", "PermitWitnessTransferFrom"):
        permitted = message["permitted"]
        fields = _allowance(
            AllowanceType.PERMIT2,
            permitted["token"],
            message["spender"],
            _int(permitted["amount"], "permitted.amount", "malformed_typed_data"),
        )
        deadline = _int(message["deadline"], "deadline", "malformed_typed_data")
        return {**fields, "valid_before": _timestamp(deadline)}
    raise DecodeError("unsupported_typed_data", f"Permit2 {primary} (several tokens at once) is not supported")


def _interpret(
    primary: str, shape: list[tuple[str, str]], message: Mapping[str, Any], domain: TypedDataDomain
) -> tuple[dict[str, Any], Any]:
    """Intent fields for a typed-data document, and the signer its message names (if any)."""
    token = domain.verifying_contract
    if primary in ("TransferWithAuthorization", "ReceiveWithAuthorization") and shape == _EIP3009_FIELDS and token:
        return _payment_fields(message, token), message["from"]
    if primary == "Permit" and shape == _EIP2612_FIELDS and token:
        amount = _int(message["value"], "message.value", "malformed_typed_data")
        deadline = _int(message["deadline"], "message.deadline", "malformed_typed_data")
        fields = _allowance(AllowanceType.EIP2612_PERMIT, token, message["spender"], amount)
        return {**fields, "valid_before": _timestamp(deadline)}, message["owner"]
    if primary == "Permit" and shape == _DAI_PERMIT_FIELDS and token:
        allowed = message["allowed"]
        if not isinstance(allowed, bool):
            raise DecodeError("malformed_typed_data", "message.allowed must be true or false")
        expiry = _int(message["expiry"], "message.expiry", "malformed_typed_data")
        fields = _allowance(AllowanceType.EIP2612_PERMIT, token, message["spender"], 2**256 - 1 if allowed else 0)
        return {**fields, "valid_before": _timestamp(expiry) if expiry else None}, message["holder"]
    # `token` is the ERC-20 contract's address, which is public: a plain comparison is right.
    # nosemgrep: compare-secrets-in-constant-time
    if primary in _PERMIT2_TYPES and (domain.name == "Permit2" or token == PERMIT2_ADDRESS):
        return _permit2_fields(primary, message), None
    if _looks_like_spending(primary):
        # A permit or an authorization whose shape we do not know could move funds:
        # refuse it rather than let it pass as harmless opaque typed data.
        raise DecodeError(
            "unsupported_typed_data",
            f"{primary} looks like a permit or a payment authorization, but its fields are not a known layout",
        )
    return {"kind": IntentKind.TYPED_DATA}, None


def _looks_like_spending(primary: str) -> bool:
    name = primary.lower()
    return "permit" in name or name.endswith("authorization") or primary in _PERMIT2_TYPES


def decode_typed_data(
    document: Mapping[str, Any],
    *,
    chain_id: int,
    wallet_id: str,
    agent_id: str | None,
    wallet_address: str | None = None,
    purpose: str | None = None,
    origin: str | None = None,
) -> Intent:
    """Describe a full EIP-712 document (``types``, ``domain``, ``primaryType``, ``message``).

    EIP-3009 ``TransferWithAuthorization``/``ReceiveWithAuthorization`` become payment
    authorizations (token = verifying contract); EIP-2612 ``Permit`` and Permit2 permits
    become allowances; anything else is opaque typed data. A payment type is recognised only
    when its field list is exactly the standard one. With ``wallet_address``, the signer named
    in the message (``from``/``owner``) must be that wallet.
    """
    try:
        encode_typed_data(full_message=dict(document))
    except Exception as error:  # eth-account raises many types for malformed documents
        raise DecodeError("malformed_typed_data", f"not a valid EIP-712 document: {error}") from None
    types: Mapping[str, Any] = document["types"]
    primary: str = document["primaryType"]
    message: Mapping[str, Any] = document["message"]
    domain = _domain(document["domain"])
    if domain.chain_id is not None and domain.chain_id != chain_id:
        raise DecodeError("chain_mismatch", f"the document's domain is for chain {domain.chain_id}, not {chain_id}")
    try:
        fields, signer = _interpret(primary, _fields(types, primary), message, domain)
    except (KeyError, TypeError) as error:  # a Permit2-domain type without the standard fields
        raise DecodeError("malformed_typed_data", f"{primary} lacks the standard field {error}") from None
    if wallet_address is not None and signer is not None and str(signer).lower() != wallet_address.lower():
        raise DecodeError("signer_mismatch", f"the document is signed by {signer}, not by this wallet")
    return _build(
        "malformed_typed_data",
        chain_id=chain_id,
        wallet_id=wallet_id,
        agent_id=agent_id,
        domain=domain,
        primary_type=primary,
        purpose=purpose,
        origin=origin,
        **fields,
    )


# --------------------------------------------------------------------------- messages


def decode_message(
    text: str,
    *,
    chain_id: int,
    wallet_id: str,
    agent_id: str | None,
    purpose: str | None = None,
    origin: str | None = None,
) -> Intent:
    """Describe a ``personal_sign`` request. Message signing is dangerous and off by default."""
    if not isinstance(text, str):
        raise DecodeError("malformed_message", "the message must be text")
    return _build(
        "malformed_message",
        kind=IntentKind.MESSAGE,
        chain_id=chain_id,
        wallet_id=wallet_id,
        agent_id=agent_id,
        purpose=purpose,
        origin=origin,
    )
