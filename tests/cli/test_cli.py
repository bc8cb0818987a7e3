"""The custody command: local mode on the data directory, remote mode over the admin API."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner
from web3 import Web3

from custody.cli import app
from custody.settings import Settings
from tests.conftest import LiveServer, SignerThread

KNOWN_KEY = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
KNOWN_ADDRESS = "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"


def run(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), input=stdin)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_init_creates_private_data_and_prints_the_admin_token_once(settings: Settings, env: dict[str, str]) -> None:
    code, out, _ = run("init", "--json")
    assert code == 0
    first = json.loads(out)
    assert first["admin_token"].startswith("cop.")
    assert stat.S_IMODE(settings.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((settings.data_dir / "kek" / "v1.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((settings.data_dir / "custody.db").stat().st_mode) == 0o600
    code, out, _ = run("init", "--json")
    assert code == 0
    assert json.loads(out) == {"data_dir": str(settings.data_dir), "admin_token": None, "initialized": False}


def test_wallet_create_list_and_show_in_local_mode(local: dict[str, str], signer: SignerThread) -> None:
    code, out, _ = run("wallet", "create", "ops-bot", "--json")
    assert code == 0
    wallet = json.loads(out)
    assert Web3.is_checksum_address(wallet["address"])
    code, out, _ = run("wallet", "list", "--json")
    assert code == 0
    assert [w["address"] for w in json.loads(out)["wallets"]] == [wallet["address"]]
    code, out, _ = run("wallet", "show", wallet["id"], "--json")
    assert json.loads(out) == wallet
    code, out, _ = run("wallet", "list")
    assert wallet["address"] in out


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_wallet_import_reads_the_key_from_a_file_and_never_prints_it(
    env: dict[str, str], signer: SignerThread, tmp_path: Path
) -> None:
    key_file = tmp_path / "key.hex"
    key_file.write_text("0x" + KNOWN_KEY + "\n")
    code, out, err = run("wallet", "import", "imported", "--key-file", str(key_file), "--json")
    assert code == 0, err
    assert json.loads(out)["address"] == KNOWN_ADDRESS
    assert KNOWN_KEY not in out + err


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_wallet_import_reads_the_key_from_stdin(env: dict[str, str], signer: SignerThread) -> None:
    code, out, err = run("wallet", "import", "from-stdin", "--json", stdin=KNOWN_KEY + "\n")
    assert code == 0, err
    assert json.loads(out)["address"] == KNOWN_ADDRESS
    assert KNOWN_KEY not in out + err


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_wallet_import_takes_no_key_argument(local: dict[str, str], signer: SignerThread) -> None:
    code, out, err = run("wallet", "import", "named", KNOWN_KEY)
    assert code == 2
    assert "unexpected extra argument" in (out + err).lower()
    code, out, _ = run("wallet", "list", "--json")
    assert json.loads(out)["wallets"] == []


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize("bad", ["", "xyz", "00" * 31, "00" * 32, "ff" * 32])
def test_wallet_import_refuses_malformed_keys_without_echoing_them(
    env: dict[str, str], signer: SignerThread, bad: str
) -> None:
    code, out, err = run("wallet", "import", "bad", stdin=bad + "\n")
    assert code == 1
    assert "error [invalid_request]" in err
    if bad:
        assert bad not in out + err


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_wallet_create_without_a_signer_fails_clearly(local: dict[str, str]) -> None:
    code, _, err = run("wallet", "create", "orphan")
    assert code == 1
    assert "error [signer_unavailable]" in err
    code, out, _ = run("wallet", "list", "--json")
    assert json.loads(out)["wallets"] == []


def test_rotate_kek_with_json_prints_only_json(local: dict[str, str], signer: SignerThread) -> None:
    for name in ("a", "b", "c"):
        assert run("wallet", "create", name)[0] == 0
    code, out, err = run("keys", "rotate-kek", "--json")
    assert code == 0
    assert json.loads(out) == {"previous_kek_version": 1, "kek_version": 2, "rewrapped": 3, "skipped": 0}
    assert err == ""


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_rotate_kek_shows_progress_when_asked(local: dict[str, str], signer: SignerThread) -> None:
    assert run("wallet", "create", "a")[0] == 0
    code, out, err = run("keys", "rotate-kek", "--progress")
    assert code == 0
    assert "rewrapping data keys: 1/1" in err
    assert "1 -> 2" in out


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_local_only_operations_refuse_a_remote_url(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUSTODY_URL", "http://127.0.0.1:9")
    for args in (("keys", "rotate-kek"), ("wallet", "import", "x")):
        code, _, err = run(*args, stdin=KNOWN_KEY)
        assert code == 1
        assert "signer's host" in err


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_remote_mode_uses_the_admin_api_with_a_token(
    env: dict[str, str], live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = json.loads(run("init", "--json")[1])["admin_token"]
    monkeypatch.setenv("CUSTODY_URL", live_server.url)
    monkeypatch.setenv("CUSTODY_ADMIN_TOKEN", token)
    code, out, err = run("wallet", "create", "remote-one", "--json")
    assert code == 0, err
    address = json.loads(out)["address"]
    code, out, _ = run("wallet", "list", "--json")
    assert [w["address"] for w in json.loads(out)["wallets"]] == [address]
    monkeypatch.setenv("CUSTODY_ADMIN_TOKEN", token + "x")
    code, _, err = run("wallet", "list", "--json")
    assert code == 1
    assert json.loads(err)["code"] == "unauthorized"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_remote_mode_with_no_service_is_a_clear_error(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUSTODY_URL", "http://127.0.0.1:9")
    code, _, err = run("wallet", "list")
    assert code == 1
    assert "error [dependency_unavailable]: cannot reach the service" in err


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_signer_status_reports_unsealed(env: dict[str, str], signer: SignerThread) -> None:
    code, out, _ = run("signer", "status", "--json")
    assert code == 0
    status = json.loads(out)
    assert status["sealed"] is False
    assert status["kek_source"] == "file"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_production_mode_refuses_insecure_defaults_naming_each_setting(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUSTODY_MODE", "production")
    monkeypatch.setenv("CUSTODY_SIGNER_SOCKET_MODE", "0666")
    expected = {
        ("serve",): {"CUSTODY_KEK_SOURCE", "CUSTODY_DATABASE_URL", "CUSTODY_SIGNER_SOCKET_MODE"},
        ("signer", "run"): {"CUSTODY_KEK_SOURCE", "CUSTODY_SIGNER_SOCKET_MODE"},
        ("serve", "--no-signer"): {"CUSTODY_DATABASE_URL"},
    }
    every = {"CUSTODY_KEK_SOURCE", "CUSTODY_DATABASE_URL", "CUSTODY_SIGNER_SOCKET_MODE"}
    for command, named in expected.items():
        code, _, err = run(*command)
        assert code == 2
        assert {setting for setting in every if setting in err} == named, command


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_production_api_starts_its_checks_without_any_kek_setting(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUSTODY_MODE", "production")
    monkeypatch.setenv("CUSTODY_ALLOW_SQLITE", "true")
    settings = Settings()
    assert settings.production_problems("api") == []
    assert any("CUSTODY_KEK_SOURCE" in p for p in settings.production_problems("signer"))


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_an_unreachable_database_is_a_clear_error_not_a_traceback(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CUSTODY_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/none")
    code, _, err = run("wallet", "list")
    assert code == 1
    assert err.startswith("error [database_unavailable]")
    assert "Traceback" not in err
    code, _, err = run("wallet", "import", "x", "--key-file", str(tmp_path / "missing"))
    assert code == 1
    assert "error [invalid_request]: cannot read the key file" in err
