"""Fixtures for CLI tests: the CLI reads its settings from the environment."""

from __future__ import annotations

import pytest

from custody.settings import Settings
from tests.cli.test_cli import run


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {"CUSTODY_DATA_DIR": str(settings.data_dir), "CUSTODY_KEK_SCRYPT_N": "1024"}
    if settings.database_url:
        values["CUSTODY_DATABASE_URL"] = settings.database_url
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def local(env: dict[str, str]) -> dict[str, str]:
    """An initialized data directory: the local CLI acts as its first admin."""
    assert run("init", "--json")[0] == 0
    return env
