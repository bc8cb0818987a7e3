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
from sqlalchemy import insert, select, update
from web3 import Web3

from custody import failpoints
from custody.errors import Conflict, SignerUnavailable
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
    async with ctx.engine.begin() as conn:  # reserved a moment ago: its request is still signing
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


async def test_a_signer_failure_records_a_failed_payment_and_frees_the_key(
    api: API, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = _ctx(api)
    wallet_id, headers = await _setup(api)
    before = await _remaining(api, wallet_id, headers)
    sign = ctx.signer.sign_transaction

    async def unavailable(envelope: Any, transaction: dict[str, Any]) -> dict[str, Any]:
        raise SignerUnavailable("the signer is restarting")

    monkeypatch.setattr(ctx.signer, "sign_transaction", unavailable)
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


async def test_an_attempt_whose_claim_was_taken_over_decides_nothing(api: API) -> None:
    ctx = _ctx(api)
    async with ctx.engine.begin() as conn:
        with pytest.raises(Conflict):
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

