"""Signing cost on one core: eth_account's own signing versus the signer's path (custody.signer.evm).

    python bench/signing.py             # 7 rounds per operation
    python bench/signing.py --rounds 3  # quicker, noisier

For EIP-1559 and legacy transactions, EIP-712 typed data (an EIP-3009 TransferWithAuthorization,
as x402 signs) and ``personal_sign``, it times

  * ``eth_account``: a ``LocalAccount`` built once, then ``sign_transaction`` / ``sign_message``
    (what the signer called before; eth-account re-derives the key object inside every call);
  * ``custody``: ``custody.signer.evm`` with an ``EvmKey`` built once: eth-account builds the
    bytes and the digest, coincurve signs it. This side also pays for the signer's own checks
    (``normalize_transaction``, the 'from' check) and the hex formatting of the reply.

Both sides must return the same bytes before anything is timed. The process is pinned to one
CPU where the OS allows it. Each round times every operation in turn (so drift on a shared
machine hits all alike); the figure is the median round. Machines like this one are noisy
(10–40 % run to run): read the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import coincurve
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data

from custody.signer import evm

KEY = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
USDC = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
PAYEE = "0x09616C3d61b3331fc4109a9E41a8BDB7d9776609"
# An ERC-20 transfer(PAYEE, 1.5 USDC): what an agent's payment usually is.
TRANSFER_DATA = "0xa9059cbb" + PAYEE[2:].lower().rjust(64, "0") + hex(1_500_000)[2:].rjust(64, "0")
EIP1559 = {
    "type": 2,
    "chainId": 8453,
    "nonce": 42,
    "gas": 65_000,
    "maxFeePerGas": 3 * 10**9,
    "maxPriorityFeePerGas": 10**8,
    "to": USDC,
    "value": 0,
    "data": TRANSFER_DATA,
}
LEGACY = {
    "chainId": 1,
    "nonce": 42,
    "gas": 21_000,
    "gasPrice": 20 * 10**9,
    "to": PAYEE,
    "value": 10**16,
    "data": "0x",
}
EIP712 = {
    "types": {
        "EIP712Domain": [
            {"name": "name", "type": "string"},
            {"name": "version", "type": "string"},
            {"name": "chainId", "type": "uint256"},
            {"name": "verifyingContract", "type": "address"},
        ],
        "TransferWithAuthorization": [
            {"name": "from", "type": "address"},
            {"name": "to", "type": "address"},
            {"name": "value", "type": "uint256"},
            {"name": "validAfter", "type": "uint256"},
            {"name": "validBefore", "type": "uint256"},
            {"name": "nonce", "type": "bytes32"},
        ],
    },
    "primaryType": "TransferWithAuthorization",
    "domain": {"name": "USD Coin", "version": "2", "chainId": 8453, "verifyingContract": USDC},
    "message": {
        "from": Account.from_key(KEY).address,
        "to": PAYEE,
        "value": 1_500_000,
        "validAfter": 0,
        "validBefore": 2_000_000_000,
        "nonce": "0x" + "ab" * 32,
    },
}
TEXT = "Sign in to example.com as an agent of wallet wal_0123456789. Nonce: 8c1f2e"


def _transaction(signed: Any) -> dict[str, Any]:
    return {
        "raw_transaction": "0x" + bytes(signed.raw_transaction).hex(),
        "hash": "0x" + bytes(signed.hash).hex(),
        "r": hex(signed.r),
        "s": hex(signed.s),
        "v": signed.v,
    }


def _message(signed: Any) -> dict[str, Any]:
    return {"signature": "0x" + bytes(signed.signature).hex(), "message_hash": "0x" + bytes(signed.message_hash).hex()}


def operations() -> dict[str, tuple[Callable[[], Any], Callable[[], Any], Callable[[], Any]]]:
    """Per operation: (eth_account call, custody call, eth_account's result in the signer's shape)."""
    local = Account.from_key(KEY)
    key = evm.EvmKey(KEY)
    return {
        "EIP-1559 transaction": (
            lambda: local.sign_transaction(EIP1559),
            lambda: evm.sign_transaction(key, EIP1559),
            lambda: _transaction(local.sign_transaction(EIP1559)),
        ),
        "legacy transaction": (
            lambda: local.sign_transaction(LEGACY),
            lambda: evm.sign_transaction(key, LEGACY),
            lambda: _transaction(local.sign_transaction(LEGACY)),
        ),
        "EIP-712 typed data": (
            lambda: local.sign_message(encode_typed_data(full_message=EIP712)),
            lambda: evm.sign_typed_data(key, EIP712),
            lambda: _message(local.sign_message(encode_typed_data(full_message=EIP712))),
        ),
        "personal_sign": (
            lambda: local.sign_message(encode_defunct(text=TEXT)),
            lambda: evm.sign_text_message(key, TEXT),
            lambda: _message(local.sign_message(encode_defunct(text=TEXT))),
        ),
    }


def _per_call_us(call: Callable[[], Any], seconds: float) -> float:
    """Microseconds per call, over a batch sized to take about ``seconds``."""
    count, began = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - began) < seconds:
        for _ in range(50):
            call()
        count += 50
    return elapsed / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per operation (the median is shown)")
    parser.add_argument("--seconds", type=float, default=0.3, help="length of one timed batch")
    args = parser.parse_args()

    cpu = "not pinned"
    if hasattr(os, "sched_setaffinity"):
        first = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {first})
        cpu = f"pinned to CPU {first}"

    ops = operations()
    for name, (_, custody_call, reference) in ops.items():
        if custody_call() != reference():
            raise SystemExit(f"{name}: the signer's path and eth_account differ; nothing timed")
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for name, (eth_call, custody_call, _) in ops.items():
            for side, call in (("eth_account", eth_call), ("custody", custody_call)):
                samples.setdefault((name, side), []).append(_per_call_us(call, args.seconds))
    digest = bytes(32)
    curve = coincurve.PrivateKey(KEY)
    sign_only = statistics.median(
        _per_call_us(lambda: curve.sign_recoverable(digest, hasher=None), args.seconds) for _ in range(args.rounds)
    )

    print(f"signing on one core ({cpu}); median of {args.rounds} rounds; identical bytes checked first")
    print(f"{'operation':<22} {'eth_account µs':>15} {'ops/s':>8}   {'custody µs':>11} {'ops/s':>8}   {'speed-up':>8}")
    for name in ops:
        old = statistics.median(samples[(name, "eth_account")][1:])
        new = statistics.median(samples[(name, "custody")][1:])
        print(f"{name:<22} {old:>15.1f} {1e6 / old:>8,.0f}   {new:>11.1f} {1e6 / new:>8,.0f}   {old / new:>7.1f}×")
    print(f"{'secp256k1 sign alone':<22} {'':>15} {'':>8}   {sign_only:>11.1f} {1e6 / sign_only:>8,.0f}")


if __name__ == "__main__":
    main()
