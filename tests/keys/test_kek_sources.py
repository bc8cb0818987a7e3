"""Every KEK source passes the same contract; each has its own failure modes."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from custody.errors import KeyDecryptionError
from custody.keys.kek import (
    FileKekSource,
    KekSource,
    KekUnavailable,
    PassphraseKekSource,
    SecretKekSource,
    parse_versioned_lines,
)

K1 = base64.b64encode(b"\x11" * 32).decode()
K2 = base64.b64encode(b"\x22" * 32).decode()


def _file(tmp: Path) -> KekSource:
    return FileKekSource(tmp / "kek", create=True)


def _secret_env(_: Path) -> KekSource:
    return SecretKekSource(K1)


def _secret_file(tmp: Path) -> KekSource:
    path = tmp / "kek.secret"
    path.write_text(K1 + "\n")
    return SecretKekSource(path=path)


def _passphrase(tmp: Path) -> KekSource:
    return PassphraseKekSource("correct horse battery staple", tmp / "kek", n=2**10)


SOURCES: dict[str, Callable[[Path], KekSource]] = {
    "file": _file,
    "secret-env": _secret_env,
    "secret-file": _secret_file,
    "passphrase": _passphrase,
}


@pytest.mark.parametrize("make", SOURCES.values(), ids=SOURCES.keys())
def test_source_wraps_and_unwraps_a_data_key(make: Callable[[Path], KekSource], tmp_path: Path) -> None:
    kek = make(tmp_path).open()
    version, wrapped = kek.wrap(b"\x42" * 32, b"ctx")
    assert version == kek.current_version
    assert kek.unwrap(version, wrapped, b"ctx") == b"\x42" * 32
    with pytest.raises(KeyDecryptionError):
        kek.unwrap(version, wrapped, b"other context")


@pytest.mark.parametrize("make", SOURCES.values(), ids=SOURCES.keys())
def test_source_gives_the_same_kek_when_opened_again(make: Callable[[Path], KekSource], tmp_path: Path) -> None:
    source = make(tmp_path)
    version, wrapped = source.open().wrap(b"\x42" * 32, b"ctx")
    assert source.open().unwrap(version, wrapped, b"ctx") == b"\x42" * 32


def test_file_source_creates_an_owner_only_key_on_first_run(tmp_path: Path) -> None:
    FileKekSource(tmp_path / "kek", create=True).open()
    assert (tmp_path / "kek").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "kek" / "v1.key").stat().st_mode & 0o777 == 0o600


def test_file_source_without_create_is_unavailable_when_no_key_exists(tmp_path: Path) -> None:
    with pytest.raises(KekUnavailable, match="no key-encryption key file"):
        FileKekSource(tmp_path / "kek", create=False).open()


def test_file_source_refuses_a_key_file_other_users_can_read(tmp_path: Path) -> None:
    source = FileKekSource(tmp_path / "kek", create=True)
    source.open()
    os.chmod(tmp_path / "kek" / "v1.key", 0o644)
    with pytest.raises(KekUnavailable, match="readable by other users"):
        source.open()


def test_file_source_rotation_adds_a_version_and_keeps_the_old_one(tmp_path: Path) -> None:
    source = FileKekSource(tmp_path / "kek", create=True)
    old = source.open()
    _, wrapped = old.wrap(b"\x42" * 32, b"ctx")
    new = source.add_version()
    assert new.current_version == 2
    assert new.versions == (1, 2)
    assert new.unwrap(1, wrapped, b"ctx") == b"\x42" * 32
    assert (tmp_path / "kek" / "v2.key").stat().st_mode & 0o777 == 0o600


def test_secret_source_reads_versioned_lines_and_uses_the_highest_as_current() -> None:
    kek = SecretKekSource(f"v1:{K1}\nv2:{K2}").open()
    assert kek.versions == (1, 2)
    assert kek.current_version == 2


def test_secret_source_refuses_invalid_base64_without_echoing_it() -> None:
    with pytest.raises(KekUnavailable) as caught:
        SecretKekSource("not base64 at all!").open()
    assert "not base64 at all" not in str(caught.value)


def test_secret_source_refuses_a_key_of_the_wrong_length() -> None:
    with pytest.raises(KekUnavailable, match="32 bytes"):
        SecretKekSource(base64.b64encode(b"short").decode()).open()


def test_secret_source_with_a_missing_file_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(KekUnavailable, match="cannot be read"):
        SecretKekSource(path=tmp_path / "missing").open()


def test_passphrase_source_detects_a_wrong_passphrase(tmp_path: Path) -> None:
    PassphraseKekSource("correct horse battery staple", tmp_path / "kek", n=2**10).open()
    with pytest.raises(KekUnavailable, match="does not match"):
        PassphraseKekSource("wrong passphrase", tmp_path / "kek", n=2**10).open()


def test_passphrase_source_without_a_passphrase_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(KekUnavailable, match="unseal"):
        PassphraseKekSource(None, tmp_path / "kek", n=2**10).open()


def test_passphrase_salt_is_owner_only(tmp_path: Path) -> None:
    PassphraseKekSource("correct horse battery staple", tmp_path / "kek", n=2**10).open()
    assert (tmp_path / "kek" / "passphrase.salt").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("abc", {1: "abc"}), ("v3:abc", {3: "abc"}), ("v1:a\nv2:b\n", {1: "a", 2: "b"}), ("v2:a:b", {2: "a:b"})],
)
def test_versioned_lines_parse(raw: str, expected: dict[int, str]) -> None:
    assert parse_versioned_lines(raw) == expected


@pytest.mark.parametrize("raw", ["", "a\nb", "v1:a\nv1:b"])
def test_versioned_lines_reject_ambiguous_input(raw: str) -> None:
    with pytest.raises(KekUnavailable):
        parse_versioned_lines(raw)
