"""The SDK against FakeCustody (the same contract as the service): results, errors, retries, idempotency."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import httpx
import pytest

from custody import errors as server_errors
from custody.client import (
    ApprovalExpired,
    ApprovalRejected,
    ApprovalTimeout,
    AsyncCustodyClient,
    CustodyClient,
    CustodyConnectionError,
    CustodyError,
    DependencyUnavailable,
    Frozen,
    IdempotencyConflict,
    InvalidRequest,
    NotFound,
    PolicyDenied,
    RateLimited,
    Unauthorized,
)
from custody.client import _client as client_module
from custody.client.testing import FakeCustody, FakeWallet

RECIPIENT = "0x09616C3d61b3331fc4109a9E41a8BDB7d9776609"
TX = {
    "to": RECIPIENT,
    "value": 2**200,
    "gas": 21_000,
    "maxFeePerGas": 3 * 10**9,
    "maxPriorityFeePerGas": 10**9,
    "nonce": 0,
    "chainId": 1,
}
TYPED = {
    "types": {
        "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "chainId", "type": "uint256"}],
        "Pay": [{"name": "to", "type": "address"}, {"name": "amount", "type": "uint256"}],
    },
    "primaryType": "Pay",
    "domain": {"name": "Shop", "chainId": 1},
    "message": {"to": RECIPIENT, "amount": 2**255},
}
REASON = {
    "code": "daily_cap_exceeded",
    "rule_id": "daily-usdc",
    "message": "the daily cap would be exceeded",
    "counter": "usdc-daily",
    "limit": 2**64,
    "remaining": 2**60,
    "resets_at": "2030-01-01T00:00:00Z",
}


@pytest.fixture
def fake() -> FakeCustody:
    return FakeCustody()


@pytest.fixture
def wallet(fake: FakeCustody) -> FakeWallet:
    return fake.add_wallet("research-agent")


@pytest.fixture
def client(fake: FakeCustody) -> Any:
    with fake.client() as custody:
        yield custody


def sign_bodies(fake: FakeCustody) -> list[dict[str, Any]]:
    return [json.loads(r.content) for r in fake.requests if r.method == "POST"]


def problem_transport(status: int, body: dict[str, Any] | str, headers: dict[str, str] | None = None) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        content = body if isinstance(body, str) else json.dumps(body)
        return httpx.Response(status, content=content.encode(), headers=headers or {})

    return httpx.MockTransport(handler)


# -- results


def test_lists_only_the_wallets_this_key_may_use(fake: FakeCustody, wallet: FakeWallet, client: CustodyClient) -> None:
    fake.add_wallet("someone-else", visible=False)
    [listed] = client.wallets()
    assert (listed.id, listed.name, listed.address) == (wallet.id, "research-agent", wallet.address)


def test_signs_a_transaction_sending_integers_as_decimal_strings(
    fake: FakeCustody, wallet: FakeWallet, client: CustodyClient
) -> None:
    outcome = client.sign_transaction(wallet.id, TX, purpose="pay invoice 42", origin="https://shop.example")
    assert outcome.signed
    assert not outcome.pending
    assert outcome.payment_id.startswith("pay_")
    expected = wallet.account.sign_transaction(TX)
    assert outcome.result is not None
    assert outcome.result.raw_transaction == expected.raw_transaction.to_0x_hex()
    [body] = sign_bodies(fake)
    assert body["transaction"]["value"] == str(2**200)
    assert body["transaction"]["gas"] == "21000"
    assert (body["purpose"], body["origin"]) == ("pay invoice 42", "https://shop.example")


def test_signs_typed_data_as_the_full_document_with_uint_fields_as_strings(
    fake: FakeCustody, wallet: FakeWallet, client: CustodyClient
) -> None:
    outcome = client.sign_typed_data(wallet.id, TYPED)
    expected = wallet.account.sign_typed_data(full_message=TYPED)
    assert outcome.result is not None
    assert outcome.result.signature == expected.signature.to_0x_hex()
    [body] = sign_bodies(fake)
    assert body["typed_data"]["message"]["amount"] == str(2**255)
    assert body["typed_data"]["primaryType"] == "Pay"


def test_signs_a_text_message(wallet: FakeWallet, client: CustodyClient) -> None:
    from eth_account.messages import encode_defunct

    outcome = client.sign_message(wallet.id, "I agree")
    assert outcome.result is not None
    assert outcome.result.signature == wallet.account.sign_message(encode_defunct(text="I agree")).signature.to_0x_hex()


def test_limits_come_back_as_integers(fake: FakeCustody, wallet: FakeWallet, client: CustodyClient) -> None:
    fake.set_limits(
        wallet.id,
        [
            {
                "rule_id": "daily",
                "counter": "eth-daily",
                "limit": 2**70,
                "remaining": 2**69,
                "window_start": "2030-01-01T00:00:00Z",
                "window_end": "2030-01-02T00:00:00Z",
                "resets_at": "2030-01-02T00:00:00Z",
            }
        ],
    )
    [limit] = client.limits(wallet.id)
    assert (limit.limit, limit.remaining) == (2**70, 2**69)
    assert limit.resets_at is not None
    assert limit.resets_at.year == 2030


# -- approvals


def test_pending_approval_is_a_result_and_waiting_returns_the_signature_after_approval(
    fake: FakeCustody, wallet: FakeWallet, client: CustodyClient
) -> None:
    fake.require_approval_next(group="treasurers", m=2, reasons=[{"code": "over_approval_threshold", "message": "m"}])
    outcome = client.sign_transaction(wallet.id, TX)
    assert outcome.pending
    assert outcome.result is None
    assert outcome.quorum is not None
    assert (outcome.quorum.group, outcome.quorum.m) == ("treasurers", 2)
    assert outcome.expires_at is not None
    assert [r.code for r in outcome.reasons] == ["over_approval_threshold"]
    assert client.payment(outcome.payment_id).pending

    fake.approve(outcome.payment_id)
    payment = client.wait_for_approval(outcome.payment_id, timeout=5)
    assert payment.status == "signed"
    assert payment.result is not None
    assert payment.result.model_dump() == {
        "raw_transaction": wallet.account.sign_transaction(TX).raw_transaction.to_0x_hex(),
        "hash": wallet.account.sign_transaction(TX).hash.to_0x_hex(),
    }


@pytest.mark.parametrize(
    ("decide", "error"),
    [("reject", ApprovalRejected), ("expire", ApprovalExpired), ("deny", PolicyDenied)],
)
def test_waiting_raises_when_the_payment_ends_unsigned(
    fake: FakeCustody, wallet: FakeWallet, client: CustodyClient, decide: str, error: type[CustodyError]
) -> None:
    fake.require_approval_next()
    outcome = client.sign_message(wallet.id, "pay?")
    getattr(fake, decide)(outcome.payment_id)
    with pytest.raises(error) as raised:
        client.wait_for_approval(outcome.payment_id, timeout=5)
    assert raised.value.extra["payment_id"] == outcome.payment_id


def test_waiting_gives_up_with_approval_timeout_while_still_pending(
    fake: FakeCustody, wallet: FakeWallet, client: CustodyClient
) -> None:
    fake.require_approval_next()
    outcome = client.sign_message(wallet.id, "pay?")
    with pytest.raises(ApprovalTimeout) as raised:
        client.wait_for_approval(outcome.payment_id, timeout=0)
    assert raised.value.payment_id == outcome.payment_id


def test_a_long_poll_sends_wait_and_extends_the_read_timeout(
    fake: FakeCustody, wallet: FakeWallet, client: CustodyClient
) -> None:
    fake.require_approval_next()
    outcome = client.sign_message(wallet.id, "pay?")
    client.payment(outcome.payment_id, wait=25)
    request = fake.requests[-1]
    assert request.url.params["wait"] == "25"
    assert request.extensions["timeout"]["read"] == client_module.DEFAULT_TIMEOUT + 25


@pytest.mark.parametrize("wait", [-1, 31, True])
def test_wait_outside_0_to_30_seconds_is_refused_before_sending(client: CustodyClient, wait: int) -> None:
    with pytest.raises(ValueError, match="wait"):
        client.payment("pay_1", wait=wait)


# -- errors


def test_denial_raises_policy_denied_with_integer_budgets(
    fake: FakeCustody, wallet: FakeWallet, client: CustodyClient
) -> None:
    fake.deny_next([REASON])
    with pytest.raises(PolicyDenied) as raised:
        client.sign_transaction(wallet.id, TX)
    [reason] = raised.value.reasons
    assert (reason.code, reason.rule_id, reason.counter) == ("daily_cap_exceeded", "daily-usdc", "usdc-daily")
    assert (reason.limit, reason.remaining) == (2**64, 2**60)
    assert raised.value.problem["reasons"][0]["limit"] == str(2**64)  # on the wire: a decimal string
    assert raised.value.status == 403
    assert isinstance(raised.value, server_errors.PolicyDenied)


def test_a_foreign_wallet_looks_exactly_like_a_missing_one(fake: FakeCustody, client: CustodyClient) -> None:
    foreign = fake.add_wallet("other-agent", visible=False)
    with pytest.raises(NotFound) as foreign_error:
        client.sign_message(foreign.id, "hi")
    with pytest.raises(NotFound) as missing_error:
        client.sign_message("wal_missing", "hi")
    strip = {"detail", "instance"}
    assert {k: v for k, v in foreign_error.value.problem.items() if k not in strip} == {
        k: v for k, v in missing_error.value.problem.items() if k not in strip
    }
    with pytest.raises(NotFound):
        client.limits(foreign.id)


def test_errors_are_the_server_side_classes_too(fake: FakeCustody, client: CustodyClient) -> None:
    with pytest.raises(server_errors.NotFound):
        client.limits("wal_missing")


def test_a_frozen_wallet_raises_frozen(fake: FakeCustody, wallet: FakeWallet, client: CustodyClient) -> None:
    wallet.frozen = True
    with pytest.raises(Frozen) as raised:
        client.sign_message(wallet.id, "hi")
    assert raised.value.status == 423


def test_a_wrong_api_key_is_unauthorized(fake: FakeCustody) -> None:
    with (
        CustodyClient(fake.base_url, "cak.x.wrong", transport=fake.transport()) as custody,
        pytest.raises(Unauthorized),
    ):
        custody.wallets()


def test_an_unknown_problem_code_becomes_the_base_error_with_its_code_status_and_document() -> None:
    problem = {"type": "t", "title": "Brewing", "status": 418, "detail": "short and stout", "code": "teapot", "x": 1}
    transport = problem_transport(418, problem, {"content-type": "application/problem+json"})
    with (
        CustodyClient("http://c.test", "cak.a.b", transport=transport) as custody,
        pytest.raises(CustodyError) as raised,
    ):
        custody.wallets()
    error = raised.value
    assert type(error) is CustodyError
    assert (error.code, error.status, error.detail) == ("teapot", 418, "short and stout")
    assert error.problem == problem
    assert error.extra == {"x": 1}
    assert CustodyError.code == "internal_error"  # the instance value did not leak into the class


def test_an_error_without_a_problem_document_still_raises_a_custody_error() -> None:
    transport = problem_transport(502, "<html>bad gateway</html>")
    with CustodyClient("http://c.test", "cak.a.b", transport=transport) as c, pytest.raises(CustodyError) as raised:
        c.wallets()
    assert (raised.value.code, raised.value.status) == ("http_502", 502)


# -- idempotency and retries


def test_the_same_idempotency_key_replays_the_same_response(
    fake: FakeCustody, wallet: FakeWallet, client: CustodyClient
) -> None:
    first = client.sign_transaction(wallet.id, TX, idempotency_key="invoice-42")
    second = client.sign_transaction(wallet.id, TX, idempotency_key="invoice-42")
    assert first == second
    assert len(fake.payments) == 1


def test_the_same_idempotency_key_replays_a_denial(
    fake: FakeCustody, wallet: FakeWallet, client: CustodyClient
) -> None:
    fake.deny_next([REASON])
    for _ in range(2):
        with pytest.raises(PolicyDenied):
            client.sign_message(wallet.id, "hi", idempotency_key="k1")
    assert client.sign_message(wallet.id, "hi", idempotency_key="k2").signed


def test_the_same_idempotency_key_with_another_body_conflicts(wallet: FakeWallet, client: CustodyClient) -> None:
    client.sign_message(wallet.id, "one", idempotency_key="k")
    with pytest.raises(IdempotencyConflict) as raised:
        client.sign_message(wallet.id, "two", idempotency_key="k")
    assert raised.value.status == 409
    assert isinstance(raised.value, server_errors.Conflict)


def test_each_call_gets_its_own_idempotency_key(fake: FakeCustody, wallet: FakeWallet, client: CustodyClient) -> None:
    client.sign_message(wallet.id, "hi")
    client.sign_message(wallet.id, "hi")
    keys = [r.headers["Idempotency-Key"] for r in fake.requests]
    assert len(set(keys)) == 2
    assert len(fake.payments) == 2


def test_a_503_is_retried_with_the_same_idempotency_key(
    fake: FakeCustody, wallet: FakeWallet, client: CustodyClient
) -> None:
    fake.fail_next("signer_unavailable", times=2)
    assert client.sign_transaction(wallet.id, TX).signed
    keys = [r.headers["Idempotency-Key"] for r in fake.requests]
    assert len(keys) == 3
    assert len(set(keys)) == 1
    assert len(fake.payments) == 1


def test_a_503_is_retried_a_bounded_number_of_times_then_raised(fake: FakeCustody, wallet: FakeWallet) -> None:
    fake.fail_next("signer_sealed", times=10)
    with fake.client(max_retries=3) as custody, pytest.raises(DependencyUnavailable) as raised:
        custody.sign_message(wallet.id, "hi")
    assert raised.value.code == "signer_sealed"
    assert len(fake.requests) == 4


@pytest.mark.parametrize("code", ["invalid_request", "policy_denied", "not_found", "frozen", "idempotency_conflict"])
def test_a_4xx_is_never_retried(fake: FakeCustody, wallet: FakeWallet, client: CustodyClient, code: str) -> None:
    fake.fail_next(code, times=5)
    with pytest.raises(CustodyError):
        client.sign_message(wallet.id, "hi")
    assert len(fake.requests) == 1


def test_rate_limited_is_not_retried_and_says_when_to_come_back(fake: FakeCustody, client: CustodyClient) -> None:
    fake.fail_next("rate_limited", status=429, headers={"Retry-After": "7"}, times=3)
    with pytest.raises(RateLimited) as raised:
        client.wallets()
    assert raised.value.retry_after == 7
    assert len(fake.requests) == 1


def test_retries_back_off_exponentially_up_to_a_cap(
    fake: FakeCustody, wallet: FakeWallet, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []
    monkeypatch.setattr("custody.client._client.time.sleep", slept.append)
    fake.fail_next("database_unavailable", times=6)
    with fake.client(max_retries=5, retry_backoff=1.0) as custody, pytest.raises(CustodyError):
        custody.wallets()
    assert slept == [1.0, 2.0, 4.0, 8.0, 8.0]


def test_connection_errors_are_retried_then_raised_as_custody_connection_error(wallet: FakeWallet) -> None:
    attempts: list[str] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        attempts.append(request.headers["Idempotency-Key"])
        raise httpx.ConnectError("refused", request=request)

    transport = httpx.MockTransport(refuse)
    custody = CustodyClient("http://c.test", "cak.a.b", transport=transport, retry_backoff=0, max_retries=2)
    with custody, pytest.raises(CustodyConnectionError) as raised:
        custody.sign_message(wallet.id, "hi")
    assert len(attempts) == 3
    assert len(set(attempts)) == 1
    assert isinstance(raised.value.__cause__, httpx.ConnectError)


# -- request hygiene


def test_ids_are_quoted_so_they_cannot_leave_their_path_segment(fake: FakeCustody, client: CustodyClient) -> None:
    with pytest.raises(NotFound):
        client.limits("../payments/pay_1")
    assert fake.requests[-1].url.raw_path == b"/v1/wallets/..%2Fpayments%2Fpay_1/limits"


@pytest.mark.parametrize("key", ["", "x" * 201, "naïve", "a\nb"])
def test_bad_idempotency_keys_are_refused_before_sending(wallet: FakeWallet, client: CustodyClient, key: str) -> None:
    with pytest.raises(ValueError, match="idempotency_key"):
        client.sign_message(wallet.id, "hi", idempotency_key=key)


def test_the_api_key_never_appears_in_repr(fake: FakeCustody, client: CustodyClient) -> None:
    assert fake.api_key not in repr(client)


def test_an_invalid_transaction_is_refused_by_the_service_as_invalid_request(
    wallet: FakeWallet, client: CustodyClient
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        client.sign_transaction(wallet.id, {**TX, "chainId": 0})
    assert raised.value.code == "invalid_transaction"


def test_the_sdk_imports_and_works_without_eth_account() -> None:
    script = """
