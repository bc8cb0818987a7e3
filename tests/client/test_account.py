"""CustodyAccount: byte-identical to LocalAccount with the same key, refusals, and web3.py's middleware."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data
from eth_account.signers.local import LocalAccount

from custody.client import (
    ApprovalPending,
    CustodyAccount,
    CustodyClient,
    InvalidResponse,
    NotFound,
    UnsupportedSigningMethod,
    register_with_web3,
)
from custody.client.testing import FakeCustody, FakeWallet

KEY = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
RECIPIENT = "0x09616C3d61b3331fc4109a9E41a8BDB7d9776609"
EIP1559 = {
    "type": 2,
    "to": RECIPIENT,
    "value": 10**18,
    "data": "0x616263",
    "gas": 100_000,
    "maxFeePerGas": 2 * 10**9,
    "maxPriorityFeePerGas": 10**9,
    "nonce": 34,
    "chainId": 1337,
    "accessList": [
        {
            "address": "0x0000000000000000000000000000000000000001",
            "storageKeys": ["0x0100000000000000000000000000000000000000000000000000000000000000"],
        }
    ],
}
LEGACY = {"to": RECIPIENT, "value": 10**9, "gas": 2_000_000, "gasPrice": 234567897654321, "nonce": 0, "chainId": 1337}
ACCESS_LIST = {**LEGACY, "type": 1, "accessList": []}
DOMAIN = {
    "name": "USD Coin",
    "version": "2",
    "chainId": 8453,
    "verifyingContract": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
}
TYPES = {
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ]
}
local: LocalAccount = Account.from_key(KEY)
MESSAGE = {
    "from": local.address,
    "to": RECIPIENT,
    "value": 2**200,
    "validAfter": 0,
    "validBefore": 2**40,
    "nonce": b"\x07" * 32,
}


@pytest.fixture
def fake() -> FakeCustody:
    return FakeCustody()


@pytest.fixture
def wallet(fake: FakeCustody) -> FakeWallet:
    return fake.add_wallet("payer", key=KEY)


@pytest.fixture
def client(fake: FakeCustody) -> Iterator[CustodyClient]:
    with fake.client() as custody:
        yield custody


@pytest.fixture
def account(client: CustodyClient, wallet: FakeWallet) -> CustodyAccount:
    return CustodyAccount(client, wallet.id, wallet.address)


@pytest.mark.parametrize("tx", [EIP1559, LEGACY, ACCESS_LIST], ids=["eip1559", "legacy", "eip2930"])
def test_sign_transaction_is_byte_identical_to_local_account(account: CustodyAccount, tx: dict[str, Any]) -> None:
    expected = local.sign_transaction(tx)
    signed = account.sign_transaction(tx)
    assert signed == expected
    assert (signed.raw_transaction, signed.hash, signed.r, signed.s, signed.v) == tuple(expected)
    assert signed["raw_transaction"] == expected.raw_transaction


def test_sign_message_is_identical_to_local_account(account: CustodyAccount) -> None:
    signable = encode_defunct(text="I ♥ custody")
    assert account.sign_message(signable) == local.sign_message(signable)


def test_sign_typed_data_with_three_parts_sends_the_full_document_and_matches_local_account(
    fake: FakeCustody, account: CustodyAccount
) -> None:
    signed = account.sign_typed_data(DOMAIN, TYPES, MESSAGE)
    assert signed == local.sign_typed_data(DOMAIN, TYPES, MESSAGE)
    sent = fake.requests[-1]
    import json

    document = json.loads(sent.content)["typed_data"]
    assert document["primaryType"] == "TransferWithAuthorization"
    assert [f["name"] for f in document["types"]["EIP712Domain"]] == ["name", "version", "chainId", "verifyingContract"]
    assert document["message"]["value"] == str(2**200)


def test_sign_typed_data_with_a_full_message_matches_local_account(account: CustodyAccount) -> None:
    full = {"types": TYPES, "primaryType": "TransferWithAuthorization", "domain": DOMAIN, "message": MESSAGE}
    assert account.sign_typed_data(full_message=full) == local.sign_typed_data(full_message=full)


def test_unsafe_sign_hash_is_refused(fake: FakeCustody, account: CustodyAccount) -> None:
    with pytest.raises(UnsupportedSigningMethod):
        account.unsafe_sign_hash(b"\x01" * 32)
    assert fake.requests == []


@pytest.mark.parametrize(
    "signable",
    [
        encode_typed_data(DOMAIN, TYPES, MESSAGE),  # version 0x01 carries only hashes
        encode_defunct(primitive=b"\xff\xfe binary"),  # not text
    ],
    ids=["eip712-hashes", "binary"],
)
def test_sign_message_refuses_anything_but_personal_sign_text(
    fake: FakeCustody, account: CustodyAccount, signable: Any
) -> None:
    with pytest.raises(UnsupportedSigningMethod):
        account.sign_message(signable)
    assert fake.requests == []


def test_a_pending_approval_raises_approval_pending_then_waiting_gives_the_signed_transaction(
    fake: FakeCustody, account: CustodyAccount
) -> None:
    fake.require_approval_next()
    with pytest.raises(ApprovalPending) as raised:
        account.sign_transaction(EIP1559)
    fake.approve(raised.value.payment_id)
    assert account.wait_for_transaction(raised.value.payment_id, timeout=5) == local.sign_transaction(EIP1559)


def test_from_client_looks_the_address_up_and_refuses_a_foreign_wallet(
    fake: FakeCustody, client: CustodyClient, wallet: FakeWallet
) -> None:
    assert CustodyAccount.from_client(client, wallet.id).address == local.address
    foreign = fake.add_wallet("other", visible=False)
    with pytest.raises(NotFound):
        CustodyAccount.from_client(client, foreign.id)


def test_a_signature_from_another_key_is_never_returned(client: CustodyClient, wallet: FakeWallet) -> None:
    impostor = CustodyAccount(client, wallet.id, Account.create().address)
    with pytest.raises(InvalidResponse):
        impostor.sign_transaction(LEGACY)
    with pytest.raises(InvalidResponse):
        impostor.sign_message(encode_defunct(text="hi"))


def test_web3_signing_middleware_sends_a_transaction_signed_by_the_service(
    fake: FakeCustody, client: CustodyClient
) -> None:
    from web3 import Web3
    from web3.middleware import SignAndSendRawMiddlewareBuilder
    from web3.providers.eth_tester import EthereumTesterProvider

    w3 = Web3(EthereumTesterProvider())
    wallet = fake.add_wallet("web3-agent")
    account = CustodyAccount.from_client(client, wallet.id, purpose="web3 test")
    funder = w3.eth.accounts[0]
    w3.eth.wait_for_transaction_receipt(
        w3.eth.send_transaction({"from": funder, "to": account.address, "value": 10**18})
    )

    register_with_web3()
    register_with_web3()  # idempotent
    w3.middleware_onion.inject(SignAndSendRawMiddlewareBuilder.build(account), layer=0)
    recipient = w3.eth.accounts[1]
    before = w3.eth.get_balance(recipient)
    tx_hash = w3.eth.send_transaction({"from": account.address, "to": recipient, "value": 12345})
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash)

    assert receipt["status"] == 1
    assert receipt["from"] == account.address
    assert w3.eth.get_balance(recipient) - before == 12345
    assert any(r.url.path.endswith("/sign/transaction") for r in fake.requests)
