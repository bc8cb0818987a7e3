"""A real custody service (signer, API on a loopback port) and a real in-process chain, for the agent tools.

One service per test module (starting one costs about a second); each test gets its own wallet,
agent key and policy through the admin API, so tests do not share budgets. Each module declares
its fixture from :func:`running_custody`::

    @pytest.fixture(scope="module")
    def custody() -> Iterator[Custody]:
        with running_custody() as service:
            yield service
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from custody.client import CustodyClient
from custody.devchain import DevChain, TestToken, start_chain
from custody.integrations.tools import CustodyTools
from custody.settings import Settings
from tests.conftest import LiveServer, SignerThread
from tests.processes import first_admin_token

ETH = 10**18
USDC = 10**6


@dataclass
class Agent:
    """One agent's set-up: its wallet (funded), its key, an SDK client and the toolkit."""

    wallet: dict[str, Any]
    api_key: str = field(repr=False)
    client: CustodyClient
    tools: CustodyTools

    @property
    def address(self) -> str:
        return str(self.wallet["address"])


@dataclass
class Custody:
    url: str
    admin: httpx.Client
    chain: DevChain
    usdc: TestToken
    _clients: list[CustodyClient] = field(default_factory=list)
    _count: int = 0

    def policy(
        self,
        payees: list[str],
        *,
        eth_cap: int = ETH,
        usdc_cap: int = 100 * USDC,
        approval_above_eth: int | None = None,
        approval_above_usdc: int | None = None,
    ) -> dict[str, Any]:
        """Native and test-USDC transfers (and x402 authorizations) to ``payees``, daily caps, optional approval."""
        rules: list[dict[str, Any]] = [
            {"id": "pay", "type": "allow_transfers", "kinds": ["native_transfer", "token_transfer"]},
            {"id": "x402", "type": "allow_transfers", "kinds": ["payment_authorization"]},
            {
                "id": "payees",
                "type": "payee_allowlist",
                "payees": [{"address": p, "label": f"payee {i}"} for i, p in enumerate(payees)],
            },
            {"id": "daily-eth", "type": "cap", "asset": "eth", "max": str(eth_cap), "period": "day"},
            {"id": "daily-usdc", "type": "cap", "asset": "usdc", "max": str(usdc_cap), "period": "day"},
        ]
        for asset, above in (("eth", approval_above_eth), ("usdc", approval_above_usdc)):
            if above is not None:
                rules.append(
                    {
                        "id": f"big-{asset}",
                        "type": "require_approval",
                        "asset": asset,
                        "above": str(above),
                        "group": "ops",
                        "m": 1,
                    }
                )
        return {
            "schema_version": 1,
            "id": "agent-tools-test",
            "assets": {
                "eth": {"chain_id": self.chain.chain_id, "address": "native", "decimals": 18},
                "usdc": {"chain_id": self.chain.chain_id, "address": self.usdc.address, "decimals": 6},
            },
            "approver_groups": {"ops": {"members": ["admin"]}},
            "rules": rules,
        }

    def new_agent(
        self, policy: dict[str, Any], *, eth: int = 2 * ETH, usdc: int = 50 * USDC, **tool_options: Any
    ) -> Agent:
        """A fresh wallet with ``policy``, funded on the chain, and an agent key for it."""
        self._count += 1
        wallet = self._post("/admin/v1/wallets", {"name": f"agent-wallet-{self._count}"})
        put = self.admin.put(f"/admin/v1/wallets/{wallet['id']}/policy", json={"document": policy})
        assert put.status_code == 200, put.text
        agent = self._post("/admin/v1/agents", {"name": f"agent-{self._count}"})
        issued = self._post(f"/admin/v1/agents/{agent['id']}/keys", {"wallet_ids": [wallet["id"]]})
        if eth:
            self.chain.fund(wallet["address"], eth)
        if usdc:
            self.usdc.mint(wallet["address"], usdc)
        client = CustodyClient(self.url, issued["api_key"], max_retries=0)
        self._clients.append(client)
        options: dict[str, Any] = {"chains": {self.chain.chain_id: self.chain.w3}, "receipt_timeout": 5.0}
        options.update(tool_options)
        return Agent(wallet, issued["api_key"], client, CustodyTools(client, **options))

    def approve(self, payment_id: str) -> None:
        """An operator (the first admin, in the policy's approver group) approves through the admin API."""
        response = self.admin.post(f"/admin/v1/approvals/{payment_id}/approve", json={"comment": "ok"})
        assert response.status_code == 200, response.text

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.admin.post(path, json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self.admin.close()


@contextmanager
def running_custody() -> Iterator[Custody]:
    """The service on SQLite with its signer, served on a loopback port, and a chain with a test USDC."""
    directory = Path(tempfile.mkdtemp(prefix="cst-"))
    with pytest.MonkeyPatch.context() as patch:  # a developer's CUSTODY_* variables must not leak in
        for name in list(os.environ):
            if name.startswith("CUSTODY_"):
                patch.delenv(name)
        settings = Settings(data_dir=directory / "data", kek_scrypt_n=2**10)
    signer = SignerThread(settings).start()
    server: LiveServer | None = None
    service: Custody | None = None
    try:
        token = asyncio.run(first_admin_token(settings))
        server = LiveServer(settings).start()
        chain = start_chain()
        admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        service = Custody(server.url, admin, chain, chain.deploy_test_usdc())
        yield service
    finally:
        if service is not None:
            service.close()
            service.chain.close()
        if server is not None:
            server.stop()
        signer.stop()
        shutil.rmtree(directory, ignore_errors=True)
