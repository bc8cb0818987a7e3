"""What the SDK costs its caller: client CPU per sign call, against a stub server that answers at once.

The payment benchmark's load generator is the SDK (``AsyncCustodyClient``) on the same cores as
the service, so its CPU per payment comes out of the service's budget. This measures it alone:
a stub HTTP server in another process answers every request with a fixed "signed" body of the
service's size, and this process times its own CPU (``time.process_time``) over many calls,
one after another, with its garbage collector paused as in the benchmark's runs:

- the benchmark's payment through the SDK (``payments.pay``: ``sign_transaction``, httpx, the
  answer parsed into the SDK's model);
- the same request through a bare ``httpx.AsyncClient``;
- the benchmark's minimal client (``payments.LightClient``).

    .venv/bin/python bench/sdk_client.py [--calls 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import httpx
from payments import LightClient, WalletUnderTest, encode_transaction, no_collector_pauses, pay

from custody.client import AsyncCustodyClient

# Serves on the listening socket it inherits (file descriptor argv[1]): no port to race for.
_STUB = r"""
import asyncio, json, socket, sys
import uvicorn

RESULT = {"raw_transaction": "0x02" + "ab" * 115, "hash": "0x" + "cd" * 32, "r": "0x" + "12" * 32,
          "s": "0x" + "34" * 32, "v": 1}
BODY = json.dumps({"status": "signed", "payment_id": "pay_00112233445566778899", "result": RESULT}).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})

# socket(fileno=...) keeps the inherited socket's family (uvicorn's fd= would take it for a
# Unix socket, and TCP_NODELAY would be missing from every connection).
listener = socket.socket(fileno=int(sys.argv[1]))
server = uvicorn.Server(uvicorn.Config(app, log_level="error", access_log=False, timeout_keep_alive=600))
asyncio.run(server.serve(sockets=[listener]))
"""
WALLET = WalletUnderTest("wal_00112233445566778899", "agt_00112233445566778899", "cak.key_0011.secret")


async def _cpu_per_call(call: Callable[[], Awaitable[object]], calls: int) -> float:
    for _ in range(200):  # warm-up: connections, caches
        await call()
    with no_collector_pauses():
        began = time.process_time()
        for _ in range(calls):
            await call()
        return (time.process_time() - began) / calls * 1e6


async def measure(port: int, calls: int, rounds: int) -> dict[str, list[float]]:
    url = f"http://127.0.0.1:{port}"
    sdk = AsyncCustodyClient(url, WALLET.api_key, max_retries=0)
    bare = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {WALLET.api_key}"})
    light = LightClient(url, WALLET.api_key)

    async def with_sdk() -> None:
        if await pay(sdk, WALLET) is not None:
            raise RuntimeError("the SDK did not read the stub's answer as signed")

    async def with_httpx() -> None:
        body = {"transaction": encode_transaction(WALLET.next_tx()), "purpose": "supplier invoice"}
        response = await bare.post(
            f"/v1/wallets/{WALLET.id}/sign/transaction", json=body, headers={"Idempotency-Key": "k"}
        )
        response.json()

    async def with_light() -> None:
        if await light.pay(WALLET) is not None:
            raise RuntimeError("the minimal client did not read the stub's answer as signed")

    clients = {"SDK sign_transaction": with_sdk, "httpx.AsyncClient alone": with_httpx, "minimal": with_light}
    figures: dict[str, list[float]] = {name: [] for name in clients}
    try:
        for _ in range(rounds):  # interleaved, so a noisy moment hits every client alike
            for name, call in clients.items():
                figures[name].append(await _cpu_per_call(call, calls))
    finally:
        await sdk.close()
        await bare.aclose()
        await light.close()
    return figures


async def _wait_for(port: int, stub: subprocess.Popen[bytes], limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if stub.poll() is not None:
            raise RuntimeError("the stub server exited")
        try:
            async with httpx.AsyncClient() as client:
                await client.get(f"http://127.0.0.1:{port}/")
        except httpx.TransportError:
            await asyncio.sleep(0.05)
            continue
        return
    raise RuntimeError("the stub server did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=3000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per client (the median is printed)")
    args = parser.parse_args()
    try:
        import uvloop  # as the payment benchmark's load generator runs

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = int(listener.getsockname()[1])
    stub = subprocess.Popen(  # noqa: S603 (our own stub)
        [sys.executable, "-c", _STUB, str(listener.fileno())], pass_fds=[listener.fileno()]
    )
    try:
        run(_wait_for(port, stub))
        figures = run(measure(port, args.calls, args.rounds))
    finally:
        stub.terminate()
        try:
            stub.wait(10)
        except subprocess.TimeoutExpired:
            stub.kill()
        listener.close()
    print(f"client CPU per call, µs (median of {args.rounds} rounds of {args.calls:,} calls; the stub answers at once)")
    for name, rounds in figures.items():
        print(f"  {name:26} {statistics.median(rounds):7.0f}   ({min(rounds):.0f}–{max(rounds):.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
