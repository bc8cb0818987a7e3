"""Envelope encryption: binding to wallet and version, uniform failure on any tamper."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest

from custody.errors import KeyDecryptionError
from custody.keys import envelope as env
from custody.keys.kek import LocalKeyring

KEY = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")


@pytest.fixture
def kek() -> LocalKeyring:
    return LocalKeyring({1: b"\x01" * 32})


def test_sealed_key_opens_to_the_same_private_key(kek: LocalKeyring) -> None:
    sealed = env.seal(kek, "wal_a", 1, KEY)
    assert env.open_envelope(kek, sealed) == KEY


def test_ciphertext_never_contains_the_private_key(kek: LocalKeyring) -> None:
    sealed = env.seal(kek, "wal_a", 1, KEY)
    for blob in (sealed.ciphertext, sealed.wrapped_dek):
        assert KEY not in blob
        assert KEY.hex() not in blob.hex()
    assert KEY.hex() not in repr(sealed)


def test_envelope_copied_to_another_wallet_does_not_decrypt(kek: LocalKeyring) -> None:
    sealed = env.seal(kek, "wal_a", 1, KEY)
    with pytest.raises(KeyDecryptionError):
        env.open_envelope(kek, replace(sealed, wallet_id="wal_b"))


def test_envelope_copied_to_another_key_version_does_not_decrypt(kek: LocalKeyring) -> None:
    sealed = env.seal(kek, "wal_a", 1, KEY)
    with pytest.raises(KeyDecryptionError):
        env.open_envelope(kek, replace(sealed, key_version=2))


def test_ciphertext_moved_between_wallets_does_not_decrypt_even_with_its_data_key(kek: LocalKeyring) -> None:
    a = env.seal(kek, "wal_a", 1, KEY)
    b = env.seal(kek, "wal_b", 1, bytes(31) + b"\x07")
    with pytest.raises(KeyDecryptionError):
        env.open_envelope(kek, replace(b, ciphertext=a.ciphertext))


def test_every_single_byte_tamper_fails_with_one_uniform_error(kek: LocalKeyring) -> None:
    sealed = env.seal(kek, "wal_a", 1, KEY)
    messages = set()
    for field in ("wrapped_dek", "ciphertext"):
        blob: bytes = getattr(sealed, field)
        for index in range(len(blob)):
            tampered = bytearray(blob)
            tampered[index] ^= 0x01
            with pytest.raises(KeyDecryptionError) as caught:
                env.open_envelope(kek, replace(sealed, **{field: bytes(tampered)}))
            messages.add(str(caught.value))
        for cut in (0, 5, len(blob) - 1):
            with pytest.raises(KeyDecryptionError) as caught:
                env.open_envelope(kek, replace(sealed, **{field: blob[:cut]}))
            messages.add(str(caught.value))
    assert len(messages) == 1
    (message,) = messages
    assert KEY.hex() not in message


def test_wrong_kek_version_fails_uniformly(kek: LocalKeyring) -> None:
    sealed = env.seal(kek, "wal_a", 1, KEY)
    with pytest.raises(KeyDecryptionError):
        env.open_envelope(kek, replace(sealed, kek_version=7))


def test_another_kek_cannot_open_the_envelope(kek: LocalKeyring) -> None:
    sealed = env.seal(kek, "wal_a", 1, KEY)
    with pytest.raises(KeyDecryptionError):
        env.open_envelope(LocalKeyring({1: b"\x02" * 32}), sealed)


def test_rewrap_moves_the_data_key_to_the_current_kek_and_leaves_the_ciphertext(kek: LocalKeyring) -> None:
    sealed = env.seal(kek, "wal_a", 1, KEY)
    rotated = LocalKeyring({1: b"\x01" * 32, 2: b"\x02" * 32})
    fresh = env.rewrap(rotated, sealed)
    assert fresh.kek_version == 2
    assert fresh.ciphertext == sealed.ciphertext
    assert fresh.wrapped_dek != sealed.wrapped_dek
    assert env.open_envelope(LocalKeyring({2: b"\x02" * 32}), fresh) == KEY


def test_generated_keys_are_valid_and_distinct() -> None:
    keys = {env.generate_private_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(env.is_valid_private_key(k) for k in keys)


@pytest.mark.parametrize(
    "candidate",
    [bytes(32), (env.SECP256K1_N).to_bytes(32, "big"), b"\x01" * 31, base64.b64encode(KEY)],
)
def test_invalid_private_keys_are_refused(kek: LocalKeyring, candidate: bytes) -> None:
    assert not env.is_valid_private_key(candidate)
    with pytest.raises(ValueError, match="not a valid"):
        env.seal(kek, "wal_a", 1, candidate)
