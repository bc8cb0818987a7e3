"""Set-up steps through the real admin API (a wallet, an agent with a key, a policy), and one row written directly."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from custody.payments.ledger import payments


async def wallet(client: httpx.AsyncClient, name: str = "payer") -> dict[str, Any]:
    response = await client.post("/admin/v1/wallets", json={"name": name})
    assert response.status_code == 201, response.text
    return dict(response.json())


async def agent_key(client: httpx.AsyncClient, wallet_ids: list[str], name: str = "bot") -> tuple[str, str]:
    agent = await client.post("/admin/v1/agents", json={"name": name})
    assert agent.status_code == 201, agent.text
    issued = await client.post(f"/admin/v1/agents/{agent.json()['id']}/keys", json={"wallet_ids": wallet_ids})
    assert issued.status_code == 201, issued.text
    return agent.json()["id"], issued.json()["api_key"]


async def set_policy(client: httpx.AsyncClient, wallet_id: str, document: dict[str, Any]) -> int:
    response = await client.put(f"/admin/v1/wallets/{wallet_id}/policy", json={"document": document})
    assert response.status_code == 200, response.text
    return int(response.json()["version"])


def native_policy(chain_id: int, payees: list[str], cap_wei: int, approval_above: int | None = None) -> dict[str, Any]:
    rules: list[dict[str, Any]] = [
        {"id": "send", "type": "allow_transfers", "kinds": ["native_transfer"]},
        {
            "id": "payees",
            "type": "payee_allowlist",
            "payees": [{"address": p, "label": f"p{i}"} for i, p in enumerate(payees)],
        },
        # A rolling 24 hours, not a calendar day: a test that runs across midnight (UTC) must not
        # see a fresh budget half-way (calendar periods: tests/battery/test_ledger_model.py).
        {"id": "daily", "type": "cap", "asset": "eth", "max": str(cap_wei), "rolling": "24h"},
    ]
    if approval_above is not None:
        rules.append(
            {
                "id": "big",
                "type": "require_approval",
                "asset": "eth",
                "above": str(approval_above),
                "group": "ops",
                "m": 1,
            }
        )
    return {
        "schema_version": 1,
        "id": "test",
        "assets": {"eth": {"chain_id": chain_id, "address": "native", "decimals": 18}},
        "approver_groups": {"ops": {"members": ["admin"]}},
        "rules": rules,
    }


def transfer(chain_id: int, to: str, value: int, nonce: int = 0) -> dict[str, Any]:
    return {
        "type": 2,
        "chainId": chain_id,
        "nonce": nonce,
        "to": to,
        "value": str(value),
        "gas": 21_000,
        "maxFeePerGas": 2 * 10**9,
        "maxPriorityFeePerGas": 10**9,
    }


GAS = 21_000 * 2 * 10**9


async def signed_payment_row(
    conn: AsyncConnection, payment_id: str, wallet_id: str, agent_id: str, at: datetime
) -> None:
    """A signed payment's row written straight into its table: something for ledger entries to belong to."""
    await conn.execute(
        insert(payments).values(
            id=payment_id,
            wallet_id=wallet_id,
            agent_id=agent_id,
            method="transaction",
            request="{}",
            status="signed",
            decision="{}",
            created_at=at,
            updated_at=at,
        )
    )
