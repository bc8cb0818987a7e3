"""An agent sends a native transfer and an ERC-20 transfer with web3.py; the custody service signs each one.

Self-contained (the default): starts a throwaway custody service and a dev chain with a test
USDC on this machine, offline, sets up a wallet, a policy and an agent key, then runs the agent.
Needs ``pip install -e ".[server,devchain]"``.

    python examples/python/web3_transfer.py

Against your own service and node (the agent part only; the key in CUSTODY_API_KEY_FILE or CUSTODY_API_KEY):

    CUSTODY_API_KEY_FILE=agent.key python examples/python/web3_transfer.py --url http://127.0.0.1:8700 \\
        --wallet wal_... --rpc https://your-node.example --to 0xPAYEE --wei 1000000000000000 \\
        [--token 0xTOKEN --token-amount 250000]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from eth_account import Account
from web3 import Web3
from web3.middleware import SignAndSendRawMiddlewareBuilder
from web3.types import Wei

from custody.client import CustodyAccount, CustodyClient, PolicyDenied, register_with_web3

# The two ERC-20 functions this example calls.
ERC20_ABI = [
    {
        "name": "transfer",
        "type": "function",
        "stateMutability": "nonpayable",
        "inputs": [{"name": "to", "type": "address"}, {"name": "amount", "type": "uint256"}],
        "outputs": [{"name": "", "type": "bool"}],
    },
    {
        "name": "balanceOf",
        "type": "function",
        "stateMutability": "view",
        "inputs": [{"name": "owner", "type": "address"}],
        "outputs": [{"name": "", "type": "uint256"}],
    },
]


# ---------------------------------------------------------------------------- the agent


def connect(rpc_url: str, account: CustodyAccount) -> Web3:
    """web3.py with a signing middleware: every transaction from the account is signed by the custody service."""
    w3 = Web3(Web3.HTTPProvider(rpc_url))
    register_with_web3()  # lets web3's signing middleware accept a CustodyAccount
    w3.middleware_onion.inject(SignAndSendRawMiddlewareBuilder.build(account), layer=0)
    return w3


def pay(w3: Web3, account: CustodyAccount, to: str, wei: int, token: str | None, token_amount: int) -> None:
    """A native transfer, then (with ``token``) an ERC-20 transfer; web3 fills nonce, gas and fees."""
    payee = Web3.to_checksum_address(to)
    tx_hash = w3.eth.send_transaction({"from": account.address, "to": payee, "value": Wei(wei)})
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)
    print(f"native transfer of {wei} wei: mined in block {receipt['blockNumber']}, tx {tx_hash.to_0x_hex()}")
    if token is None:
        return
    erc20 = w3.eth.contract(address=Web3.to_checksum_address(token), abi=ERC20_ABI)
    tx_hash = erc20.functions.transfer(payee, token_amount).transact({"from": account.address})
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)
    print(
        f"ERC-20 transfer of {token_amount} base units: mined in block {receipt['blockNumber']}, "
        f"tx {tx_hash.to_0x_hex()}"
    )
    print(f"payee's token balance: {erc20.functions.balanceOf(payee).call()} base units")


def try_to_pay(w3: Web3, account: CustodyAccount, to: str, wei: int) -> None:
    """A payment the policy refuses: the middleware raises PolicyDenied before anything is sent."""
    try:
        w3.eth.send_transaction({"from": account.address, "to": Web3.to_checksum_address(to), "value": Wei(wei)})
    except PolicyDenied as denied:
        print("denied, nothing was signed or sent:")
        for reason in denied.reasons:
            print(f"  {reason.code} (rule {reason.rule_id}): {reason.message}")
    else:
        raise SystemExit("expected a denial")


# ---------------------------------------------------------------------------- set-up


def self_contained() -> None:
    from custody.devchain import start_chain
    from custody.devchain.sandbox import start_sandbox

    print("Self-contained: a throwaway custody service and a dev chain on this machine (offline).")
    with start_sandbox() as sandbox, start_chain() as chain:
        usdc = chain.deploy_test_usdc()
        payee = Account.create().address
        wallet = sandbox.create_wallet("web3-example")
        sandbox.set_policy(wallet["id"], example_policy(chain.chain_id, usdc.address, payee))
        api_key = sandbox.issue_key(sandbox.create_agent("web3-example"), [wallet["id"]])
        chain.fund(wallet["address"], 10**18)
        usdc.mint(wallet["address"], 5_000_000)
        print(f"wallet {wallet['address']}: 1 ETH and 5 test USDC; may pay only {payee}")

        with CustodyClient(sandbox.url, api_key) as custody:
            account = CustodyAccount.from_client(custody, wallet["id"], purpose="web3 example")
            w3 = connect(chain.serve_rpc(), account)
            pay(w3, account, payee, 10**15, usdc.address, 250_000)
            try_to_pay(w3, account, Account.create().address, 10**15)


def example_policy(chain_id: int, token: str, payee: str) -> dict[str, Any]:
    """Native and token transfers to one payee, with a daily cap on each asset."""
    return {
        "schema_version": 1,
        "id": "web3-example",
        "assets": {
            "eth": {"chain_id": chain_id, "address": "native", "decimals": 18},
            "usdc": {"chain_id": chain_id, "address": token, "decimals": 6},
        },
        "rules": [
            {"id": "transfers", "type": "allow_transfers", "kinds": ["native_transfer", "token_transfer"]},
            {"id": "payees", "type": "payee_allowlist", "payees": [{"address": payee, "label": "supplier"}]},
            {"id": "daily-eth", "type": "cap", "asset": "eth", "max": str(10**17), "period": "day"},
            {"id": "daily-usdc", "type": "cap", "asset": "usdc", "max": "1000000", "period": "day"},
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
    parser.add_argument("--rpc", help="the chain's JSON-RPC node")
    parser.add_argument("--to", help="the payee")
    parser.add_argument("--wei", type=int, default=0, help="native amount in wei")
    parser.add_argument("--token", help="an ERC-20 token address (optional)")
    parser.add_argument("--token-amount", type=int, default=0, help="token amount in base units")
    args = parser.parse_args(argv)
    if args.url is None:
        self_contained()
        return
    if not (args.wallet and args.rpc and args.to):
        parser.error("--url needs --wallet, --rpc and --to")
    with CustodyClient(args.url, api_key_from_environment()) as custody:
        account = CustodyAccount.from_client(custody, args.wallet, purpose="web3 example")
        pay(connect(args.rpc, account), account, args.to, args.wei, args.token, args.token_amount)


if __name__ == "__main__":
    main(sys.argv[1:])
