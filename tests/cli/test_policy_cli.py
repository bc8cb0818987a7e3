"""`custody policy validate | explain | schema`, through typer's CliRunner on the sub-app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from custody.cli.policy import policy_app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"
X402 = EXAMPLES / "x402-api-agent.yaml"
INTENT = EXAMPLES / "intent-x402-payment.yaml"
SPEND = EXAMPLES / "spend-x402.yaml"
GRANT = EXAMPLES / "research-agent-grant.yaml"
NOW = "2026-06-01T12:00:00Z"
POLICIES = sorted(p for p in EXAMPLES.glob("*.yaml") if not p.name.startswith(("intent-", "spend-", "research-")))

runner = CliRunner()


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_every_sample_policy_is_valid(path: Path) -> None:
    result = runner.invoke(policy_app, ["validate", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["valid"] is True


def test_the_samples_are_all_checked() -> None:
    assert {p.name for p in POLICIES} >= {"x402-api-agent.yaml", "treasury-bot.yaml", "dex-trader.yaml"}


def test_validate_prints_a_summary() -> None:
    result = runner.invoke(policy_app, ["validate", str(X402)])
    assert result.exit_code == 0
    assert "valid (schema_version 1, 10 rules)" in result.output


def test_validate_names_each_invalid_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "schema_version: 1\nrules:\n  - {id: m, type: max_per_payment, max_usd: 1.5}\n"
        "  - {id: n, type: cap, max_usd: '1'}\n"
    )
    result = runner.invoke(policy_app, ["validate", str(bad)])
    assert result.exit_code == 1
    assert "error [invalid_policy]" in result.output
    assert "rules[0].max_usd" in result.output
    assert "rules[1]" in result.output
    as_json = runner.invoke(policy_app, ["validate", str(bad), "--json"])
    problem = json.loads(as_json.output)
    assert problem["code"] == "invalid_policy"
    assert [e["field"] for e in problem["errors"]] == ["rules[0].max_usd", "rules[1]"]


@pytest.mark.parametrize(
    ("name", "text", "code"),
    [
        ("dup.yaml", "schema_version: 1\nschema_version: 1\n", "malformed_document"),
        ("dup.json", '{"schema_version": 1, "schema_version": 1}', "malformed_document"),
        ("broken.json", "{", "malformed_document"),
        ("list.yaml", "- 1\n", "invalid_policy"),
    ],
)
def test_syntax_problems_and_duplicate_keys_are_errors(tmp_path: Path, name: str, text: str, code: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    result = runner.invoke(policy_app, ["validate", str(path), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output)["code"] == code


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(policy_app, ["validate", str(tmp_path / "nope.yaml"), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output)["code"] == "unreadable_file"


def test_schema_prints_the_json_schema() -> None:
    result = runner.invoke(policy_app, ["schema", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output)["title"] == "Agent Custody policy"
    grant = runner.invoke(policy_app, ["schema", "--grant"])
    assert json.loads(grant.output)["title"] == "Agent Custody grant"


def test_explain_shows_each_rule_verdict_and_the_decision() -> None:
    result = runner.invoke(policy_app, ["explain", str(X402), "--intent", str(INTENT), "--now", NOW])
    assert result.exit_code == 0, result.output
    assert "x402" in result.output
    assert "allow_transfers" in result.output
    assert "decision: needs_approval" not in result.output
    assert "decision: allow" in result.output


def test_explain_with_spend_and_grant_reports_the_grant_cap_and_when_it_resets() -> None:
    args = [
        "explain",
        str(X402),
        "--intent",
        str(INTENT),
        "--spend",
        str(SPEND),
        "--grant",
        str(GRANT),
        "--now",
        NOW,
        "--json",
    ]
    result = runner.invoke(policy_app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    decision = data["decision"]
    assert decision["outcome"] == "deny"
    (reason,) = decision["reasons"]
    assert (reason["code"], reason["rule_id"], reason["remaining"]) == ("cap_exceeded", "agent-daily", 0)
    assert reason["resets_at"] == "2026-06-01T22:00:00Z"  # midnight in Paris
    assert data["intent"]["kind"] == "payment_authorization"
    human = runner.invoke(policy_app, args[:-1])
    assert "resets at 2026-06-01T22:00:00+00:00" in human.output


def test_explain_needs_approval_shows_the_quorum(tmp_path: Path) -> None:
    intent = tmp_path / "intent.json"
    intent.write_text(
        json.dumps(
            {
                "kind": "token_transfer",
                "chain_id": 1,
                "wallet_id": "w",
                "asset": "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48",
                "amount": "20000000000",
                "payee": "0x1111111111111111111111111111111111111111",
            }
        )
    )
    spend = tmp_path / "spend.json"
    spend.write_text(
        json.dumps(
            [{"at": "2026-01-01T00:00:00Z", "debits": {}, "payee": "0x1111111111111111111111111111111111111111"}]
        )
    )
    args = [
        "explain",
        str(EXAMPLES / "treasury-bot.yaml"),
        "--intent",
        str(intent),
        "--spend",
        str(spend),
        "--now",
        "2026-06-03T14:00:00Z",
    ]
    result = runner.invoke(policy_app, args)
    assert result.exit_code == 0, result.output
    assert "decision: needs_approval" in result.output
    assert "approvals: 2 of treasury" in result.output


def test_explain_decodes_transactions_and_messages(tmp_path: Path) -> None:
    message = tmp_path / "message.json"
    message.write_text(json.dumps({"chain_id": 8453, "wallet_id": "w", "message": "Sign in"}))
    result = runner.invoke(policy_app, ["explain", str(X402), "--intent", str(message), "--json"])
    assert json.loads(result.output)["decision"]["reasons"][0]["code"] == "message_signing_not_allowed"
    transaction = tmp_path / "tx.json"
    transaction.write_text(
        json.dumps(
            {
                "chain_id": 8453,
                "wallet_id": "w",
                "transaction": {
                    "to": "0x1111111111111111111111111111111111111111",
                    "value": 1,
                    "gas": 21000,
                    "gasPrice": 1,
                    "chainId": 8453,
                    "nonce": 0,
                },
            }
        )
    )
    result = runner.invoke(policy_app, ["explain", str(X402), "--intent", str(transaction), "--json"])
    assert json.loads(result.output)["decision"]["outcome"] == "deny"


@pytest.mark.parametrize(
    ("content", "code", "field"),
    [
        ({"kind": "token_transfer", "chain_id": 1, "wallet_id": "w", "amount": 1.5}, "invalid_intent", "amount"),
        ({"chain_id": 1, "wallet_id": "w"}, "invalid_intent", "(document)"),
        ({"wallet_id": "w", "message": "x"}, "invalid_intent", "chain_id"),
        (
            {"chain_id": 1, "wallet_id": "w", "transaction": {"to": "0x12", "chainId": 1}},
            "malformed_transaction",
            "(request)",
        ),
        ({"chain_id": 1, "wallet_id": "", "message": "x"}, "malformed_message", "(request)"),
    ],
)
def test_explain_rejects_bad_intents_with_a_code(tmp_path: Path, content: object, code: str, field: str) -> None:
    intent = tmp_path / "intent.json"
    intent.write_text(json.dumps(content))
    result = runner.invoke(policy_app, ["explain", str(X402), "--intent", str(intent), "--json"])
    assert result.exit_code == 1
    problem = json.loads(result.output)
    assert problem["code"] == code
    assert problem["errors"][0]["field"] == field


def test_explain_rejects_bad_spend_and_bad_now(tmp_path: Path) -> None:
    spend = tmp_path / "spend.json"
    spend.write_text(json.dumps([{"at": "2026-01-01T00:00:00", "debits": {}}]))
    result = runner.invoke(policy_app, ["explain", str(X402), "--intent", str(INTENT), "--spend", str(spend)])
    assert result.exit_code == 1
    assert "error [invalid_spend]" in result.output
    for bad in ("yesterday", "2026-01-01T00:00:00"):
        result = runner.invoke(policy_app, ["explain", str(X402), "--intent", str(INTENT), "--now", bad])
        assert result.exit_code == 2
