"""Migrations that rewrite data: upgrading keeps every window total exact; downgrading undoes it."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from alembic import command
from sqlalchemy import Connection, DateTime, String, column, insert, select, table

from custody.payments.ledger import SPANS, ledger_buckets, ledger_entries, record, window_total
from custody.payments.models import AgentRow
from custody.settings import Settings
from custody.storage.db import _alembic_config, create_engine
from custody.storage.models import WalletRow
from custody.storage.types import BigInt
from tests.payments.helpers import signed_payment_row

# ledger_buckets as revision 0007 has it: hours only, no span.
HOURLY = table(
    "ledger_buckets",
    column("wallet_id", String),
    column("counter", String),
    column("agent_id", String),
    column("bucket", DateTime(timezone=True)),
    column("amount", BigInt),
)
START = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
COUNTER = "1:native"


def _to(revision: str, *, down: bool = False) -> object:
    def run(connection: Connection) -> None:
        config = _alembic_config(connection)
        (command.downgrade if down else command.upgrade)(config, revision)

    return run


def _entries(rng: random.Random) -> list[dict[str, object]]:
    entries = []
    for n in range(300):
        at = START + timedelta(microseconds=rng.randrange(0, 3 * 3600 * 10**6))
        if n % 10 == 0:
            at = at.replace(second=0, microsecond=0)  # on a minute boundary
        entries.append(
            {
                "payment_id": "pay_m",
                "wallet_id": "wal_m",
                "agent_id": rng.choice(["agt_a", "agt_b"]),
                "counter": rng.choice([COUNTER, "payments"]),
                "amount": rng.choice([1, 10**18, 2**200]),
                "at": at,
            }
        )
    return entries


def _expected(entries: list[dict[str, object]], span: timedelta) -> Counter[tuple[object, ...]]:
    totals: Counter[tuple[object, ...]] = Counter()
    for e in entries:
        at = e["at"]
        assert isinstance(at, datetime)
        start = at - (at - datetime(1970, 1, 1, tzinfo=UTC)) % span
        totals[(e["wallet_id"], e["counter"], start, e["agent_id"])] += e["amount"]  # type: ignore[operator]
    return totals


def _stored(rows: list[Any], span: timedelta) -> Counter[tuple[object, ...]]:
    """The totals of one span as read back from ledger_buckets."""
    return Counter(
        {
            (r.wallet_id, r.counter, r.bucket.replace(tzinfo=UTC), r.agent_id): r.amount
            for r in rows
            if r.span == span.total_seconds()
        }
    )


async def test_upgrading_rebuilds_hour_and_minute_totals_from_the_entries_and_downgrading_keeps_the_hours(
    settings: Settings,
) -> None:
    rng = random.Random(5)
    entries = _entries(rng)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(settings.sqlalchemy_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_to("0007"))
            await conn.execute(
                insert(WalletRow.__table__).values(  # type: ignore[attr-defined]
                    id="wal_m", name="m", address="0x" + "22" * 20, public_key="0x04", created_at=START
                )
            )
            for agent in ("agt_a", "agt_b"):
                await conn.execute(insert(AgentRow.__table__).values(id=agent, name=agent, created_at=START))  # type: ignore[attr-defined]
            await signed_payment_row(conn, "pay_m", "wal_m", "agt_a", START)
            # Entries with no totals at all: what revision 0005 left behind for an older ledger.
            await conn.execute(insert(ledger_entries), entries)

        async with engine.begin() as conn:
            await conn.run_sync(_to("head"))
        async with engine.connect() as conn:
            found = (await conn.execute(select(ledger_buckets))).all()
            for span in SPANS:
                assert _stored(found, span) == _expected(entries, span)
            for _ in range(100):
                since = START + timedelta(microseconds=rng.randrange(-600 * 10**6, 3 * 3600 * 10**6))
                until = since + timedelta(microseconds=rng.randrange(1, 3 * 3600 * 10**6))
                agent = rng.choice([None, "agt_a"])
                plain = sum(
                    e["amount"]  # type: ignore[misc]
                    for e in entries
                    if e["counter"] == COUNTER
                    and since <= e["at"] < until  # type: ignore[operator]
                    and agent in (None, e["agent_id"])
                )
                assert await window_total(conn, "wal_m", COUNTER, since, until, agent) == plain

        # The service's own writes land on the totals the migration built (same keys, same stored form).
        later = dict(entries[0], amount=5)
        async with engine.begin() as conn:
            await record(conn, [later])
        async with engine.connect() as conn:
            after = (await conn.execute(select(ledger_buckets))).all()
        assert len(after) == len(found)
        entries.append(later)
        for span in SPANS:
            assert _stored(after, span) == _expected(entries, span)

        async with engine.begin() as conn:
            await conn.run_sync(_to("0007", down=True))
        async with engine.connect() as conn:
            hours = {
                (r.wallet_id, r.counter, r.bucket.replace(tzinfo=UTC), r.agent_id): int(r.amount)
                for r in await conn.execute(select(HOURLY))
            }
        assert Counter(hours) == _expected(entries, timedelta(hours=1))
    finally:
        await engine.dispose()
