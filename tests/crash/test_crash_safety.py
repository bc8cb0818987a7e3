"""Crash safety: kill the API and the signer with SIGKILL mid-payment, restart them, account for everything.

The processes run with failpoints (custody/failpoints.py) that SIGKILL them after the
signature is produced but before the decision's transaction commits, after it commits but
before the reply, and inside the signer before it answers. A
supervisor restarts whatever died. Agents retry with the same Idempotency-Key until they
get a final answer. Afterwards the database must account for every payment exactly once.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from web3 import Web3

from custody.audit.log import AuditLog
from custody.payments.ledger import ledger_buckets, ledger_entries, payments
from custody.payments.service import idempotency_keys
from custody.services.context import Context
from custody.settings import Settings
from tests.payments.helpers import GAS, native_policy, transfer
from tests.processes import (
    Supervisor,
    api_process,
    api_ready,
    first_admin_token,
    free_port,
    signer_process,
    signer_ready,
    wait_for,
)

CHAIN = 31337
BOB = Web3.to_checksum_address("0x" + "b0" * 20)
EACH = 10**15
LEASE = 3.0


async def _set_up(url: str, admin_token: str, slots: int) -> tuple[str, str]:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30) as c:
        wallet = (await c.post("/admin/v1/wallets", json={"name": "payer"})).json()
        policy = native_policy(CHAIN, [BOB], slots * (EACH + GAS))
        assert (await c.put(f"/admin/v1/wallets/{wallet['id']}/policy", json={"document": policy})).status_code == 200
        agent = (await c.post("/admin/v1/agents", json={"name": "bot"})).json()
        issued = await c.post(f"/admin/v1/agents/{agent['id']}/keys", json={"wallet_ids": [wallet["id"]]})
        return str(wallet["id"]), str(issued.json()["api_key"])


async def _pay_until_answered(http: httpx.AsyncClient, path: str, body: dict[str, Any], key: str) -> httpx.Response:
    """What a careful agent does: retry with the same Idempotency-Key until the answer is final."""
    for _ in range(600):
        try:
            response = await http.post(path, json=body, headers={"Idempotency-Key": key})
        except httpx.TransportError:
            await asyncio.sleep(0.1)
            continue
        if response.status_code in (200, 403):
            return response
        assert response.status_code in (409, 503), response.text  # still in flight, or a dependency restarting
        assert "Traceback" not in response.text
        await asyncio.sleep(0.25)
    raise AssertionError("no final answer after 600 attempts")


async def _run(settings: Settings, short_dir: Path, rounds: int, probability: float) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    token = await first_admin_token(settings)
    failpoints = ",".join(f"{name}={probability}" for name in ("payment.after_sign", "payment.after_record"))
    signer = signer_process(settings, short_dir / "signer.log", failpoints=f"signer.after_sign={probability}")
    api = api_process(
        settings,
        port,
        short_dir / "api.log",
        failpoints=failpoints,
        reservation_lease_seconds=str(LEASE),
        agent_rate_limit_per_minute="0",
    )
    slots = rounds * 3 // 4
    with Supervisor(signer, api):
        wait_for(lambda: signer_ready(settings) and api_ready(url), "the signer and the API", 60)
        wallet_id, api_key = await _set_up(url, token, slots)
        path = f"/v1/wallets/{wallet_id}/sign/transaction"
        keys = [f"crash-{n}-{secrets.token_hex(4)}" for n in range(rounds)]
        first: dict[str, httpx.Response] = {}
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as http:
            lanes = asyncio.Semaphore(4)

            async def pay(n: int) -> None:
                async with lanes:
                    body = {"transaction": transfer(CHAIN, BOB, EACH, n)}
                    first[keys[n]] = await _pay_until_answered(http, path, body, keys[n])

            await asyncio.gather(*(pay(n) for n in range(rounds)))
            # A retry after the answer replays it exactly, crash or no crash.
            for n in range(0, rounds, 7):
                again = await _pay_until_answered(http, path, {"transaction": transfer(CHAIN, BOB, EACH, n)}, keys[n])
                assert again.status_code == first[keys[n]].status_code
                assert again.json() == first[keys[n]].json()
        crashes = api.starts - 1 + signer.starts - 1
        ctx = await Context.open(settings, run_migrations=False)
        try:
            # A reservation commits with its signature, so a crash leaves none behind.
            async with ctx.engine.connect() as conn:
                rows = await conn.execute(select(payments.c.id).where(payments.c.status == "reserved"))
                assert rows.all() == []
            await _check_books(ctx, first, slots)
        finally:
            await ctx.close()
    print(f"crashes: api {api.starts - 1}, signer {signer.starts - 1}")
    assert crashes > 0, "no failpoint fired: the test proved nothing"


async def _check_books(ctx: Context, first: dict[str, httpx.Response], slots: int) -> None:
    async with ctx.engine.connect() as conn:
        rows = {r.id: r for r in await conn.execute(select(payments))}
        entries = (await conn.execute(select(ledger_entries))).all()
        buckets = (await conn.execute(select(ledger_buckets))).all()
        claims = (await conn.execute(select(idempotency_keys))).all()
    statuses = Counter(r.status for r in rows.values())
    assert set(statuses) <= {"signed", "denied", "failed"}, statuses
    # Every signature an agent received is a signed payment with its reservation, and the same bytes.
    signed_answers = {key: r.json() for key, r in first.items() if r.status_code == 200}
    for body in signed_answers.values():
        payment = rows[body["payment_id"]]
        assert payment.status == "signed"
        assert json.loads(payment.result) == body["result"]
    # No agent key paid twice: one signed payment per nonce (each key sent its own nonce).
    nonces = Counter(json.loads(r.request)["transaction"]["nonce"] for r in rows.values() if r.status == "signed")
    assert max(nonces.values()) == 1
    # Reservations: counted once for every signed payment, none left for any other.
    per_payment: Counter[str] = Counter()
    for entry in entries:
        per_payment[entry.payment_id] += 1
        assert rows[entry.payment_id].status == "signed"
    assert set(per_payment) == {pid for pid, r in rows.items() if r.status == "signed"}
    counter = f"{CHAIN}:native"
    spent = sum(int(e.amount) for e in entries if e.counter == counter)
    assert spent <= slots * (EACH + GAS), (spent, slots * (EACH + GAS))
    # The hourly and minute totals agree with the entries (nothing released twice or twice added).
    totals: Counter[tuple[int, str, str]] = Counter()
    for entry in entries:
        for span in (3600, 60):
            totals[(span, entry.counter, entry.agent_id)] += int(entry.amount)
    bucket_totals: Counter[tuple[int, str, str]] = Counter()
    for bucket in buckets:
        bucket_totals[(bucket.span, bucket.counter, bucket.agent_id)] += int(bucket.amount)
    assert +bucket_totals == +totals
    # Checked after the books above, so a failure here says whether reservations were lost or never made.
    assert len(signed_answers) == statuses["signed"] == slots, (len(signed_answers), statuses)
    # A claim commits with its answer: a crash leaves no claim without one.
    assert all(c.status_code is not None for c in claims)
    # Payments the signer failed on are recorded as failed, with an audit record each; the chain is intact.
    log = AuditLog(ctx.engine)
    report = await log.verify()
    assert report.ok, report
    events = []
    while batch := await log.events(after_seq=events[-1].seq if events else 0):
        events.extend(batch)
    failed = {e.subject for e in events if e.kind in ("payment.interrupted", "payment.sign_failed")}
    assert failed == {pid for pid, r in rows.items() if r.status == "failed"}
    print(f"payments: {dict(statuses)}; failed at the signer: {len(failed)}")


def _settings(short_dir: Path, database_url: str | None) -> Settings:
    return Settings(data_dir=short_dir / "data", database_url=database_url, kek_scrypt_n=2**10)


@pytest.mark.postgres
async def test_killed_processes_lose_nothing_and_count_nothing_twice(short_dir: Path, pg_database: str) -> None:
    await _run(_settings(short_dir, pg_database), short_dir, rounds=200, probability=0.02)


@pytest.mark.soak
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def test_killed_processes_soak(short_dir: Path, backend: str, request: pytest.FixtureRequest) -> None:
    database_url = request.getfixturevalue("pg_database") if backend == "postgresql" else None
    await _run(_settings(short_dir, database_url), short_dir, rounds=800, probability=0.02)
