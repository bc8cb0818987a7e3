"""The agent toolkit against the real service and a real chain: pay, deny, wait for a human, x402.

Error translation and argument checks that need no service run against FakeCustody.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from custody.client import CustodyClient
from custody.client.testing import FakeCustody
from custody.integrations.tools import CustodyToolError, CustodyTools, parse_amount
from tests.integrations.service_fixtures import ETH, USDC, Custody, running_custody

PAYEE = "0x09616C3d61b3331fc4109a9E41a8BDB7d9776609"


@pytest.fixture(scope="module")
def custody() -> Iterator[Custody]:
    with running_custody() as service:
        yield service


def _payee() -> str:
    return str(Account.create().address)


def test_pay_native_is_mined_and_moves_the_balance(custody: Custody) -> None:
    bob = _payee()
    agent = custody.new_agent(custody.policy([bob]))
    w3 = custody.chain.w3
    result = agent.tools.pay(None, bob, str(3 * ETH // 10), chain_id=custody.chain.chain_id, purpose="invoice 1")
    assert result["status"] == "confirmed", result
    assert result["payment_id"].startswith("pay_")
    assert w3.eth.get_balance(bob) == 3 * ETH // 10
    receipt = w3.eth.get_transaction_receipt(result["tx_hash"])
    assert receipt["from"] == agent.address
    limits = {limit["rule_id"]: limit for limit in agent.tools.limits()["limits"]}
    assert int(limits["daily-eth"]["remaining"]) < ETH - 3 * ETH // 10  # value and the gas reserved


def test_pay_token_sends_an_erc20_transfer_to_the_payee(custody: Custody) -> None:
    bob = _payee()
    agent = custody.new_agent(custody.policy([bob]))
    result = agent.tools.pay(
        agent.wallet["id"], bob, 2_500_000, chain_id=custody.chain.chain_id, token=custody.usdc.address
    )
    assert result["status"] == "confirmed", result
    assert result["asset"] == custody.usdc.address
    assert custody.usdc.balance_of(bob) == 2_500_000
    assert custody.usdc.balance_of(agent.address) == 50 * USDC - 2_500_000
    limits = {limit["rule_id"]: limit for limit in agent.tools.limits(agent.wallet["name"])["limits"]}
    assert limits["daily-usdc"]["remaining"] == str(100 * USDC - 2_500_000)


def test_a_denial_names_the_reason_code_rule_and_remaining_budget_and_sends_nothing(custody: Custody) -> None:
    bob = _payee()
    agent = custody.new_agent(custody.policy([bob], usdc_cap=5 * USDC))
    chain_id = custody.chain.chain_id
    agent.tools.pay(None, bob, 3 * USDC, chain_id=chain_id, token=custody.usdc.address)
    with pytest.raises(CustodyToolError) as denied:
        agent.tools.pay(None, bob, 3 * USDC, chain_id=chain_id, token=custody.usdc.address)
    message = str(denied.value)
    assert "Denied by policy" in message
    assert "cap_exceeded (rule daily-usdc)" in message
    assert f"remaining {2 * USDC} base units" in message
    assert "resets at " in message
    assert denied.value.data["status"] == "denied"
    cap = next(r for r in denied.value.data["reasons"] if r["code"] == "cap_exceeded")
    assert cap["remaining"] == str(2 * USDC)
    assert cap["limit"] == str(5 * USDC)
    assert custody.usdc.balance_of(bob) == 3 * USDC


def test_a_payee_outside_the_allowlist_is_denied_with_its_code(custody: Custody) -> None:
    agent = custody.new_agent(custody.policy([_payee()]))
    with pytest.raises(CustodyToolError) as denied:
        agent.tools.pay(None, _payee(), 1000, chain_id=custody.chain.chain_id)
    assert "payee_not_allowlisted" in str(denied.value)


def test_a_payment_held_for_approval_is_sent_by_payment_status_after_an_operator_approves(custody: Custody) -> None:
    bob = _payee()
    agent = custody.new_agent(custody.policy([bob], approval_above_eth=ETH // 2))
    w3 = custody.chain.w3
    pending = agent.tools.pay(None, bob, 6 * ETH // 10, chain_id=custody.chain.chain_id)
    assert pending["status"] == "pending_approval"
    assert pending["approvers"] == {"group": "ops", "m": 1}
    assert "approval_required" in [r["code"] for r in pending["reasons"]]
    assert "payment_status" in pending["message"]
    assert w3.eth.get_balance(bob) == 0
    assert agent.tools.payment_status(pending["payment_id"])["status"] == "pending_approval"

    custody.approve(pending["payment_id"])
    status = agent.tools.payment_status(pending["payment_id"], wait=5)
    assert status["status"] == "signed"
    assert status["chain_status"] == "confirmed", status
    assert w3.eth.get_balance(bob) == 6 * ETH // 10
    again = agent.tools.payment_status(pending["payment_id"])  # already on chain: not sent twice
    assert again["chain_status"] == "confirmed"
    assert again["tx_hash"] == status["tx_hash"]


def _payment_required(custody: Custody, pay_to: str, amount: int) -> dict[str, Any]:
    return {
        "x402Version": 2,
        "error": "payment required",
        "resource": {"url": "http://api.test/report", "description": "a report", "mimeType": "application/json"},
        "accepts": [
            {
                "scheme": "exact",
                "network": custody.chain.network,
                "asset": custody.usdc.address,
                "amount": str(amount),
                "payTo": pay_to,
                "maxTimeoutSeconds": 300,
                "extra": {"name": custody.usdc.name, "version": custody.usdc.version},
            }
        ],
    }


def _recover(custody: Custody, payload: dict[str, Any]) -> str:
    """The address that signed an x402 EIP-3009 payload."""
    authorization = payload["payload"]["authorization"]
    typed = {
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
        "domain": custody.usdc.eip712_domain(),
        "message": {
            **authorization,
            "value": int(authorization["value"]),
            "validAfter": int(authorization["validAfter"]),
            "validBefore": int(authorization["validBefore"]),
        },
    }
    return str(
        Account.recover_message(encode_typed_data(full_message=typed), signature=payload["payload"]["signature"])
    )


def test_sign_x402_payment_returns_a_header_signed_by_the_wallet(custody: Custody) -> None:
    seller = _payee()
    agent = custody.new_agent(
        custody.policy([seller]),
        x402_spend_controls={"allowed_assets": [{"network": custody.chain.network, "asset": custody.usdc.address}]},
    )
    required = _payment_required(custody, seller, 10_000)
    header_value = base64.b64encode(json.dumps(required).encode()).decode()
    result = agent.tools.sign_x402_payment(None, header_value, purpose="a report")
    assert result["status"] == "signed", result
    assert result["header_name"] == "PAYMENT-SIGNATURE"
    payload = json.loads(base64.b64decode(result["header_value"]))
    authorization = payload["payload"]["authorization"]
    assert authorization["to"] == seller
    assert authorization["value"] == "10000"
    assert _recover(custody, payload) == agent.address
    limits = {limit["rule_id"]: limit for limit in agent.tools.limits()["limits"]}
    assert limits["daily-usdc"]["remaining"] == str(100 * USDC - 10_000)


def test_an_x402_payment_held_for_approval_gives_its_header_through_payment_status(custody: Custody) -> None:
    seller = _payee()
    agent = custody.new_agent(
        custody.policy([seller], approval_above_usdc=5_000),
        x402_spend_controls={"allowed_assets": True},
    )
    pending = agent.tools.sign_x402_payment(None, _payment_required(custody, seller, 10_000))
    assert pending["status"] == "pending_approval"
    assert "payment_status" in pending["message"]
    assert "x402" not in agent.tools.payment_status(pending["payment_id"])
    custody.approve(pending["payment_id"])
    status = agent.tools.payment_status(pending["payment_id"], wait=5)
    assert status["status"] == "signed"
    assert status["x402"]["header_name"] == "PAYMENT-SIGNATURE"
    payload = json.loads(base64.b64decode(status["x402"]["header_value"]))
    assert payload["payload"]["signature"] == status["signature"]
    assert payload["payload"]["authorization"]["to"] == seller
    assert payload["accepted"]["payTo"] == seller
    assert _recover(custody, payload) == agent.address


def test_sign_x402_payment_refuses_an_unknown_token_by_default_and_a_payee_the_policy_denies(custody: Custody) -> None:
    seller = _payee()
    agent = custody.new_agent(custody.policy([seller]))
    with pytest.raises(CustodyToolError) as refused:  # the x402 client's own spend controls: unknown token
        agent.tools.sign_x402_payment(None, json.dumps(_payment_required(custody, seller, 10_000)))
    assert refused.value.code == "x402_unsupported"
    assert "spend_controls" in str(refused.value)
    allowed = custody.new_agent(
        custody.policy([seller]),
        x402_spend_controls={"allowed_assets": True},
    )
    with pytest.raises(CustodyToolError) as denied:
        allowed.tools.sign_x402_payment(None, _payment_required(custody, _payee(), 10_000))
    assert "payee_not_allowlisted" in str(denied.value)


# ---------------------------------------------------------------------------- no service needed


def test_amounts_must_be_whole_base_units_never_floats_or_decimals() -> None:
    assert parse_amount(12) == 12
    assert parse_amount(" 1500000 ") == 1_500_000
    assert parse_amount(str(2**255)) == 2**255
    for bad, words in [
        (1.5, "not a float"),
        (1.0, "not a float"),
        (Decimal("1"), "not a Decimal"),
        ("1.5", "digits only"),
        ("1e18", "digits only"),
        ("-3", "digits only"),
        ("0", "greater than zero"),
        (True, "not a boolean"),
        (2**256, "larger than a uint256"),
    ]:
        with pytest.raises(CustodyToolError) as refused:
            parse_amount(bad)
        assert words in str(refused.value), bad
        assert refused.value.code == "invalid_argument"


API_KEY = "cak.test-key-id.super-secret-value-1234567890"
MAINNET_USDC_REQUIREMENT = {
    "scheme": "exact",
    "network": "eip155:1",
    "asset": "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48",
    "amount": "10000",
    "payTo": PAYEE,
    "maxTimeoutSeconds": 60,
    "extra": {"name": "USD Coin", "version": "2"},
}


class _Fake(FakeCustody):
    """FakeCustody whose clients are closed after the test."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: list[CustodyClient] = []

    def client(self, *args: Any, **kwargs: Any) -> CustodyClient:
        client = super().client(*args, **kwargs)
        self.opened.append(client)
        return client


