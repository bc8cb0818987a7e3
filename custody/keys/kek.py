"""The key-encryption key (KEK): a port and its local sources.

The port is :class:`KeyEncryptionKey`, two operations (``wrap`` and ``unwrap``) and a
set of versions. It never hands out key bytes, so a PKCS#11 HSM or a cloud KMS that
keeps its key non-extractable is one more implementation of the same port.

Local sources turn configuration into a :class:`LocalKeyring` (AES-256-GCM):

* :class:`FileKekSource` keeps one file per version in a directory with owner-only
  permissions (``v1.key``, ``v2.key`` ...), created on first run. Rotation adds a file.
* :class:`SecretKekSource` reads base64 keys from an environment variable or a mounted
  secret file. One line per version: ``v2:BASE64`` (a bare ``BASE64`` is version 1).
* :class:`PassphraseKekSource` stretches passphrases with scrypt (same line format:
  ``v2:passphrase``; a single unprefixed line is version 1). A check value per
  version detects a wrong passphrase at unseal time.

The highest version is the current one: new keys are wrapped with it, older versions
stay available for unwrapping until a rotation has rewrapped every data key.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from custody.errors import KeyDecryptionError

KEY_BYTES = 32
NONCE_BYTES = 12
_VERSIONED_LINE = re.compile(r"^v(\d+):(.*)$", re.DOTALL)
_CHECK_PLAINTEXT = b"agent-custody kek check"
_CHECK_CONTEXT = b"agent-custody:v1:kek-check"


class KekUnavailable(Exception):
    """The KEK cannot be loaded; the signer stays sealed. Messages never contain key bytes."""


class KeyEncryptionKey(Protocol):
    """Wraps and unwraps data keys. Implementations must not expose key bytes."""

    @property
    def current_version(self) -> int: ...

    @property
    def versions(self) -> tuple[int, ...]: ...

    def wrap(self, data_key: bytes, context: bytes) -> tuple[int, bytes]:
        """Encrypt ``data_key`` under the current version; ``context`` is bound as AAD."""
        ...

    def unwrap(self, version: int, wrapped: bytes, context: bytes) -> bytes:
        """Decrypt; raises :class:`KeyDecryptionError` for any mismatch or tampering."""
        ...


class KekSource(Protocol):
    """Where a KEK comes from. ``open`` loads it; ``add_version`` supports rotation."""

    name: str

    def open(self) -> KeyEncryptionKey: ...

    def add_version(self) -> KeyEncryptionKey:
        """Make a newer version current (create it, or re-read what the operator added)."""
        ...


class LocalKeyring:
    """AES-256-GCM with in-memory keys, one per version. Wrapped form: nonce ‖ ciphertext."""

    def __init__(self, keys: Mapping[int, bytes]) -> None:
        if not keys:
            raise KekUnavailable("no key-encryption key versions are configured")
        for version, key in keys.items():
            if version < 1 or len(key) != KEY_BYTES:
                raise KekUnavailable(f"key-encryption key version {version} is not 32 bytes")
        self._aead = {version: AESGCM(key) for version, key in keys.items()}

    @property
    def current_version(self) -> int:
        return max(self._aead)

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self._aead))

    def wrap(self, data_key: bytes, context: bytes) -> tuple[int, bytes]:
        version = self.current_version
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead[version].encrypt(nonce, data_key, _bind(context, version))
        return version, nonce + sealed

    def unwrap(self, version: int, wrapped: bytes, context: bytes) -> bytes:
        aead = self._aead.get(version)
        if aead is None or len(wrapped) <= NONCE_BYTES:
            raise KeyDecryptionError()
        try:
            return aead.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _bind(context, version))
        except InvalidTag:
            raise KeyDecryptionError() from None


def _bind(context: bytes, version: int) -> bytes:
    return context + b"|kek:" + str(version).encode()


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the first byte on; never overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_versioned_lines(raw: str) -> dict[int, str]:
    """``v2:value`` lines to ``{2: value}``; a single unprefixed line is version 1."""
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    result: dict[int, str] = {}
    for line in lines:
        match = _VERSIONED_LINE.match(line)
        if match:
            version, value = int(match.group(1)), match.group(2)
        elif len(lines) == 1:
            version, value = 1, line
        else:
            raise KekUnavailable("with several lines, each must start with its version: v<N>:")
        if version in result:
            raise KekUnavailable(f"version {version} is given twice")
        result[version] = value
    if not result:
        raise KekUnavailable("the key-encryption key setting is empty")
    return result


class FileKekSource:
    """Key files in a directory with owner-only permissions; the embedded default."""

    name = "file"

    def __init__(self, directory: Path, *, create: bool) -> None:
        self.directory = directory
        self.create = create

    def _files(self) -> dict[int, Path]:
        found: dict[int, Path] = {}
        if self.directory.is_dir():
            for path in self.directory.glob("v*.key"):
                stem = path.stem[1:]
                if stem.isdigit():
                    found[int(stem)] = path
        return found

    def ensure(self) -> None:
        """Create the directory and the first key if there is none (first run)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        if not self._files():
            _write_private(self.directory / "v1.key", base64.b64encode(secrets.token_bytes(KEY_BYTES)))

    def open(self) -> KeyEncryptionKey:
        if self.create:
            self.ensure()
        files = self._files()
        if not files:
            raise KekUnavailable(f"no key-encryption key file in {self.directory}")
        keys: dict[int, bytes] = {}
        for version, path in files.items():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise KekUnavailable(f"{path.name} is readable by other users (mode {oct(mode)}); chmod 600 it")
            try:
                keys[version] = base64.b64decode(path.read_bytes().strip(), validate=True)
            except (OSError, binascii.Error):
                raise KekUnavailable(f"{path.name} cannot be read as a base64 key") from None
        return LocalKeyring(keys)

    def add_version(self) -> KeyEncryptionKey:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        version = max(self._files(), default=0) + 1
        _write_private(self.directory / f"v{version}.key", base64.b64encode(secrets.token_bytes(KEY_BYTES)))
        return self.open()


