"""Does a decision get slower as the ledger grows? Prints the median decision time with N past payments.

    python bench/decision_history.py                       # SQLite in a temporary directory
    python bench/decision_history.py --database-url postgresql://postgres@127.0.0.1/bench_db

A decision here is the whole locked transaction the payment path runs: take the wallet
lock, answer the engine's spend questions with range sums, evaluate, record the payment
and its reservation (rolled back after timing, so the history stays the same). The history
is spread over the 30 days before now; the policy has a calendar-day cap, a rolling 7-day
cap and a velocity limit, so the windows cover 1, 7 and 1/24 of those days.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, insert, text

from custody.keys.envelope import KeyEnvelope
from custody.payments.ledger import decide, ledger_buckets, ledger_entries, payments, record
from custody.payments.models import AgentRow
from custody.services.context import Context
from custody.settings import Settings
from custody.storage.db import write_transaction
from custody.storage.interfaces import Wallet
from policies import Intent, load_policy

CHAIN = 8453
PAYEE = "0x" + "b0" * 20
POLICY = load_policy(
    {
        "schema_version": 1,
        "assets": {"eth": {"chain_id": CHAIN, "address": "native", "decimals": 18}},
        "rules": [
            {"id": "send", "type": "allow_transfers"},
            {"id": "day", "type": "cap", "asset": "eth", "max": str(10**30), "period": "day"},
            {"id": "week", "type": "cap", "asset": "eth", "max": str(10**30), "rolling": "7d"},
            {"id": "rate", "type": "velocity", "max_payments": 10**9, "rolling": "1h"},
        ],
    }
)


async def _fill(ctx: Context, wallet_id: str, count: int, now: datetime) -> None:
    async with write_transaction(ctx.engine) as conn:
        await conn.execute(delete(ledger_entries).where(ledger_entries.c.wallet_id == wallet_id))
        await conn.execute(delete(ledger_buckets).where(ledger_buckets.c.wallet_id == wallet_id))
    step = timedelta(days=30) / max(count, 1)
    for start in range(0, count, 5000):
        rows = []
        for n in range(start, min(count, start + 5000)):
            at = now - timedelta(days=30) + step * n
            for counter, amount in ((f"{CHAIN}:native", 10**15), ("payments", 1)):
                rows.append(
                    {
                        "payment_id": "pay_history",
                        "wallet_id": wallet_id,
                        "agent_id": "agt_bench",
                        "counter": counter,
                        "amount": amount,
                        "at": at,
                    }
                )
        async with write_transaction(ctx.engine) as conn:
            await record(conn, rows)
    async with ctx.engine.connect() as conn:  # what autovacuum would do after a bulk load
        if conn.dialect.name == "postgresql":
            await conn.execute(text("ANALYZE ledger_entries"))
            await conn.execute(text("ANALYZE ledger_buckets"))
            await conn.commit()


async def _time_decisions(ctx: Context, wallet_id: str, now: datetime, rounds: int) -> float:
    intent = Intent(
        kind="native_transfer",
        chain_id=CHAIN,
        wallet_id=wallet_id,
        agent_id="agt_bench",
        asset="native",
        amount=10**15,
        payee=PAYEE,
    )
    samples = []
    for _ in range(rounds):
        async with ctx.engine.connect() as conn:
            conn = await conn.execution_options(sqlite_immediate=True)
            began = time.perf_counter()
            transaction = await conn.begin()
            decision = await decide(conn, wallet_id, POLICY, intent, now, None)
            assert decision.outcome == "allow", decision.codes
            await record(
                conn,
                [
                    {
                        "payment_id": "pay_history",
                        "wallet_id": wallet_id,
                        "agent_id": "agt_bench",
                        "counter": d.counter,
                        "amount": d.amount,
                        "at": now,
                    }
                    for d in decision.debits
                ],
            )
            await transaction.rollback()
            samples.append(time.perf_counter() - began)
    return statistics.median(samples) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--sizes", default="100,1000,10000,100000")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), database_url=args.database_url)
        ctx = await Context.open(settings)
        now = datetime.now(UTC)
        wallet = Wallet("wal_bench", "bench", "0x" + "11" * 20, "0x04", 1, now)
        if await ctx.wallets.get(wallet.id) is None:
            await ctx.wallets.add(wallet, KeyEnvelope(wallet.id, 1, 1, b"x", b"x"))
            async with write_transaction(ctx.engine) as conn:
                await conn.execute(insert(AgentRow.__table__).values(id="agt_bench", name="bench", created_at=now))  # type: ignore[attr-defined]
                await conn.execute(
                    insert(payments).values(
                        id="pay_history",
                        wallet_id=wallet.id,
                        agent_id="agt_bench",
                        method="transaction",
                        request="{}",
                        status="signed",
                        decision="{}",
                        created_at=now,
                        updated_at=now,
                    )
                )
        backend = "PostgreSQL" if settings.database_url else "SQLite"
        print(f"decision cost vs. ledger size ({backend}, median of {args.rounds})")
        baseline = None
        for size in (int(s) for s in args.sizes.split(",")):
            await _fill(ctx, wallet.id, size, now)
            median = await _time_decisions(ctx, wallet.id, now, args.rounds)
            baseline = baseline or median
            print(f"  {size:>9,} past payments: {median:6.3f} ms  ({median / baseline:4.2f}x)")
        await ctx.close()


if __name__ == "__main__":
    asyncio.run(main())