@pytest.fixture
def fake() -> Iterator[_Fake]:
    service = _Fake()
    yield service
    for client in service.opened:
        client.close()


def _tools(fake: FakeCustody, **options: Any) -> CustodyTools:
    return CustodyTools(fake.client(), **options)


def test_errors_from_the_service_become_short_actionable_texts(fake: FakeCustody) -> None:
    wallet = fake.add_wallet("agent")
    tools = _tools(fake)

    wallet.frozen = True
    with pytest.raises(CustodyToolError) as frozen:  # USDC on Ethereum: an asset x402 knows
        tools.sign_x402_payment(None, {"x402Version": 2, "accepts": [MAINNET_USDC_REQUIREMENT]})
    assert frozen.value.code == "frozen"
    assert "operator unfreezes" in str(frozen.value)
    wallet.frozen = False

    fake.fail_next("rate_limited", status=429, headers={"Retry-After": "7"})
    with pytest.raises(CustodyToolError) as limited:
        tools.limits()
    assert "try again after 7 seconds" in str(limited.value)

    fake.fail_next("signer_unavailable", status=503, times=3)
    with pytest.raises(CustodyToolError) as down:
        tools.wallets()
    assert "unavailable" in str(down.value)
    assert "nothing was signed" in str(down.value)

    with pytest.raises(CustodyToolError) as unknown:
        tools.limits("wal_nobody")
    assert unknown.value.code == "not_found"
    assert "`wallets`" in str(unknown.value)

    fake.fail_next("unauthorized", status=401)
    with pytest.raises(CustodyToolError) as refused:
        tools.wallets()
    assert refused.value.code == "unauthorized"


