"""x402 with the custody signer: the signer's contract, then a paid request end to end, fully offline.

End to end (``custody.devchain.paywall``): a FastAPI app behind x402's own payment middleware
sells a report for 0.01 test USDC; x402's own facilitator runs in process and settles on the dev
chain (its gas payer sends ``transferWithAuthorization`` through the chain's HTTP endpoint). The agent pays with x402's
httpx client and ``CustodyX402Signer`` against the real custody service. No lookup or connection
leaves the loopback interface.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from eth_account import Account
from x402 import NoMatchingRequirementsError, x402Client, x402ClientSync
from x402.http.clients.httpx import PaymentError, x402_httpx_transport
from x402.http.utils import decode_payment_response_header
from x402.mechanisms.evm.eip712 import build_typed_data_for_signing
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.mechanisms.evm.types import ExactEIP3009Authorization

from custody.client import ApprovalPending, CustodyAccount, CustodyClient, InvalidResponse, PolicyDenied
from custody.client.testing import FakeCustody, FakeWallet
from custody.devchain import start_chain
from custody.devchain.paywall import Paywall, x402_paywall
from custody.integrations.x402 import CustodyX402Signer, allow_asset, typed_data_document, x402_client
from tests.conftest import LiveServer
from tests.integrations.chain_fixtures import (
    custody_payer,
    decided_intents,
    forbid_non_loopback,
    signed_count,
    token_policy,
)

KEY = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
TOKEN = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
PAYEE = "0x09616C3d61b3331fc4109a9E41a8BDB7d9776609"
PRICE = 10_000  # 0.01 test USDC
TRANSFER_WITH_AUTHORIZATION_VRS = "0xe3ee160e"


# ---------------------------------------------------------------------------- the signer, against a fake service


@pytest.fixture
def fake() -> FakeCustody:
    return FakeCustody()


@pytest.fixture
def fake_wallet(fake: FakeCustody) -> FakeWallet:
    return fake.add_wallet("payer", key=KEY)


@pytest.fixture
def fake_client(fake: FakeCustody) -> Iterator[CustodyClient]:
    with fake.client() as client:
        yield client


def x402_parts(address: str) -> tuple[Any, Any, str, dict[str, Any]]:
    """What x402's exact EVM scheme passes to a signer for an EIP-3009 payment."""
    authorization = ExactEIP3009Authorization(
        from_address=address,
        to=PAYEE,
        value=str(PRICE),
        valid_after="0",
        valid_before=str(int(time.time()) + 300),
        nonce="0x" + "07" * 32,
    )
    return build_typed_data_for_signing(authorization, 8453, TOKEN, "USD Coin", "2")


def test_the_signer_sends_the_full_document_and_signs_exactly_as_a_local_key_would(
    fake: FakeCustody, fake_client: CustodyClient, fake_wallet: FakeWallet
) -> None:
    signer = CustodyX402Signer(fake_client, fake_wallet.id, purpose="reports")
    assert signer.address == fake_wallet.address
    domain, types, primary_type, message = x402_parts(signer.address)
    signature = signer.sign_typed_data(domain, types, primary_type, message)
    assert signature == EthAccountSigner(Account.from_key(KEY)).sign_typed_data(domain, types, primary_type, message)

    sent = json.loads(fake.requests[-1].content)
    assert sent["purpose"] == "reports"
    document = sent["typed_data"]
    assert document["primaryType"] == "TransferWithAuthorization"
    assert document["domain"] == {"name": "USD Coin", "version": "2", "chainId": "8453", "verifyingContract": TOKEN}
    assert [f["name"] for f in document["types"]["EIP712Domain"]] == ["name", "version", "chainId", "verifyingContract"]
    assert document["message"]["to"] == PAYEE
    assert document["message"]["value"] == str(PRICE)
    assert document["message"]["nonce"] == "0x" + "07" * 32


