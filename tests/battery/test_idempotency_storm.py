"""Idempotency storms: the same request replayed 100 times at once and 100 times in a row.

Same Idempotency-Key and body: one payment, one reservation, one signature, and every caller gets
the first response. The same key with anything changed: 409 ``idempotency_conflict`` and nothing
in the ledger, the payments or the audit log moves.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from web3 import Web3

from custody.audit.log import AuditLog, audit_events
from custody.payments.ledger import ledger_buckets, ledger_entries, payments
from custody.payments.service import idempotency_keys
from tests.payments.helpers import GAS, agent_key, native_policy, set_policy, transfer, wallet

API = tuple[httpx.AsyncClient, str]
CHAIN = 31337
BOB = Web3.to_checksum_address("0x" + "b0" * 20)
VALUE = 10**16
STORM = 100


def _engine(client: httpx.AsyncClient) -> AsyncEngine:
    engine: AsyncEngine = client._transport.app.state.ctx.engine  # type: ignore[attr-defined]
    return engine


async def _snapshot(engine: AsyncEngine) -> dict[str, Any]:
    """Everything a request could change: payments, ledger rows and totals, idempotency records, the audit log."""
    await AuditLog(engine).seal()  # payments queue their records; reading the table directly, chain them first
    async with engine.connect() as conn:
        return {
            "payments": sorted(tuple(r) for r in await conn.execute(select(payments.c.id, payments.c.status))),
            "entries": sorted(
                tuple(r)
                for r in await conn.execute(
                    select(ledger_entries.c.payment_id, ledger_entries.c.counter, ledger_entries.c.amount)
                )
            ),
            "buckets": sorted(
                tuple(r)
                for r in await conn.execute(
                    select(ledger_buckets.c.span, ledger_buckets.c.counter, ledger_buckets.c.amount)
                )
            ),
            "keys": sorted(
                tuple(r)
                for r in await conn.execute(
                    select(idempotency_keys.c.key, idempotency_keys.c.body_hash, idempotency_keys.c.response)
                )
            ),
            "audit": (await conn.execute(select(func.count()).select_from(audit_events))).scalar(),
        }


async def _audit_kinds(engine: AsyncEngine, payment_id: str) -> list[str]:
    await AuditLog(engine).seal()
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(audit_events.c.kind).where(audit_events.c.subject == payment_id).order_by(audit_events.c.seq)
        )
        return [r.kind for r in rows]


async def _storm(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
) -> list[httpx.Response]:
    """``STORM`` concurrent requests, then ``STORM`` sequential ones."""
    together = await asyncio.gather(*(client.post(url, json=body, headers=headers) for _ in range(STORM)))
    in_a_row = [await client.post(url, json=body, headers=headers) for _ in range(STORM)]
    return [*together, *in_a_row]


async def _conflicts_change_nothing(
    client: httpx.AsyncClient, engine: AsyncEngine, requests: list[tuple[str, dict[str, Any]]], headers: dict[str, str]
) -> None:
    before = await _snapshot(engine)
    answers = await asyncio.gather(*(client.post(url, json=body, headers=headers) for url, body in requests))
    answers += [await client.post(url, json=body, headers=headers) for url, body in requests]
    for answer in answers:
        assert answer.status_code == 409, answer.text
        assert answer.json()["code"] == "idempotency_conflict"
    assert await _snapshot(engine) == before


async def test_a_storm_of_replays_signs_once_and_a_changed_body_changes_nothing(api: API) -> None:
    client, _ = api
    engine = _engine(client)
    payer, other = await wallet(client, "payer"), await wallet(client, "other")
    for target in (payer, other):
        await set_policy(client, target["id"], native_policy(CHAIN, [BOB], 10 * (VALUE + GAS)))
    _, key = await agent_key(client, [payer["id"], other["id"]])
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "storm-order-1"}
    url = f"/v1/wallets/{payer['id']}/sign/transaction"
    body = {"transaction": transfer(CHAIN, BOB, VALUE), "purpose": "invoice 1"}

    responses = await _storm(client, url, body, headers)

    first = responses[0]
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "signed"
    assert all(r.status_code == 200 and r.json() == first.json() for r in responses)
    payment_id = first.json()["payment_id"]
    state = await _snapshot(engine)
    assert [p for p in state["payments"] if p[0] == payment_id] == [(payment_id, "signed")]
    assert len(state["payments"]) == 1
    assert state["entries"] == sorted([(payment_id, f"{CHAIN}:native", VALUE + GAS), (payment_id, "payments", 1)])
    assert sorted((s, c, int(a)) for s, c, a in state["buckets"]) == sorted(
        (span, counter, amount)
        for span in (3600, 60)
        for counter, amount in [(f"{CHAIN}:native", VALUE + GAS), ("payments", 1)]
    )
    assert len(state["keys"]) == 1
    assert await _audit_kinds(engine, payment_id) == ["payment.decided", "payment.signed"]

    changed: list[tuple[str, dict[str, Any]]] = [
        (url, body | {"transaction": transfer(CHAIN, BOB, VALUE + 1)}),
        (url, body | {"transaction": transfer(CHAIN, BOB, VALUE, nonce=1)}),
        (url, body | {"purpose": "invoice 2"}),
        (url, {"transaction": body["transaction"]}),
        (f"/v1/wallets/{other['id']}/sign/transaction", body),
        (f"/v1/wallets/{payer['id']}/sign/message", {"message": "hello"}),
    ]
    await _conflicts_change_nothing(client, engine, changed, headers)

    # The key still replays the first response after the conflicts, and a new key pays anew.
    again = await client.post(url, json=body, headers=headers)
    assert again.status_code == 200
    assert again.json() == first.json()
    fresh = await client.post(url, json=body, headers=headers | {"Idempotency-Key": "storm-order-2"})
    assert fresh.status_code == 200
    assert fresh.json()["payment_id"] != payment_id


async def test_a_storm_on_a_payment_awaiting_approval_holds_it_once(api: API) -> None:
    client, _ = api
    engine = _engine(client)
    payer = await wallet(client, "payer")
    await set_policy(client, payer["id"], native_policy(CHAIN, [BOB], 10 * (VALUE + GAS), approval_above=VALUE))
    _, key = await agent_key(client, [payer["id"]])
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "needs-a-human"}
    url = f"/v1/wallets/{payer['id']}/sign/transaction"
    body = {"transaction": transfer(CHAIN, BOB, 2 * VALUE)}

    responses = await _storm(client, url, body, headers)

    first = responses[0]
    assert first.status_code == 202, first.text
    assert all(r.status_code == 202 and r.json() == first.json() for r in responses)
    payment_id = first.json()["payment_id"]
    state = await _snapshot(engine)
    assert state["payments"] == [(payment_id, "pending_approval")]
    assert state["entries"] == []
    pending = (await client.get("/admin/v1/approvals")).json()["pending"]
    assert [p["payment_id"] for p in pending] == [payment_id]

    approved = await client.post(f"/admin/v1/approvals/{payment_id}/approve", json={})
    assert approved.json()["status"] == "signed"
    # A replay still answers what the first request was told; the payment's status is where it moved on.
    replays = await asyncio.gather(*(client.post(url, json=body, headers=headers) for _ in range(20)))
    assert all(r.status_code == 202 and r.json() == first.json() for r in replays)
    status = (await client.get(f"/v1/payments/{payment_id}", headers=headers)).json()
    assert status["status"] == "signed"
    state = await _snapshot(engine)
    assert state["payments"] == [(payment_id, "signed")]
    assert state["entries"] == sorted([(payment_id, f"{CHAIN}:native", 2 * VALUE + GAS), (payment_id, "payments", 1)])
    assert await _audit_kinds(engine, payment_id) == [
        "payment.decided",
        "approval.voted",
        "payment.decided",
        "payment.signed",
    ]
    await _conflicts_change_nothing(client, engine, [(url, {"transaction": transfer(CHAIN, BOB, VALUE)})], headers)


async def test_a_storm_of_denied_replays_records_one_denial(api: API) -> None:
    client, _ = api
    engine = _engine(client)
    payer = await wallet(client, "payer")
    await set_policy(client, payer["id"], native_policy(CHAIN, [BOB], VALUE))
    _, key = await agent_key(client, [payer["id"]])
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "too-much"}
    url = f"/v1/wallets/{payer['id']}/sign/transaction"
    body = {"transaction": transfer(CHAIN, BOB, VALUE)}

    responses = await _storm(client, url, body, headers)

    first = responses[0]
    assert first.status_code == 403
    assert [r["code"] for r in first.json()["reasons"]] == ["cap_exceeded"]
    assert all(r.status_code == 403 and r.json() == first.json() for r in responses)
    state = await _snapshot(engine)
    assert state["payments"] == [(first.json()["payment_id"], "denied")]
    assert state["entries"] == []
    assert await _audit_kinds(engine, first.json()["payment_id"]) == ["payment.decided"]
    assert json.loads(state["keys"][0][2])["code"] == "policy_denied"


async def storm_across_processes(admin: httpx.AsyncClient, http: httpx.AsyncClient, ports: list[int]) -> None:
    """The storm split over API processes that share the database (and Redis): still one payment.

    Run by the two-process test in test_overspend.py, which has the processes running already.
    """
    engine = _engine(admin)
    payer = await wallet(admin, "storm-payer")
    await set_policy(admin, payer["id"], native_policy(CHAIN, [BOB], 10 * (VALUE + GAS)))
    _, key = await agent_key(admin, [payer["id"]], name="storm-agent")
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "two-replicas"}
    body = {"transaction": transfer(CHAIN, BOB, VALUE)}
    urls = [f"http://127.0.0.1:{port}/v1/wallets/{payer['id']}/sign/transaction" for port in ports]
    together = await asyncio.gather(*(http.post(urls[n % len(urls)], json=body, headers=headers) for n in range(STORM)))
    in_a_row = [await http.post(urls[n % len(urls)], json=body, headers=headers) for n in range(STORM)]
    first = together[0]
    assert first.status_code == 200, first.text
    assert all(r.status_code == 200 and r.json() == first.json() for r in [*together, *in_a_row])
    payment_id = first.json()["payment_id"]
    async with engine.connect() as conn:
        rows = (
            await conn.execute(select(payments.c.id, payments.c.status).where(payments.c.wallet_id == payer["id"]))
        ).all()
        entries = (
            await conn.execute(
                select(ledger_entries.c.payment_id, ledger_entries.c.counter, ledger_entries.c.amount).where(
                    ledger_entries.c.wallet_id == payer["id"]
                )
            )
        ).all()
    assert [tuple(r) for r in rows] == [(payment_id, "signed")]
    assert sorted(tuple(e) for e in entries) == sorted(
        [(payment_id, f"{CHAIN}:native", VALUE + GAS), (payment_id, "payments", 1)]
    )
    assert await _audit_kinds(engine, payment_id) == ["payment.decided", "payment.signed"]
    before = await _snapshot(engine)
    changed = body | {"purpose": "something else"}
    conflicts = await asyncio.gather(*(http.post(url, json=changed, headers=headers) for url in urls))
    assert all(c.status_code == 409 and c.json()["code"] == "idempotency_conflict" for c in conflicts)
    assert await _snapshot(engine) == before