import sys
for name in ("eth_account", "eth_utils", "eth_keys", "web3"):
    sys.modules[name] = None
import httpx, custody.client as sdk
from custody.client._client import encode_transaction
assert encode_transaction({"to": "0xAbC", "value": 5})["value"] == "5"
try:
    sdk.CustodyAccount
except ImportError:
    print("lazy")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "lazy"


# -- async


async def test_async_client_signs_waits_for_approval_and_raises_denials(fake: FakeCustody, wallet: FakeWallet) -> None:
    async with fake.async_client() as custody:
        [listed] = await custody.wallets()
        assert listed.id == wallet.id
        assert (await custody.sign_typed_data(wallet.id, TYPED)).signed
        fake.require_approval_next()
        outcome = await custody.sign_transaction(wallet.id, TX)
        assert outcome.pending
        fake.approve(outcome.payment_id)
        payment = await custody.wait_for_approval(outcome.payment_id, timeout=5)
        assert payment.result is not None
        assert payment.result.raw_transaction == wallet.account.sign_transaction(TX).raw_transaction.to_0x_hex()
        fake.deny_next([REASON])
        with pytest.raises(PolicyDenied) as raised:
            await custody.sign_message(wallet.id, "hi")
        assert raised.value.reasons[0].remaining == 2**60


