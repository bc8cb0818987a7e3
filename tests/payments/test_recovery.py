"""Recovery from a request whose process died: the sweep, abandoned Idempotency-Key claims, fencing.

A payment commits with its signature, so a crash today leaves nothing to recover; the
crash test (tests/crash) kills real processes to show it. Versions before that committed the
reservation and the claim first: these tests put the database in the state a crash of such a
version left and check what the sweep and a retry make of it, on both backends.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import insert, select, text, update
from web3 import Web3

from custody import failpoints
from custody.errors import AuditUnavailable, InvalidTransaction, KeyDecryptionError, SignerUnavailable
from custody.payments import service
from custody.payments.ledger import ledger_entries, payments
from custody.payments.service import Claim, idempotency_keys, recover_interrupted
from custody.services.context import Context
from custody.settings import Settings
from tests.payments.helpers import GAS, agent_key, native_policy, set_policy, transfer, wallet

API = tuple[httpx.AsyncClient, str]
CHAIN = 31337
BOB = Web3.to_checksum_address("0x" + "b0" * 20)
EACH = 10**16
LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)


def _ctx(api: API) -> Context:
    client, _ = api
    app = client._transport.app  # type: ignore[attr-defined]
    assert isinstance(app, FastAPI)
    ctx = app.state.ctx
    assert isinstance(ctx, Context)
    return ctx


async def _setup(api: API) -> tuple[str, dict[str, str]]:
    client, _ = api
    payer = await wallet(client)
    await set_policy(client, payer["id"], native_policy(CHAIN, [BOB], 10 * (EACH + GAS)))
    _, key = await agent_key(client, [payer["id"]])
    return str(payer["id"]), {"Authorization": f"Bearer {key}"}


async def _pay(api: API, wallet_id: str, headers: dict[str, str], nonce: int, key: str) -> httpx.Response:
    client, _ = api
    return await client.post(
        f"/v1/wallets/{wallet_id}/sign/transaction",
        json={"transaction": transfer(CHAIN, BOB, EACH, nonce)},
        headers=headers | {"Idempotency-Key": key},
    )


async def _remaining(api: API, wallet_id: str, headers: dict[str, str]) -> int:
    client, _ = api
    limits = (await client.get(f"/v1/wallets/{wallet_id}/limits", headers=headers)).json()["limits"]
    return int(limits[0]["remaining"])


async def _as_if_crashed(ctx: Context, payment_id: str, *, status: str, claim_answered: bool) -> None:
    """Put a finished payment back into the state a crash at some step would have left."""
    async with ctx.engine.begin() as conn:
        stale = update(payments).where(payments.c.id == payment_id).values(status=status, updated_at=LONG_AGO)
        await conn.execute(stale)
        if not claim_answered:
            await conn.execute(
                update(idempotency_keys)
                .where(idempotency_keys.c.payment_id == payment_id)
                .values(status_code=None, response=None, created_at=LONG_AGO)
            )


async def _payment(ctx: Context, payment_id: str) -> Any:
    async with ctx.engine.connect() as conn:
        return (await conn.execute(select(payments).where(payments.c.id == payment_id))).one()


async def _entries(ctx: Context, payment_id: str) -> int:
    async with ctx.engine.connect() as conn:
        rows = await conn.execute(select(ledger_entries.c.id).where(ledger_entries.c.payment_id == payment_id))
        return len(rows.all())


async def test_the_sweep_releases_an_abandoned_reservation_exactly_once(api: API) -> None:
    ctx = _ctx(api)
    wallet_id, headers = await _setup(api)
    before = await _remaining(api, wallet_id, headers)
    paid = await _pay(api, wallet_id, headers, 0, "k0")
    payment_id = paid.json()["payment_id"]
    # Died after reserving, before signing: reserved, and still counted.
    await _as_if_crashed(ctx, payment_id, status="reserved", claim_answered=True)
    assert await _remaining(api, wallet_id, headers) == before - (EACH + GAS)

    assert await recover_interrupted(ctx) == 1
    assert (await _payment(ctx, payment_id)).status == "failed"
    assert await _entries(ctx, payment_id) == 0
    assert await _remaining(api, wallet_id, headers) == before
    assert await recover_interrupted(ctx) == 0  # a second sweep (another replica) finds nothing
    assert await _remaining(api, wallet_id, headers) == before
    kinds = [e.kind for e in await ctx.audit.events() if e.subject == payment_id]
    assert kinds.count("payment.interrupted") == 1


async def test_the_sweep_leaves_a_fresh_reservation_alone(api: API) -> None:
    ctx = _ctx(api)
    wallet_id, headers = await _setup(api)
    payment_id = (await _pay(api, wallet_id, headers, 0, "k0")).json()["payment_id"]
    async with ctx.engine.begin() as conn:  # reserved a moment ago (an earlier version's request, still signing)
        await conn.execute(update(payments).where(payments.c.id == payment_id).values(status="reserved"))
    assert await recover_interrupted(ctx) == 0
    assert (await _payment(ctx, payment_id)).status == "reserved"


async def test_a_retry_after_a_crash_before_signing_gets_a_fresh_decision(api: API) -> None:
    ctx = _ctx(api)
    wallet_id, headers = await _setup(api)
    before = await _remaining(api, wallet_id, headers)
    first = await _pay(api, wallet_id, headers, 0, "invoice-1")
    old_id = first.json()["payment_id"]
    await _as_if_crashed(ctx, old_id, status="reserved", claim_answered=False)

    retry = await _pay(api, wallet_id, headers, 0, "invoice-1")
    assert retry.status_code == 200, retry.text
    assert retry.json()["payment_id"] != old_id
    assert (await _payment(ctx, old_id)).status == "failed"  # released, not counted twice
    assert await _remaining(api, wallet_id, headers) == before - (EACH + GAS)
    replay = await _pay(api, wallet_id, headers, 0, "invoice-1")
    assert replay.json() == retry.json()


async def test_a_retry_after_a_crash_after_recording_replays_the_signature(api: API) -> None:
    ctx = _ctx(api)
    wallet_id, headers = await _setup(api)
    first = await _pay(api, wallet_id, headers, 0, "invoice-2")
    await _as_if_crashed(ctx, first.json()["payment_id"], status="signed", claim_answered=False)

    retry = await _pay(api, wallet_id, headers, 0, "invoice-2")
    assert retry.status_code == 200
    assert retry.json() == first.json()


async def test_a_retry_of_a_claim_that_died_before_deciding_runs_afresh(api: API) -> None:
    ctx = _ctx(api)
    wallet_id, headers = await _setup(api)
    agent_id = await _agent_id(ctx, headers["Authorization"].split(".")[1])
    body = {"transaction": transfer(CHAIN, BOB, EACH, 0)}
    async with ctx.engine.begin() as conn:
        await conn.execute(
            insert(idempotency_keys).values(
                agent_id=agent_id,
                key="invoice-3",
                body_hash=service._body_hash(wallet_id, "transaction", body),
                created_at=LONG_AGO,
                owner="dead" * 8,
            )
        )
    retry = await _pay(api, wallet_id, headers, 0, "invoice-3")
    assert retry.status_code == 200, retry.text


async def _agent_id(ctx: Context, key_id: str) -> str:
    from custody.payments.agents import agent_keys

    async with ctx.engine.connect() as conn:
        return str((await conn.execute(select(agent_keys.c.agent_id).where(agent_keys.c.id == key_id))).scalar_one())


async def _claims(ctx: Context) -> list[Any]:
    async with ctx.engine.connect() as conn:
        return list((await conn.execute(select(idempotency_keys))).all())


async def _rows(ctx: Context, wallet_id: str) -> list[Any]:
    async with ctx.engine.connect() as conn:
        return list((await conn.execute(select(payments).where(payments.c.wallet_id == wallet_id))).all())


async def test_nothing_of_a_payment_commits_before_its_signature(api: API, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _ctx(api)
    wallet_id, headers = await _setup(api)
    asked, release = asyncio.Event(), asyncio.Event()
    sign = ctx.signer.sign_transaction

    async def held(envelope: Any, transaction: dict[str, Any]) -> dict[str, Any]:
        asked.set()
        await release.wait()
        return await sign(envelope, transaction)

    monkeypatch.setattr(ctx.signer, "sign_transaction", held)
    paying = asyncio.create_task(_pay(api, wallet_id, headers, 0, "invoice-5"))
    await asyncio.wait_for(asked.wait(), 10)
    # The signer is at work: no payment, no debit and no claim can be seen yet.
    assert await _rows(ctx, wallet_id) == []
    assert await _claims(ctx) == []
    release.set()
    paid = await asyncio.wait_for(paying, 10)
    assert paid.status_code == 200, paid.text
    payment_id = paid.json()["payment_id"]
    # Then all of it at once: the signed payment, its debits and the stored answer.
    payment = await _payment(ctx, payment_id)
    assert (payment.status, json.loads(payment.result)) == ("signed", paid.json()["result"])
    assert await _entries(ctx, payment_id) > 0
    [claim] = await _claims(ctx)
    assert (claim.status_code, json.loads(claim.response)) == (200, paid.json())


def _signer_raises(monkeypatch: pytest.MonkeyPatch, ctx: Context, error: Exception) -> None:
    async def failing(envelope: Any, transaction: dict[str, Any]) -> dict[str, Any]:
        raise error

    monkeypatch.setattr(ctx.signer, "sign_transaction", failing)


async def test_a_signer_failure_records_a_failed_payment_and_frees_the_key(
    api: API, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = _ctx(api)
    wallet_id, headers = await _setup(api)
    before = await _remaining(api, wallet_id, headers)
    sign = ctx.signer.sign_transaction
    _signer_raises(monkeypatch, ctx, SignerUnavailable("the signer is restarting"))
    failed = await _pay(api, wallet_id, headers, 0, "invoice-6")
    assert (failed.status_code, failed.json()["code"]) == (503, "signer_unavailable")
    [row] = await _rows(ctx, wallet_id)
    assert (row.status, row.result) == ("failed", None)
    assert await _entries(ctx, row.id) == 0
    assert await _remaining(api, wallet_id, headers) == before
    assert await _claims(ctx) == []  # transient: the same key may try again
    kinds = [e.kind for e in await ctx.audit.events() if e.subject == row.id]
    assert kinds == ["payment.decided", "payment.sign_failed"]

    monkeypatch.setattr(ctx.signer, "sign_transaction", sign)
    retry = await _pay(api, wallet_id, headers, 0, "invoice-6")
    assert retry.status_code == 200, retry.text
    assert retry.json()["payment_id"] != row.id
    assert await _remaining(api, wallet_id, headers) == before - (EACH + GAS)


async def test_a_signature_whose_records_cannot_be_written_is_never_handed_out(
    api: API, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = _ctx(api)
    wallet_id, headers = await _setup(api)
    before = await _remaining(api, wallet_id, headers)
    append = ctx.audit.append_all_in

    async def full(conn: Any, records: Any) -> None:
        if any(record.kind == "payment.signed" for record in records):
            raise AuditUnavailable("the audit storage is full")
        await append(conn, records)

    monkeypatch.setattr(ctx.audit, "append_all_in", full)
    failed = await _pay(api, wallet_id, headers, 0, "invoice-8")
    assert (failed.status_code, failed.json()["code"]) == (503, "audit_unavailable")
    assert "raw_transaction" not in failed.text
    # Signed, then rolled back with everything else: no payment, no debit, no claim.
    assert await _rows(ctx, wallet_id) == []
    assert await _claims(ctx) == []
    assert await _remaining(api, wallet_id, headers) == before

    monkeypatch.setattr(ctx.audit, "append_all_in", append)
    retry = await _pay(api, wallet_id, headers, 0, "invoice-8")
    assert retry.status_code == 200, retry.text


async def test_a_signer_refusal_is_the_keys_answer_and_a_signer_fault_is_not(
    api: API, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = _ctx(api)
    wallet_id, headers = await _setup(api)
    before = await _remaining(api, wallet_id, headers)
    _signer_raises(monkeypatch, ctx, InvalidTransaction("the signer cannot sign this transaction"))
    refused = await _pay(api, wallet_id, headers, 0, "invoice-9")
    assert (refused.status_code, refused.json()["code"]) == (400, "invalid_transaction")
    [row] = await _rows(ctx, wallet_id)
    assert (row.status, await _entries(ctx, row.id)) == ("failed", 0)
    # The same request would be refused again: its answer is kept, tied to its payment, in one commit.
    [claim] = await _claims(ctx)
    assert (claim.payment_id, claim.status_code) == (row.id, 400)
    replay = await _pay(api, wallet_id, headers, 0, "invoice-9")
    assert (replay.status_code, replay.json()["code"]) == (400, "invalid_transaction")
    assert len(await _rows(ctx, wallet_id)) == 1

    _signer_raises(monkeypatch, ctx, KeyDecryptionError())
    fault = await _pay(api, wallet_id, headers, 1, "invoice-10")
    assert (fault.status_code, fault.json()["code"]) == (500, "key_decryption_failed")
    # A fault on the server's side is no answer to keep: a retry runs afresh.
    assert [c.key for c in await _claims(ctx)] == ["invoice-9"]
    assert await _remaining(api, wallet_id, headers) == before


async def _waiting_on_a_lock(ctx: Context) -> int:
    async with ctx.engine.connect() as conn:
        query = text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return int((await conn.execute(query)).scalar_one())


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)])
async def test_a_freeze_committed_while_a_payment_waits_for_its_wallet_stops_that_payment(
    api: API, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL only: SQLite's write lock is taken before anything is read, so a freeze waits its turn there."""
    client, _ = api
    ctx = _ctx(api)
    wallet_id, headers = await _setup(api)
    asked, release = asyncio.Event(), asyncio.Event()
    sign = ctx.signer.sign_transaction

    async def first_one_held(envelope: Any, transaction: dict[str, Any]) -> dict[str, Any]:
        if not asked.is_set():
            asked.set()
            await release.wait()
        return await sign(envelope, transaction)

    monkeypatch.setattr(ctx.signer, "sign_transaction", first_one_held)
    first = asyncio.create_task(_pay(api, wallet_id, headers, 0, "invoice-11"))
    await asyncio.wait_for(asked.wait(), 10)  # the first payment holds the wallet's lock, signing
    second = asyncio.create_task(_pay(api, wallet_id, headers, 1, "invoice-12"))
    async with asyncio.timeout(10):
        while await _waiting_on_a_lock(ctx) < 1:  # noqa: ASYNC110 - the wait is in PostgreSQL
            await asyncio.sleep(0.02)
    frozen = await client.post("/admin/v1/freezes", json={"scope": "wallet", "target": wallet_id})
    assert frozen.status_code == 204
    release.set()
    assert (await first).status_code == 200  # decided before the freeze
    stopped = await second
    assert (stopped.status_code, stopped.json()["code"]) == (423, "frozen")


