"""EvmKey and the coincurve signing path, compared with eth_account directly, byte for byte.

No signer, socket or envelope here (tests/battery/test_signing_vectors.py does that through the
service): ``custody.signer.evm`` with an :class:`EvmKey` on one side, ``Account.from_key(key)`` on
the other, for random keys and random legacy, EIP-2930 and EIP-1559 transactions, EIP-712
documents and ``personal_sign`` texts. Every returned field must be equal: raw_transaction, hash,
r, s, v for transactions; signature and message_hash for messages.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data

from custody.errors import InvalidTransaction
from custody.keys.envelope import SECP256K1_N
from custody.signer import evm
from tests.battery.test_signing_vectors import (
    _keys,
    _text,
    expected_transaction,
    expected_typed_data,
    random_transaction,
    random_typed_data,
)
from tests.canary import find
from tests.signer.test_signing import EIP155_KEY, EIP155_SIGNED, EIP155_TX, MAIL, MAIL_KEY, MAIL_SIGNATURE

SEED = 7_100_001
TX_COUNT = 1500
TYPED_COUNT = 300
TEXT_COUNT = 300


def _expected_text(key: bytes, text: str) -> dict[str, Any]:
    signed = Account.from_key(key).sign_message(encode_defunct(text=text))
    return {"signature": "0x" + bytes(signed.signature).hex(), "message_hash": "0x" + bytes(signed.message_hash).hex()}


@pytest.fixture(scope="module")
def keys() -> list[tuple[bytes, evm.EvmKey]]:
    return [(key, evm.EvmKey(key)) for key in _keys(SEED)]


def test_address_and_public_key_are_eth_accounts(keys: list[tuple[bytes, evm.EvmKey]]) -> None:
    for key, evm_key in keys:
        local = Account.from_key(key)
        assert evm_key.address == local.address
        assert evm_key.public_key == local._key_obj.public_key.to_bytes()
        assert len(evm_key.public_key) == 64


def test_published_vectors_eip155_and_eip712() -> None:
    assert evm.sign_transaction(evm.EvmKey(EIP155_KEY), EIP155_TX)["raw_transaction"] == EIP155_SIGNED
    assert evm.sign_typed_data(evm.EvmKey(MAIL_KEY), MAIL)["signature"] == MAIL_SIGNATURE


def test_random_transactions_are_byte_identical_to_eth_account(keys: list[tuple[bytes, evm.EvmKey]]) -> None:
    rng = random.Random(SEED)
    seen = {"type 0": 0, "type 1": 0, "type 2": 0, "creation": 0, "access list": 0, "legacy chain id > 2**32": 0}
    for index in range(TX_COUNT):
        key, evm_key = keys[index % len(keys)]
        tx = random_transaction(rng)
        if index % 10 == 0:  # legacy with a chain id above 2**32: v = recid + 35 + 2 * chainId
            tx = {k: v for k, v in tx.items() if k not in ("type", "accessList", "maxFeePerGas")}
            tx.pop("maxPriorityFeePerGas", None)
            tx["gasPrice"] = rng.randint(0, (2**256 - 1) // tx["gas"])
            tx["chainId"] = rng.choice([2**32 + 1, 2**53 + 1, 2**64 - 1, rng.randint(2**32, 2**200)])
        result = evm.sign_transaction(evm_key, tx)
        assert result == expected_transaction(key, tx), (SEED, index, tx)
        assert int(result["s"], 16) <= SECP256K1_N // 2
        kind = tx.get("type", 0)
        seen[f"type {kind}"] += 1
        seen["creation"] += "to" not in tx
        seen["access list"] += bool(tx.get("accessList"))
        seen["legacy chain id > 2**32"] += kind == 0 and tx["chainId"] > 2**32
    assert min(seen.values()) >= 100, seen


def test_value_and_fee_extremes_are_byte_identical(keys: list[tuple[bytes, evm.EvmKey]]) -> None:
    key, evm_key = keys[0]
    base: dict[str, Any] = {"nonce": 2**64 - 1, "gas": 1, "value": 2**256 - 1, "data": "0x" + "ff" * 1000}
    for tx in (
        base | {"gasPrice": 2**256 - 1, "chainId": 2**64 - 1},
        base | {"gasPrice": 0, "accessList": [], "type": 1, "chainId": 1},
        base | {"maxFeePerGas": 2**256 - 1, "maxPriorityFeePerGas": 2**256 - 1, "type": 2, "chainId": 8453},
        base | {"maxFeePerGas": 0, "maxPriorityFeePerGas": 0, "chainId": 1, "to": "0x" + "00" * 20},
        # eth-account takes lowercase addresses and short storage keys inside an access list
        base | {"gasPrice": 1, "chainId": 5, "accessList": [{"address": "0x" + "ab" * 20, "storageKeys": ["0x01"]}]},
    ):
        assert evm.sign_transaction(evm_key, tx) == expected_transaction(key, tx), tx


def test_random_eip712_documents_are_byte_identical(keys: list[tuple[bytes, evm.EvmKey]]) -> None:
    rng = random.Random(SEED + 1)
    for index in range(TYPED_COUNT):
        key, evm_key = keys[index % len(keys)]
        document = random_typed_data(rng)
        assert evm.sign_typed_data(evm_key, document) == expected_typed_data(key, document), (SEED + 1, index)
    key, evm_key = keys[0]
    local = Account.from_key(key).sign_message(encode_typed_data(full_message=MAIL))
    result = evm.sign_typed_data(evm_key, MAIL)
    assert result["signature"] == "0x" + bytes(local.signature).hex()
    assert result["message_hash"] == "0x" + bytes(local.message_hash).hex()


def test_random_personal_sign_texts_are_byte_identical(keys: list[tuple[bytes, evm.EvmKey]]) -> None:
    rng = random.Random(SEED + 2)
    for index in range(TEXT_COUNT):
        key, evm_key = keys[index % len(keys)]
        text = _text(rng) if index else ""
        assert evm.sign_text_message(evm_key, text) == _expected_text(key, text), (SEED + 2, index, text)


@pytest.mark.parametrize(
    "tx",
    [
        {"to": "0x" + "ab" * 20},  # lowercase hex is not an address
        {"accessList": [{"address": "0xab", "storageKeys": []}], "type": 1},  # a short address
        {"gasPrice": None},
        {"gasPrice": 1, "maxFeePerGas": 2, "maxPriorityFeePerGas": 1, "type": 2},
        {"data": "not hex"},
        {"accessList": [], "gasPrice": None, "type": None},  # inferred type 1, but legacy to eth-account
    ],
    ids=["lowercase-to", "short-access-list-address", "no-gas-price", "fee-mix", "bad-data", "access-list-no-fee"],
)
def test_what_eth_account_rejects_is_an_invalid_transaction(tx: dict[str, Any]) -> None:
    merged = {k: v for k, v in (EIP155_TX | tx).items() if v is not None}
    with pytest.raises((TypeError, ValueError, KeyError)):
        Account.from_key(EIP155_KEY).sign_transaction(merged)
    with pytest.raises(InvalidTransaction, match="rejected by the encoder"):
        evm.sign_transaction(evm.EvmKey(EIP155_KEY), merged)


def test_the_key_shows_nowhere_and_bad_keys_are_refused_without_it() -> None:
    key = _keys(SEED)[0]
    evm_key = evm.EvmKey(key)
    assert find(key, repr(evm_key) + str(evm_key)) == []
    assert evm_key.address in repr(evm_key)
    for bad in (bytes(32), SECP256K1_N.to_bytes(32, "big"), b"\xff" * 32, key[:31], key + b"\0"):
        with pytest.raises(ValueError, match=r"^not a valid secp256k1 private key$") as caught:
            evm.EvmKey(bad)
        assert caught.value.__cause__ is None
        assert caught.value.__context__ is None or caught.value.__suppress_context__
