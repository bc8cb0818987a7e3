"""The payment path through the real API on both backends: decide, reserve, sign; deny; approve; freeze."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from eth_account import Account
from web3 import Web3

from custody.services.operators import issue_operator
from custody.settings import Settings
from tests.payments.helpers import GAS, agent_key, native_policy, set_policy, transfer, wallet

API = tuple[httpx.AsyncClient, str]
CHAIN = 31337
BOB = Web3.to_checksum_address("0x" + "b0" * 20)
EVE = Web3.to_checksum_address("0x" + "e0" * 20)
ETH = 10**18


async def _setup(api: API, cap: int = ETH, approval_above: int | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    client, _ = api
    payer = await wallet(client)
    await set_policy(client, payer["id"], native_policy(CHAIN, [BOB], cap, approval_above))
    _, key = await agent_key(client, [payer["id"]])
    return payer, {"Authorization": f"Bearer {key}"}


async def _pay(
    client: httpx.AsyncClient, headers: dict[str, str], wallet_id: str, value: int, to: str = BOB, **kw: Any
) -> httpx.Response:
    body = {"transaction": transfer(CHAIN, to, value, kw.pop("nonce", 0)), **kw}
    return await client.post(f"/v1/wallets/{wallet_id}/sign/transaction", json=body, headers=headers)


async def test_allowed_payment_is_signed_by_the_wallet_key(api: API) -> None:
    client, _ = api
    payer, headers = await _setup(api)
    response = await _pay(client, headers, payer["id"], ETH // 10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "signed"
    assert Account.recover_transaction(body["result"]["raw_transaction"]) == payer["address"]
    status = await client.get(f"/v1/payments/{body['payment_id']}", headers=headers)
    assert status.json()["status"] == "signed"


async def test_a_wallet_without_a_policy_signs_nothing(api: API) -> None:
    client, _ = api
    payer = await wallet(client)
    _, key = await agent_key(client, [payer["id"]])
    response = await _pay(client, {"Authorization": f"Bearer {key}"}, payer["id"], 1)
    assert response.status_code == 403
    assert [r["code"] for r in response.json()["reasons"]] == ["no_policy"]


async def test_denial_names_every_reason_with_remaining_budget(api: API) -> None:
    client, _ = api
    payer, headers = await _setup(api)
    assert (await _pay(client, headers, payer["id"], 4 * ETH // 10)).status_code == 200
    assert (await _pay(client, headers, payer["id"], 4 * ETH // 10, nonce=1)).status_code == 200
    denied = await _pay(client, headers, payer["id"], 4 * ETH // 10, nonce=2)
    assert denied.status_code == 403
    problem = denied.json()
    assert problem["code"] == "policy_denied"
    cap = next(r for r in problem["reasons"] if r["code"] == "cap_exceeded")
    assert int(cap["remaining"]) == ETH - 2 * (4 * ETH // 10 + GAS)
    assert cap["resets_at"]
    unknown = await _pay(client, headers, payer["id"], 1, to=EVE, nonce=2)
    assert "payee_not_allowlisted" in [r["code"] for r in unknown.json()["reasons"]]


async def test_concurrent_payments_never_exceed_the_cap(api: API) -> None:
    client, _ = api
    each = ETH // 10
    payer, headers = await _setup(api, cap=5 * (each + GAS))
    results = await asyncio.gather(*(_pay(client, headers, payer["id"], each, nonce=n) for n in range(20)))
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) == 5
    assert codes.count(403) == 15


async def test_idempotent_replay_returns_the_same_response_and_reserves_once(api: API) -> None:
    client, _ = api
    payer, headers = await _setup(api, cap=ETH // 10 + GAS)
    keyed = headers | {"Idempotency-Key": "order-42"}
    first = await _pay(client, keyed, payer["id"], ETH // 10)
    replays = await asyncio.gather(*(_pay(client, keyed, payer["id"], ETH // 10) for _ in range(10)))
    assert first.status_code == 200
    assert all(r.status_code == 200 and r.json() == first.json() for r in replays)
    other = await _pay(client, keyed, payer["id"], ETH // 100)
    assert other.status_code == 409
    assert other.json()["code"] == "idempotency_conflict"
    # The cap fits exactly one payment: had a replay reserved again, this would be a different denial.
    fresh = await _pay(client, headers, payer["id"], 1, nonce=1)
    assert [r["code"] for r in fresh.json()["reasons"]] == ["cap_exceeded"]


async def test_a_key_used_once_refuses_a_changed_body_even_one_refused_before_any_decision(api: API) -> None:
    client, _ = api
    payer, headers = await _setup(api)
    keyed = headers | {"Idempotency-Key": "order-43"}
    assert (await _pay(client, keyed, payer["id"], ETH // 100)).status_code == 200
    url = f"/v1/wallets/{payer['id']}/sign/transaction"
    broken = {"transaction": transfer(CHAIN, BOB, 1, 0) | {"chainId": 0}}  # refused while decoding
    changed = await client.post(url, json=broken, headers=keyed)
    assert changed.status_code == 409, changed.text
    assert changed.json()["code"] == "idempotency_conflict"
    # A refusal made before any decision is itself the stored answer for its key.
    refused_key = headers | {"Idempotency-Key": "order-44"}
    first = await client.post(url, json=broken, headers=refused_key)
    again = await client.post(url, json=broken, headers=refused_key)
    assert first.status_code == again.status_code == 400
    assert first.json() == again.json()
    other = await _pay(client, refused_key, payer["id"], ETH // 100)
    assert other.status_code == 409


async def test_a_denial_is_replayed_too(api: API) -> None:
    client, _ = api
    payer, headers = await _setup(api)
    keyed = headers | {"Idempotency-Key": "deny-me"}
    first = await _pay(client, keyed, payer["id"], 1, to=EVE)
    second = await _pay(client, keyed, payer["id"], 1, to=EVE)
    assert first.status_code == second.status_code == 403
    assert first.json() == second.json()


async def test_payment_above_the_threshold_waits_for_approval_then_is_signed(api: API) -> None:
    client, _ = api
    payer, headers = await _setup(api, approval_above=ETH // 2)
    pending = await _pay(client, headers, payer["id"], 6 * ETH // 10)
    assert pending.status_code == 202
    payment_id = pending.json()["payment_id"]
    assert pending.json()["quorum"] == {"group": "ops", "m": 1}
    listed = (await client.get("/admin/v1/approvals")).json()["pending"]
    assert [p["payment_id"] for p in listed] == [payment_id]
    approved = await client.post(f"/admin/v1/approvals/{payment_id}/approve", json={"comment": "ok"})
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "signed"
    status = (await client.get(f"/v1/payments/{payment_id}", headers=headers)).json()
    assert status["status"] == "signed"
    assert Account.recover_transaction(status["result"]["raw_transaction"]) == payer["address"]
    again = await client.post(f"/admin/v1/approvals/{payment_id}/approve", json={})
    assert again.status_code == 409


async def test_a_rejected_payment_is_never_signed(api: API) -> None:
    client, _ = api
    payer, headers = await _setup(api, approval_above=ETH // 2)
    payment_id = (await _pay(client, headers, payer["id"], 6 * ETH // 10)).json()["payment_id"]
    rejected = await client.post(f"/admin/v1/approvals/{payment_id}/reject", json={"comment": "no"})
    assert rejected.json()["status"] == "rejected"
    status = (await client.get(f"/v1/payments/{payment_id}", headers=headers)).json()
    assert status["status"] == "rejected"
    assert "result" not in status


async def test_freezing_the_wallet_stops_new_payments_and_approvals(api: API) -> None:
    client, _ = api
    payer, headers = await _setup(api, approval_above=ETH // 2)
    payment_id = (await _pay(client, headers, payer["id"], 6 * ETH // 10)).json()["payment_id"]
    assert (await client.post("/admin/v1/freezes", json={"scope": "wallet", "target": payer["id"]})).status_code == 204
    frozen = await _pay(client, headers, payer["id"], 1)
    assert frozen.status_code == 423
    assert frozen.json()["code"] == "frozen"
    approve = await client.post(f"/admin/v1/approvals/{payment_id}/approve", json={})
    assert approve.status_code == 423
    assert (await client.delete("/admin/v1/freezes/wallet", params={"target": payer["id"]})).status_code == 204
    assert (await _pay(client, headers, payer["id"], 1)).status_code == 200


async def test_an_agent_key_cannot_see_another_wallet(api: API) -> None:
    client, _ = api
    payer, headers = await _setup(api)
    other = await wallet(client, "other")
    foreign = await _pay(client, headers, other["id"], 1)
    missing = await _pay(client, headers, "wal_missing", 1)
    assert foreign.status_code == missing.status_code == 404
    assert {k: v for k, v in foreign.json().items() if k != "instance"} == {
        k: v for k, v in missing.json().items() if k != "instance"
    }
    wallets = (await client.get("/v1/wallets", headers=headers)).json()["wallets"]
    assert [w["id"] for w in wallets] == [payer["id"]]


async def test_a_revoked_key_stops_working_at_once(api: API) -> None:
    client, _ = api
    payer = await wallet(client)
    agent_id, key = await agent_key(client, [payer["id"]])
    headers = {"Authorization": f"Bearer {key}"}
    assert (await client.get("/v1/wallets", headers=headers)).status_code == 200
    key_id = key.split(".")[1]
    assert (await client.delete(f"/admin/v1/agents/{agent_id}/keys/{key_id}")).status_code == 204
    assert (await client.get("/v1/wallets", headers=headers)).status_code == 401


@pytest.mark.parametrize(
    "transaction",
    [{"type": 4, "chainId": CHAIN, "authorizationList": []}, {"chainId": 0, "to": BOB, "value": 1, "gas": 21000}],
)
async def test_unsignable_requests_are_refused_before_anything_is_reserved(
    api: API, transaction: dict[str, Any]
) -> None:
    client, _ = api
    payer, headers = await _setup(api)
    response = await client.post(
        f"/v1/wallets/{payer['id']}/sign/transaction", json={"transaction": transaction}, headers=headers
    )
    assert response.status_code == 400
    assert response.json()["code"] in {"unsupported_signing_method", "invalid_transaction"}


async def test_every_decision_vote_signature_and_admin_change_is_audited(api: API) -> None:
    client, _ = api
    payer, headers = await _setup(api, approval_above=ETH // 2)
    assert (await _pay(client, headers, payer["id"], 1)).status_code == 200
    assert (await _pay(client, headers, payer["id"], 1, to=EVE)).status_code == 403
    pending = (await _pay(client, headers, payer["id"], 6 * ETH // 10)).json()["payment_id"]
    assert (await client.post(f"/admin/v1/approvals/{pending}/approve", json={"comment": "fine"})).status_code == 200
    assert (await client.post("/admin/v1/freezes", json={"scope": "all"})).status_code == 204
    assert (await _pay(client, headers, payer["id"], 1)).status_code == 423
    assert (await _pay(client, headers, "wal_not_mine", 1)).status_code == 404
    events = (await client.get("/admin/v1/audit", params={"limit": 1000})).json()["events"]
    kinds = [e["kind"] for e in events]
    for kind in (
        "wallet.created",
        "policy.set",
        "agent.created",
        "agent_key.issued",
        "payment.decided",
        "payment.signed",
        "approval.voted",
        "freeze.set",
        "payment.refused",
        "payment.request_refused",
    ):
        assert kind in kinds, kind
    outcomes = [e["data"]["outcome"] for e in events if e["kind"] == "payment.decided"]
    assert outcomes == ["allow", "deny", "needs_approval", "allow"]
    signed = [e["data"]["hash"] for e in events if e["kind"] == "payment.signed"]
    assert len(signed) == 2
    assert all(h.startswith("0x") and len(h) == 66 for h in signed)
    assert not any("cak." in str(e["data"]) or "cop." in str(e["data"]) for e in events)
    verified = (await client.get("/admin/v1/audit/verify")).json()
    assert verified["ok"] is True
    assert verified["count"] == len(events)


async def test_an_expired_approval_is_never_signed(api: API) -> None:
    client, _ = api
    payer, headers = await _setup(api, approval_above=ETH // 2)
    payment_id = (await _pay(client, headers, payer["id"], 6 * ETH // 10)).json()["payment_id"]
    ctx = client._transport.app.state.ctx  # type: ignore[attr-defined]
    from custody.payments.ledger import payments

    async with ctx.engine.begin() as conn:
        await conn.execute(
            payments.update()
            .where(payments.c.id == payment_id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    status = (await client.get(f"/v1/payments/{payment_id}", headers=headers)).json()
    assert status["status"] == "expired"
    assert (await client.get("/admin/v1/approvals")).json()["pending"] == []
    approve = await client.post(f"/admin/v1/approvals/{payment_id}/approve", json={})
    assert approve.json()["status"] == "expired"
    assert "result" not in (await client.get(f"/v1/payments/{payment_id}", headers=headers)).json()


async def test_a_quorum_of_two_needs_two_different_approvers(api: API, settings: Settings) -> None:
    client, _ = api
    payer = await wallet(client)
    document = native_policy(CHAIN, [BOB], ETH, approval_above=ETH // 2)
    document["approver_groups"] = {"ops": {"members": ["ana", "ben", "cy"]}}
    document["rules"][-1]["m"] = 2
    await set_policy(client, payer["id"], document)
    _, key = await agent_key(client, [payer["id"]])
    headers = {"Authorization": f"Bearer {key}"}
    ctx = client._transport.app.state.ctx  # type: ignore[attr-defined]
    tokens = {name: (await issue_operator(ctx, name, "approver"))[1] for name in ("ana", "ben", "zed")}
    payment_id = (await _pay(client, headers, payer["id"], 6 * ETH // 10)).json()["payment_id"]

    def as_(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tokens[name]}"}

    outsider = await client.post(f"/admin/v1/approvals/{payment_id}/approve", json={}, headers=as_("zed"))
    assert outsider.status_code == 403
    first = await client.post(f"/admin/v1/approvals/{payment_id}/approve", json={}, headers=as_("ana"))
    assert first.json()["status"] == "pending_approval"
    twice = await client.post(f"/admin/v1/approvals/{payment_id}/approve", json={}, headers=as_("ana"))
    assert twice.status_code == 409
    second = await client.post(f"/admin/v1/approvals/{payment_id}/approve", json={}, headers=as_("ben"))
    assert second.json()["status"] == "signed"
    status = (await client.get(f"/v1/payments/{payment_id}", headers=headers)).json()
    assert Account.recover_transaction(status["result"]["raw_transaction"]) == payer["address"]


async def test_approval_re_evaluates_against_the_current_budget(api: API) -> None:
    client, _ = api
    payer, headers = await _setup(api, cap=ETH, approval_above=ETH // 2)
    payment_id = (await _pay(client, headers, payer["id"], 6 * ETH // 10)).json()["payment_id"]
    assert (await _pay(client, headers, payer["id"], 4 * ETH // 10 + 1, nonce=1)).status_code == 200
    approved = await client.post(f"/admin/v1/approvals/{payment_id}/approve", json={})
    assert approved.json()["status"] == "denied"
    assert "cap_exceeded" in [r["code"] for r in approved.json()["reasons"]]
    status = (await client.get(f"/v1/payments/{payment_id}", headers=headers)).json()
    assert status["status"] == "denied"


async def test_freezing_something_that_does_not_exist_is_refused(api: API) -> None:
    client, _ = api
    payer, _ = await _setup(api)
    for body in ({"scope": "wallet", "target": "wal_missing"}, {"scope": "wallet", "target": payer["address"]}):
        response = await client.post("/admin/v1/freezes", json=body)
        assert response.status_code in (400, 404)
    assert (await client.post("/admin/v1/freezes", json={"scope": "wallet", "target": "wal x"})).status_code == 400
    assert (await client.get("/admin/v1/freezes")).json()["freezes"] == []


async def test_a_grant_naming_what_the_policy_lacks_is_refused(api: API) -> None:
    client, _ = api
    payer, _ = await _setup(api)
    agent_id = (await client.get("/admin/v1/agents")).json()["agents"][0]["id"]
    grant = {
        "schema_version": 1,
        "agent_id": "x",
        "rules": [{"id": "g", "type": "cap", "asset": "usdc", "max": "1", "period": "day"}],
    }
    response = await client.put(f"/admin/v1/agents/{agent_id}/grants/{payer['id']}", json={"document": grant})
    assert response.status_code == 400


async def test_a_revoked_key_cannot_have_its_pending_payment_signed(api: API) -> None:
    client, _ = api
    payer, headers = await _setup(api, approval_above=ETH // 2)
    payment_id = (await _pay(client, headers, payer["id"], 6 * ETH // 10)).json()["payment_id"]
    agent_id = (await client.get("/admin/v1/agents")).json()["agents"][0]["id"]
    key_id = headers["Authorization"].split(".")[1]
    assert (await client.delete(f"/admin/v1/agents/{agent_id}/keys/{key_id}")).status_code == 204
    approved = await client.post(f"/admin/v1/approvals/{payment_id}/approve", json={})
    assert approved.json()["status"] == "denied"
    assert [r["code"] for r in approved.json()["reasons"]] == ["key_revoked"]


async def test_overflowing_gas_values_are_refused(api: API) -> None:
    client, _ = api
    payer, headers = await _setup(api)
    tx = transfer(CHAIN, BOB, 1) | {"gas": 2**200, "maxFeePerGas": 2**200}
    response = await client.post(
        f"/v1/wallets/{payer['id']}/sign/transaction", json={"transaction": tx}, headers=headers
    )
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_transaction"


async def test_a_policy_change_of_approver_group_does_not_strand_a_pending_payment(api: API) -> None:
    client, _ = api
    payer, headers = await _setup(api, approval_above=ETH // 2)
    payment_id = (await _pay(client, headers, payer["id"], 6 * ETH // 10)).json()["payment_id"]
    document = native_policy(CHAIN, [BOB], ETH, approval_above=ETH // 2)
    document["approver_groups"] = {"ops": {"members": ["nobody"]}, "cfo": {"members": ["admin"]}}
    document["rules"][-1]["group"] = "cfo"
    await set_policy(client, payer["id"], document)
    approved = await client.post(f"/admin/v1/approvals/{payment_id}/approve", json={})
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "signed"
