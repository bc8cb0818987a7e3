"""Zero overspend across API processes: two `custody serve` processes, one database, one Redis, one cap."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from web3 import Web3

from custody.settings import Settings
from tests.conftest import REDIS_URL
from tests.payments.helpers import GAS, agent_key, native_policy, set_policy, transfer, wallet
from tests.processes import api_process, api_ready, free_port, wait_for

CHAIN = 31337
BOB = Web3.to_checksum_address("0x" + "b0" * 20)
EACH = 10**16


async def test_two_api_processes_never_approve_more_than_the_cap(
    api: tuple[httpx.AsyncClient, str], settings: Settings, short_dir: Path, redis_prefix: str
) -> None:
    admin, _ = api
    payer = await wallet(admin)
    slots = 7
    await set_policy(admin, payer["id"], native_policy(CHAIN, [BOB], slots * (EACH + GAS)))
    _, key = await agent_key(admin, [payer["id"]])
    ports = [free_port(), free_port()]
    shared = settings.model_copy(update={"redis_url": REDIS_URL, "redis_prefix": redis_prefix})
    servers = [
        api_process(shared, port, short_dir / f"api{n}.log").start() for n, port in enumerate(ports)
    ]
    try:
        for port in ports:
            wait_for(lambda port=port: api_ready(f"http://127.0.0.1:{port}"), f"the API on port {port}")  # type: ignore[misc]
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(timeout=60) as http:

            async def pay(n: int) -> int:
                url = f"http://127.0.0.1:{ports[n % 2]}/v1/wallets/{payer['id']}/sign/transaction"
                response = await http.post(url, json={"transaction": transfer(CHAIN, BOB, EACH, n)}, headers=headers)
                return response.status_code

            codes = await asyncio.gather(*(pay(n) for n in range(30)))
        assert codes.count(200) == slots
        assert codes.count(403) == 30 - slots
    finally:
        for server in servers:
            server.stop()
