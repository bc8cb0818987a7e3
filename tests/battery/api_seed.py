"""A small populated service for the API battery, built through the real admin and agent APIs.

Three wallets with policies, an agent on each of two, an agent key that is revoked and one that
has expired, a viewer, an approver, a revoked operator, signed and pending payments, and spare
keys, operators and webhooks that tests may delete.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine
from web3 import Web3

from custody.payments.agents import agent_keys
from tests.payments.helpers import native_policy, transfer

CHAIN_ID = 31337
PAYEE = Web3.to_checksum_address("0x" + "b0" * 20)
APPROVAL_ABOVE = 10**15  # wei: a payment above this waits for one approval from the "ops" group


def policy() -> dict[str, Any]:
    """Transfers to PAYEE (a large one needs approval), text messages, and typed data of type Mail."""
    document = native_policy(CHAIN_ID, [PAYEE], 10**24, APPROVAL_ABOVE)
    document["approver_groups"] = {"ops": {"members": ["admin", "approver"]}}
    document["rules"] += [
        {"id": "messages", "type": "allow_dangerous", "operations": ["message_signing"]},
        {"id": "mail", "type": "allow_typed_data", "primary_type": "Mail"},
    ]
    return document


def grant(agent_id: str) -> dict[str, Any]:
    """A grant that narrows :func:`policy` for one agent."""
    return {
        "schema_version": 1,
        "id": "battery-grant",
        "agent_id": agent_id,
        "rules": [{"id": "agent-daily", "type": "cap", "asset": "eth", "max": str(10**20), "period": "day"}],
    }


def small_payment(nonce: int = 0) -> dict[str, Any]:
    return {"transaction": transfer(CHAIN_ID, PAYEE, 1000, nonce), "purpose": "battery"}


def large_payment(nonce: int = 0) -> dict[str, Any]:
    return {"transaction": transfer(CHAIN_ID, PAYEE, APPROVAL_ABOVE * 10, nonce), "purpose": "battery"}


def typed_mail() -> dict[str, Any]:
    return {
        "typed_data": {
            "types": {
                "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "chainId", "type": "uint256"}],
                "Mail": [{"name": "contents", "type": "string"}],
            },
            "primaryType": "Mail",
            "domain": {"name": "battery", "chainId": CHAIN_ID},
            "message": {"contents": "hello"},
        }
    }


_SECRET = re.compile(r"\b(?:cak|cop)\.[A-Za-z0-9_]+\.[A-Za-z0-9_-]+|\bwhsec_[A-Za-z0-9_-]+")


class Secret(str):
    """A credential whose repr hides it: pytest prints the arguments of every frame of a failure."""

    def __repr__(self) -> str:
        return "'<secret>'"


def redact(text: str) -> str:
    """``text`` without credentials (API keys, operator tokens, webhook keys), for failure messages."""
    return _SECRET.sub("[redacted]", text)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass(frozen=True)
class World:
    """Ids and credentials of the seeded service (credentials are left out of its repr)."""

    admin: str = field(repr=False)
    approver: str = field(repr=False)
    viewer: str = field(repr=False)
    revoked_operator: str = field(repr=False)
    admin_id: str
    approver_id: str
    viewer_id: str
    spare_operator_ids: tuple[str, ...]
    wallet_a: str
    wallet_b: str
    spare_wallet: str
    agent_a: str
    agent_b: str
    key_a: str = field(repr=False)
    key_b: str = field(repr=False)
    key_a_id: str
    key_b_id: str
    revoked_key: str = field(repr=False)
    expired_key: str = field(repr=False)
    spare_key_ids: tuple[str, ...]
    signed_a: str
    pending_a: str
    signed_b: str
    webhook_ids: tuple[str, ...]


async def _json(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, redact(response.text)
    return dict(response.json()) if response.content else {}


async def _wallet(client: httpx.AsyncClient, name: str) -> str:
    wallet = await _json(await client.post("/admin/v1/wallets", json={"name": name}), 201)
    await _json(await client.put(f"/admin/v1/wallets/{wallet['id']}/policy", json={"document": policy()}), 200)
    return str(wallet["id"])


async def _agent(client: httpx.AsyncClient, name: str) -> str:
    return str((await _json(await client.post("/admin/v1/agents", json={"name": name}), 201))["id"])


async def _key(client: httpx.AsyncClient, agent_id: str, wallet_id: str) -> tuple[str, str]:
    body = {"wallet_ids": [wallet_id], "expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}
    issued = await _json(await client.post(f"/admin/v1/agents/{agent_id}/keys", json=body), 201)
    return str(issued["key"]["id"]), str(issued["api_key"])


async def _operator(client: httpx.AsyncClient, name: str, role: str) -> tuple[str, str]:
    issued = await _json(await client.post("/admin/v1/operators", json={"name": name, "role": role}), 201)
    return str(issued["operator"]["id"]), str(issued["token"])


async def _pay(client: httpx.AsyncClient, token: str, wallet_id: str, body: dict[str, Any], status: int) -> str:
    response = await client.post(f"/v1/wallets/{wallet_id}/sign/transaction", json=body, headers=bearer(token))
    return str((await _json(response, status))["payment_id"])


async def pending_payment(client: httpx.AsyncClient, world: World, nonce: int = 0) -> str:
    """A new payment of agent A that waits for approval."""
    return await _pay(client, world.key_a, world.wallet_a, large_payment(nonce), 202)


async def seed(client: httpx.AsyncClient, admin_token: str, engine: AsyncEngine, spares: int = 3) -> World:
    """Populate an empty service through its API; ``client`` sends requests as the admin by default."""
    client.headers.update(bearer(admin_token))
    me = await _json(await client.get("/admin/v1/operators"), 200)
    admin_id = str(me["operators"][0]["id"])
    approver_id, approver = await _operator(client, "approver", "approver")
    viewer_id, viewer = await _operator(client, "viewer", "viewer")
    revoked_operator_id, revoked_operator = await _operator(client, "gone", "viewer")
    await _json(await client.delete(f"/admin/v1/operators/{revoked_operator_id}"), 204)
    spare_operators = [(await _operator(client, f"spare-{i}", "viewer"))[0] for i in range(spares)]

    wallet_a, wallet_b = await _wallet(client, "wallet-a"), await _wallet(client, "wallet-b")
    spare_wallet = await _wallet(client, "wallet-spare")
    agent_a, agent_b = await _agent(client, "agent-a"), await _agent(client, "agent-b")
    key_a_id, key_a = await _key(client, agent_a, wallet_a)
    key_b_id, key_b = await _key(client, agent_b, wallet_b)
    revoked_id, revoked_key = await _key(client, agent_a, wallet_a)
    await _json(await client.delete(f"/admin/v1/agents/{agent_a}/keys/{revoked_id}"), 204)
    expired_id, expired_key = await _key(client, agent_a, wallet_a)
    # The API only issues keys that expire in the future; move this one's expiry into the past.
    async with engine.begin() as conn:
        past = datetime.now(UTC) - timedelta(minutes=1)
        await conn.execute(update(agent_keys).where(agent_keys.c.id == expired_id).values(expires_at=past))
    spare_keys = [(await _key(client, agent_a, wallet_a))[0] for _ in range(spares)]

    signed_a = await _pay(client, key_a, wallet_a, small_payment(), 200)
    signed_b = await _pay(client, key_b, wallet_b, small_payment(), 200)
    hooks = []
    for _ in range(spares):
        hook = await client.post("/admin/v1/webhooks", json={"url": "http://127.0.0.1:9/battery"})
        hooks.append(str((await _json(hook, 201))["webhook"]["id"]))
    world = World(
        admin=Secret(admin_token),
        approver=Secret(approver),
        viewer=Secret(viewer),
        revoked_operator=Secret(revoked_operator),
        admin_id=admin_id,
        approver_id=approver_id,
        viewer_id=viewer_id,
        spare_operator_ids=tuple(spare_operators),
        wallet_a=wallet_a,
        wallet_b=wallet_b,
        spare_wallet=spare_wallet,
        agent_a=agent_a,
        agent_b=agent_b,
        key_a=Secret(key_a),
        key_b=Secret(key_b),
        key_a_id=key_a_id,
        key_b_id=key_b_id,
        revoked_key=Secret(revoked_key),
        expired_key=Secret(expired_key),
        spare_key_ids=tuple(spare_keys),
        signed_a=signed_a,
        pending_a="",
        signed_b=signed_b,
        webhook_ids=tuple(hooks),
    )
    pending = await pending_payment(client, world, nonce=1)
    return replace(world, pending_a=pending)
