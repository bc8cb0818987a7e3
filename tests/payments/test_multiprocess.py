"""Zero overspend across API processes: two `custody serve` processes, one database, one Redis, one cap."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
from web3 import Web3

from custody.settings import Settings
from tests.conftest import REDIS_URL
from tests.payments.helpers import GAS, agent_key, native_policy, set_policy, transfer, wallet
from tests.test_isolation import _free_port, _wait_for

CHAIN = 31337
BOB = Web3.to_checksum_address("0x" + "b0" * 20)
EACH = 10**16


def _serve(settings: Settings, port: int, log: Path, redis_prefix: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODY_")} | {
        "CUSTODY_DATA_DIR": str(settings.data_dir),
        "CUSTODY_SIGNER_SOCKET": str(settings.socket_path),
        "CUSTODY_REDIS_URL": REDIS_URL,
        "CUSTODY_REDIS_PREFIX": redis_prefix,
    }
    if settings.database_url:
        env["CUSTODY_DATABASE_URL"] = settings.database_url
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "custody", "serve", "--no-signer", "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


async def test_two_api_processes_never_approve_more_than_the_cap(
    api: tuple[httpx.AsyncClient, str], settings: Settings, short_dir: Path, redis_prefix: str
) -> None:
    admin, _ = api
    payer = await wallet(admin)
    slots = 7
    await set_policy(admin, payer["id"], native_policy(CHAIN, [BOB], slots * (EACH + GAS)))
    _, key = await agent_key(admin, [payer["id"]])
    ports = [_free_port(), _free_port()]
    servers = [_serve(settings, port, short_dir / f"api{n}.log", redis_prefix) for n, port in enumerate(ports)]
    try:
        for port in ports:
            _wait_for(lambda port=port: _ready(port), f"the API on port {port}")  # type: ignore[misc]
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
            server.terminate()
            server.wait(15)


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
