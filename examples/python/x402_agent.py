"""An agent pays for an API over x402; the custody service signs each payment within policy.

Self-contained (the default): starts a throwaway custody service, a dev chain with a test USDC
and a paid API (x402's own middleware and facilitator) on loopback ports, offline; sets up a
wallet, a policy (at most 0.025 test USDC a day) and an agent key; then the agent buys three
reports at 0.01 each: two are paid, the third is denied with its reasons.
Needs ``pip install -e ".[server,devchain,x402]"``.

    python examples/python/x402_agent.py

Against your own service and a paid API (the agent part only; the key in CUSTODY_API_KEY_FILE or
CUSTODY_API_KEY). ``--asset`` lets the x402 client pay in a token it does not know (it knows
only the usual USDC deployments):

    CUSTODY_API_KEY_FILE=agent.key python examples/python/x402_agent.py --url http://127.0.0.1:8700 \\
        --wallet wal_... --resource https://api.example/paid [--asset eip155:8453=0xTOKEN] [--times 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from eth_account import Account
from x402.http.clients import x402HttpxClient
from x402.http.clients.httpx import PaymentError
from x402.http.utils import decode_payment_response_header

from custody.client import ApprovalPending, CustodyClient, PolicyDenied
from custody.integrations.x402 import CustodyX402Signer, allow_asset, x402_client

PRICE = 10_000  # 0.01 test USDC (6 decimals)

# ---------------------------------------------------------------------------- the agent


async def buy(url: str, api_key: str, wallet_id: str, resource: str, assets: list[str], times: int) -> None:
    """GET a paid resource ``times`` times; each 402 is paid with an authorization the custody service signs."""
    with CustodyClient(url, api_key) as custody:
        signer = CustodyX402Signer(custody, wallet_id, purpose="x402 example")
        allowed = [allow_asset(*entry.split("=", 1)) for entry in assets]
        client = x402_client(signer, allowed_assets=allowed)
        async with x402HttpxClient(client, timeout=60) as http:
            for attempt in range(1, times + 1):
                try:
                    response = await http.get(resource)
                except PaymentError as error:
                    cause = error.__cause__
                    if isinstance(cause, PolicyDenied):  # the policy said no: adapt, do not retry blindly
                        print(f"purchase {attempt}: denied by policy, nothing was signed:")
                        for reason in cause.reasons:
                            left = f"; remaining {reason.remaining}" if reason.remaining is not None else ""
                            when = f", resets at {reason.resets_at.isoformat()}" if reason.resets_at else ""
                            print(f"  {reason.code} (rule {reason.rule_id}): {reason.message}{left}{when}")
                        return
                    if isinstance(cause, ApprovalPending):  # a human must approve; the authorization may expire
                        print(f"purchase {attempt}: held for approval as {cause.payment_id}")
                        return
                    raise
                settlement = decode_payment_response_header(response.headers["PAYMENT-RESPONSE"])
                print(
                    f"purchase {attempt}: {response.status_code} {response.text}; "
                    f"settled in tx {settlement.transaction}"
                )


# ---------------------------------------------------------------------------- set-up


def self_contained() -> None:
    from custody.devchain import start_chain
    from custody.devchain.paywall import x402_paywall
    from custody.devchain.sandbox import serve_app, start_sandbox

    print("Self-contained: a throwaway custody service, a dev chain and a paid API on this machine (offline).")
    with start_sandbox() as sandbox, start_chain() as chain:
        usdc = chain.deploy_test_usdc()
        seller = Account.create().address
        paywall = x402_paywall(chain, usdc, pay_to=seller, price=PRICE, path="/report", content={"report": "ok"})
        wallet = sandbox.create_wallet("x402-example")
        sandbox.set_policy(wallet["id"], example_policy(chain.chain_id, usdc.address, seller))
        api_key = sandbox.issue_key(sandbox.create_agent("x402-example"), [wallet["id"]])
        usdc.mint(wallet["address"], 1_000_000)
        print(f"wallet {wallet['address']}: 1 test USDC; may pay only {seller}, at most 0.025 a day")
        with serve_app(paywall.app) as api:
            print(f"paid API: GET {api}/report costs 0.01 test USDC")
            asset = f"{chain.network}={usdc.address}"
            asyncio.run(buy(sandbox.url, api_key, wallet["id"], f"{api}/report", [asset], times=3))
        print(f"seller's balance: {usdc.balance_of(seller)} base units")


def example_policy(chain_id: int, token: str, seller: str) -> dict[str, Any]:
    """x402 payments (EIP-3009 authorizations) in one token, to one seller, at most 0.025 a day."""
    return {
        "schema_version": 1,
        "id": "x402-example",
        "assets": {"usdc": {"chain_id": chain_id, "address": token, "decimals": 6}},
        "rules": [
            {"id": "x402", "type": "allow_transfers", "kinds": ["payment_authorization"]},
            {"id": "sellers", "type": "payee_allowlist", "payees": [{"address": seller, "label": "report API"}]},
            {"id": "daily", "type": "cap", "asset": "usdc", "max": "25000", "period": "day"},
            {"id": "short-lived", "type": "max_validity", "max": "10m"},
        ],
    }


def api_key_from_environment() -> str:
    key = os.environ.get("CUSTODY_API_KEY", "").strip()
    key_file = os.environ.get("CUSTODY_API_KEY_FILE", "").strip()
    if not key and key_file:
        key = Path(key_file).read_text(encoding="utf-8").strip()
    if not key:
        raise SystemExit("set CUSTODY_API_KEY_FILE (or CUSTODY_API_KEY) to the agent's API key")
    return key


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", help="your custody service; without it, everything runs self-contained")
    parser.add_argument("--wallet", help="the wallet id the agent's key may use")
    parser.add_argument("--resource", help="the paid URL")
    parser.add_argument("--asset", action="append", default=[], metavar="NETWORK=TOKEN", help="a token to pay in")
    parser.add_argument("--times", type=int, default=1, help="how many times to buy it")
    args = parser.parse_args(argv)
    if args.url is None:
        self_contained()
        return
    if not (args.wallet and args.resource):
        parser.error("--url needs --wallet and --resource")
    asyncio.run(buy(args.url, api_key_from_environment(), args.wallet, args.resource, args.asset, args.times))


if __name__ == "__main__":
    main(sys.argv[1:])
