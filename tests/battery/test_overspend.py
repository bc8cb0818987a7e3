"""Overspend race: many concurrent clients against one wallet's daily cap.

Every run sends requests that together ask for at least three times the cap, and then checks
what the service answered against what it recorded: the approved total never exceeds the cap,
the cap is filled to within one payment, every signature has its reservation in the ledger and
its records in the audit log, and nothing else was reserved or signed. The same holds in one
process (SQLite and PostgreSQL) and across two ``custody serve`` processes sharing a database
and Redis; those two processes also take an idempotency storm split between them.

The daily cap is a rolling 24 hours here, so a run that crosses midnight does not see a fresh
budget half-way (calendar days are covered by test_ledger_model.py).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine
from web3 import Web3

from custody.audit.log import AuditLog, audit_events
from custody.payments.ledger import ledger_buckets, ledger_entries, payments
from custody.settings import Settings
from tests.battery.test_idempotency_storm import storm_across_processes
from tests.conftest import REDIS_URL
from tests.payments.helpers import GAS, agent_key, native_policy, set_policy, transfer, wallet
from tests.processes import api_process, api_ready, free_port, wait_for

API = tuple[httpx.AsyncClient, str]
CHAIN = 31337
NATIVE = f"{CHAIN}:native"
BOB = Web3.to_checksum_address("0x" + "b0" * 20)
CLIENTS = 64


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """One agent sends thousands of requests here: the per-agent rate limit is not what is tested."""
    return settings.model_copy(update={"agent_rate_limit_per_minute": 0})


@dataclass(frozen=True)
class Outcome:
    nonce: int
    value: int
    status: int
    body: dict[str, Any]

    @property
    def cost(self) -> int:
        """What the payment debits from the native cap: its value and its maximum gas cost."""
        return self.value + GAS


def _values(seed: int, cap: int, count: int) -> list[int]:
    """Random payment values (small, medium, large) whose costs add up to at least three times the cap."""
    rng = random.Random(seed)
    ranges = ((1, cap // 40), (1, cap // 6), (cap // 8, cap // 3))
    values = [rng.randint(*rng.choice(ranges)) for _ in range(count)]
    assert sum(v + GAS for v in values) >= 3 * cap
    return values


async def _race(
    urls: Sequence[str], headers: dict[str, str], wallet_id: str, values: list[int], http: Any
) -> list[Outcome]:
    """``CLIENTS`` concurrent clients share the attempts; client n talks to ``urls[n % len(urls)]``."""
    pending = iter(enumerate(values))
    outcomes: list[Outcome] = []

    async def client(n: int) -> None:
        base = urls[n % len(urls)]
        for nonce, value in pending:
            body = {"transaction": transfer(CHAIN, BOB, value, nonce)}
            response = await http.post(f"{base}/v1/wallets/{wallet_id}/sign/transaction", json=body, headers=headers)
            outcomes.append(Outcome(nonce, value, response.status_code, response.json()))

    await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    assert len(outcomes) == len(values)
    return outcomes


def _policy(cap: int, approval_above: int | None = None) -> dict[str, Any]:
    """A daily cap as a rolling 24 hours, so a run that crosses midnight cannot see two budgets."""
    document = native_policy(CHAIN, [BOB], cap, approval_above)
    daily = next(rule for rule in document["rules"] if rule["id"] == "daily")
    assert daily["rolling"] == "24h"
    assert "period" not in daily
    return document


async def _new_wallet(admin: httpx.AsyncClient, name: str, cap: int) -> tuple[dict[str, Any], dict[str, str]]:
    payer = await wallet(admin, name)
    await set_policy(admin, payer["id"], _policy(cap))
    _, key = await agent_key(admin, [payer["id"]], name=f"{name}-agent")
    return payer, {"Authorization": f"Bearer {key}"}


async def _verify(
    engine: AsyncEngine, admin: httpx.AsyncClient, payer: dict[str, Any], cap: int, outcomes: list[Outcome]
) -> int:
    """Check the answers against the cap, the ledger and the audit log; return the approved total."""
    approved = [o for o in outcomes if o.status == 200]
    denied = [o for o in outcomes if o.status == 403]
    assert len(approved) + len(denied) == len(outcomes), Counter(o.status for o in outcomes)
    for outcome in denied:
        assert [r["code"] for r in outcome.body["reasons"]] == ["cap_exceeded"], outcome.body
    total = sum(o.cost for o in approved)
    assert total <= cap
    assert total >= cap - max(o.cost for o in outcomes)
    # Each denial saw the ledger at some total <= the final one, so none of them could have fitted at the end.
    assert all(total + o.cost > cap for o in denied)

    signed_ids = {o.body["payment_id"] for o in approved}
    assert len(signed_ids) == len(approved)
    for outcome in approved:
        assert outcome.body["status"] == "signed"
        assert Account.recover_transaction(outcome.body["result"]["raw_transaction"]) == payer["address"]

    await AuditLog(engine).seal()  # payments queue their records; reading the table directly, chain them first
    async with engine.connect() as conn:
        rows = (
            await conn.execute(select(payments.c.id, payments.c.status).where(payments.c.wallet_id == payer["id"]))
        ).all()
        entries = (await conn.execute(select(ledger_entries).where(ledger_entries.c.wallet_id == payer["id"]))).all()
        buckets = (
            await conn.execute(
                select(ledger_buckets.c.span, ledger_buckets.c.counter, ledger_buckets.c.amount).where(
                    ledger_buckets.c.wallet_id == payer["id"]
                )
            )
        ).all()
        ids = [r.id for r in rows]
        events = (
            await conn.execute(
                select(audit_events.c.kind, audit_events.c.subject, audit_events.c.data).where(
                    audit_events.c.subject.in_(ids)
                )
            )
        ).all()

    # The database holds exactly what the clients were told.
    assert Counter(r.status for r in rows) == Counter({"signed": len(approved), "denied": len(denied)})
    assert {r.id for r in rows if r.status == "signed"} == signed_ids
    assert {r.id for r in rows} == {o.body["payment_id"] for o in outcomes}
    # Every signed payment has its reservation: one native debit of its cost and one payment count.
    by_payment: dict[str, dict[str, int]] = {}
    for entry in entries:
        counters = by_payment.setdefault(entry.payment_id, {})
        assert entry.counter not in counters
        counters[entry.counter] = int(entry.amount)
    assert by_payment == {o.body["payment_id"]: {NATIVE: o.cost, "payments": 1} for o in approved}
    # Hourly and minute totals each agree with the entries.
    bucket_totals: Counter[tuple[int, str]] = Counter()
    for span, counter, amount in buckets:
        bucket_totals[(span, counter)] += int(amount)
    for span in (3600, 60):
        assert bucket_totals[(span, NATIVE)] == total
        assert bucket_totals[(span, "payments")] == len(approved)

    # The audit log: one decision per request, one signature per signed payment, and each signature's hash
    # is the one the client received.
    decided = Counter(json.loads(e.data)["outcome"] for e in events if e.kind == "payment.decided")
    assert decided == Counter({"allow": len(approved), "deny": len(denied)})
    signed_hashes = {e.subject: json.loads(e.data)["hash"] for e in events if e.kind == "payment.signed"}
    assert len([e for e in events if e.kind == "payment.signed"]) == len(approved)
    assert signed_hashes == {o.body["payment_id"]: o.body["result"]["hash"] for o in approved}
    assert not [e.kind for e in events if e.kind == "payment.sign_failed"]
    verified = (await admin.get("/admin/v1/audit/verify")).json()
    assert verified["ok"] is True, verified
    return total


async def _overspend_rounds(api: API, seeds: Sequence[int], attempts: int) -> None:
    admin, _ = api
    engine = admin._transport.app.state.ctx.engine  # type: ignore[attr-defined]
    for seed in seeds:
        rng = random.Random(seed)
        cap = rng.randint(5 * 10**16, 5 * 10**17)
        payer, headers = await _new_wallet(admin, f"race-{seed}", cap)
        values = _values(seed, cap, attempts)
        outcomes = await _race([""], headers, payer["id"], values, admin)
        await _verify(engine, admin, payer, cap, outcomes)


async def test_64_concurrent_clients_never_overspend_the_daily_cap(api: API) -> None:
    await _overspend_rounds(api, seeds=(1, 2, 3), attempts=80)


@pytest.mark.soak
async def test_soak_10000_attempts_never_overspend_the_daily_cap(api: API) -> None:
    await _overspend_rounds(api, seeds=tuple(range(100, 110)), attempts=1000)


async def _last_slot(
    admin: httpx.AsyncClient, engine: AsyncEngine, urls: Sequence[str], http: Any, name: str, same: bool
) -> None:
    """Fill the cap but one slot, then ten different requests race for it: exactly one wins."""
    slot = 10**16 + GAS
    cap = 4 * slot
    payer, headers = await _new_wallet(admin, name, cap)
    first = await _race(urls, headers, payer["id"], [slot - GAS] * 3, http)
    assert [o.status for o in first] == [200, 200, 200]
    rng = random.Random(name)
    # Any one of these fits the last slot; no two fit together.
    values = [slot - GAS if same else rng.randint(slot // 2 + 1, slot) - GAS for _ in range(10)]
    pending = iter(range(3, 13))
    results: list[Outcome] = []

    async def contender(n: int, value: int) -> None:
        nonce = next(pending)
        body = {"transaction": transfer(CHAIN, BOB, value, nonce)}
        response = await http.post(
            f"{urls[n % len(urls)]}/v1/wallets/{payer['id']}/sign/transaction", json=body, headers=headers
        )
        results.append(Outcome(nonce, value, response.status_code, response.json()))

    await asyncio.gather(*(contender(n, v) for n, v in enumerate(values)))
    winners = [o for o in results if o.status == 200]
    assert len(winners) == 1, Counter(o.status for o in results)
    losers = [o for o in results if o.status == 403]
    assert len(losers) == 9
    for loser in losers:
        (reason,) = loser.body["reasons"]
        assert reason["code"] == "cap_exceeded"
        assert int(reason["remaining"]) == slot - winners[0].cost
    total = await _verify(engine, admin, payer, cap, first + results)
    assert total == 3 * slot + winners[0].cost


@pytest.mark.parametrize("same", [True, False], ids=["same-amount", "different-amounts"])
async def test_ten_requests_for_the_last_slot_exactly_one_wins(api: API, same: bool) -> None:
    admin, _ = api
    engine = admin._transport.app.state.ctx.engine  # type: ignore[attr-defined]
    await _last_slot(admin, engine, [""], admin, f"last-{same}", same)


async def test_approvals_and_payments_racing_for_the_last_slot_exactly_one_wins(api: API) -> None:
    """Five approvals of held payments and five new payments, all at once, for one remaining slot."""
    admin, _ = api
    engine = admin._transport.app.state.ctx.engine  # type: ignore[attr-defined]
    slot = 10**16 + GAS
    cap, above = 4 * slot, slot * 7 // 10
    payer = await wallet(admin, "mixed")
    await set_policy(admin, payer["id"], _policy(cap, approval_above=above))
    _, key = await agent_key(admin, [payer["id"]], name="mixed-agent")
    headers = {"Authorization": f"Bearer {key}"}
    url = f"/v1/wallets/{payer['id']}/sign/transaction"
    rng = random.Random(4)
    # Held for approval: above the threshold, and each fits the last slot alone.
    held = []
    for nonce in range(5):
        value = rng.randint(above + 1, slot) - GAS
        response = await admin.post(url, json={"transaction": transfer(CHAIN, BOB, value, nonce)}, headers=headers)
        assert response.status_code == 202, response.text
        held.append((response.json()["payment_id"], value + GAS))
    # Fill the cap but one slot with payments below the threshold.
    for nonce in range(5, 11):
        response = await admin.post(
            url, json={"transaction": transfer(CHAIN, BOB, slot // 2 - GAS, nonce)}, headers=headers
        )
        assert response.status_code == 200, response.text
    filled = 6 * (slot // 2)
    remaining = cap - filled
    # Paid at once: at most the threshold. Any one contender fits what remains; no two fit together.
    direct = [rng.randint(remaining // 2 + 1, above) - GAS for _ in range(5)]
    assert all(remaining // 2 < cost <= remaining for _, cost in held)

    async def approve(payment_id: str) -> httpx.Response:
        return await admin.post(f"/admin/v1/approvals/{payment_id}/approve", json={})

    async def pay(nonce: int, value: int) -> httpx.Response:
        return await admin.post(url, json={"transaction": transfer(CHAIN, BOB, value, nonce)}, headers=headers)

    answers = await asyncio.gather(
        *(approve(pid) for pid, _ in held), *(pay(11 + n, value) for n, value in enumerate(direct))
    )
    approvals, payments_made = answers[:5], answers[5:]
    assert all(a.status_code == 200 for a in approvals)
    won = [pid for (pid, _), a in zip(held, approvals, strict=True) if a.json()["status"] == "signed"]
    won += [p.json()["payment_id"] for p in payments_made if p.status_code == 200]
    assert len(won) == 1, [a.json()["status"] for a in approvals] + [p.status_code for p in payments_made]
    assert all(a.json()["status"] in ("signed", "denied") for a in approvals)
    assert all(p.status_code in (200, 403) for p in payments_made)
    costs = dict(held) | {p.json()["payment_id"]: value + GAS for p, value in zip(payments_made, direct, strict=True)}
    await AuditLog(engine).seal()
    async with engine.connect() as conn:
        entries = (
            await conn.execute(
                select(ledger_entries.c.payment_id, ledger_entries.c.amount).where(
                    ledger_entries.c.wallet_id == payer["id"], ledger_entries.c.counter == NATIVE
                )
            )
        ).all()
        signed = (
            await conn.execute(
                select(audit_events.c.subject).where(
                    audit_events.c.kind == "payment.signed", audit_events.c.subject.in_(list(costs))
                )
            )
        ).all()
    total = sum(int(e.amount) for e in entries)
    assert total == filled + costs[won[0]] <= cap
    assert [s.subject for s in signed] == won


async def _two_processes(
    api: API, settings: Settings, short_dir: Path, redis_prefix: str, seeds: Sequence[int], attempts: int
) -> None:
    admin, _ = api
    engine = admin._transport.app.state.ctx.engine  # type: ignore[attr-defined]
    ports = [free_port(), free_port()]
    shared = settings.model_copy(update={"redis_url": REDIS_URL, "redis_prefix": redis_prefix})
    servers = [
        api_process(shared, port, short_dir / f"api{n}.log", agent_rate_limit_per_minute="0").start()
        for n, port in enumerate(ports)
    ]
    try:
        for port in ports:
            wait_for(lambda port=port: api_ready(f"http://127.0.0.1:{port}"), f"the API on port {port}")  # type: ignore[misc]
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            for seed in seeds:
                rng = random.Random(seed)
                cap = rng.randint(5 * 10**16, 5 * 10**17)
                payer, headers = await _new_wallet(admin, f"mp-{seed}", cap)
                outcomes = await _race(urls, headers, payer["id"], _values(seed, cap, attempts), http)
                await _verify(engine, admin, payer, cap, outcomes)
            await _last_slot(admin, engine, urls, http, "mp-last", same=False)
            await storm_across_processes(admin, http, ports)
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)])
async def test_two_api_processes_never_overspend_and_replay_one_answer(
    api: API, settings: Settings, short_dir: Path, redis_prefix: str, backend: str
) -> None:
    await _two_processes(api, settings, short_dir, redis_prefix, seeds=(7, 8), attempts=100)


@pytest.mark.soak
async def test_soak_two_api_processes_never_overspend_and_replay_one_answer(
    api: API, settings: Settings, short_dir: Path, redis_prefix: str
) -> None:
    await _two_processes(api, settings, short_dir, redis_prefix, seeds=tuple(range(200, 205)), attempts=1000)
