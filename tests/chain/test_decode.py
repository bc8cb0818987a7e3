"""Decoders on real encodings (eth-abi calldata, eth-account typed data), and malformed input."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from eth_abi import encode  # type: ignore[attr-defined]  # eth-abi re-exports encode without __all__
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import function_signature_to_4byte_selector, to_checksum_address

from custody.chain.decode import (
    PERMIT2_ADDRESS,
    UNLIMITED_THRESHOLD,
    DecodeError,
    decode_message,
    decode_transaction,
    decode_typed_data,
)
from policies import AllowanceType, DangerousOperation, IntentKind, MemorySpend, evaluate, load_policy

BASE = 8453
USDC = to_checksum_address("0x833589fcd6edb6e08f4c7c32d4f71b54bda02913")
ALICE = to_checksum_address("0x" + "a1" * 20)
BOB = to_checksum_address("0x" + "b0" * 20)
ROUTER = to_checksum_address("0x" + "c0" * 20)
CONTEXT: dict[str, Any] = {"chain_id": BASE, "wallet_id": "w1", "agent_id": "agent-1"}


def calldata(signature: str, types: list[str], values: list[Any]) -> str:
    return "0x" + (function_signature_to_4byte_selector(signature) + encode(types, values)).hex()


def tx(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "to": USDC,
        "value": 0,
        "data": "0x",
        "gas": 100_000,
        "maxFeePerGas": 2_000_000_000,
        "maxPriorityFeePerGas": 1_000_000,
        "chainId": BASE,
        "nonce": 0,
        "type": 2,
    }
    base.update(fields)
    return base


def test_native_transfer_counts_the_maximum_gas_cost() -> None:
    transaction = tx(to=ALICE, value=10**17, gas=21_000)
    Account.create().sign_transaction(transaction)  # eth-account accepts exactly this dict
    intent = decode_transaction(transaction, **CONTEXT, purpose="tip", origin="https://example.org")
    assert intent.kind is IntentKind.NATIVE_TRANSFER
    assert (intent.asset, intent.amount, intent.payee) == ("native", 10**17, ALICE.lower())
    assert intent.max_gas_cost == 21_000 * 2_000_000_000
    assert (intent.purpose, intent.origin) == ("tip", "https://example.org")


def test_legacy_transaction_uses_gas_price_and_hex_strings() -> None:
    transaction = {"to": ALICE, "value": "0x10", "gas": "0x5208", "gasPrice": "1000", "chainId": BASE, "nonce": 0}
    intent = decode_transaction(transaction, **CONTEXT)
    assert (intent.amount, intent.max_gas_cost) == (16, 21_000 * 1000)


def test_erc20_transfer_reveals_the_real_payee_and_amount() -> None:
    data = calldata("transfer(address,uint256)", ["address", "uint256"], [BOB, 5_000_000])
    intent = decode_transaction(tx(data=data), **CONTEXT)
    assert intent.kind is IntentKind.TOKEN_TRANSFER
    assert (intent.asset, intent.payee, intent.amount) == (USDC.lower(), BOB.lower(), 5_000_000)
    assert (intent.target, intent.selector, intent.calldata) == (USDC.lower(), "0xa9059cbb", data)


def test_erc20_transfer_from_pays_the_to_argument() -> None:
    data = calldata("transferFrom(address,address,uint256)", ["address", "address", "uint256"], [ALICE, BOB, 7])
    intent = decode_transaction(tx(data=data), **CONTEXT)
    assert (intent.kind, intent.payee, intent.amount) == (IntentKind.TOKEN_TRANSFER, BOB.lower(), 7)


@pytest.mark.parametrize(
    ("signature", "kind"),
    [
        ("approve(address,uint256)", AllowanceType.ERC20_APPROVE),
        ("increaseAllowance(address,uint256)", AllowanceType.ERC20_INCREASE_ALLOWANCE),
    ],
)
def test_bounded_and_unlimited_approvals(signature: str, kind: AllowanceType) -> None:
    bounded = decode_transaction(tx(data=calldata(signature, ["address", "uint256"], [ROUTER, 100])), **CONTEXT)
    assert (bounded.kind, bounded.allowance_type, bounded.spender) == (IntentKind.ALLOWANCE, kind, ROUTER.lower())
    assert (bounded.amount, bounded.unlimited, bounded.asset) == (100, False, USDC.lower())
    unlimited = decode_transaction(
        tx(data=calldata(signature, ["address", "uint256"], [ROUTER, 2**256 - 1])), **CONTEXT
    )
    assert (unlimited.amount, unlimited.unlimited) == (0, True)
    assert unlimited.dangerous_operations == {DangerousOperation.UNLIMITED_ALLOWANCE}
    at_threshold = calldata(signature, ["address", "uint256"], [ROUTER, UNLIMITED_THRESHOLD - 1])
    assert not decode_transaction(tx(data=at_threshold), **CONTEXT).unlimited


def test_set_approval_for_all_and_its_revocation() -> None:
    on = decode_transaction(
        tx(data=calldata("setApprovalForAll(address,bool)", ["address", "bool"], [ROUTER, True])), **CONTEXT
    )
    assert on.dangerous_operations == {DangerousOperation.SET_APPROVAL_FOR_ALL}
    off = decode_transaction(
        tx(data=calldata("setApprovalForAll(address,bool)", ["address", "bool"], [ROUTER, False])), **CONTEXT
    )
    assert (off.allowance_type, off.dangerous_operations) == (AllowanceType.SET_APPROVAL_FOR_ALL, frozenset())


def test_permit2_on_chain_approve_is_a_permit2_allowance() -> None:
    data = calldata(
        "approve(address,address,uint160,uint48)",
        ["address", "address", "uint160", "uint48"],
        [USDC, ROUTER, 2**160 - 1, 1_900_000_000],
    )
    intent = decode_transaction(tx(to=to_checksum_address(PERMIT2_ADDRESS), data=data), **CONTEXT)
    assert intent.allowance_type is AllowanceType.PERMIT2
    assert (intent.asset, intent.spender) == (USDC.lower(), ROUTER.lower())
    assert intent.dangerous_operations == {DangerousOperation.PERMIT2, DangerousOperation.UNLIMITED_ALLOWANCE}
    assert intent.valid_before == datetime.fromtimestamp(1_900_000_000, tz=UTC)


def test_other_calldata_is_a_contract_call_with_its_selector_and_value() -> None:
    data = calldata("deposit(uint256,address)", ["uint256", "address"], [5, ALICE])
    intent = decode_transaction(tx(to=ROUTER, data=data, value=3), **CONTEXT)
    assert (intent.kind, intent.target, intent.selector) == (IntentKind.CONTRACT_CALL, ROUTER.lower(), data[:10])
    assert (intent.asset, intent.amount) == ("native", 3)


def test_eip7702_transaction_is_a_delegation() -> None:
    auth = [{"chainId": BASE, "address": ROUTER, "nonce": 1, "yParity": 0, "r": 1, "s": 1}]
    intent = decode_transaction(tx(type=4, to=ALICE, authorizationList=auth), **CONTEXT)
    assert (intent.kind, intent.spender) == (IntentKind.DELEGATION, ROUTER.lower())
    two = decode_transaction(tx(authorizationList=[*auth, {**auth[0], "address": BOB}]), **CONTEXT)
    assert two.spender is None
    policy = load_policy({"schema_version": 1, "rules": [{"id": "pay", "type": "allow_transfers"}]})
    decision = evaluate(policy, intent, MemorySpend(), datetime(2025, 1, 1, tzinfo=UTC))
    assert decision.codes == ("dangerous_operation",)


BAD_TRANSACTIONS: list[tuple[Any, str]] = [
    (tx(data="0xa9059cbb" + "00" * 10), "malformed_calldata"),  # truncated arguments
    (tx(data="0xa9059cbb" + "00" * 64 + "00" * 32), "malformed_calldata"),  # trailing bytes
    (tx(data="0xa9059cbb" + "ff" * 32 + "00" * 32), "malformed_calldata"),  # address with dirty high bytes
    (tx(data="0x095ea7b3"), "malformed_calldata"),  # selector only
    (tx(data="0xa9059c"), "malformed_calldata"),  # shorter than a selector
    (tx(data="0xzz"), "malformed_calldata"),
    (tx(data="0x123"), "malformed_calldata"),
    (
        tx(data=calldata("transfer(address,uint256)", ["address", "uint256"], [BOB, 1]), value=1),
        "malformed_transaction",
    ),  # a token call that also sends the native coin
    (tx(type=3), "unsupported_transaction_type"),
    (tx(to=None), "unsupported_transaction_type"),
    (tx(to="0x1234"), "malformed_transaction"),
    (tx(chainId=1), "chain_mismatch"),
    ({k: v for k, v in tx().items() if k != "chainId"}, "malformed_transaction"),
    ({k: v for k, v in tx().items() if k != "gas"}, "malformed_transaction"),
    (tx(value=-1), "malformed_transaction"),
    (tx(value=1.5), "malformed_transaction"),
    (tx(value="lots"), "malformed_transaction"),
    (tx(value=True), "malformed_transaction"),
    (tx(type=4), "malformed_transaction"),  # no authorizationList
    (tx(authorizationList=["x"]), "malformed_transaction"),
    (tx(authorizationList=[{"address": "nope"}]), "malformed_transaction"),
    ([("to", ALICE)], "malformed_transaction"),
]


@pytest.mark.parametrize(("transaction", "code"), BAD_TRANSACTIONS)
def test_malformed_transactions_raise_a_stable_code(transaction: Any, code: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_transaction(transaction, **CONTEXT)
    assert caught.value.code == code
    assert caught.value.message


def test_calldata_given_as_bytes_is_accepted() -> None:
    data = bytes.fromhex(calldata("transfer(address,uint256)", ["address", "uint256"], [BOB, 1])[2:])
    assert decode_transaction(tx(data=data), **CONTEXT).payee == BOB.lower()


def test_an_intent_that_cannot_be_described_is_an_error_not_an_allow() -> None:
    with pytest.raises(DecodeError) as caught:
        decode_transaction(tx(to=ALICE), chain_id=BASE, wallet_id="", agent_id=None)
    assert caught.value.code == "malformed_transaction"
    assert "wallet_id" in caught.value.message


# --------------------------------------------------------------------------- typed data

EIP712_DOMAIN = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
EIP3009 = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]
DOMAIN = {"name": "USD Coin", "version": "2", "chainId": BASE, "verifyingContract": USDC}


def authorization(
    primary: str = "TransferWithAuthorization", fields: list[dict[str, str]] = EIP3009, **message: Any
) -> dict[str, Any]:
    body = {
        "from": ALICE,
        "to": BOB,
        "value": 20_000,
        "validAfter": 0,
        "validBefore": 1_900_000_000,
        "nonce": b"\x01" * 32,
        **message,
    }
    return {
        "types": {"EIP712Domain": EIP712_DOMAIN, primary: fields},
        "domain": DOMAIN,
        "primaryType": primary,
        "message": body,
    }


@pytest.mark.parametrize("primary", ["TransferWithAuthorization", "ReceiveWithAuthorization"])
def test_eip3009_authorization_is_a_payment_to_the_to_address(primary: str) -> None:
    document = authorization(primary)
    Account.create().sign_typed_data(full_message=document)  # eth-account accepts this document
    intent = decode_typed_data(document, **CONTEXT, wallet_address=ALICE)
    assert intent.kind is IntentKind.PAYMENT_AUTHORIZATION
    assert (intent.asset, intent.payee, intent.amount) == (USDC.lower(), BOB.lower(), 20_000)
    assert intent.valid_after == datetime(1970, 1, 1, tzinfo=UTC)
    assert intent.valid_before == datetime.fromtimestamp(1_900_000_000, tz=UTC)
    assert intent.domain is not None
    assert (intent.domain.name, intent.domain.chain_id, intent.primary_type) == ("USD Coin", BASE, primary)


def test_authorization_signed_by_another_wallet_is_refused() -> None:
    with pytest.raises(DecodeError) as caught:
        decode_typed_data(authorization(), **CONTEXT, wallet_address=BOB)
    assert caught.value.code == "signer_mismatch"


def test_a_validity_beyond_year_9999_means_no_end() -> None:
    assert decode_typed_data(authorization(validBefore=2**255), **CONTEXT).valid_before is None


def test_a_lookalike_authorization_with_other_fields_is_refused_not_opaque() -> None:
    lookalike = [*EIP3009[:5], {"name": "salt", "type": "bytes32"}]
    document = authorization(fields=lookalike, salt=b"\x00" * 32)
    del document["message"]["nonce"]
    with pytest.raises(DecodeError) as caught:
        decode_typed_data(document, **CONTEXT)
    assert caught.value.code == "unsupported_typed_data"


def test_eip2612_permit_is_an_allowance() -> None:
    fields = [
        {"name": "owner", "type": "address"},
        {"name": "spender", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "nonce", "type": "uint256"},
        {"name": "deadline", "type": "uint256"},
    ]
    document = {
        "types": {"EIP712Domain": EIP712_DOMAIN, "Permit": fields},
        "domain": DOMAIN,
        "primaryType": "Permit",
        "message": {"owner": ALICE, "spender": ROUTER, "value": 2**256 - 1, "nonce": 0, "deadline": 10},
    }
    intent = decode_typed_data(document, **CONTEXT)
    assert (intent.kind, intent.allowance_type, intent.spender) == (
        IntentKind.ALLOWANCE,
        AllowanceType.EIP2612_PERMIT,
        ROUTER.lower(),
    )
    assert intent.unlimited
    assert intent.valid_before == datetime.fromtimestamp(10, tz=UTC)


PERMIT2_DOMAIN = {"name": "Permit2", "chainId": BASE, "verifyingContract": to_checksum_address(PERMIT2_ADDRESS)}
PERMIT2_DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
TOKEN_PERMISSIONS = [{"name": "token", "type": "address"}, {"name": "amount", "type": "uint256"}]


def test_permit2_witness_transfer_is_a_permit2_allowance() -> None:
    document = {
        "types": {
            "EIP712Domain": PERMIT2_DOMAIN_TYPE,
            "PermitWitnessTransferFrom": [
                {"name": "permitted", "type": "TokenPermissions"},
                {"name": "spender", "type": "address"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
                {"name": "witness", "type": "Witness"},
            ],
            "TokenPermissions": TOKEN_PERMISSIONS,
            "Witness": [{"name": "to", "type": "address"}],
        },
        "domain": PERMIT2_DOMAIN,
        "primaryType": "PermitWitnessTransferFrom",
        "message": {
            "permitted": {"token": USDC, "amount": 1000},
            "spender": ROUTER,
            "nonce": 1,
            "deadline": 99,
            "witness": {"to": BOB},
        },
    }
    intent = decode_typed_data(document, **CONTEXT)
    assert (intent.allowance_type, intent.asset, intent.amount, intent.spender) == (
        AllowanceType.PERMIT2,
        USDC.lower(),
        1000,
        ROUTER.lower(),
    )
    assert intent.dangerous_operations == {DangerousOperation.PERMIT2}


def test_permit2_single_allowance() -> None:
    details = [
        {"name": "token", "type": "address"},
        {"name": "amount", "type": "uint160"},
        {"name": "expiration", "type": "uint48"},
        {"name": "nonce", "type": "uint48"},
    ]
    document = {
        "types": {
            "EIP712Domain": PERMIT2_DOMAIN_TYPE,
            "PermitDetails": details,
            "PermitSingle": [
                {"name": "details", "type": "PermitDetails"},
                {"name": "spender", "type": "address"},
                {"name": "sigDeadline", "type": "uint256"},
            ],
        },
        "domain": PERMIT2_DOMAIN,
        "primaryType": "PermitSingle",
        "message": {
            "details": {"token": USDC, "amount": 2**160 - 1, "expiration": 5, "nonce": 0},
            "spender": ROUTER,
            "sigDeadline": 5,
        },
    }
    intent = decode_typed_data(document, **CONTEXT)
    assert intent.unlimited
    assert intent.valid_before == datetime.fromtimestamp(5, tz=UTC)


def test_permit2_batch_is_refused() -> None:
    document = {
        "types": {
            "EIP712Domain": PERMIT2_DOMAIN_TYPE,
            "TokenPermissions": TOKEN_PERMISSIONS,
            "PermitBatchTransferFrom": [
                {"name": "permitted", "type": "TokenPermissions[]"},
                {"name": "spender", "type": "address"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
            ],
        },
        "domain": PERMIT2_DOMAIN,
        "primaryType": "PermitBatchTransferFrom",
        "message": {"permitted": [{"token": USDC, "amount": 1}], "spender": ROUTER, "nonce": 1, "deadline": 9},
    }
    with pytest.raises(DecodeError) as caught:
        decode_typed_data(document, **CONTEXT)
    assert caught.value.code == "unsupported_typed_data"


def test_other_typed_data_is_opaque_with_its_domain() -> None:
    document = {
        "types": {
            "EIP712Domain": [{"name": "name", "type": "string"}],
            "Order": [{"name": "amount", "type": "uint256"}],
        },
        "domain": {"name": "Exchange"},
        "primaryType": "Order",
        "message": {"amount": 1},
    }
    intent = decode_typed_data(document, **CONTEXT)
    assert (intent.kind, intent.domain, intent.primary_type) == (IntentKind.TYPED_DATA, intent.domain, "Order")
    assert intent.domain is not None
    assert (intent.domain.name, intent.domain.chain_id, intent.domain.verifying_contract) == ("Exchange", None, None)
    encode_typed_data(full_message=document)


@pytest.mark.parametrize(
    ("document", "code"),
    [
        ({"types": {}, "primaryType": "X"}, "malformed_typed_data"),
        (authorization(value="not a number"), "malformed_typed_data"),
        ({**authorization(), "primaryType": "Missing"}, "malformed_typed_data"),
        ({**authorization(), "domain": {**DOMAIN, "chainId": 1}}, "chain_mismatch"),
        ("not a document", "malformed_typed_data"),
    ],
)
def test_malformed_typed_data_raises_a_stable_code(document: Any, code: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_typed_data(document, **CONTEXT)
    assert caught.value.code == code


def test_message_is_a_message_intent() -> None:
    intent = decode_message("Sign in to example.org", **CONTEXT)
    assert intent.kind is IntentKind.MESSAGE
    assert intent.dangerous_operations == {DangerousOperation.MESSAGE_SIGNING}
    with pytest.raises(DecodeError) as caught:
        decode_message(b"raw", **CONTEXT)  # type: ignore[arg-type]  # the point of the test
    assert caught.value.code == "malformed_message"


def test_a_permit2_type_without_the_standard_fields_is_malformed_not_a_crash() -> None:
    document = {
        "types": {"EIP712Domain": PERMIT2_DOMAIN_TYPE, "PermitSingle": [{"name": "spender", "type": "address"}]},
        "domain": PERMIT2_DOMAIN,
        "primaryType": "PermitSingle",
        "message": {"spender": ROUTER},
    }
    with pytest.raises(DecodeError) as caught:
        decode_typed_data(document, **CONTEXT)
    assert caught.value.code == "malformed_typed_data"


def _dai_permit(allowed: object, expiry: int) -> dict[str, object]:
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "Permit": [
                {"name": "holder", "type": "address"},
                {"name": "spender", "type": "address"},
                {"name": "nonce", "type": "uint256"},
                {"name": "expiry", "type": "uint256"},
                {"name": "allowed", "type": "bool"},
            ],
        },
        "primaryType": "Permit",
        "domain": {
            "name": "Dai Stablecoin",
            "version": "1",
            "chainId": 1,
            "verifyingContract": "0x6B175474E89094C44Da98b954EedeAC495271d0F",
        },
        "message": {
            "holder": "0x1111111111111111111111111111111111111111",
            "spender": "0x2222222222222222222222222222222222222222",
            "nonce": 0,
            "expiry": expiry,
            "allowed": allowed,
        },
    }


def test_dai_permit_with_allowed_true_is_an_unlimited_allowance_without_expiry() -> None:
    from custody.chain import decode_typed_data
    from policies import IntentKind

    intent = decode_typed_data(_dai_permit(True, 0), chain_id=1, wallet_id="w", agent_id=None)
    assert intent.kind == IntentKind.ALLOWANCE
    assert intent.unlimited is True
    assert intent.spender == "0x2222222222222222222222222222222222222222"
    assert intent.valid_before is None


def test_dai_permit_with_allowed_false_is_a_zero_allowance() -> None:
    from custody.chain import decode_typed_data

    intent = decode_typed_data(_dai_permit(False, 2_000_000_000), chain_id=1, wallet_id="w", agent_id=None)
    assert intent.unlimited is False
    assert intent.amount == 0


def test_dai_permit_with_a_non_boolean_allowed_is_malformed() -> None:
    from custody.chain import DecodeError, decode_typed_data

    with pytest.raises(DecodeError) as caught:
        decode_typed_data(_dai_permit("yes", 0), chain_id=1, wallet_id="w", agent_id=None)
    assert caught.value.code == "malformed_typed_data"


@pytest.mark.parametrize("primary", ["Permit", "PermitForAll", "TransferWithAuthorization", "SpendAuthorization"])
def test_unknown_layouts_of_permits_and_authorizations_are_refused_not_opaque(primary: str) -> None:
    from custody.chain import DecodeError, decode_typed_data

    document = _dai_permit(True, 0)
    types = document["types"]
    assert isinstance(types, dict)
    types[primary] = [{"name": "who", "type": "address"}, {"name": "amount", "type": "uint256"}]
    if primary != "Permit":
        del types["Permit"]
    document["primaryType"] = primary
    document["message"] = {"who": "0x2222222222222222222222222222222222222222", "amount": 1}
    with pytest.raises(DecodeError) as caught:
        decode_typed_data(document, chain_id=1, wallet_id="w", agent_id=None)
    assert caught.value.code == "unsupported_typed_data"
