"""What the SDK costs its caller: client CPU per sign call, against a stub server that answers at once.

The payment benchmark's load generator is the SDK (``AsyncCustodyClient``) on the same cores as
the service, so its CPU per payment comes out of the service's budget. This measures it alone:
a stub HTTP server in another process answers every request with a fixed "signed" body, and
this process times its own CPU (``time.process_time``) over many calls, one after another:

- the SDK's ``sign_transaction`` (request building, httpx, the answer parsed into its model);
- the same request through a bare ``httpx.AsyncClient``;
- the benchmark's minimal client (one keep-alive connection, hand-written HTTP/1.1).

    .venv/bin/python bench/sdk_client.py [--calls 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import httpx

from custody.client import AsyncCustodyClient

_STUB = r"""
import json, sys
import uvicorn

BODY = json.dumps({"status": "signed", "payment_id": "pay_00112233445566778899", "result": {
    "raw_transaction": "0x02", "hash": "0x" + "ab" * 32, "r": "0x1", "s": "0x2", "v": 0}}).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error", access_log=False)
"""
WALLET = "wal_00112233445566778899"
TX = {
    "to": "0x" + "11" * 20,
    "value": 10**14,
    "gas": 21_000,
    "maxFeePerGas": 10**9,
    "maxPriorityFeePerGas": 10**8,
    "nonce": 1,
    "chainId": 8453,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_for(port: int, stub: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        if stub.poll() is not None:
            raise RuntimeError("the stub server exited")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise RuntimeError("the stub server did not start")


class _Minimal:
    """The benchmark's kind of minimal client: one connection, the request written by hand."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        body = json.dumps({"transaction": {k: str(v) if isinstance(v, int) else v for k, v in TX.items()}}).encode()
        self.request = (
            f"POST /v1/wallets/{WALLET}/sign/transaction HTTP/1.1\r\nhost: stub\r\n"
            f"authorization: Bearer cak.key.secret\r\ncontent-type: application/json\r\n"
            f"idempotency-key: k\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def call(self) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        json.loads(await self.reader.readexactly(length))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def _cpu_per_call(call: Callable[[], Awaitable[object]], calls: int) -> float:
    for _ in range(200):  # warm-up: connections, caches
        await call()
    began = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - began) / calls * 1e6


async def measure(port: int, calls: int, rounds: int) -> dict[str, list[float]]:
    url = f"http://127.0.0.1:{port}"
    sdk = AsyncCustodyClient(url, "cak.key_0011.secret", max_retries=0)
    bare = httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer cak.key.secret"})
    minimal = _Minimal(port)

    async def with_sdk() -> object:
        return await sdk.sign_transaction(WALLET, TX)

    async def with_httpx() -> object:
        response = await bare.post(
            f"/v1/wallets/{WALLET}/sign/transaction", json={"transaction": TX}, headers={"Idempotency-Key": "k"}
        )
        return response.json()

    clients = {"SDK sign_transaction": with_sdk, "httpx.AsyncClient alone": with_httpx, "minimal": minimal.call}
    figures: dict[str, list[float]] = {name: [] for name in clients}
    try:
        for _ in range(rounds):  # interleaved, so a noisy moment hits every client alike
            for name, call in clients.items():
                figures[name].append(await _cpu_per_call(call, calls))
    finally:
        await sdk.close()
        await bare.aclose()
        await minimal.close()
    return figures


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
    port = _free_port()
    stub = subprocess.Popen([sys.executable, "-c", _STUB, str(port)])  # noqa: S603 (our own stub)
    try:
        run(_wait_for(port, stub))
        figures = run(measure(port, args.calls, args.rounds))
    finally:
        stub.terminate()
        stub.wait(10)
    print(f"client CPU per call, µs (median of {args.rounds} rounds of {args.calls:,} calls; the stub answers at once)")
    for name, rounds in figures.items():
        print(f"  {name:26} {statistics.median(rounds):7.0f}   ({min(rounds):.0f}–{max(rounds):.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
