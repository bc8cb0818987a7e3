"""Envelope encryption of wallet private keys.

Each wallet key version gets its own random 256-bit data key (DEK). The private key
is encrypted with the DEK (AES-256-GCM); the DEK is wrapped by the KEK. The wallet id
and key version are bound as associated data to both layers, so a ciphertext copied to
another wallet or version does not decrypt. Every failure, whatever byte was changed,
raises the same :class:`~custody.errors.KeyDecryptionError`.

Rotating the KEK rewraps the DEK only; the encrypted private key is never touched.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from custody.errors import KeyDecryptionError
from custody.keys.kek import NONCE_BYTES, KeyEncryptionKey

# Order of the secp256k1 group: a private key is an integer in [1, N-1].
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@dataclass(frozen=True, repr=False)
class KeyEnvelope:
    """A wallet key at rest: ciphertext only, safe to store and to pass between processes."""

    wallet_id: str
    key_version: int
    kek_version: int
    wrapped_dek: bytes
    ciphertext: bytes

    def __repr__(self) -> str:
        return (
            f"KeyEnvelope(wallet_id={self.wallet_id!r}, key_version={self.key_version}, kek_version={self.kek_version})"
        )


def _dek_context(wallet_id: str, key_version: int) -> bytes:
    return f"agent-custody:v1:dek:{wallet_id}:{key_version}".encode()


def _key_context(wallet_id: str, key_version: int) -> bytes:
    return f"agent-custody:v1:key:{wallet_id}:{key_version}".encode()


def generate_private_key() -> bytes:
    """A secp256k1 private key from the OS CSPRNG."""
    while True:
        candidate = secrets.token_bytes(32)
        if 0 < int.from_bytes(candidate, "big") < SECP256K1_N:
            return candidate


def is_valid_private_key(key: bytes) -> bool:
    return len(key) == 32 and 0 < int.from_bytes(key, "big") < SECP256K1_N


def seal(kek: KeyEncryptionKey, wallet_id: str, key_version: int, private_key: bytes) -> KeyEnvelope:
    if not is_valid_private_key(private_key):
        raise ValueError("not a valid secp256k1 private key")
    dek = secrets.token_bytes(32)
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = nonce + AESGCM(dek).encrypt(nonce, private_key, _key_context(wallet_id, key_version))
    kek_version, wrapped = kek.wrap(dek, _dek_context(wallet_id, key_version))
    return KeyEnvelope(wallet_id, key_version, kek_version, wrapped, ciphertext)


def open_envelope(kek: KeyEncryptionKey, envelope: KeyEnvelope) -> bytes:
    """The private key inside ``envelope``; one uniform error for any mismatch."""
    dek = kek.unwrap(envelope.kek_version, envelope.wrapped_dek, _dek_context(envelope.wallet_id, envelope.key_version))
    data = envelope.ciphertext
    if len(data) <= NONCE_BYTES:
        raise KeyDecryptionError()
    try:
        key = AESGCM(dek).decrypt(
            data[:NONCE_BYTES], data[NONCE_BYTES:], _key_context(envelope.wallet_id, envelope.key_version)
        )
    except (InvalidTag, ValueError):
        raise KeyDecryptionError() from None
    if not is_valid_private_key(key):
        raise KeyDecryptionError()
    return key


def rewrap(kek: KeyEncryptionKey, envelope: KeyEnvelope) -> KeyEnvelope:
    """The same envelope with its data key wrapped under the KEK's current version."""
    context = _dek_context(envelope.wallet_id, envelope.key_version)
    dek = kek.unwrap(envelope.kek_version, envelope.wrapped_dek, context)
    kek_version, wrapped = kek.wrap(dek, context)
    return replace(envelope, kek_version=kek_version, wrapped_dek=wrapped)
