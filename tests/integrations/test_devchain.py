"""The local dev chain: prefunded accounts, the USDC-like test token with EIP-3009, and its HTTP JSON-RPC endpoint."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from importlib import resources
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_tester.exceptions import TransactionFailed
from web3 import Web3
from web3.exceptions import ContractCustomError, ContractLogicError

from custody.devchain import DevChain, TestToken, start_chain, token_artifact

AUTHORIZATION_FIELDS = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]


@pytest.fixture
def chain() -> Iterator[DevChain]:
    with start_chain() as running:
        yield running


@pytest.fixture
def usdc(chain: DevChain) -> TestToken:
    return chain.deploy_test_usdc()


def authorize(
    holder: LocalAccount,
    token: TestToken,
    to: str,
    value: int,
    *,
    kind: str = "TransferWithAuthorization",
    valid_before: int | None = None,
) -> tuple[dict[str, Any], Any]:
    message = {
        "from": holder.address,
        "to": to,
        "value": value,
        "validAfter": 0,
        "validBefore": valid_before if valid_before is not None else int(time.time()) + 600,
        "nonce": secrets.token_bytes(32),
    }
    signed = holder.sign_typed_data(token.eip712_domain(), {kind: AUTHORIZATION_FIELDS}, message)
    return message, signed


def vrs_args(message: dict[str, Any], signed: Any) -> list[Any]:
    fields = [message[f["name"]] for f in AUTHORIZATION_FIELDS]
    return [*fields, signed.v, signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big")]


def test_a_new_chain_has_a_prefunded_funder_and_fund_moves_native_coin(chain: DevChain) -> None:
    assert chain.chain_id == chain.w3.eth.chain_id
    assert chain.network == f"eip155:{chain.chain_id}"
    assert chain.w3.eth.get_balance(chain.funder) >= 10**24
    fresh = Account.create().address
    chain.fund(fresh, 12345)
    assert chain.w3.eth.get_balance(fresh) == 12345
    account = chain.new_account(10**15)
    assert chain.w3.eth.get_balance(account.address) == 10**15


def test_the_test_token_is_usdc_like_and_only_the_funder_mints(chain: DevChain, usdc: TestToken) -> None:
    functions = usdc.contract.functions
    assert (usdc.decimals, usdc.name, usdc.version, usdc.symbol) == (6, "USD Coin", "2", "USDC")
    assert (functions.name().call(), functions.version().call(), functions.symbol().call()) == ("USD Coin", "2", "USDC")
    holder = chain.accounts[1]
    usdc.mint(holder, 5_000_000)
    assert usdc.balance_of(holder) == 5_000_000
    assert functions.totalSupply().call() == 5_000_000
    with pytest.raises(TransactionFailed, match="caller is not the minter"):
        functions.mint(holder, 1).transact({"from": holder})
    assert usdc.balance_of(holder) == 5_000_000


def test_transfer_calldata_sent_as_a_transaction_moves_tokens(chain: DevChain, usdc: TestToken) -> None:
    sender, payee = chain.accounts[1], chain.accounts[2]
    usdc.mint(sender, 1_000)
    data = usdc.transfer_calldata(payee, 250)
    assert data.startswith("0xa9059cbb")
    tx_hash = chain.w3.eth.send_transaction({"from": sender, "to": usdc.address, "data": data})
    assert chain.w3.eth.wait_for_transaction_receipt(tx_hash)["status"] == 1
    assert (usdc.balance_of(sender), usdc.balance_of(payee)) == (750, 250)


def test_transfer_with_authorization_pays_once_and_refuses_replay_expiry_and_a_wrong_signer(
    chain: DevChain, usdc: TestToken
) -> None:
    holder: LocalAccount = Account.create()
    payee = chain.accounts[2]
    usdc.mint(holder.address, 100_000)
    functions = usdc.contract.functions
    message, signed = authorize(holder, usdc, payee, 40_000)
    functions.transferWithAuthorization(*vrs_args(message, signed)).transact({"from": chain.funder})
    assert (usdc.balance_of(holder.address), usdc.balance_of(payee)) == (60_000, 40_000)
    assert functions.authorizationState(holder.address, message["nonce"]).call() is True

    with pytest.raises(TransactionFailed, match="authorization is used or canceled"):
        functions.transferWithAuthorization(*vrs_args(message, signed)).transact({"from": chain.funder})
    expired, expired_sig = authorize(holder, usdc, payee, 1, valid_before=int(time.time()) - 1)
    with pytest.raises(TransactionFailed, match="authorization is expired"):
        functions.transferWithAuthorization(*vrs_args(expired, expired_sig)).transact({"from": chain.funder})
    forged, forged_sig = authorize(Account.create(), usdc, payee, 1)
    forged["from"] = holder.address
    with pytest.raises(TransactionFailed, match="invalid signature"):
        functions.transferWithAuthorization(*vrs_args(forged, forged_sig)).transact({"from": chain.funder})
    # The bytes-signature form (what x402 uses for non-65-byte signatures) verifies the same way.
    other, other_sig = authorize(holder, usdc, payee, 5_000)
    fields = [other[f["name"]] for f in AUTHORIZATION_FIELDS]
    functions.transferWithAuthorization(*fields, bytes(other_sig.signature)).transact({"from": chain.funder})
    assert (usdc.balance_of(holder.address), usdc.balance_of(payee)) == (55_000, 45_000)


def test_receive_with_authorization_must_be_submitted_by_the_payee(chain: DevChain, usdc: TestToken) -> None:
    holder: LocalAccount = Account.create()
    payee = chain.accounts[2]
    usdc.mint(holder.address, 10_000)
    message, signed = authorize(holder, usdc, payee, 3_000, kind="ReceiveWithAuthorization")
    functions = usdc.contract.functions
    with pytest.raises(TransactionFailed, match="caller must be the payee"):
        functions.receiveWithAuthorization(*vrs_args(message, signed)).transact({"from": chain.funder})
    functions.receiveWithAuthorization(*vrs_args(message, signed)).transact({"from": payee})
    assert usdc.balance_of(payee) == 3_000


def test_the_rpc_endpoint_serves_web3_http_clients_until_closed(chain: DevChain, usdc: TestToken) -> None:
    url = chain.serve_rpc()
    assert url.startswith("http://127.0.0.1:")
    assert chain.serve_rpc() == url == chain.rpc_url
    w3 = Web3(Web3.HTTPProvider(url))
    assert w3.eth.chain_id == chain.chain_id
    sender: LocalAccount = chain.new_account(10**18)
    usdc.mint(sender.address, 1_000)
    token = w3.eth.contract(address=usdc.address, abi=usdc.contract.abi)
    assert token.functions.balanceOf(sender.address).call() == 1_000
    assert w3.eth.fee_history(1, "latest", [50])["baseFeePerGas"]

    tx = token.functions.transfer(chain.accounts[3], 400).build_transaction(
        {"from": sender.address, "nonce": w3.eth.get_transaction_count(sender.address, "pending")}
    )
    tx_hash = w3.eth.send_raw_transaction(sender.sign_transaction(tx).raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=5)
    assert receipt["status"] == 1
    assert receipt["logs"][0]["address"] == usdc.address
    assert w3.eth.get_block("latest")["number"] == receipt["blockNumber"]
    assert usdc.balance_of(chain.accounts[3]) == 400

    with pytest.raises(ContractLogicError, match="TestUSDC: caller is not the minter"):
        token.functions.mint(sender.address, 1).call({"from": sender.address})
    with pytest.raises(ContractCustomError):  # OpenZeppelin's ERC20InsufficientBalance, as raw revert data
        token.functions.transfer(chain.accounts[3], 10**9).call({"from": sender.address})

    chain.close()
    assert chain.rpc_url is None
    with pytest.raises(httpx.ConnectError):
        httpx.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})


def test_the_rpc_endpoint_answers_batches_and_refuses_malformed_requests(chain: DevChain) -> None:
    url = chain.serve_rpc()
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []},
        {"jsonrpc": "2.0", "id": 2, "method": "eth_getBalance", "params": [chain.funder, "latest"]},
        {"jsonrpc": "2.0", "id": 3, "method": "eth_noSuchMethod", "params": []},
        {"jsonrpc": "2.0", "id": 4},
    ]
    answers = httpx.post(url, json=batch).json()
    assert answers[0] == {"jsonrpc": "2.0", "id": 1, "result": hex(chain.chain_id)}
    assert int(answers[1]["result"], 16) == chain.w3.eth.get_balance(chain.funder)
    assert "Unknown RPC Endpoint" in answers[2]["error"]["message"]
    assert answers[3]["error"]["code"] == -32600
    bad = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == -32700


def test_requests_over_rpc_and_in_process_at_once_are_all_mined_in_order(chain: DevChain) -> None:
    url = chain.serve_rpc()
    senders = [chain.new_account(10**18) for _ in range(3)]
    payee = Account.create().address
    errors: list[BaseException] = []

    def pay_over_rpc(sender: LocalAccount) -> None:
        try:
            w3 = Web3(Web3.HTTPProvider(url))
            for nonce in range(5):
                tx = {"to": payee, "value": 1, "gas": 21_000, "gasPrice": 2 * 10**9, "nonce": nonce}
                tx["chainId"] = chain.chain_id
                w3.eth.send_raw_transaction(sender.sign_transaction(tx).raw_transaction)
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=pay_over_rpc, args=(s,)) for s in senders]
    for thread in threads:
        thread.start()
    for _ in range(5):
        chain.fund(payee, 10)
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert chain.w3.eth.get_balance(payee) == 3 * 5 + 5 * 10
    assert [chain.w3.eth.get_transaction_count(s.address) for s in senders] == [5, 5, 5]


def test_a_paywall_price_must_be_a_positive_integer_in_base_units(chain: DevChain, usdc: TestToken) -> None:
    from custody.devchain.paywall import x402_paywall

    for price in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            x402_paywall(chain, usdc, pay_to=chain.accounts[1], price=price)  # type: ignore[arg-type]
    assert chain.rpc_url is None  # nothing was started for a refused price


def test_the_compiled_artifact_and_its_source_ship_in_the_package() -> None:
    files = resources.files("custody.devchain")
    source = files.joinpath("TestUSDC.sol").read_text(encoding="utf-8")
    assert "pragma solidity 0.8.30;" in source
    assert "contract TestUSDC is ERC20, EIP712" in source
    artifact = token_artifact()
    assert artifact == json.loads(files.joinpath("TestUSDC.json").read_text(encoding="utf-8"))
    assert artifact["compiler"]["solc"].startswith("0.8.30+")
    names = {entry.get("name") for entry in artifact["abi"]}
    assert {
        "transferWithAuthorization",
        "receiveWithAuthorization",
        "cancelAuthorization",
        "authorizationState",
    } <= names
    assert len(bytes.fromhex(artifact["bytecode"].removeprefix("0x"))) > 4_000
