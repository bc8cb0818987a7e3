"""ERC-20 transfers through web3.py with ``CustodyAccount``: the policy reads payee and amount from the calldata.

The real custody service (SQLite) signs; the transactions go to the dev chain's HTTP endpoint,
both through web3's signing middleware and as raw transactions.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from eth_account import Account
from web3 import Web3
from web3.middleware import SignAndSendRawMiddlewareBuilder

from custody.client import CustodyAccount, CustodyClient, PolicyDenied, register_with_web3
from custody.devchain import DevChain, TestToken, start_chain
from tests.conftest import LiveServer
from tests.integrations.chain_fixtures import Payer, custody_payer, signed_count, token_policy

CAP = 1_000_000  # 1 test USDC a day
SQLITE = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


@pytest.fixture
def chain() -> Iterator[DevChain]:
    with start_chain() as running:
        yield running


@pytest.fixture
def usdc(chain: DevChain) -> TestToken:
    return chain.deploy_test_usdc()


@pytest.fixture
def bob() -> str:
    return str(Account.create().address)


@pytest.fixture
async def payer(admin_api: tuple[httpx.AsyncClient, str], chain: DevChain, usdc: TestToken, bob: str) -> Payer:
    policy = token_policy(chain, usdc, payees=[bob], cap=CAP, kinds=["token_transfer"])
    return await custody_payer(admin_api[0], chain, usdc, policy, tokens=2_000_000, wei=10**18)


@pytest.fixture
def custody(live_server: LiveServer, payer: Payer) -> Iterator[CustodyClient]:
    with CustodyClient(live_server.url, payer.api_key) as client:
        yield client


def erc20_tx(chain: DevChain, usdc: TestToken, to: str, amount: int, nonce: int) -> dict[str, Any]:
    return {
        "type": 2,
        "chainId": chain.chain_id,
        "nonce": nonce,
        "to": usdc.address,
        "value": 0,
        "data": usdc.transfer_calldata(to, amount),
        "gas": 100_000,
        "maxFeePerGas": 3 * 10**9,
        "maxPriorityFeePerGas": 10**9,
    }


def remaining(custody: CustodyClient, payer: Payer) -> int:
    return next(limit.remaining for limit in custody.limits(payer.wallet_id) if limit.rule_id == "daily")


@SQLITE
async def test_an_erc20_transfer_is_signed_through_web3_middleware_and_raw_then_mined_and_counted(
    chain: DevChain, usdc: TestToken, bob: str, payer: Payer, custody: CustodyClient
) -> None:
    account = CustodyAccount.from_client(custody, payer.wallet_id, purpose="supplier invoice")
    w3 = Web3(Web3.HTTPProvider(chain.serve_rpc()))
    register_with_web3()
    w3.middleware_onion.inject(SignAndSendRawMiddlewareBuilder.build(account), layer=0)
    token = w3.eth.contract(address=usdc.address, abi=usdc.contract.abi)

    # web3 fills nonce, gas and fees, asks the account to sign, sends the raw transaction.
    tx_hash = token.functions.transfer(bob, 300_000).transact({"from": account.address})
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=5)
    assert receipt["status"] == 1
    assert receipt["from"] == payer.address
    assert usdc.balance_of(bob) == 300_000
    assert remaining(custody, payer) == CAP - 300_000

    # Raw signing, sent by the caller.
    signed = account.sign_transaction(erc20_tx(chain, usdc, bob, 200_000, nonce=1))
    receipt = w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(signed.raw_transaction), timeout=5)
    assert receipt["status"] == 1
    assert usdc.balance_of(bob) == 500_000
    assert usdc.balance_of(payer.address) == 1_500_000
    assert remaining(custody, payer) == CAP - 500_000


@SQLITE
async def test_a_transfer_to_an_unlisted_payee_or_over_the_cap_is_denied_from_the_calldata_and_nothing_is_mined(
    admin_api: tuple[httpx.AsyncClient, str],
    chain: DevChain,
    usdc: TestToken,
    bob: str,
    payer: Payer,
    custody: CustodyClient,
) -> None:
    account = CustodyAccount.from_client(custody, payer.wallet_id)
    eve = str(Account.create().address)
    w3 = Web3(Web3.HTTPProvider(chain.serve_rpc()))
    register_with_web3()
    w3.middleware_onion.inject(SignAndSendRawMiddlewareBuilder.build(account), layer=0)
    token = w3.eth.contract(address=usdc.address, abi=usdc.contract.abi)
    block, signed_before = w3.eth.block_number, await signed_count(admin_api[0])

    # The transaction's `to` is the (unlisted) token contract; the payee in the calldata is what is judged.
    with pytest.raises(PolicyDenied) as unlisted:
        token.functions.transfer(eve, 1_000).transact({"from": account.address})
    reasons = {reason.code: reason for reason in unlisted.value.reasons}
    assert set(reasons) == {"payee_not_allowlisted"}
    assert eve.lower() in reasons["payee_not_allowlisted"].message.lower()

    with pytest.raises(PolicyDenied) as over:
        account.sign_transaction(erc20_tx(chain, usdc, bob, CAP + 1, nonce=0))
    cap = next(reason for reason in over.value.reasons if reason.code == "cap_exceeded")
    assert (cap.rule_id, cap.remaining, cap.limit) == ("daily", CAP, CAP)
    assert cap.counter == f"{chain.chain_id}:{usdc.address.lower()}"
    assert str(CAP + 1) in cap.message

    assert w3.eth.block_number == block
    assert w3.eth.get_transaction_count(payer.address) == 0
    assert (usdc.balance_of(eve), usdc.balance_of(bob)) == (0, 0)
    assert await signed_count(admin_api[0]) == signed_before
    assert remaining(custody, payer) == CAP
