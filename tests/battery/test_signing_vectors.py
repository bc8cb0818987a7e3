"""Signing vectors: random transactions and EIP-712 documents, signed by the service and by eth_account.

Every vector is generated from a seed (``random.Random``), so a failure names a seed and an
index that reproduce it. The service side is the real signer on its real Unix socket (the
``signer_client`` fixture): each request travels as JSON, the key is opened from its envelope,
and decimal-string numbers are normalised as the API would send them. The reference side is
``eth_account`` with the same private key. Zero differences are allowed, in any returned field.

EIP-712 digests are also recomputed here from the specification, with nothing but keccak, so the
check does not rest on eth_account alone; transaction signatures are recovered to the wallet's
address, and transaction hashes recomputed from the raw bytes.

Only what the signer accepts by design is generated: chain id at least 1, transaction types 0, 1
and 2. Chain id 0, EIP-7702 authorizations and blob transactions are refused on purpose and are
tested as refusals in tests/signer/test_signing.py.

The CI run signs 1,000 transactions and 1,000 typed-data documents through the socket;
``--soak`` signs 20,000 of each (other seeds) through the same ``SignerCore`` in-process.
"""

from __future__ import annotations

import random
import string
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_keys import keys as eth_keys
from eth_utils import keccak, to_checksum_address

from custody.keys.envelope import SECP256K1_N, KeyEnvelope
from custody.keys.kek import FileKekSource
from custody.signer.client import SignerClient
from custody.signer.protocol import b64
from custody.signer.server import SignerCore
from tests.signer.test_signing import MAIL

CI_COUNT = 1000
SOAK_COUNT = 20_000
TX_SEED = 7_000_001
TYPED_SEED = 7_000_002
UINT256 = 2**256


@pytest.fixture
def backend() -> str:
    """The signer needs no database: one backend is enough here."""
    return "sqlite"


# -- random values ------------------------------------------------------------------------------


def _uint(rng: random.Random, bits: int) -> int:
    """An unsigned integer below 2**bits, biased towards the edges where encoders break."""
    roll = rng.random()
    if roll < 0.15:
        return rng.choice([0, 1, 2**bits - 1, 2 ** (bits - 1), 2 ** (bits - 1) - 1])
    if roll < 0.3:
        return 2 ** rng.randrange(bits)  # one bit set: exercises every byte length
    return rng.getrandbits(rng.randint(1, bits))


def _int(rng: random.Random, bits: int) -> int:
    """A signed integer that fits ``int<bits>``."""
    if rng.random() < 0.15:
        return rng.choice([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, -1, 0, 1])
    magnitude = rng.getrandbits(rng.randint(1, bits - 1))
    return -magnitude - 1 if rng.random() < 0.5 else magnitude


