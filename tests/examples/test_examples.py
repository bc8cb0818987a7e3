"""The examples run as examples/README.md documents them, offline.

Each Python example runs as a subprocess twice: self-contained (its default: a throwaway service,
a dev chain, a paid API, all started by the example) and against a service and chain this test
runs (``--url``, the key in ``CUSTODY_API_KEY_FILE``). The MCP configuration is parsed, checked
for inline secrets, then started exactly as a desktop agent would start it (with this test's
values in place of the placeholders) and spoken to over stdio.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from typer.testing import CliRunner

from custody.cli import app as cli
from custody.devchain.paywall import x402_paywall
from custody.devchain.sandbox import serve_app
from tests.integrations.service_fixtures import Agent, Custody, running_custody

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
MCP_CONFIG = EXAMPLES / "mcp" / "desktop-agent.json"
TX = r"0x[0-9a-f]{64}"


@pytest.fixture(scope="module")
def custody() -> Iterator[Custody]:
    with running_custody() as service:
        yield service


def _example(tmp: Path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python examples/python/SCRIPT ARGS`` from the repository root, in a shell with no CUSTODY_* variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODY_")}
    return subprocess.run(
        [sys.executable, f"examples/python/{script}", *args],
        cwd=REPO,
        env=clean | {"TMPDIR": str(tmp)} | env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _key_file(tmp: Path, agent: Agent) -> Path:
    path = tmp / "agent.key"
    path.touch(mode=0o600)
    path.write_text(agent.api_key + "\n")
    return path


def _lines(text: str, *patterns: str) -> None:
    for pattern in patterns:
        assert re.search(pattern, text, re.MULTILINE), f"{pattern!r} not in:\n{text}"


# ---------------------------------------------------------------------------- self-contained (the default)


def test_web3_example_self_contained_sends_eth_and_a_token_then_shows_a_denial(short_dir: Path) -> None:
    done = _example(short_dir, "web3_transfer.py")
    assert done.returncode == 0, done.stdout + done.stderr
    _lines(
        done.stdout,
        r"^Self-contained: a throwaway custody service and a dev chain",
        rf"^native transfer of 1000000000000000 wei: mined in block \d+, tx {TX}$",
        rf"^ERC-20 transfer of 250000 base units: mined in block \d+, tx {TX}$",
        r"^payee's token balance: 250000 base units$",
        r"^denied, nothing was signed or sent:$",
        r"^  payee_not_allowlisted \(rule payees\): 0x[0-9a-f]{40} is not on the payee allowlist$",
    )
    assert list(short_dir.iterdir()) == []  # the throwaway service's directory is gone


def test_x402_example_self_contained_buys_twice_then_the_daily_cap_denies_the_third(short_dir: Path) -> None:
    done = _example(short_dir, "x402_agent.py")
    assert done.returncode == 0, done.stdout + done.stderr
    _lines(
        done.stdout,
        r"^paid API: GET http://127\.0\.0\.1:\d+/report costs 0\.01 test USDC$",
        rf'^purchase 1: 200 {{"report":"ok"}}; settled in tx {TX}$',
        rf'^purchase 2: 200 {{"report":"ok"}}; settled in tx {TX}$',
        r"^purchase 3: denied by policy, nothing was signed:$",
        r"^  cap_exceeded \(rule daily\): 20000 \+ 10000 would exceed 25000 .*; remaining 5000, resets at \d{4}-",
        r"^seller's balance: 20000 base units$",
    )
    assert list(short_dir.iterdir()) == []


# ---------------------------------------------------------------------------- against your own service


def test_web3_example_pays_through_a_given_service_and_node(custody: Custody, short_dir: Path) -> None:
    bob = str(Account.create().address)
    agent = custody.new_agent(custody.policy([bob]))
    done = _example(
        short_dir,
        "web3_transfer.py",
        *("--url", custody.url, "--wallet", agent.wallet["id"], "--rpc", custody.chain.serve_rpc()),
        *("--to", bob, "--wei", "12345", "--token", custody.usdc.address, "--token-amount", "678"),
        CUSTODY_API_KEY_FILE=str(_key_file(short_dir, agent)),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert custody.chain.w3.eth.get_balance(bob) == 12345
    assert custody.usdc.balance_of(bob) == 678
    _lines(done.stdout, r"^native transfer of 12345 wei: mined", r"^payee's token balance: 678 base units$")
    assert agent.api_key not in done.stdout + done.stderr


def test_x402_example_pays_a_given_paid_api_through_a_given_service(custody: Custody, short_dir: Path) -> None:
    seller = str(Account.create().address)
    agent = custody.new_agent(custody.policy([seller]))
    paywall = x402_paywall(custody.chain, custody.usdc, pay_to=seller, price=10_000, path="/data")
    with serve_app(paywall.app) as api:
        done = _example(
            short_dir,
            "x402_agent.py",
            *("--url", custody.url, "--wallet", agent.wallet["id"], "--resource", f"{api}/data"),
            *("--asset", f"{custody.chain.network}={custody.usdc.address}"),
            CUSTODY_API_KEY=agent.api_key,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    _lines(done.stdout, rf'^purchase 1: 200 {{"paid":true}}; settled in tx {TX}$')
    assert len(paywall.settled) == 1
    assert custody.usdc.balance_of(seller) == 10_000
    assert "purchase 2" not in done.stdout


# ---------------------------------------------------------------------------- the MCP configuration


def _server_entry() -> dict[str, Any]:
    config = json.loads(MCP_CONFIG.read_text())
    assert list(config["mcpServers"]) == ["agent-custody"]
    return dict(config["mcpServers"]["agent-custody"])


def test_the_mcp_configuration_names_our_command_and_keeps_the_key_in_a_file() -> None:
    text = MCP_CONFIG.read_text()
    entry = _server_entry()
    assert Path(entry["command"]).name == "custody"
    assert entry["args"][0] == "mcp"
    assert set(entry["env"]) == {"CUSTODY_URL", "CUSTODY_API_KEY_FILE"}  # never CUSTODY_API_KEY inline
    assert "cak." not in text
    assert not re.search(r"[0-9a-fA-F]{64}", text)
    options = [arg for arg in entry["args"] if arg.startswith("--")]
    assert options
    shown = CliRunner().invoke(cli, ["mcp", "--help"], terminal_width=200)
    assert shown.exit_code == 0
    for option in options:
        assert option in shown.output


def _filled_in(entry: dict[str, Any], custody: Custody, agent: Agent, key_file: Path) -> StdioServerParameters:
    """The configuration with this machine's values where a user puts theirs."""
    command = Path(sys.executable).parent / "custody"
    assert command.is_file()
    args = list(entry["args"])
    args[args.index("--wallet") + 1] = agent.wallet["name"]
    args[args.index("--rpc") + 1] = f"{custody.chain.chain_id}={custody.chain.serve_rpc()}"
    env = {"CUSTODY_URL": custody.url, "CUSTODY_API_KEY_FILE": str(key_file)}
    assert set(env) == set(entry["env"])
    return StdioServerParameters(command=str(command), args=args, env=env, cwd=str(REPO))


async def test_the_mcp_configuration_starts_a_server_a_desktop_agent_can_pay_with(
    custody: Custody, short_dir: Path
) -> None:
    bob = str(Account.create().address)
    agent = custody.new_agent(custody.policy([bob]))
    parameters = _filled_in(_server_entry(), custody, agent, _key_file(short_dir, agent))
    with tempfile.TemporaryFile("w+") as stderr:
        async with Client(stdio_client(parameters, errlog=stderr)) as client:
            tools = {tool.name for tool in (await client.list_tools()).tools}
            assert tools == {"wallets", "limits", "pay", "payment_status", "sign_x402_payment"}
            wallets = await client.call_tool("wallets", {})
            assert not wallets.is_error
            assert wallets.structured_content is not None
            assert wallets.structured_content["wallets"][0]["default"] is True
            paid = await client.call_tool("pay", {"to": bob, "amount": "4321", "chain_id": custody.chain.chain_id})
            assert not paid.is_error
            assert paid.structured_content is not None
            assert paid.structured_content["status"] == "confirmed"
        stderr.seek(0)
        logged = stderr.read()
    assert custody.chain.w3.eth.get_balance(bob) == 4321
    assert agent.api_key not in logged
