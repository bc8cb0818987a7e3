"""Signing: byte-identical to eth-account, refusals of dangerous methods, sealed start."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data

from custody.errors import InvalidRequest, InvalidTransaction, SignerSealed, UnsupportedSigningMethod
from custody.keys.kek import FileKekSource, PassphraseKekSource, SecretKekSource
from custody.signer.protocol import b64
from custody.signer.server import SignerCore

EIP155_KEY = bytes.fromhex("46" * 32)
EIP155_TX = {
    "nonce": 9,
    "gasPrice": 20 * 10**9,
    "gas": 21000,
    "to": "0x3535353535353535353535353535353535353535",
    "value": 10**18,
    "data": "0x",
    "chainId": 1,
}
# The signed transaction given in EIP-155 itself.
EIP155_SIGNED = (
    "0xf86c098504a817c800825208943535353535353535353535353535353535353535880de0b6b3a7640000"
    "8025a028ef61340bd939bc2195fe537567866003e1a15d3c71ff63e1590620aa636276a067cbe9d8997f761"
    "aecb703304b3800ccf555c9f3dc64214b297fb1966a3b6d83"
)
MAIL_KEY = bytes.fromhex("c85ef7d79691fe79573b1a7064c19c1a9819ebdbd1faaab1a8ec92344438aaf4")  # keccak("cow")
MAIL: dict[str, Any] = {
    "types": {
        "EIP712Domain": [
            {"name": "name", "type": "string"},
            {"name": "version", "type": "string"},
            {"name": "chainId", "type": "uint256"},
            {"name": "verifyingContract", "type": "address"},
        ],
        "Person": [{"name": "name", "type": "string"}, {"name": "wallet", "type": "address"}],
        "Mail": [
            {"name": "from", "type": "Person"},
            {"name": "to", "type": "Person"},
            {"name": "contents", "type": "string"},
        ],
    },
    "primaryType": "Mail",
    "domain": {
        "name": "Ether Mail",
        "version": "1",
        "chainId": 1,
        "verifyingContract": "0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC",
    },
    "message": {
        "from": {"name": "Cow", "wallet": "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"},
        "to": {"name": "Bob", "wallet": "0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbB"},
        "contents": "Hello, Bob!",
    },
}
# The signature given in EIP-712's example (v=28).
MAIL_SIGNATURE = (
    "0x4355c47d63924e8a72e509b65029052eb6c299d53a04e167c5775fd466751c9d"
    "07299936d304c153f6443dfa05f40ff007d72911b6f72307f996231605b91562"
    "1c"
)


@pytest.fixture
def core(tmp_path: Path) -> SignerCore:
    return SignerCore(FileKekSource(tmp_path / "kek", create=True))


def _import(core: SignerCore, key: bytes, wallet_id: str = "wal_1") -> dict[str, Any]:
    return core.handle({"op": "import_key", "wallet_id": wallet_id, "private_key": b64(key)})


def test_eip155_example_signs_byte_identical_to_the_eip_and_to_local_account(core: SignerCore) -> None:
    sealed = _import(core, EIP155_KEY)
    result = core.handle({"op": "sign_transaction", "envelope": sealed["envelope"], "transaction": EIP155_TX})
    assert result["raw_transaction"] == EIP155_SIGNED
    local = Account.from_key(EIP155_KEY).sign_transaction(EIP155_TX)
    assert result["raw_transaction"] == "0x" + local.raw_transaction.hex()
    assert result["hash"] == "0x" + local.hash.hex()


def test_eip712_mail_example_signs_byte_identical_to_the_eip_and_to_local_account(core: SignerCore) -> None:
    sealed = _import(core, MAIL_KEY)
    assert sealed["address"] == "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"
    result = core.handle({"op": "sign_typed_data", "envelope": sealed["envelope"], "typed_data": MAIL})
    assert result["signature"] == MAIL_SIGNATURE
    local = Account.from_key(MAIL_KEY).sign_message(encode_typed_data(full_message=MAIL))
    assert result["signature"] == "0x" + local.signature.hex()


def test_eip1559_and_eip2930_transactions_match_local_account(core: SignerCore) -> None:
    sealed = _import(core, EIP155_KEY)
    base = {"nonce": 0, "gas": 50_000, "to": EIP155_TX["to"], "value": 5, "data": "0x1234", "chainId": 10}
    for tx in (
        base | {"maxFeePerGas": 3 * 10**9, "maxPriorityFeePerGas": 10**9, "type": 2},
        base | {"gasPrice": 10**9, "accessList": [], "type": 1},
    ):
        result = core.handle({"op": "sign_transaction", "envelope": sealed["envelope"], "transaction": tx})
        assert (
            result["raw_transaction"] == "0x" + Account.from_key(EIP155_KEY).sign_transaction(tx).raw_transaction.hex()
        )


def test_integers_may_arrive_as_decimal_strings(core: SignerCore) -> None:
    sealed = _import(core, EIP155_KEY)
    as_strings = {k: str(v) if isinstance(v, int) else v for k, v in EIP155_TX.items()}
    result = core.handle({"op": "sign_transaction", "envelope": sealed["envelope"], "transaction": as_strings})
    assert result["raw_transaction"] == EIP155_SIGNED


def test_personal_sign_matches_local_account(core: SignerCore) -> None:
    sealed = _import(core, EIP155_KEY)
    result = core.handle({"op": "sign_message", "envelope": sealed["envelope"], "text": "hello agent"})
    local = Account.from_key(EIP155_KEY).sign_message(encode_defunct(text="hello agent"))
    assert result["signature"] == "0x" + local.signature.hex()


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"type": 4, "authorizationList": []}, UnsupportedSigningMethod),
        ({"authorizationList": [{"chainId": 1}]}, UnsupportedSigningMethod),
        ({"type": 3, "maxFeePerBlobGas": 1}, UnsupportedSigningMethod),
        ({"type": 7}, UnsupportedSigningMethod),
        ({"chainId": None}, InvalidTransaction),
        ({"from": "0x0000000000000000000000000000000000000001"}, InvalidTransaction),
        ({"gas": "lots"}, InvalidTransaction),
        ({"type": "two"}, InvalidTransaction),
    ],
    ids=["eip7702-type", "eip7702-list", "blob", "unknown-type", "no-chain-id", "foreign-from", "bad-gas", "bad-type"],
)
def test_dangerous_or_malformed_transactions_are_refused(
    core: SignerCore, change: dict[str, Any], error: type[Exception]
) -> None:
    sealed = _import(core, EIP155_KEY)
    tx = {k: v for k, v in (EIP155_TX | change).items() if v is not None}
    with pytest.raises(error):
        core.handle({"op": "sign_transaction", "envelope": sealed["envelope"], "transaction": tx})


def test_a_pre_hashed_typed_data_message_is_refused(core: SignerCore) -> None:
    sealed = _import(core, MAIL_KEY)
    signable = encode_typed_data(full_message=MAIL)
    opaque = {"version": "0x01", "header": "0x" + signable.header.hex(), "body": "0x" + signable.body.hex()}
    with pytest.raises(UnsupportedSigningMethod, match="full EIP-712 document"):
        core.handle({"op": "sign_typed_data", "envelope": sealed["envelope"], "typed_data": opaque})


def test_a_bare_hash_cannot_be_signed_as_a_message(core: SignerCore) -> None:
    sealed = _import(core, EIP155_KEY)
    with pytest.raises(UnsupportedSigningMethod, match="only text"):
        core.handle({"op": "sign_message", "envelope": sealed["envelope"], "text": {"hash": "0x" + "ab" * 32}})
    with pytest.raises(InvalidRequest, match="unknown signer operation"):
        core.handle({"op": "sign_hash", "envelope": sealed["envelope"], "hash": "0x" + "ab" * 32})


def test_signer_without_a_usable_kek_starts_sealed_and_signs_nothing(tmp_path: Path) -> None:
    donor = SignerCore(FileKekSource(tmp_path / "good", create=True))
    sealed = _import(donor, EIP155_KEY)
    core = SignerCore(FileKekSource(tmp_path / "empty", create=False))
    status = core.handle({"op": "status"})
    assert status["sealed"] is True
    assert "no key-encryption key file" in status["reason"]
    for request in (
        {"op": "sign_transaction", "envelope": sealed["envelope"], "transaction": EIP155_TX},
        {"op": "sign_message", "envelope": sealed["envelope"], "text": "x"},
        {"op": "create_key", "wallet_id": "wal_2"},
    ):
        with pytest.raises(SignerSealed):
            core.handle(request)


def test_passphrase_signer_starts_sealed_and_unseals_with_the_right_passphrase(tmp_path: Path) -> None:
    first = SignerCore(PassphraseKekSource("a long passphrase here", tmp_path / "kek", n=2**10))
    sealed = _import(first, EIP155_KEY)
    core = SignerCore(PassphraseKekSource(None, tmp_path / "kek", n=2**10))
    assert core.sealed
    with pytest.raises(InvalidRequest, match="does not match"):
        core.handle({"op": "unseal", "passphrase": "not it at all"})
    assert core.sealed
    assert core.handle({"op": "unseal", "passphrase": "a long passphrase here"})["sealed"] is False
    result = core.handle({"op": "sign_transaction", "envelope": sealed["envelope"], "transaction": EIP155_TX})
    assert result["raw_transaction"] == EIP155_SIGNED


def test_secret_source_signer_signs_with_a_key_sealed_elsewhere_under_the_same_secret() -> None:
    secret = base64.b64encode(b"\x33" * 32).decode()
    sealed = _import(SignerCore(SecretKekSource(secret)), EIP155_KEY)
    other = SignerCore(SecretKekSource(secret))
    result = other.handle({"op": "sign_transaction", "envelope": sealed["envelope"], "transaction": EIP155_TX})
    assert result["raw_transaction"] == EIP155_SIGNED


def test_a_tampered_envelope_is_not_served_from_the_key_cache(core: SignerCore) -> None:
    sealed = _import(core, EIP155_KEY)
    core.handle({"op": "sign_message", "envelope": sealed["envelope"], "text": "warm the cache"})
    wire = dict(sealed["envelope"])
    blob = bytearray(base64.b64decode(wire["ciphertext"]))
    blob[-1] ^= 1
    wire["ciphertext"] = b64(bytes(blob))
    with pytest.raises(Exception, match="could not be decrypted") as caught:
        core.handle({"op": "sign_message", "envelope": wire, "text": "x"})
    assert getattr(caught.value, "code", None) == "key_decryption_failed"


def test_import_refuses_keys_that_are_not_secp256k1_scalars(core: SignerCore) -> None:
    for bad in (bytes(32), b"\xff" * 32, b"\x01" * 20):
        with pytest.raises(InvalidRequest, match="not a valid secp256k1"):
            _import(core, bad)
    with pytest.raises(InvalidRequest, match="base64"):
        core.handle({"op": "import_key", "wallet_id": "w", "private_key": "%%%"})


def test_public_key_operation_reports_the_address_of_the_envelope(core: SignerCore) -> None:
    sealed = _import(core, MAIL_KEY)
    result = core.handle({"op": "public_key", "envelope": sealed["envelope"]})
    assert result["address"] == "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"
    assert result["public_key"] == sealed["public_key"]
    assert len(bytes.fromhex(result["public_key"][2:])) == 65


def test_an_unsealed_signer_refuses_unseal_so_its_kek_cannot_be_swapped(tmp_path: Path) -> None:
    core = SignerCore(PassphraseKekSource("a long passphrase here", tmp_path / "kek", n=2**10))
    sealed = _import(core, EIP155_KEY)
    with pytest.raises(InvalidRequest, match="already unsealed"):
        core.handle({"op": "unseal", "passphrase": "v9:attacker chosen"})
    assert core.handle({"op": "status"})["kek_versions"] == [1]
    result = core.handle({"op": "sign_transaction", "envelope": sealed["envelope"], "transaction": EIP155_TX})
    assert result["raw_transaction"] == EIP155_SIGNED


def test_a_sealed_signer_accepts_a_new_passphrase_version_only_with_the_current_one(tmp_path: Path) -> None:
    SignerCore(PassphraseKekSource("a long passphrase here", tmp_path / "kek", n=2**10))
    core = SignerCore(PassphraseKekSource(None, tmp_path / "kek", n=2**10))
    with pytest.raises(InvalidRequest, match=r"version 1 \(the current one\) is not given"):
        core.handle({"op": "unseal", "passphrase": "v9:attacker chosen"})
    assert core.sealed
    status = core.handle({"op": "unseal", "passphrase": "v1:a long passphrase here\nv2:the next passphrase"})
    assert status["kek_versions"] == [1, 2]


@pytest.mark.parametrize("chain_id", ["00", "0x0", 0, -1, "0xzz", True])
def test_a_zero_or_malformed_chain_id_is_refused(core: SignerCore, chain_id: object) -> None:
    sealed = _import(core, EIP155_KEY)
    with pytest.raises(InvalidTransaction, match="chainId"):
        core.handle(
            {"op": "sign_transaction", "envelope": sealed["envelope"], "transaction": EIP155_TX | {"chainId": chain_id}}
        )


def test_an_explicit_legacy_type_signs_like_the_eip155_example(core: SignerCore) -> None:
    sealed = _import(core, EIP155_KEY)
    for tx_type in (0, "0x0"):
        tx = EIP155_TX | {"type": tx_type}
        result = core.handle({"op": "sign_transaction", "envelope": sealed["envelope"], "transaction": tx})
        assert result["raw_transaction"] == EIP155_SIGNED