def _address(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.05:
        raw = bytes(20)
    elif roll < 0.1:
        raw = b"\xff" * 20
    else:
        raw = rng.randbytes(20)
    return str(to_checksum_address(raw))


def _hex(data: bytes) -> str:
    return "0x" + data.hex()


def _data(rng: random.Random) -> bytes:
    size = rng.choice([0, 0, 1, 4, 36, 68, 100, rng.randint(0, 600)])
    return rng.randbytes(size)


def _text(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + " .,:;'\"\\/{}[]-_" + "äöüßéñ漢字🦊€\u200b\n\t"
    return "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 5, 20, rng.randint(0, 120)])))


def _key(rng: random.Random) -> bytes:
    return rng.randint(1, SECP256K1_N - 1).to_bytes(32, "big")


def _keys(seed: int) -> list[bytes]:
    """Eight random keys and the two ends of the valid range."""
    rng = random.Random(seed)
    return [_key(rng) for _ in range(8)] + [(1).to_bytes(32, "big"), (SECP256K1_N - 1).to_bytes(32, "big")]


# -- transactions -------------------------------------------------------------------------------


def random_transaction(rng: random.Random) -> dict[str, Any]:
    """A valid legacy (EIP-155), EIP-2930 or EIP-1559 transaction, as eth_account takes it."""
    kind = rng.choice([0, 1, 2])
    gas = rng.choice([21_000, 53_000, _uint(rng, 24) + 21_000, _uint(rng, 64)]) or 21_000
    fee_bits = min(256, (UINT256 // gas).bit_length())
    fee = min(_uint(rng, fee_bits), (UINT256 - 1) // gas)  # the signer refuses gas × fee ≥ 2**256
    tx: dict[str, Any] = {
        "chainId": rng.choice([1, 10, 137, 8453, 31337, 11155111, 131277322940537, _uint(rng, 64) or 1]),
        "nonce": _uint(rng, 64),
        "gas": gas,
        "value": _uint(rng, 256),
        "data": _hex(_data(rng)),
    }
    if rng.random() < 0.9:  # otherwise a contract creation (no recipient)
        tx["to"] = _address(rng)
    if kind == 0:
        tx["gasPrice"] = fee
    else:
        tx["accessList"] = [
            {
                "address": _address(rng),
                "storageKeys": [_hex(rng.randbytes(32)) for _ in range(rng.choice([0, 1, 2, 5]))],
            }
            for _ in range(rng.choice([0, 0, 1, 2, 4]))
        ]
        if kind == 1:
            tx["gasPrice"] = fee
        else:
            tx["maxFeePerGas"] = fee
            tx["maxPriorityFeePerGas"] = rng.choice([0, fee, rng.randint(0, fee)])
        tx["type"] = kind
    return tx


def as_sent(rng: random.Random, tx: dict[str, Any], address: str) -> dict[str, Any]:
    """The same transaction as a client may send it: numbers as decimal strings, 'from', type omitted."""
    sent = dict(tx)
    for field in ("nonce", "gas", "gasPrice", "maxFeePerGas", "maxPriorityFeePerGas", "value", "chainId"):
        if field in sent and rng.random() < 0.3:
            sent[field] = str(sent[field])
    if rng.random() < 0.3:
        sent["from"] = address if rng.random() < 0.5 else address.lower()
    if "type" in sent and rng.random() < 0.3:
        del sent["type"]  # inferred from the fee fields and the access list
    elif "type" not in sent and rng.random() < 0.2:
        sent["type"] = 0
    return sent


def expected_transaction(key: bytes, tx: dict[str, Any]) -> dict[str, Any]:
    signed = Account.from_key(key).sign_transaction(tx)
    return {
        "raw_transaction": _hex(bytes(signed.raw_transaction)),
        "hash": _hex(bytes(signed.hash)),
        "r": hex(signed.r),
        "s": hex(signed.s),
        "v": signed.v,
    }


def check_transaction_result(result: dict[str, Any], address: str) -> None:
    raw = bytes.fromhex(result["raw_transaction"][2:])
    assert _hex(keccak(raw)) == result["hash"]
    assert Account.recover_transaction(raw) == address
    assert int(result["s"], 16) <= SECP256K1_N // 2  # low-s (EIP-2)


# -- EIP-712 ------------------------------------------------------------------------------------

_DOMAIN_FIELDS = [
    ("name", "string"),
    ("version", "string"),
    ("chainId", "uint256"),
    ("verifyingContract", "address"),
    ("salt", "bytes32"),
]


def _atomic_type(rng: random.Random) -> str:
    return rng.choice(
        [
            f"uint{8 * rng.randint(1, 32)}",
            "uint256",
            f"int{8 * rng.randint(1, 32)}",
            "int256",
            "address",
            "bool",
            "bytes",
            f"bytes{rng.randint(1, 32)}",
            "bytes32",
            "string",
        ]
    )


def _identifier(rng: random.Random, capital: bool) -> str:
    first = rng.choice(string.ascii_uppercase if capital else string.ascii_lowercase)
    return first + "".join(rng.choice(string.ascii_letters + string.digits + "_") for _ in range(rng.randint(0, 10)))


def random_types(rng: random.Random) -> tuple[str, dict[str, list[dict[str, str]]]]:
    """Struct definitions without cycles: struct i refers only to structs after it."""
    count = rng.randint(1, 5)
    names: list[str] = []
    while len(names) < count:
        name = _identifier(rng, capital=True)
        if name not in names and name != "EIP712Domain":
            names.append(name)
    types: dict[str, list[dict[str, str]]] = {}
    for index, name in enumerate(names):
        fields: list[dict[str, str]] = []
        used: set[str] = set()
        for _ in range(rng.randint(0 if index else 1, 6)):
            field = _identifier(rng, capital=False)
            if field in used:
                continue
            used.add(field)
            later = names[index + 1 :]
            base = rng.choice(later) if later and rng.random() < 0.35 else _atomic_type(rng)
            for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):
                base += rng.choice(["[]", f"[{rng.randint(0, 3)}]"])
            fields.append({"name": field, "type": base})
        types[name] = fields
    # Keep only the structs the primary type reaches (a document may not carry unused types).
    reachable: set[str] = set()
    pending = [names[0]]
    while pending:
        current = pending.pop()
        if current in reachable:
            continue
        reachable.add(current)
        pending.extend(f["type"].split("[")[0] for f in types[current] if f["type"].split("[")[0] in types)
    return names[0], {name: fields for name, fields in types.items() if name in reachable}


def random_value(rng: random.Random, type_: str, types: dict[str, list[dict[str, str]]], depth: int = 0) -> Any:
    if type_.endswith("]"):
        inner, size = type_[: type_.rindex("[")], type_[type_.rindex("[") + 1 : -1]
        length = int(size) if size else rng.choice([0, 1, 2, 3] if depth < 3 else [0, 1])
        return [random_value(rng, inner, types, depth + 1) for _ in range(length)]
    if type_ in types:
        return {f["name"]: random_value(rng, f["type"], types, depth + 1) for f in types[type_]}
    if type_ == "address":
        return _address(rng)
    if type_ == "bool":
        return rng.random() < 0.5
    if type_ == "string":
        return _text(rng)
    if type_ == "bytes":
        return _hex(_data(rng))
    if type_.startswith("bytes"):
        return _hex(rng.randbytes(int(type_[5:])))
    if type_.startswith("uint"):
        return _uint(rng, int(type_[4:]))
    return _int(rng, int(type_[3:]))


def random_typed_data(rng: random.Random) -> dict[str, Any]:
    primary, types = random_types(rng)
    domain_fields = [{"name": name, "type": type_} for name, type_ in _DOMAIN_FIELDS if rng.random() < 0.7] or [
        {"name": "name", "type": "string"}
    ]
    domain = {f["name"]: random_value(rng, f["type"], {}) for f in domain_fields}
    if "chainId" in domain:
        domain["chainId"] = rng.choice([1, 8453, _uint(rng, 256)])
    return {
        "types": {"EIP712Domain": domain_fields, **types},
        "primaryType": primary,
        "domain": domain,
        "message": random_value(rng, primary, types),
    }


def expected_typed_data(key: bytes, document: dict[str, Any]) -> dict[str, Any]:
    signed = Account.from_key(key).sign_message(encode_typed_data(full_message=document))
    return {"signature": _hex(bytes(signed.signature)), "message_hash": _hex(bytes(signed.message_hash))}


def _dependencies(type_: str, types: dict[str, list[dict[str, str]]], found: set[str]) -> set[str]:
    base = type_.split("[")[0]
    if base in types and base not in found:
        found.add(base)
        for field in types[base]:
            _dependencies(field["type"], types, found)
    return found


def _type_hash(name: str, types: dict[str, list[dict[str, str]]]) -> bytes:
    order = [name, *sorted(_dependencies(name, types, set()) - {name})]
    text = "".join(f"{n}({','.join(f['type'] + ' ' + f['name'] for f in types[n])})" for n in order)
    return bytes(keccak(text=text))


def _encode(type_: str, value: Any, types: dict[str, list[dict[str, str]]]) -> bytes:
    """One 32-byte word of ``encodeData`` (EIP-712), written from the specification."""
    if type_.endswith("]"):
        inner = type_[: type_.rindex("[")]
        return bytes(keccak(b"".join(_encode(inner, item, types) for item in value)))
    if type_ in types:
        return _hash_struct(type_, value, types)
    if type_ == "string":
        return bytes(keccak(value.encode("utf-8")))
    if type_ == "bytes":
        return bytes(keccak(bytes.fromhex(value[2:])))
    if type_ == "bool":
        return int(value).to_bytes(32, "big")
    if type_ == "address":
        return bytes.fromhex(value[2:]).rjust(32, b"\0")
    if type_.startswith("bytes"):
        return bytes.fromhex(value[2:]).ljust(32, b"\0")
    if type_.startswith("uint"):
        return int(value).to_bytes(32, "big")
    return (int(value) % UINT256).to_bytes(32, "big")  # intN: two's complement, sign-extended


def _hash_struct(name: str, value: dict[str, Any], types: dict[str, list[dict[str, str]]]) -> bytes:
    words = b"".join(_encode(f["type"], value[f["name"]], types) for f in types[name])
    return bytes(keccak(_type_hash(name, types) + words))


def spec_digest(document: dict[str, Any]) -> bytes:
    types = document["types"]
    domain = _hash_struct("EIP712Domain", document["domain"], types)
    return bytes(keccak(b"\x19\x01" + domain + _hash_struct(document["primaryType"], document["message"], types)))


def check_typed_data_result(result: dict[str, Any], document: dict[str, Any], address: str) -> None:
    digest = spec_digest(document)
    assert result["message_hash"] == _hex(digest)
    signature = bytes.fromhex(result["signature"][2:])
    recovered = eth_keys.Signature(signature[:64] + bytes([signature[64] - 27])).recover_public_key_from_msg_hash(
        digest
    )
    assert recovered.to_checksum_address() == address


# -- the comparison -----------------------------------------------------------------------------


class Wallet:
    def __init__(self, key: bytes, address: str, envelope: KeyEnvelope) -> None:
        self.key = key
        self.address = address
        self.envelope = envelope


def transaction_vectors(seed: int, count: int) -> Iterator[tuple[int, dict[str, Any], random.Random]]:
    rng = random.Random(seed)
    for index in range(count):
        yield index, random_transaction(rng), rng


def typed_data_vectors(seed: int, count: int) -> Iterator[tuple[int, dict[str, Any]]]:
    rng = random.Random(seed)
    for index in range(count):
        yield index, random_typed_data(rng)


def _coverage_of_transactions(txs: list[dict[str, Any]]) -> Counter[str]:
    seen: Counter[str] = Counter()
    for tx in txs:
        seen[f"type {tx.get('type', 0)}"] += 1
        seen["contract creation"] += "to" not in tx
        seen["access list entries"] += bool(tx.get("accessList"))
        seen["value 2**256-1"] += tx["value"] == UINT256 - 1
        seen["chain id above 2**32"] += tx["chainId"] > 2**32
        seen["nonce above 2**32"] += tx["nonce"] > 2**32
        seen["data over 100 bytes"] += len(tx["data"]) > 202
    return seen


def _coverage_of_documents(documents: list[dict[str, Any]]) -> Counter[str]:
    seen: Counter[str] = Counter()
    for document in documents:
        structs = set(document["types"]) - {"EIP712Domain"}
        seen["nested structs"] += len(structs) > 1
        for name in structs:
            for field in document["types"][name]:
                type_ = field["type"]
                base = type_.split("[")[0]
                seen["dynamic array"] += "[]" in type_
                seen["fixed array"] += any(ch.isdigit() for ch in type_[len(base) :])
                seen["array of arrays"] += type_.count("[") > 1
                seen["array of structs"] += base in structs and "[" in type_
                for kind in ("uint", "int", "bytes", "address", "bool", "string"):
                    seen[kind] += base.startswith(kind) and base not in structs
                seen["bytes1..31"] += base.startswith("bytes") and base[5:] not in ("", "32")
                seen["small int"] += base.startswith(("int", "uint")) and not base.endswith("256")
        seen["empty struct"] += any(not document["types"][name] for name in structs)
        seen["domain with salt"] += "salt" in document["domain"]
    return seen


async def _import(client: SignerClient, keys: list[bytes]) -> list[Wallet]:
    wallets = []
    for index, key in enumerate(keys):
        address, _, envelope = await client.import_key(f"wal_vec{index}", key)
        assert address == Account.from_key(key).address
        wallets.append(Wallet(key, address, envelope))
    return wallets


async def test_random_transactions_sign_byte_identical_to_eth_account(signer_client: SignerClient) -> None:
    wallets = await _import(signer_client, _keys(TX_SEED))
    differences, generated = [], []
    for index, tx, rng in transaction_vectors(TX_SEED, CI_COUNT):
        wallet = wallets[index % len(wallets)]
        generated.append(tx)
        result = await signer_client.sign_transaction(wallet.envelope, as_sent(rng, tx, wallet.address))
        expected = expected_transaction(wallet.key, tx)
        if result != expected:
            differences.append((TX_SEED, index, tx, result, expected))
        check_transaction_result(result, wallet.address)
    assert differences == []
    seen = _coverage_of_transactions(generated)
    for case in ("type 0", "type 1", "type 2", "contract creation", "access list entries", "value 2**256-1"):
        assert seen[case] >= 10, (case, seen)
    for case in ("chain id above 2**32", "nonce above 2**32", "data over 100 bytes"):
        assert seen[case] >= 10, (case, seen)


async def test_random_eip712_documents_sign_identically_to_eth_account_and_to_the_spec(
    signer_client: SignerClient,
) -> None:
    wallets = await _import(signer_client, _keys(TYPED_SEED))
    differences, generated = [], []
    for index, document in typed_data_vectors(TYPED_SEED, CI_COUNT):
        wallet = wallets[index % len(wallets)]
        generated.append(document)
        result = await signer_client.sign_typed_data(wallet.envelope, document)
        expected = expected_typed_data(wallet.key, document)
        if result != expected:
            differences.append((TYPED_SEED, index, document, result, expected))
        check_typed_data_result(result, document, wallet.address)
    assert differences == []
    seen = _coverage_of_documents(generated)
    for case in ("nested structs", "dynamic array", "fixed array", "array of arrays", "array of structs"):
        assert seen[case] >= 10, (case, seen)
    for case in ("uint", "int", "bytes", "bytes1..31", "small int", "address", "bool", "string"):
        assert seen[case] >= 10, (case, seen)
    for case in ("empty struct", "domain with salt"):
        assert seen[case] >= 10, (case, seen)


def test_the_spec_encoder_here_is_itself_right_on_the_eip712_mail_example() -> None:
    """The independent encoder above reproduces the digest published in EIP-712."""
    assert spec_digest(MAIL).hex() == "be609aee343fb3c4b28e1df9e632fca64fcfaede20f02e86244efddf30957bd2"


def test_a_difference_would_be_seen() -> None:
    """The comparison is not vacuous: one changed field changes the reference signature."""
    rng = random.Random(TX_SEED)
    tx = random_transaction(rng)
    key = _keys(TX_SEED)[0]
    assert expected_transaction(key, tx) != expected_transaction(key, tx | {"nonce": (tx["nonce"] + 1) % 2**64})
    document = random_typed_data(rng)
    changed = document | {"domain": document["domain"] | {"name": "other"}}
    assert expected_typed_data(key, document) != expected_typed_data(key, changed)
    assert spec_digest(document) != spec_digest(changed)


@pytest.mark.soak
def test_soak_many_more_vectors_sign_identically_in_process(tmp_path: Path) -> None:
    core = SignerCore(FileKekSource(tmp_path / "kek", create=True))
    for seed in (TX_SEED + 100, TYPED_SEED + 100):
        keys = _keys(seed)
        wallets = []
        for i, key in enumerate(keys):
            sealed = core.handle({"op": "import_key", "wallet_id": f"wal_soak{i}", "private_key": b64(key)})
            wallets.append((key, sealed["address"], sealed["envelope"]))
        if seed == TX_SEED + 100:
            for index, tx, rng in transaction_vectors(seed, SOAK_COUNT):
                key, address, envelope = wallets[index % len(wallets)]
                sent = as_sent(rng, tx, address)
                result = core.handle({"op": "sign_transaction", "envelope": envelope, "transaction": sent})
                assert result == expected_transaction(key, tx), (seed, index)
                check_transaction_result(result, address)
        else:
            for index, document in typed_data_vectors(seed, SOAK_COUNT):
                key, address, envelope = wallets[index % len(wallets)]
                result = core.handle({"op": "sign_typed_data", "envelope": envelope, "typed_data": document})
                assert result == expected_typed_data(key, document), (seed, index)
                check_typed_data_result(result, document, address)
