"""Records written inside a transaction queue in audit_pending and are chained later, in order, once."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select, text

from custody.audit import AuditLog
from custody.audit.log import Record, audit_events, audit_pending
from custody.audit.sealer import Sealer
from custody.services.context import Context
from custody.settings import Settings


async def _counts(log: AuditLog) -> tuple[int, int]:
    async with log.engine.connect() as conn:
        chained = (await conn.execute(select(func.count()).select_from(audit_events))).scalar_one()
        pending = (await conn.execute(select(func.count()).select_from(audit_pending))).scalar_one()
    return int(chained), int(pending)


async def test_a_record_written_in_a_transaction_waits_unchained_until_sealed(log: AuditLog) -> None:
    async with log.engine.begin() as conn:
        await log.append_in(conn, "payment.decided", actor="system", subject="pay_1")
        await log.append_in(conn, "payment.signed", actor="signer", subject="pay_1")
    assert await _counts(log) == (0, 2)
    assert await log.seal() == 2
    assert await _counts(log) == (2, 0)
    assert await log.seal() == 0
    events = await log.events()
    assert [(e.seq, e.kind) for e in events] == [(1, "payment.decided"), (2, "payment.signed")]
    assert (await log.verify()).ok


async def test_records_written_together_are_chained_in_their_order(log: AuditLog) -> None:
    records = [
        Record("payment.decided", "agent:agt_1", "pay_1", {"outcome": "allow"}),
        Record("payment.signed", "signer", "pay_1", {"hash": "0x01"}),
        Record("payment.decided", "agent:agt_1", "pay_2", {"outcome": "deny"}),
    ]
    async with log.engine.begin() as conn:
        await log.append_all_in(conn, records)
    assert await _counts(log) == (0, 3)
    events = await log.events()
    assert [(e.kind, e.subject, e.data) for e in events] == [(r.kind, r.subject, r.data) for r in records]
    assert (await log.verify()).ok


async def test_a_record_refused_by_validation_writes_none_of_its_batch(log: AuditLog) -> None:
    records = [
        Record("payment.decided", "agent:agt_1", "pay_1", {"outcome": "allow"}),
        Record("payment.signed", "signer", "pay_1", {"private_key": "0x" + "11" * 32}),
    ]
    async with log.engine.begin() as conn:
        with pytest.raises(ValueError, match="looks like a secret"):
            await log.append_all_in(conn, records)
    assert await _counts(log) == (0, 0)


async def test_every_read_of_the_log_chains_pending_records_first(log: AuditLog) -> None:
    async with log.engine.begin() as conn:
        await log.append_in(conn, "payment.decided", actor="system", subject="pay_1")
    assert [e.subject for e in await log.events()] == ["pay_1"]
    async with log.engine.begin() as conn:
        await log.append_in(conn, "payment.decided", actor="system", subject="pay_2")
    report = await log.verify()
    assert (report.ok, report.count, report.head_seq) == (True, 2, 2)
    async with log.engine.begin() as conn:
        await log.append_in(conn, "payment.decided", actor="system", subject="pay_3")
    assert await log.head() is not None
    assert await _counts(log) == (3, 0)


async def test_an_own_transaction_append_comes_after_what_was_pending(log: AuditLog) -> None:
    async with log.engine.begin() as conn:
        for i in range(3):
            await log.append_in(conn, "payment.decided", actor="system", subject=f"pay_{i}")
    event = await log.append("wallet.created", actor="operator:op_1", subject="wal_1")
    assert event.seq == 4
    assert [e.subject for e in await log.events()] == ["pay_0", "pay_1", "pay_2", "wal_1"]
    assert await _counts(log) == (4, 0)


async def test_more_than_a_batch_is_sealed_in_one_call(log: AuditLog) -> None:
    async with log.engine.begin() as conn:
        for i in range(1_205):
            await log.append_in(conn, "payment.decided", actor="system", subject=f"pay_{i}")
    assert await log.seal() == 1_205
    report = await log.verify()
    assert (report.ok, report.count) == (True, 1_205)


async def test_writers_and_sealers_racing_build_one_gap_free_chain(log: AuditLog, settings: Settings) -> None:
    other = await Context.open(settings)  # a second process's engine
    try:
        second = AuditLog(other.engine)

        async def writer(task: int) -> None:
            for i in range(5):
                async with log.engine.begin() as conn:
                    await log.append_in(conn, "payment.decided", actor="system", subject=f"pay_{task}_{i}")

        async def sealer(audit: AuditLog) -> None:
            for _ in range(10):
                await audit.seal()
                await asyncio.sleep(0)

        await asyncio.gather(*(writer(t) for t in range(20)), sealer(log), sealer(second))
    finally:
        await other.close()
    events = await log.events(limit=1000)
    assert [e.seq for e in events] == list(range(1, 101))
    assert sorted(e.subject or "" for e in events) == sorted(f"pay_{t}_{i}" for t in range(20) for i in range(5))
    assert (await log.verify()).ok


async def test_the_background_sealer_chains_without_a_reader(log: AuditLog) -> None:
    sealer = Sealer(log, interval=0.05)
    sealer.start()
    try:
        async with log.engine.begin() as conn:
            await log.append_in(conn, "payment.decided", actor="system", subject="pay_1")
        for _ in range(100):
            if await _counts(log) == (1, 0):
                break
            await asyncio.sleep(0.05)
        assert await _counts(log) == (1, 0)
    finally:
        await sealer.stop()


async def test_the_sealer_chains_what_is_left_when_it_stops(log: AuditLog) -> None:
    sealer = Sealer(log, interval=3600)
    sealer.start()
    await asyncio.sleep(0.05)  # its first round ran on an empty queue
    async with log.engine.begin() as conn:
        await log.append_in(conn, "payment.decided", actor="system", subject="pay_1")
    await sealer.stop()
    assert await _counts(log) == (1, 0)


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_write_with_an_audit_record_does_not_wait_for_the_chain_head(log: AuditLog) -> None:
    """Payments queue their records: a transaction holding the head does not hold them up."""
    async with log.engine.connect() as holder:
        await holder.begin()
        await holder.execute(text("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE"))

        async def write() -> None:
            async with log.engine.begin() as conn:
                await log.append_in(conn, "payment.decided", actor="system", subject="pay_1")

        await asyncio.wait_for(write(), timeout=5)  # before pending records, this waited for the holder
        await holder.rollback()
    assert await _counts(log) == (0, 1)
    assert await log.seal() == 1
