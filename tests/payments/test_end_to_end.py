"""The whole product on an in-process EVM: an operator sets a policy, an agent pays with the SDK.

Daily cap 1 ETH, payee allowlist, approval above 0.5 ETH: two 0.4 ETH payments are mined, a
third is denied with what remains and when it resets; on a fresh day a 0.6 ETH payment waits,
is approved through the CLI, then signed and mined; an unknown payee is denied; freezing the
wallet stops the next payment.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from typer.testing import CliRunner
from web3 import EthereumTesterProvider, Web3

from custody.cli import app as cli
from custody.client import AsyncCustodyClient, Frozen, PolicyDenied
from custody.payments.ledger import ledger_buckets, ledger_entries
from custody.settings import Settings
from tests.payments.helpers import agent_key, native_policy, set_policy, wallet

ETH = 10**18


def _tx(w3: Web3, sender: str, to: str, value: int) -> dict[str, Any]:
    return {
        "type": 2,
        "chainId": w3.eth.chain_id,
        "nonce": w3.eth.get_transaction_count(sender),
        "to": to,
        "value": value,
        "gas": 21_000,
        "maxFeePerGas": w3.to_wei(2, "gwei"),
        "maxPriorityFeePerGas": w3.to_wei(1, "gwei"),
    }


def _mine(w3: Web3, raw: str) -> None:
    receipt = w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(bytes.fromhex(raw.removeprefix("0x"))))
    assert receipt["status"] == 1


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
async def test_policy_budget_approval_and_freeze_end_to_end(
    api: tuple[httpx.AsyncClient, str], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin, admin_token = api
    w3 = Web3(EthereumTesterProvider())
    bob, eve = w3.eth.accounts[1], w3.eth.accounts[2]
    payer = await wallet(admin)
    w3.eth.send_transaction({"from": w3.eth.accounts[0], "to": payer["address"], "value": 3 * ETH})
    await set_policy(admin, payer["id"], native_policy(w3.eth.chain_id, [bob], ETH, approval_above=ETH // 2))
    _, key = await agent_key(admin, [payer["id"]])
    app = admin._transport.app  # type: ignore[attr-defined]
    agent = AsyncCustodyClient("http://custody.test", key, transport=httpx.ASGITransport(app=app))
    try:
        start = w3.eth.get_balance(bob)
        for _ in range(2):
            signed = await agent.sign_transaction(payer["id"], _tx(w3, payer["address"], bob, 4 * ETH // 10))
            assert signed.signed
            _mine(w3, signed.result.raw_transaction)
        assert w3.eth.get_balance(bob) - start == 8 * ETH // 10

        with pytest.raises(PolicyDenied) as denied:
            await agent.sign_transaction(payer["id"], _tx(w3, payer["address"], bob, 4 * ETH // 10))
        cap = next(r for r in denied.value.reasons if r.code == "cap_exceeded")
        gas = 21_000 * w3.to_wei(2, "gwei")
        assert cap.remaining == ETH - 2 * (4 * ETH // 10 + gas)  # 0.2 ETH less the gas reserved
        assert cap.resets_at is not None
        limits = {limit.rule_id: limit for limit in await agent.limits(payer["id"])}
        assert limits["daily"].remaining == cap.remaining

        # A fresh day: yesterday's spend no longer counts against today's cap.
        ctx = app.state.ctx
        async with ctx.engine.begin() as conn:
            await conn.execute(update(ledger_entries).values(at=ledger_entries.c.at - timedelta(days=1)))
            await conn.execute(update(ledger_buckets).values(bucket=ledger_buckets.c.bucket - timedelta(days=1)))

        pending = await agent.sign_transaction(payer["id"], _tx(w3, payer["address"], bob, 6 * ETH // 10))
        assert pending.pending
        monkeypatch.setenv("CUSTODY_DATA_DIR", str(settings.data_dir))
        if settings.database_url:
            monkeypatch.setenv("CUSTODY_DATABASE_URL", settings.database_url)
        monkeypatch.setenv("CUSTODY_ADMIN_TOKEN", admin_token)  # a vote needs the voter's own credential
        approved = await asyncio.to_thread(
            CliRunner().invoke, cli, ["approvals", "approve", pending.payment_id, "--comment", "invoice 7", "--json"]
        )
        assert approved.exit_code == 0, approved.stderr
        payment = await agent.wait_for_approval(pending.payment_id, timeout=10)
        before = w3.eth.get_balance(bob)
        _mine(w3, payment.result.raw_transaction)
        assert w3.eth.get_balance(bob) - before == 6 * ETH // 10

        with pytest.raises(PolicyDenied) as unknown:
            await agent.sign_transaction(payer["id"], _tx(w3, payer["address"], eve, 1))
        assert "payee_not_allowlisted" in [r.code for r in unknown.value.reasons]

        frozen = await asyncio.to_thread(CliRunner().invoke, cli, ["freeze", "--wallet", payer["id"]])
        assert frozen.exit_code == 0, frozen.stderr
        with pytest.raises(Frozen):
            await agent.sign_transaction(payer["id"], _tx(w3, payer["address"], bob, 1))
    finally:
        await agent.close()
