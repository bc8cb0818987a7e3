"""The MCP server: in process with ``mcp.Client``, and ``custody mcp`` over real stdio, against the real service."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from mcp import Client, StdioServerParameters
from mcp.types import CallToolResult, TextContent

from custody.integrations.mcp import ConfigError, build_server, config_from
from tests.integrations.service_fixtures import ETH, USDC, Custody, running_custody

TOOLS = {"wallets", "limits", "pay", "payment_status", "sign_x402_payment"}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def custody() -> Iterator[Custody]:
    with running_custody() as service:
        yield service


def _payee() -> str:
    return str(Account.create().address)


def _text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def _data(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, _text(result)
    assert isinstance(result.structured_content, dict)
    return result.structured_content


def _assert_nothing_approves(tools: list[Any]) -> None:
    """No tool, and no parameter of any tool, approves, rejects or votes on anything."""
    for tool in tools:
        words = [tool.name, *tool.input_schema.get("properties", {})]
        assert not [w for w in words if any(verb in w.lower() for verb in ("approv", "reject", "vote"))], tool.name


async def test_in_process_server_lists_the_tools_and_calls_each_against_the_service(custody: Custody) -> None:
    bob = _payee()
    agent = custody.new_agent(custody.policy([bob], approval_above_eth=ETH // 2), x402_spend_controls=False)
    elicited: list[Any] = []

    async def elicitation(context: Any, params: Any) -> Any:  # the agent's own client: must never be asked
        elicited.append(params)
        raise AssertionError("the server asked the agent's client to decide something")

    async with Client(build_server(agent.tools), elicitation_callback=elicitation) as client:
        listed = await client.list_tools()
        assert {tool.name for tool in listed.tools} == TOOLS
        _assert_nothing_approves(listed.tools)
        pay_schema = next(t for t in listed.tools if t.name == "pay").input_schema
        assert set(pay_schema["required"]) == {"to", "amount", "chain_id"}
        assert {"type": "integer"} in pay_schema["properties"]["amount"]["anyOf"]

        wallets = _data(await client.call_tool("wallets", {}))
        assert [w["address"] for w in wallets["wallets"]] == [agent.address]
        assert wallets["chain_ids"] == [custody.chain.chain_id]

        chain_id = custody.chain.chain_id
        paid = _data(await client.call_tool("pay", {"to": bob, "amount": "1000000", "chain_id": chain_id}))
        assert paid["status"] == "confirmed"
        assert custody.chain.w3.eth.get_balance(bob) == 1_000_000

        token = {"to": bob, "amount": 2 * USDC, "chain_id": chain_id, "token": custody.usdc.address}
        assert _data(await client.call_tool("pay", token))["status"] == "confirmed"
        assert custody.usdc.balance_of(bob) == 2 * USDC

        limits = _data(await client.call_tool("limits", {"wallet": agent.wallet["name"]}))
        assert {limit["rule_id"] for limit in limits["limits"]} == {"daily-eth", "daily-usdc"}

        held = _data(await client.call_tool("pay", {"to": bob, "amount": str(6 * ETH // 10), "chain_id": chain_id}))
        assert held["status"] == "pending_approval"
        status = _data(await client.call_tool("payment_status", {"payment_id": held["payment_id"]}))
        assert status["status"] == "pending_approval"

        required = {
            "x402Version": 2,
            "resource": {"url": "http://api.test/data"},
            "accepts": [
                {
                    "scheme": "exact",
                    "network": custody.chain.network,
                    "asset": custody.usdc.address,
                    "amount": "5000",
                    "payTo": bob,
                    "maxTimeoutSeconds": 120,
                    "extra": {"name": custody.usdc.name, "version": custody.usdc.version},
                }
            ],
        }
        x402 = _data(await client.call_tool("sign_x402_payment", {"payment_required": json.dumps(required)}))
        assert x402["status"] == "signed"
        assert x402["header_name"] == "PAYMENT-SIGNATURE"

        denied = await client.call_tool("pay", {"to": _payee(), "amount": 1, "chain_id": chain_id})
        assert denied.is_error
        assert "payee_not_allowlisted (rule payees)" in _text(denied)

        bad = await client.call_tool("pay", {"to": bob, "amount": 0.5, "chain_id": chain_id})
        assert bad.is_error
        assert "not a float" in _text(bad)
    assert elicited == []


def test_configuration_needs_the_api_key_and_never_repeats_an_rpc_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        config_from({})
    assert "CUSTODY_API_KEY" in str(missing.value)
    with pytest.raises(ConfigError) as bad:
        config_from({"CUSTODY_API_KEY": "k"}, rpc=["https://node.example/v3/secret-project-key"])
    assert "secret-project-key" not in str(bad.value)
    key_file = tmp_path / "key"
    key_file.write_text("cak.from-a-file\n")
    config = config_from(
        {"CUSTODY_API_KEY_FILE": str(key_file), "CUSTODY_RPC_URLS": "1=https://a.example, 8453=https://b.example"},
        rpc=["8453=https://c.example"],
    )
    assert config.api_key == "cak.from-a-file"
    assert config.url == "http://127.0.0.1:8700"
    assert config.rpc_urls == {1: "https://a.example", 8453: "https://c.example"}
    assert "cak.from-a-file" not in repr(config)
    assert "a.example" not in repr(config)


async def test_custody_mcp_over_stdio_lists_limits_and_pays_through_a_json_rpc_node(custody: Custody) -> None:
    bob = _payee()
    agent = custody.new_agent(custody.policy([bob]))
    rpc_url = custody.chain.serve_rpc()
    env = {
        "CUSTODY_URL": custody.url,
        "CUSTODY_API_KEY": agent.api_key,
        "PYTHONPATH": str(REPO),
    }
    parameters = StdioServerParameters(
        command=sys.executable,
        args=["-m", "custody", "mcp", "--rpc", f"{custody.chain.chain_id}={rpc_url}"],
        env=env,
        cwd=str(REPO),
    )
    with tempfile.TemporaryFile("w+") as stderr:
        async with Client(parameters_with_errlog(parameters, stderr)) as client:
            listed = await client.list_tools()
            assert {tool.name for tool in listed.tools} == TOOLS
            _assert_nothing_approves(listed.tools)
            wallets = _data(await client.call_tool("wallets", {}))
            assert wallets["wallets"][0]["address"] == agent.address
            limits = _data(await client.call_tool("limits", {}))
            assert {limit["rule_id"] for limit in limits["limits"]} == {"daily-eth", "daily-usdc"}
            paid = _data(
                await client.call_tool("pay", {"to": bob, "amount": "12345", "chain_id": custody.chain.chain_id})
            )
            assert paid["status"] == "confirmed", paid
            denied = await client.call_tool("pay", {"to": bob, "amount": str(5 * ETH), "chain_id": 1})
            assert denied.is_error
            assert "No connection to chain 1" in _text(denied)
        stderr.seek(0)
        logged = stderr.read()
    assert custody.chain.w3.eth.get_balance(bob) == 12345
    assert agent.api_key not in logged
    assert rpc_url not in logged


def parameters_with_errlog(parameters: StdioServerParameters, errlog: Any) -> Any:
    """``mcp.Client`` spawns stdio servers with stderr to ours; this transport sends it to ``errlog``."""
    from mcp.client.stdio import stdio_client

    return stdio_client(parameters, errlog=errlog)


def test_the_cli_says_what_is_missing_an_api_key_or_the_mcp_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from custody.cli import app

    for name in [n for n in os.environ if n.startswith("CUSTODY_")]:
        monkeypatch.delenv(name)
    no_key = CliRunner().invoke(app, ["mcp"])
    assert no_key.exit_code == 2
    assert "error [invalid_configuration]: set CUSTODY_API_KEY" in no_key.stderr
    assert no_key.stdout == ""

    monkeypatch.setitem(sys.modules, "custody.integrations.mcp", None)  # as if the extra were not installed
    monkeypatch.setenv("CUSTODY_API_KEY", "cak.x.y")
    no_extra = CliRunner().invoke(app, ["mcp"])
    assert no_extra.exit_code == 2
    assert "needs the mcp extra" in no_extra.stderr
    assert 'pip install "agent-custody[mcp]"' in no_extra.stderr
