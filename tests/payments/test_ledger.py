"""The SQL ledger's window sums are exact: hourly buckets plus edge entries equal a plain sum."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy import insert

from custody.keys.envelope import KeyEnvelope
from custody.payments.ledger import _edges, record, release, window_total
from custody.payments.models import AgentRow
from custody.services.context import Context
from custody.storage.db import write_transaction
from custody.storage.interfaces import Wallet
from tests.payments.helpers import signed_payment_row

START = datetime(2026, 3, 28, 22, 0, tzinfo=UTC)
COUNTER = "1:native"


async def _wallet_with_payment(ctx: Context) -> None:
    now = START
    await ctx.wallets.add(
        Wallet("wal_l", "l", "0x" + "11" * 20, "0x04", 1, now), KeyEnvelope("wal_l", 1, 1, b"x", b"x")
    )
    async with write_transaction(ctx.engine) as conn:
        await conn.execute(insert(AgentRow.__table__).values(id="agt_a", name="a", created_at=now))  # type: ignore[attr-defined]
        for payment_id in ("pay_1", "pay_2"):
            await signed_payment_row(conn, payment_id, "wal_l", "agt_a", now)


async def test_window_totals_match_a_plain_sum_at_every_boundary(settings: object) -> None:
    ctx = await Context.open(settings)  # type: ignore[arg-type]
    try:
        await _wallet_with_payment(ctx)
        rng = random.Random(7)
        entries = []
        for _ in range(400):
            at = START + timedelta(microseconds=rng.randrange(0, 3 * 24 * 3600 * 10**6))
            if rng.random() < 0.2:  # many right on an hour or a minute boundary
                at = at.replace(minute=rng.choice([0, at.minute]), second=0, microsecond=0)
            agent = rng.choice(["agt_a", "agt_b"])
            amount = rng.choice([1, 10**18, 2**200])
            entries.append(
                {
                    "payment_id": rng.choice(["pay_1", "pay_2"]),
                    "wallet_id": "wal_l",
                    "agent_id": agent,
                    "counter": COUNTER,
                    "amount": amount,
                    "at": at,
                }
            )
        async with write_transaction(ctx.engine) as conn:
            # Every other entry stamped in another offset: the same instant, recorded as UTC.
            east = timezone(timedelta(hours=2))
            await record(conn, [e | {"at": e["at"].astimezone(east)} if n % 2 else e for n, e in enumerate(entries)])
        boundaries = [e["at"] for e in entries[:50]] + [START + timedelta(hours=h) for h in range(0, 80, 7)]
        boundaries += [START + timedelta(minutes=m) for m in range(7, 4000, 131)]
        async with ctx.engine.connect() as conn:
            for _ in range(300):
                since = rng.choice(boundaries) + timedelta(microseconds=rng.choice([-1000, -1, 0, 1, 1000]))
                # Windows inside one hour, across one boundary, and over days; empty and reversed ones too.
                longest = rng.choice([3600, 2 * 3600, 2 * 24 * 3600]) * 10**6
                until = since + timedelta(microseconds=rng.randrange(-1000, longest))
                if rng.random() < 0.2:
                    until = until.replace(minute=0, second=0, microsecond=0)
                agent = rng.choice([None, "agt_a"])
                expected = sum(
                    e["amount"]
                    for e in entries
                    if since <= e["at"] < until and (agent is None or e["agent_id"] == agent)
                )
                assert await window_total(conn, "wal_l", COUNTER, since, until, agent) == expected
                # The same instants given in another offset: the same total.
                zone = timezone(timedelta(hours=rng.choice([-3, 2, 5.5])))
                local = (since.astimezone(zone), until.astimezone(zone))
                assert await window_total(conn, "wal_l", COUNTER, *local, agent) == expected
        async with write_transaction(ctx.engine) as conn:
            await release(conn, "pay_1")
        left = [e for e in entries if e["payment_id"] == "pay_2"]
        async with ctx.engine.connect() as conn:
            everything = await window_total(
                conn, "wal_l", COUNTER, START - timedelta(days=1), START + timedelta(days=5), None
            )
        assert everything == sum(e["amount"] for e in left)
    finally:
        await ctx.close()


def test_a_window_reads_one_minute_of_entries_and_30_minute_totals_at_its_start_and_only_the_future_at_its_end() -> (
    None
):
    rng = random.Random(11)
    for _ in range(2000):
        until = START + timedelta(microseconds=rng.randrange(0, 10 * 24 * 3600 * 10**6))
        since = until - timedelta(microseconds=rng.randrange(1, 8 * 24 * 3600 * 10**6))
        _sign, ranges = _edges(since, until)
        assert timedelta(0) <= ranges["su"] - ranges["ss"] <= timedelta(minutes=1)
        assert timedelta(0) <= ranges["mu"] - ranges["ms"] <= timedelta(minutes=30)
        assert ranges["es"] == until  # the end reads only from the window's end onwards