async def test_binding_a_claim_the_transaction_does_not_hold_is_a_fault_not_an_answer(api: API) -> None:
    ctx = _ctx(api)
    async with ctx.engine.begin() as conn:
        # Not a CustodyError: that would be stored as the key's answer for good.
        with pytest.raises(RuntimeError):
            await service._bind(conn, Claim("agent", "key", "not-the-owner"), "pay_x", service.Response(200, {}))


def test_failpoints_are_parsed_strictly() -> None:
    assert failpoints.parse("payment.after_sign=0.5, signer.after_sign") == {
        "payment.after_sign": 0.5,
        "signer.after_sign": 1.0,
    }
    with pytest.raises(ValueError, match="unknown failpoint"):
        failpoints.parse("payment.after_lunch")
    with pytest.raises(ValueError, match="probability"):
        failpoints.parse("payment.after_sign=2")


def test_production_refuses_failpoints(tmp_path: Any) -> None:
    settings = Settings(mode="production", data_dir=tmp_path, failpoints="payment.after_sign=0.1")
    assert any("CUSTODY_FAILPOINTS" in problem for problem in settings.production_problems("api"))
    assert any("CUSTODY_FAILPOINTS" in problem for problem in settings.production_problems("signer"))
    assert sum("CUSTODY_FAILPOINTS" in problem for problem in settings.production_problems("both")) == 1