class SecretKekSource:
    """Base64 keys from an environment variable or a mounted secret file."""

    name = "secret"

    def __init__(self, value: str | None = None, path: Path | None = None) -> None:
        self._value = value
        self.path = path

    def _raw(self) -> str:
        if self.path is not None:
            try:
                return self.path.read_text()
            except OSError:
                raise KekUnavailable(f"the secret file {self.path} cannot be read") from None
        if self._value is None:
            raise KekUnavailable("no key-encryption secret is configured")
        return self._value

    def open(self) -> KeyEncryptionKey:
        keys: dict[int, bytes] = {}
        for version, value in parse_versioned_lines(self._raw()).items():
            try:
                keys[version] = base64.b64decode(value, validate=True)
            except binascii.Error:
                raise KekUnavailable(f"version {version} of the secret is not valid base64") from None
        return LocalKeyring(keys)

    def add_version(self) -> KeyEncryptionKey:
        # The operator adds the new version to the secret (and restarts or re-mounts);
        # a secret file is re-read here, so a mounted secret can change without a restart.
        return self.open()


class PassphraseKekSource:
    """Passphrases stretched with scrypt; a salt and a check value live in ``directory``."""

    name = "passphrase"

    def __init__(self, value: str | None, directory: Path, *, path: Path | None = None, n: int = 2**15) -> None:
        self._value = value
        self.path = path
        self.directory = directory
        self.n = n

    def with_passphrase(self, value: str) -> PassphraseKekSource:
        return PassphraseKekSource(value, self.directory, n=self.n)

    def _raw(self) -> str:
        if self.path is not None:
            try:
                return self.path.read_text()
            except OSError:
                raise KekUnavailable(f"the passphrase file {self.path} cannot be read") from None
        if self._value is None:
            raise KekUnavailable("no passphrase given: unseal the signer with `custody signer unseal`")
        return self._value

    def _salt(self) -> bytes:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.directory / "passphrase.salt"
        if not path.exists():
            _write_private(path, secrets.token_bytes(16))
        return path.read_bytes()

    def _checked_versions(self) -> set[int]:
        found = set()
        for path in self.directory.glob("passphrase-v*.check"):
            number = path.name.removeprefix("passphrase-v").removesuffix(".check")
            if number.isdigit():
                found.add(int(number))
        return found

    def open(self) -> KeyEncryptionKey:
        """Derive every given version and check it against its stored check value.

        Once versions are known, the highest known one must be given (and match): a
        passphrase for a new version is accepted only together with the current one,
        so nobody who lacks the current passphrase can install a KEK of their own.
        """
        salt = self._salt()
        given = parse_versioned_lines(self._raw())
        known = self._checked_versions()
        if known and max(known) not in given:
            raise KekUnavailable(f"passphrase version {max(known)} (the current one) is not given")
        keys: dict[int, bytes] = {}
        for version, passphrase in given.items():
            if not passphrase:
                raise KekUnavailable(f"passphrase version {version} is empty")
            kdf = Scrypt(salt=salt + str(version).encode(), length=KEY_BYTES, n=self.n, r=8, p=1)
            keys[version] = kdf.derive(passphrase.encode())
        keyring = LocalKeyring(keys)
        for version in sorted(known & set(given)):
            self._verify(keyring, version)
        for version in sorted(set(given) - known):
            _, blob = _wrap_with(keyring, version, _CHECK_PLAINTEXT, _CHECK_CONTEXT)
            _write_private(self.directory / f"passphrase-v{version}.check", blob)
        return keyring

    def _verify(self, keyring: LocalKeyring, version: int) -> None:
        path = self.directory / f"passphrase-v{version}.check"
        try:
            keyring.unwrap(version, path.read_bytes(), _CHECK_CONTEXT)
        except KeyDecryptionError:
            raise KekUnavailable(f"passphrase version {version} does not match") from None

    def add_version(self) -> KeyEncryptionKey:
        return self.open()


def _wrap_with(keyring: LocalKeyring, version: int, data: bytes, context: bytes) -> tuple[int, bytes]:
    nonce = os.urandom(NONCE_BYTES)
    return version, nonce + keyring._aead[version].encrypt(nonce, data, _bind(context, version))
