"""Settings: zero-config development, and production refusals that name the setting to fix."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from pydantic import SecretStr

from custody.errors import ConfigurationError
from custody.settings import Settings

GOOD_SECRET = SecretStr(base64.b64encode(bytes(range(32))).decode())
PG = "postgresql://custody@db/custody"


def test_development_mode_needs_no_configuration(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.production_problems() == []
    assert settings.effective_kek_source == "file"
    assert settings.sqlalchemy_url == f"sqlite+aiosqlite:///{tmp_path / 'custody.db'}"
    assert settings.socket_path == tmp_path / "signer.sock"


def test_settings_read_the_custody_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CUSTODY_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CUSTODY_DATABASE_URL", PG)
    monkeypatch.setenv("CUSTODY_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("CUSTODY_SIGNER_SOCKET_MODE", "0660")
    settings = Settings()
    assert settings.data_dir == tmp_path
    assert settings.sqlalchemy_url == "postgresql+asyncpg://custody@db/custody"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.signer_socket_mode == 0o660


def test_a_safe_production_configuration_is_accepted() -> None:
    settings = Settings(mode="production", kek_source="secret", kek_secret=GOOD_SECRET, database_url=PG)
    assert settings.production_problems() == []
    settings.require_safe()


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"kek_source": None}, "CUSTODY_KEK_SOURCE"),
        ({"kek_secret": None}, "CUSTODY_KEK_SECRET"),
        ({"kek_secret": SecretStr("changeme")}, "CUSTODY_KEK_SECRET"),
        ({"kek_secret": SecretStr(base64.b64encode(bytes(32)).decode())}, "CUSTODY_KEK_SECRET"),
        ({"kek_secret": SecretStr(base64.b64encode(b"short").decode())}, "CUSTODY_KEK_SECRET"),
        ({"kek_secret": SecretStr("!!!")}, "CUSTODY_KEK_SECRET"),
        ({"kek_source": "passphrase", "kek_passphrase": SecretStr("password")}, "CUSTODY_KEK_PASSPHRASE"),
        ({"database_url": None}, "CUSTODY_DATABASE_URL"),
        ({"signer_socket_mode": 0o666}, "CUSTODY_SIGNER_SOCKET_MODE"),
        ({"signer_socket_mode": 0o604}, "CUSTODY_SIGNER_SOCKET_MODE"),
        ({"admin_token": SecretStr("changeme")}, "CUSTODY_ADMIN_TOKEN"),
        ({"admin_token": SecretStr("")}, "CUSTODY_ADMIN_TOKEN"),
        ({"admin_token": SecretStr("  ")}, "CUSTODY_ADMIN_TOKEN"),
        ({"kek_secret": SecretStr("")}, "CUSTODY_KEK_SECRET"),
        ({"kek_secret": SecretStr(" \n\n")}, "CUSTODY_KEK_SECRET"),
        ({"kek_secret": SecretStr(f"v1:{GOOD_SECRET.get_secret_value()}\nv2:")}, "CUSTODY_KEK_SECRET"),
        ({"kek_source": "passphrase", "kek_passphrase": SecretStr("")}, "CUSTODY_KEK_PASSPHRASE"),
        (
            {"kek_source": "passphrase", "kek_passphrase": SecretStr("v1:a long passphrase here\nv2:short")},
            "CUSTODY_KEK_PASSPHRASE",
        ),
        ({"database_url": "postgresql://custody:@db/custody"}, "CUSTODY_DATABASE_URL"),
        ({"database_url": "postgresql://custody:changeme@db/custody"}, "CUSTODY_DATABASE_URL"),
        ({"database_url": "postgresql://custody:custody@db/custody"}, "CUSTODY_DATABASE_URL"),
        ({"database_url": "postgresql://postgres:postgres@db/custody"}, "CUSTODY_DATABASE_URL"),
        ({"redis_url": "redis://:@redis:6379/0"}, "CUSTODY_REDIS_URL"),
        ({"redis_url": "redis://:password@redis:6379/0"}, "CUSTODY_REDIS_URL"),
    ],
)
def test_production_refuses_an_insecure_setting_and_names_it(overrides: dict[str, object], setting: str) -> None:
    values: dict[str, object] = {
        "mode": "production",
        "kek_source": "secret",
        "kek_secret": GOOD_SECRET,
        "database_url": PG,
    } | overrides
    settings = Settings(**values)  # type: ignore[arg-type]
    problems = settings.production_problems()
    assert len(problems) == 1
    assert setting in problems[0]
    with pytest.raises(ConfigurationError, match=setting):
        settings.require_safe()


def test_production_accepts_sqlite_only_when_explicitly_allowed() -> None:
    settings = Settings(mode="production", kek_source="secret", kek_secret=GOOD_SECRET, allow_sqlite=True)
    assert settings.production_problems() == []


def test_production_has_no_default_kek_source() -> None:
    assert Settings(mode="production").effective_kek_source is None


def test_a_secret_file_is_checked_like_the_variable(tmp_path: Path) -> None:
    secret = tmp_path / "kek"
    secret.write_text("changeme\n")
    settings = Settings(mode="production", kek_source="secret", kek_secret_file=secret, database_url=PG)
    assert any("CUSTODY_KEK_SECRET" in p for p in settings.production_problems())


def test_a_strong_passphrase_and_url_passwords_are_accepted() -> None:
    settings = Settings(
        mode="production",
        kek_source="passphrase",
        kek_passphrase=SecretStr("v1:first long passphrase\nv2:second long passphrase"),
        database_url="postgresql://custody:4f1c9a0e7b2d@db/custody",
        redis_url="redis://:9d8e7f6a5b4c@redis:6379/0",
    )
    assert settings.production_problems() == []


def test_production_without_a_passphrase_starts_sealed_instead_of_refusing() -> None:
    settings = Settings(mode="production", kek_source="passphrase", database_url=PG)
    assert settings.production_problems() == []


def test_a_missing_secret_file_is_refused_naming_the_file_setting(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-secret"
    settings = Settings(mode="production", kek_source="secret", kek_secret_file=missing, database_url=PG)
    problems = settings.production_problems()
    assert len(problems) == 1
    assert f"CUSTODY_KEK_SECRET_FILE={missing} cannot be read" in problems[0]


def test_an_unreadable_secret_file_is_a_refusal_not_a_crash(tmp_path: Path) -> None:
    # A directory stands for any file the process cannot read (the tests may run as root).
    settings = Settings(mode="production", kek_source="secret", kek_secret_file=tmp_path, database_url=PG)
    with pytest.raises(ConfigurationError, match="CUSTODY_KEK_SECRET_FILE"):
        settings.require_safe("signer")


def test_an_unreadable_passphrase_file_is_refused(tmp_path: Path) -> None:
    settings = Settings(
        mode="production", kek_source="passphrase", kek_passphrase_file=tmp_path / "gone", database_url=PG
    )
    problems = settings.production_problems("signer")
    assert len(problems) == 1
    assert "CUSTODY_KEK_PASSPHRASE_FILE" in problems[0]


def test_an_empty_secret_file_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "kek"
    secret.write_text("\n")
    settings = Settings(mode="production", kek_source="secret", kek_secret_file=secret, database_url=PG)
    assert settings.production_problems() == ["CUSTODY_KEK_SECRET_FILE is empty"]


def test_the_secret_file_is_checked_when_both_are_set_as_the_signer_reads_the_file(tmp_path: Path) -> None:
    secret = tmp_path / "kek"
    secret.write_text("changeme\n")
    settings = Settings(
        mode="production", kek_source="secret", kek_secret=GOOD_SECRET, kek_secret_file=secret, database_url=PG
    )
    assert settings.production_problems() == ["CUSTODY_KEK_SECRET_FILE holds a default or all-zero key"]


def test_a_good_versioned_secret_file_is_accepted(tmp_path: Path) -> None:
    secret = tmp_path / "kek"
    other = base64.b64encode(bytes(range(1, 33))).decode()
    secret.write_text(f"v1:{GOOD_SECRET.get_secret_value()}\nv2:{other}\n")
    settings = Settings(mode="production", kek_source="secret", kek_secret_file=secret, database_url=PG)
    assert settings.production_problems() == []


def test_refusals_never_quote_the_secret(tmp_path: Path) -> None:
    weak = "v1:tooshort"
    settings = Settings(
        mode="production",
        kek_source="passphrase",
        kek_passphrase=SecretStr(weak),
        database_url="postgresql://custody:secret@db/custody",
    )
    problems = settings.production_problems()
    assert len(problems) == 2
    assert not any("tooshort" in p or ":secret@" in p for p in problems)
