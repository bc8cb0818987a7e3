"""Shared set-up for the integration tests: a dev chain, a custody wallet on it, a loopback-only guard.

Plain functions (not fixtures) so each test module declares the fixtures it needs.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from custody.devchain import DevChain, TestToken
from tests.payments.helpers import agent_key, set_policy, wallet

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def forbid_non_loopback(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Refuse (and record) any name lookup or connection that is not to this machine.

    Returns the list of refused attempts: a test asserts it is empty at the end.
    """
    attempts: list[str] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def loopback(host: Any) -> bool:
        if isinstance(host, bytes):
            host = host.decode()
        if not isinstance(host, str):
            return False
        if host in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
        except ValueError:
            return False

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not loopback(host):
            attempts.append(f"lookup {host!r}")
            raise OSError(f"test guard: no lookups of {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not loopback(address[0]):
            attempts.append(f"connect {address!r}")
            raise OSError(f"test guard: no connections to {address!r}")

    def connect(sock: socket.socket, address: Any) -> None:
        check(sock, address)
        real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        check(sock, address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return attempts


@dataclass
class Payer:
    """A custody wallet with an agent key, funded on the dev chain."""

    wallet_id: str
    address: str
    api_key: str


async def custody_payer(
    admin: httpx.AsyncClient, chain: DevChain, token: TestToken, policy: dict[str, Any], *, tokens: int, wei: int
) -> Payer:
    """A wallet under ``policy``, holding ``wei`` for gas and ``tokens`` base units of ``token``."""
    created = await wallet(admin)
    await set_policy(admin, created["id"], policy)
    _, key = await agent_key(admin, [created["id"]])
    chain.fund(created["address"], wei)
    token.mint(created["address"], tokens)
    return Payer(created["id"], created["address"], key)


def token_policy(
    chain: DevChain,
    token: TestToken,
    *,
    payees: list[str],
    cap: int,
    kinds: list[str],
) -> dict[str, Any]:
    """Transfers of ``kinds`` in ``token`` to ``payees`` only, at most ``cap`` base units a day."""
    return {
        "schema_version": 1,
        "id": "integration",
        "assets": {"tusdc": {"chain_id": chain.chain_id, "address": token.address, "decimals": token.decimals}},
        "rules": [
            {"id": "pay", "type": "allow_transfers", "kinds": kinds},
            {"id": "only-tusdc", "type": "assets", "assets": ["tusdc"]},
            {
                "id": "payees",
                "type": "payee_allowlist",
                "payees": [{"address": p, "label": f"payee-{i}"} for i, p in enumerate(payees)],
            },
            {"id": "daily", "type": "cap", "asset": "tusdc", "max": str(cap), "period": "day"},
            {"id": "short-lived", "type": "max_validity", "max": "10m"},
        ],
    }


async def signed_count(admin: httpx.AsyncClient) -> int:
    """How many ``payment.signed`` records the audit log holds."""
    response = await admin.get("/admin/v1/audit", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return sum(1 for event in response.json()["events"] if event["kind"] == "payment.signed")


async def decided_intents(admin: httpx.AsyncClient) -> list[dict[str, Any]]:
    """Each ``payment.decided`` audit record's intent, with the outcome, oldest first."""
    response = await admin.get("/admin/v1/audit", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return [
        {**event["data"]["intent"], "outcome": event["data"]["outcome"], "method": event["data"]["method"]}
        for event in response.json()["events"]
        if event["kind"] == "payment.decided"
    ]