def test_a_permit2_style_domain_without_version_is_sent_as_given() -> None:
    domain = {"name": "Permit2", "chainId": 8453, "verifyingContract": TOKEN}
    types = {"TokenPermissions": [{"name": "token", "type": "address"}, {"name": "amount", "type": "uint256"}]}
    document = typed_data_document(domain, types, "TokenPermissions", {"token": TOKEN, "amount": 5})
    assert document == {
        "types": types,
        "primaryType": "TokenPermissions",
        "domain": domain,
        "message": {"token": TOKEN, "amount": 5},
    }
    with pytest.raises(ValueError, match="unknown EIP-712 domain field"):
        typed_data_document({"name": "x", "colour": "red"}, types, "TokenPermissions", {})


def test_a_denial_reaches_the_caller_unchanged_with_its_reasons(
    fake: FakeCustody, fake_client: CustodyClient, fake_wallet: FakeWallet
) -> None:
    signer = CustodyX402Signer(fake_client, fake_wallet.id, address=fake_wallet.address)
    fake.deny_next([{"code": "cap_exceeded", "rule_id": "daily", "message": "over", "remaining": "7"}])
    with pytest.raises(PolicyDenied) as denied:
        signer.sign_typed_data(*x402_parts(signer.address))
    assert [(r.code, r.rule_id, r.remaining) for r in denied.value.reasons] == [("cap_exceeded", "daily", 7)]


def test_a_payment_held_for_approval_gives_no_signature(
    fake: FakeCustody, fake_client: CustodyClient, fake_wallet: FakeWallet
) -> None:
    signer = CustodyX402Signer(fake_client, fake_wallet.id, address=fake_wallet.address)
    fake.require_approval_next(group="ops", m=1)
    with pytest.raises(ApprovalPending) as pending:
        signer.sign_typed_data(*x402_parts(signer.address))
    assert pending.value.payment_id in fake.payments


def test_a_signature_from_another_key_is_refused(fake_client: CustodyClient, fake_wallet: FakeWallet) -> None:
    someone_else = Account.create().address
    signer = CustodyX402Signer(fake_client, fake_wallet.id, address=someone_else)
    with pytest.raises(InvalidResponse, match="signed by"):
        signer.sign_typed_data(*x402_parts(someone_else))


def test_allow_asset_builds_a_spend_control_entry_in_base_units() -> None:
    assert allow_asset("eip155:1", TOKEN) == {"network": "eip155:1", "asset": TOKEN}
    assert allow_asset("eip155:1", TOKEN, max_per_payment=50_000)["max_amount_per_payment"] == "50000"
    with pytest.raises(ValueError, match="base units"):
        allow_asset("eip155:1", TOKEN, max_per_payment=-1)


def test_x402_client_registers_the_signer_on_a_new_or_given_client(
    fake_client: CustodyClient, fake_wallet: FakeWallet
) -> None:
    signer = CustodyX402Signer(fake_client, fake_wallet.id, address=fake_wallet.address)
    built = x402_client(signer, networks="eip155:8453")
    assert isinstance(built, x402Client)
    given = x402ClientSync()
    assert x402_client(signer, client=given) is given


# ---------------------------------------------------------------------------- end to end on the dev chain


def test_the_loopback_guard_refuses_and_records_other_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = forbid_non_loopback(monkeypatch)
    with pytest.raises(httpx.ConnectError):
        httpx.get("https://facilitator.example/supported")
    with socket.socket() as sock, pytest.raises(OSError, match="test guard"):
        sock.connect(("192.0.2.1", 443))
    assert attempts == ["lookup 'facilitator.example'", "connect ('192.0.2.1', 443)"]