async def test_async_client_retries_a_503_with_the_same_key_and_never_a_4xx(
    fake: FakeCustody, wallet: FakeWallet
) -> None:
    async with fake.async_client() as custody:
        fake.fail_next("signer_unavailable", times=1)
        assert (await custody.sign_message(wallet.id, "hi")).signed
        assert len({r.headers["Idempotency-Key"] for r in fake.requests}) == 1
        fake.fail_next("invalid_request", times=3)
        with pytest.raises(InvalidRequest):
            await custody.limits(wallet.id)
        assert len(fake.requests) == 3


async def test_async_waiting_raises_rejected_and_timeout(fake: FakeCustody, wallet: FakeWallet) -> None:
    async with fake.async_client() as custody:
        fake.require_approval_next()
        first = await custody.sign_message(wallet.id, "a")
        fake.reject(first.payment_id)
        with pytest.raises(ApprovalRejected):
            await custody.wait_for_approval(first.payment_id, timeout=5)
        fake.require_approval_next()
        second = await custody.sign_message(wallet.id, "b")
        with pytest.raises(ApprovalTimeout):
            await custody.wait_for_approval(second.payment_id, timeout=0)


async def test_async_client_accepts_a_custom_transport(fake: FakeCustody, wallet: FakeWallet) -> None:
    async with AsyncCustodyClient(fake.base_url, fake.api_key, transport=httpx.MockTransport(fake.handler)) as c:
        assert [w.id for w in await c.wallets()] == [wallet.id]


def test_a_frozen_answer_is_replayed_for_the_same_idempotency_key(wallet: FakeWallet, client: CustodyClient) -> None:
    wallet.frozen = True
    with pytest.raises(Frozen):
        client.sign_message(wallet.id, "hi", idempotency_key="k")
    wallet.frozen = False
    with pytest.raises(Frozen):
        client.sign_message(wallet.id, "hi", idempotency_key="k")
    assert client.sign_message(wallet.id, "hi").signed


def test_waiting_on_a_payment_whose_signing_failed_raises_and_says_nothing_was_signed() -> None:
    from custody.client import CustodyClient, DependencyUnavailable

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"payment_id": "pay_1", "wallet_id": "wal_1", "status": "failed"})

    transport = httpx.MockTransport(handler)
    with (
        CustodyClient("http://custody.test", "cak.k.s", transport=transport) as client,
        pytest.raises(DependencyUnavailable, match="nothing was signed"),
    ):
        client.wait_for_approval("pay_1", timeout=1)