def test_bad_arguments_are_refused_before_anything_is_signed(fake: FakeCustody) -> None:
    fake.add_wallet("agent")
    tools = _tools(fake)
    for kwargs, words in [
        ({"to": "bob", "amount": 1, "chain_id": 1}, "20-byte hex address"),
        ({"to": PAYEE.lower().replace("0x09616c", "0x09616C"), "amount": 1, "chain_id": 1}, "wrong checksum"),
        ({"to": PAYEE, "amount": 0.1, "chain_id": 1}, "not a float"),
        ({"to": PAYEE, "amount": 1, "chain_id": 5}, "No connection to chain 5"),
        ({"to": PAYEE, "amount": 1, "chain_id": 1, "token": "0x12"}, "token must be"),
    ]:
        with pytest.raises(CustodyToolError) as refused:
            tools.pay(None, kwargs.pop("to"), kwargs.pop("amount"), **kwargs)
        assert words in str(refused.value)
    assert fake.payments == {}


def test_with_several_wallets_a_call_must_name_one_unless_a_default_is_set(fake: FakeCustody) -> None:
    first = fake.add_wallet("first")
    second = fake.add_wallet("second")
    with pytest.raises(CustodyToolError) as ambiguous:
        _tools(fake).limits()
    assert "Several wallets" in str(ambiguous.value)
    listed = _tools(fake, default_wallet="second").wallets()
    assert [(w["id"], w["default"]) for w in listed["wallets"]] == [(first.id, False), (second.id, True)]
    assert _tools(fake).limits(second.address.lower())["wallet_id"] == second.id


def test_no_output_or_error_carries_the_api_key_or_an_rpc_url(fake: FakeCustody) -> None:
    fake.add_wallet("agent")
    rpc = "http://127.0.0.1:9/v3/provider-secret-key"
    client = fake.client()
    client._headers["Authorization"] = f"Bearer {API_KEY}"  # as if this were the agent's real key
    tools = CustodyTools(client, rpc_urls={777: rpc})
    texts = [repr(tools), json.dumps(tools.wallets()), json.dumps(tools.limits())]
    with pytest.raises(CustodyToolError) as unreachable:
        tools.pay(None, PAYEE, 1, chain_id=777)
    texts += [str(unreachable.value), json.dumps(unreachable.value.data)]
    assert unreachable.value.code == "chain_unreachable"
    for text in texts:
        assert API_KEY not in text
        assert "provider-secret-key" not in text