def paying_http(paywall: Paywall, client: x402Client) -> httpx.AsyncClient:
    """The agent's httpx client, paying through ``client``, talking to the paywall's app in process."""
    transport = x402_httpx_transport(client, httpx.ASGITransport(app=paywall.app))
    return httpx.AsyncClient(transport=transport, base_url="http://reports.test")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_an_agent_pays_for_a_report_over_x402_within_a_budget_shared_with_token_transfers(
    admin_api: tuple[httpx.AsyncClient, str], live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts = forbid_non_loopback(monkeypatch)
    admin, _ = admin_api
    with start_chain() as chain:
        usdc = chain.deploy_test_usdc()
        merchant = Account.create().address
        policy = token_policy(
            chain, usdc, payees=[merchant], cap=24_000, kinds=["payment_authorization", "token_transfer"]
        )
        payer = await custody_payer(admin, chain, usdc, policy, tokens=100_000, wei=10**17)
        paywall = x402_paywall(
            chain, usdc, pay_to=merchant, price=PRICE, path="/report", content={"report": "all systems nominal"}
        )

        with CustodyClient(live_server.url, payer.api_key) as custody:
            # An ordinary ERC-20 transfer first: it counts against the same daily cap.
            account = CustodyAccount.from_client(custody, payer.wallet_id)
            tx = {
                "type": 2,
                "chainId": chain.chain_id,
                "nonce": 0,
                "to": usdc.address,
                "data": usdc.transfer_calldata(merchant, 5_000),
                "gas": 100_000,
                "maxFeePerGas": 2 * 10**9,
                "maxPriorityFeePerGas": 10**9,
            }
            receipt = chain.w3.eth.wait_for_transaction_receipt(
                chain.w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
            )
            assert receipt["status"] == 1

            def remaining() -> int:
                return next(limit.remaining for limit in custody.limits(payer.wallet_id) if limit.rule_id == "daily")

            assert remaining() == 19_000
            signer = CustodyX402Signer(custody, payer.wallet_id, purpose="daily report")

            # x402's own spend controls know only real USDC deployments: the test token must be allowed.
            async with paying_http(paywall, x402_client(signer)) as http:
                with pytest.raises(PaymentError) as not_allowed:
                    await http.get("/report")
            assert isinstance(not_allowed.value.__cause__, NoMatchingRequirementsError)
            assert remaining() == 19_000

            client = x402_client(
                signer, networks=chain.network, allowed_assets=[allow_asset(chain.network, usdc.address)]
            )
            async with paying_http(paywall, client) as http:
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=paywall.app)) as plain:
                    assert (await plain.get("http://reports.test/report")).status_code == 402

                paid = await http.get("/report")
                assert paid.status_code == 200, paid.text
                assert paid.json() == {"report": "all systems nominal"}
                settlement = decode_payment_response_header(paid.headers["PAYMENT-RESPONSE"])
                assert settlement.success
                assert paywall.settled == [settlement.transaction]
                settle_tx = chain.w3.eth.get_transaction(settlement.transaction)
                assert settle_tx["to"] == usdc.address
                assert "0x" + bytes(settle_tx["input"][:4]).hex() == TRANSFER_WITH_AUTHORIZATION_VRS
                assert chain.w3.eth.get_transaction_receipt(settlement.transaction)["status"] == 1
                assert usdc.balance_of(merchant) == 5_000 + PRICE
                assert usdc.balance_of(payer.address) == 100_000 - 5_000 - PRICE
                assert remaining() == 9_000  # 24,000 - 5,000 (ERC-20) - 10,000 (x402)
                # What the policy judged: the authorization's token, payee and amount, not a hash.
                erc20, x402_payment = (await decided_intents(admin))[-2:]
                assert (erc20["kind"], erc20["amount"], erc20["outcome"]) == ("token_transfer", 5_000, "allow")
                assert x402_payment["kind"] == "payment_authorization"
                assert x402_payment["method"] == "typed_data"
                assert (x402_payment["asset"], x402_payment["payee"]) == (usdc.address.lower(), merchant.lower())
                assert (x402_payment["amount"], x402_payment["outcome"]) == (PRICE, "allow")
                assert x402_payment["purpose"] == "daily report"

                # A second report would exceed the cap: refused before anything is signed.
                signed_before = await signed_count(admin)
                with pytest.raises(PaymentError) as refused:
                    await http.get("/report")
                denied = refused.value.__cause__
                assert isinstance(denied, PolicyDenied)
                cap = next(reason for reason in denied.reasons if reason.code == "cap_exceeded")
                assert (cap.rule_id, cap.remaining) == ("daily", 9_000)
                assert cap.counter == f"{chain.chain_id}:{usdc.address.lower()}"
                assert await signed_count(admin) == signed_before
                assert remaining() == 9_000
                assert paywall.settled == [settlement.transaction]
                assert usdc.balance_of(merchant) == 5_000 + PRICE
    assert attempts == []
