"""Operator commands in local mode (the admin API in-process, as the local admin)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.cli.test_cli import run
from tests.conftest import SignerThread
from tests.payments.helpers import native_policy

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


def _json(*args: str) -> dict[str, object]:
    code, out, err = run(*args, "--json")
    assert code == 0, err
    return dict(json.loads(out))


def test_operator_sets_up_an_agent_policy_grant_freeze_and_webhook(
    local: dict[str, str], signer: SignerThread, tmp_path: Path
) -> None:
    wallet = _json("wallet", "create", "ops")
    wallet_id = str(wallet["id"])
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(native_policy(1, ["0x" + "b0" * 20], 10**18)))
    assert _json("policy", "set", wallet_id, str(policy_file))["version"] == 1
    assert _json("policy", "set", wallet_id, str(policy_file))["version"] == 2
    assert [v["version"] for v in _json("policy", "history", wallet_id)["versions"]] == [1, 2]  # type: ignore[attr-defined]
    assert _json("policy", "diff", wallet_id, "1", "2")["diff"] == ""
    assert _json("policy", "show", wallet_id)["version"] == 2

    agent = _json("agent", "create", "invoice-bot")
    issued = _json("agent", "issue-key", str(agent["id"]), "--wallet", wallet_id)
    assert str(issued["api_key"]).startswith("cak.")
    key_id = issued["key"]["id"]  # type: ignore[index]
    keys = _json("agent", "keys", str(agent["id"]))["keys"]
    assert [k["id"] for k in keys] == [key_id]  # type: ignore[attr-defined]
    assert "api_key" not in json.dumps(keys)
    grant_file = tmp_path / "grant.yaml"
    grant_file.write_text(yaml.safe_dump({"schema_version": 1, "agent_id": "x", "rules": []}))
    assert _json("grant", "set", str(agent["id"]), wallet_id, str(grant_file))["version"] == 1
    _json("agent", "revoke-key", str(agent["id"]), str(key_id))

    _json("freeze", "--wallet", wallet_id)
    assert [f["target"] for f in _json("freezes")["freezes"]] == [wallet_id]  # type: ignore[attr-defined]
    _json("unfreeze", "--wallet", wallet_id)
    assert _json("freezes")["freezes"] == []
    code, _, err = run("freeze", "--wallet", wallet_id, "--all")
    assert code == 2
    assert "exactly one of" in err

    hook = _json("webhook", "add", "https://ops.example/hook", "--event", "payment.signed")
    assert str(hook["signing_key"]).startswith("whsec_")
    assert len(_json("webhook", "list")["webhooks"]) == 1  # type: ignore[arg-type]
    _json("webhook", "remove", str(hook["webhook"]["id"]))  # type: ignore[index]
    assert _json("approvals", "list")["pending"] == []

    verified = _json("audit", "verify")
    assert verified["ok"] is True
    code, out, _ = run("audit", "export")
    kinds = [json.loads(line)["kind"] for line in out.splitlines() if line.strip()]
    for kind in (
        "wallet.created",
        "policy.set",
        "agent.created",
        "agent_key.issued",
        "grant.set",
        "agent_key.revoked",
        "freeze.set",
        "freeze.lifted",
    ):
        assert kind in kinds, kind


def test_an_unknown_local_operator_is_refused(local: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUSTODY_OPERATOR", "mallory")
    code, _, err = run("agent", "list")
    assert code == 1
    assert "error [unauthorized]: no active operator named 'mallory'" in err


def test_a_local_vote_needs_the_voters_own_token(local: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run("approvals", "approve", "pay_x")
    assert code == 1
    assert "votes need the approver's own credential" in err
    issued = _json("operator", "create", "ana", "--role", "approver")
    monkeypatch.setenv("CUSTODY_ADMIN_TOKEN", str(issued["token"]))
    code, _, err = run("approvals", "approve", "pay_x")
    assert code == 1
    assert "error [not_found]" in err  # authenticated as ana; the payment does not exist
    monkeypatch.setenv("CUSTODY_ADMIN_TOKEN", str(issued["token"]) + "x")
    code, _, err = run("approvals", "approve", "pay_x")
    assert "error [unauthorized]" in err
