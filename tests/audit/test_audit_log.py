"""The audit log: append-only, hash-chained, and every kind of tampering is named, on both backends."""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import json
import random
import stat
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from typer.testing import CliRunner

from custody.audit import GENESIS_HASH, AuditEvent, AuditLog, event_hash
from custody.audit.log import audit_events, audit_head, looks_secret
from custody.cli.audit import audit_app
from custody.services.context import Context
from custody.settings import Settings

N = 300
T0 = datetime(2025, 1, 31, 9, 15, 2, 123456, tzinfo=UTC)


def _sample_data(i: int) -> dict[str, Any]:
    return {
        "amount": 10**18 + i,  # wei: beyond 2**53 on purpose
        "reasons": [{"code": "within_budget", "rule": f"r{i % 7}"}],
        "note": "naïve ☃",
        "approved": i % 2 == 0,
        "credential_id": f"op_{i:04d}",
    }


async def _seed(log: AuditLog, n: int = N) -> list[AuditEvent]:
    """n records in one caller transaction (append_in), with distinct timestamps and contents."""
    async with log.engine.begin() as conn:
        for i in range(1, n + 1):
            actor = "system" if i % 3 == 0 else f"agent:agt_{i % 5}"
            await log.append_in(
                conn,
                "payment.decided",
                actor=actor,
                subject=f"pay_{i:05d}",
                data=_sample_data(i),
                at=T0 + timedelta(seconds=i, microseconds=i),
            )
    assert await log.seal() == n
    return await log.events(limit=n)


async def _snapshot(engine: AsyncEngine) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    async with engine.connect() as conn:
        rows = [dict(row._mapping) for row in await conn.execute(select(audit_events).order_by(audit_events.c.seq))]
        head = dict((await conn.execute(select(audit_head))).one()._mapping)
    return rows, head


async def _restore(engine: AsyncEngine, snapshot: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    rows, head = snapshot
    async with engine.begin() as conn:
        await conn.execute(delete(audit_events))
        await conn.execute(delete(audit_head))
        await conn.execute(insert(audit_events), rows)
        await conn.execute(insert(audit_head).values(**head))


async def _tamper(engine: AsyncEngine, change: Callable[[AsyncConnection], Awaitable[Any]]) -> None:
    async with engine.begin() as conn:
        await change(conn)


def _set(seq: int, **values: Any) -> Callable[[AsyncConnection], Awaitable[Any]]:
    async def change(conn: AsyncConnection) -> None:
        await conn.execute(update(audit_events).where(audit_events.c.seq == seq).values(**values))

    return change


async def _assert_detected(log: AuditLog, bad_seq: int, *words: str) -> None:
    result = await log.verify()
    assert not result.ok
    assert result.first_bad_seq == bad_seq, result.problem
    assert result.problem is not None
    for word in words:
        assert word in result.problem


# -- appending ----------------------------------------------------------------------------------


async def test_append_returns_the_record_and_reads_back_identically(log: AuditLog) -> None:
    at = datetime(2025, 3, 1, 12, 0, 0, 7, tzinfo=UTC)
    data = {"wallet_id": "wal_1", "amount": 2**200, "to": "0xabc", "reasons": ["allowlisted"]}
    event = await log.append("payment.requested", actor="agent:agt_1", subject="pay_1", data=data, at=at)
    assert (event.seq, event.at, event.prev_hash) == (1, at, GENESIS_HASH)
    assert event.hash == event_hash(
        seq=1, at=at, kind="payment.requested", actor="agent:agt_1", subject="pay_1", data=data, prev_hash=GENESIS_HASH
    )
    assert await log.events() == [event]
    result = await log.verify()
    assert (result.ok, result.count, result.head_seq, result.head_hash) == (True, 1, 1, event.hash)


async def test_timestamps_default_to_now_and_convert_to_utc(log: AuditLog) -> None:
    before = datetime.now(UTC)
    first = await log.append("admin.changed", actor="operator:op_1")
    offset = datetime(2025, 1, 1, 12, 0, tzinfo=UTC).astimezone(ZoneInfo("Asia/Kolkata"))
    second = await log.append("admin.changed", actor="operator:op_1", at=offset)
    assert before <= first.at <= datetime.now(UTC)
    assert second.at == offset
    assert second.at.utcoffset() == timedelta(0)
    assert [e.at for e in await log.events()] == [first.at, second.at]
    with pytest.raises(ValueError, match="timezone"):
        await log.append("admin.changed", actor="system", at=datetime(2025, 1, 1))


async def test_each_record_links_to_the_previous_hash(log: AuditLog) -> None:
    events = await _seed(log, 20)
    assert [e.seq for e in events] == list(range(1, 21))
    assert events[0].prev_hash == GENESIS_HASH
    for previous, current in itertools.pairwise(events):
        assert current.prev_hash == previous.hash
    assert await log.events() == events
    assert await log.events(after_seq=5, limit=3) == events[5:8]
    assert (await log.verify()).ok


async def test_concurrent_appends_build_one_gap_free_chain(log: AuditLog) -> None:
    async def writer(task: int) -> list[int]:
        return [(await log.append("payment.requested", actor=f"agent:agt_{task}", data={"i": i})).seq for i in range(4)]

    seqs = await asyncio.gather(*(writer(task) for task in range(50)))
    assert sorted(s for batch in seqs for s in batch) == list(range(1, 201))
    result = await log.verify()
    assert (result.ok, result.count, result.head_seq) == (True, 200, 200), result.problem


async def test_concurrent_appends_inside_caller_transactions_do_not_fork(log: AuditLog) -> None:
    async def decide(task: int) -> None:
        async with log.engine.begin() as conn:
            for i in range(4):
                await log.append_in(conn, "payment.decided", actor="system", subject=f"pay_{task}", data={"i": i})

    await asyncio.gather(*(decide(task) for task in range(50)))
    events = await log.events()
    assert [e.seq for e in events] == list(range(1, 201))
    # Each caller's records are all there, in the order it wrote them.
    by_caller: dict[str | None, list[int]] = {}
    for event in events:
        by_caller.setdefault(event.subject, []).append(event.data["i"])
    assert by_caller == {f"pay_{task}": [0, 1, 2, 3] for task in range(50)}
    assert (await log.verify()).ok


async def test_a_rolled_back_transaction_leaves_no_record(log: AuditLog) -> None:
    await log.append("payment.requested", actor="agent:agt_1")
    async with log.engine.connect() as conn:
        await conn.begin()
        await log.append_in(conn, "payment.decided", actor="system")
        await conn.rollback()
    after = await log.append("payment.requested", actor="agent:agt_1")
    assert after.seq == 2
    result = await log.verify()
    assert (result.ok, result.count) == (True, 2)


async def test_an_empty_log_verifies(log: AuditLog) -> None:
    result = await log.verify()
    assert (result.ok, result.count, result.head_seq, result.head_hash) == (True, 0, 0, GENESIS_HASH)


# -- refusing secrets and malformed input ----------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"private_key": "ab" * 32},
        {"privateKey": "x"},
        {"wallet": {"PrivKey": "x"}},
        {"auth": {"apiToken": "x"}},
        {"token": "x"},
        {"client_secret": "x"},
        {"steps": [{"ok": 1}, {"Mnemonic": "abandon abandon"}]},
        {"KEK": "x"},
        {"kek_material": "x"},
        {"seed_phrase": "x"},
        {"passphrase": "x"},
        {"password": "x"},
    ],
)
async def test_secrets_are_refused_and_nothing_is_written(log: AuditLog, data: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="looks like a secret"):
        await log.append("admin.changed", actor="operator:op_1", data=data)
    async with log.engine.begin() as conn:
        with pytest.raises(ValueError, match="looks like a secret"):
            await log.append_in(conn, "admin.changed", actor="operator:op_1", data=data)
    assert await log.events() == []


@pytest.mark.parametrize(
    "key", ["kek_version", "previous_kek_version", "token_address", "credential_id", "secret_id", "kekSource", "amount"]
)
def test_references_to_secrets_are_allowed(key: str) -> None:
    assert not looks_secret(key)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"actor": "operator:cop.op_1.s3cr3t"}, "invalid audit actor"),
        ({"actor": ""}, "invalid audit actor"),
        ({"actor": "system", "subject": "has space"}, "invalid audit subject"),
        ({"actor": "system", "data": {"usd": 1.5}}, "float"),
        ({"actor": "system", "data": {"raw": b"\x00"}}, "bytes"),
        ({"actor": "system", "data": {1: "x"}}, "keys must be strings"),
        ({"actor": "system", "data": {"s": "\ud800"}}, "Unicode"),
        ({"actor": "system", "data": {"big": "x" * 70_000}}, "larger than"),
    ],
)
async def test_malformed_input_is_refused(log: AuditLog, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        await log.append("admin.changed", **kwargs)
    with pytest.raises(ValueError, match="invalid audit kind"):
        await log.append("Bad Kind", actor="system")
    assert await log.events() == []


# -- tampering ----------------------------------------------------------------------------------

SAMPLE = [1, 2, 150, 299, N]


async def test_changing_any_field_of_any_record_is_named(log: AuditLog) -> None:
    events = await _seed(log)
    snapshot = await _snapshot(log.engine)
    sample = [*SAMPLE, *random.Random(7).sample(range(3, N - 1), 3)]
    for seq in sample:
        event = events[seq - 1]
        changes: dict[str, dict[str, Any]] = {
            "data": {"data": json.dumps({**event.data, "amount": 1}, sort_keys=True, separators=(",", ":"))},
            "data whitespace": {"data": json.dumps(event.data, sort_keys=True, ensure_ascii=False)},
            "data not json": {"data": "{not json"},
            "kind": {"kind": "payment.refunded"},
            "actor": {"actor": "operator:op_evil"},
            "subject": {"subject": None},
            "at": {"at": event.at + timedelta(microseconds=1)},
            "hash": {"hash": "f" * 64},
            "prev_hash": {"prev_hash": "e" * 64},
        }
        for field, values in changes.items():
            await _tamper(log.engine, _set(seq, **values))
            result = await log.verify()
            assert (result.ok, result.first_bad_seq) == (False, seq), (field, seq, result.problem)
            assert result.count == seq - 1
            await _restore(log.engine, snapshot)
    assert (await log.verify()).ok


async def test_changing_a_hash_and_relinking_the_next_record_is_still_named(log: AuditLog) -> None:
    await _seed(log, 50)
    await _tamper(log.engine, _set(20, data='{"amount":1}', hash="a" * 64))
    await _tamper(log.engine, _set(21, prev_hash="a" * 64))
    await _assert_detected(log, 20, "do not match its hash")


async def test_deleting_a_record_in_the_middle_is_named(log: AuditLog) -> None:
    await _seed(log)
    await _tamper(log.engine, lambda conn: conn.execute(delete(audit_events).where(audit_events.c.seq == 150)))
    await _assert_detected(log, 150, "record 150 is missing")


async def test_deleting_a_run_of_records_names_the_first(log: AuditLog) -> None:
    await _seed(log)
    await _tamper(
        log.engine, lambda conn: conn.execute(delete(audit_events).where(audit_events.c.seq.between(100, 120)))
    )
    await _assert_detected(log, 100, "records 100..120 are missing")


async def test_deleting_the_last_record_is_named(log: AuditLog) -> None:
    await _seed(log)
    await _tamper(log.engine, lambda conn: conn.execute(delete(audit_events).where(audit_events.c.seq == N)))
    await _assert_detected(log, N, f"record {N} missing", "tail")


async def test_truncating_the_tail_is_named(log: AuditLog) -> None:
    await _seed(log)
    await _tamper(log.engine, lambda conn: conn.execute(delete(audit_events).where(audit_events.c.seq > 250)))
    await _assert_detected(log, 251, f"records 251..{N} missing")


async def test_appending_after_a_truncation_does_not_hide_it(log: AuditLog) -> None:
    await _seed(log, 30)
    await _tamper(log.engine, lambda conn: conn.execute(delete(audit_events).where(audit_events.c.seq == 30)))
    await log.append("payment.requested", actor="agent:agt_1")
    await _assert_detected(log, 30, "record 30 is missing")


async def test_a_forged_record_with_a_stale_hash_is_named(log: AuditLog) -> None:
    events = await _seed(log)
    forged = events[99].model_dump() | {"kind": "admin.changed", "actor": "operator:op_evil"}
    forged["data"] = json.dumps(forged["data"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    async def replace(conn: AsyncConnection) -> None:
        await conn.execute(delete(audit_events).where(audit_events.c.seq == 100))
        await conn.execute(insert(audit_events).values(**forged))

    await _tamper(log.engine, replace)
    await _assert_detected(log, 100, "do not match its hash")


def _forge(seq: int, prev_hash: str) -> dict[str, Any]:
    at = T0 + timedelta(seconds=seq, microseconds=500)
    data = {"amount": 10**24, "to": "0xattacker"}
    digest = event_hash(
        seq=seq, at=at, kind="payment.decided", actor="system", subject="pay_evil", data=data, prev_hash=prev_hash
    )
    return {
        "seq": seq,
        "at": at,
        "kind": "payment.decided",
        "actor": "system",
        "subject": "pay_evil",
        "data": json.dumps(data, sort_keys=True, separators=(",", ":")),
        "prev_hash": prev_hash,
        "hash": digest,
    }


async def test_a_well_forged_record_inserted_in_the_middle_is_caught_at_the_next_record(log: AuditLog) -> None:
    events = await _seed(log)

    async def shift_and_insert(conn: AsyncConnection) -> None:
        # Make room at 120 by moving 120..N up one (from the top, to keep seq unique), then forge 120.
        for seq in range(N, 119, -1):
            await conn.execute(update(audit_events).where(audit_events.c.seq == seq).values(seq=seq + 1))
        await conn.execute(insert(audit_events).values(**_forge(120, events[118].hash)))
        await conn.execute(update(audit_head).values(seq=N + 1))

    await _tamper(log.engine, shift_and_insert)
    await _assert_detected(log, 121, "record 121")


async def test_a_forged_record_filling_a_deleted_slot_is_caught_at_the_next_record(log: AuditLog) -> None:
    events = await _seed(log)

    async def replace(conn: AsyncConnection) -> None:
        await conn.execute(delete(audit_events).where(audit_events.c.seq == 200))
        await conn.execute(insert(audit_events).values(**_forge(200, events[198].hash)))

    await _tamper(log.engine, replace)
    await _assert_detected(log, 201, "does not link")


async def test_a_forged_record_past_the_head_is_named(log: AuditLog) -> None:
    events = await _seed(log)
    await _tamper(log.engine, lambda conn: conn.execute(insert(audit_events).values(**_forge(N + 1, events[-1].hash))))
    await _assert_detected(log, N + 1, f"head names record {N}")


async def test_swapping_two_records_contents_is_named(log: AuditLog) -> None:
    events = await _seed(log)
    snapshot = await _snapshot(log.engine)
    rows = {row["seq"]: row for row in snapshot[0]}
    for a, b in [(40, 41), (10, 250), (1, N)]:

        async def swap(conn: AsyncConnection, a: int = a, b: int = b) -> None:
            for target, source in ((a, b), (b, a)):
                values = {k: v for k, v in rows[source].items() if k != "seq"}
                await conn.execute(update(audit_events).where(audit_events.c.seq == target).values(**values))

        await _tamper(log.engine, swap)
        await _assert_detected(log, a, "does not link")
        await _restore(log.engine, snapshot)
    assert (await log.verify()).head_hash == events[-1].hash


@pytest.mark.parametrize(
    ("head", "bad_seq", "words"),
    [
        ({"hash": "c" * 64}, N, "head hash does not match"),
        ({"seq": N - 1}, N, f"head names record {N - 1}"),
        ({"seq": N + 5}, N + 1, f"records {N + 1}..{N + 5} missing"),
        ({"seq": 0, "hash": GENESIS_HASH}, 1, "head names record 0"),
    ],
)
async def test_changing_the_head_is_named(log: AuditLog, head: dict[str, Any], bad_seq: int, words: str) -> None:
    await _seed(log)
    await _tamper(log.engine, lambda conn: conn.execute(update(audit_head).values(**head)))
    await _assert_detected(log, bad_seq, words)


async def test_a_missing_head_is_named_and_refuses_appends(log: AuditLog) -> None:
    from custody.audit import AuditTampered

    await _seed(log, 10)
    await _tamper(log.engine, lambda conn: conn.execute(delete(audit_head)))
    await _assert_detected(log, 11, "head")
    with pytest.raises(AuditTampered):
        await log.append("payment.requested", actor="agent:agt_1")


async def test_a_consistent_rewrite_is_caught_only_by_an_external_anchor(log: AuditLog) -> None:
    events = await _seed(log, 40)
    anchor = (events[-1].seq, events[-1].hash)
    snapshot = await _snapshot(log.engine)

    async def rewrite_from(conn: AsyncConnection, first: int) -> None:
        # An attacker with full write access recomputes every hash from `first` on and moves the head.
        await conn.execute(delete(audit_events).where(audit_events.c.seq >= first))
        prev = events[first - 2].hash
        for seq in range(first, 41):
            row = _forge(seq, prev)
            await conn.execute(insert(audit_events).values(**row))
            prev = row["hash"]
        await conn.execute(update(audit_head).values(seq=40, hash=prev))

    await _tamper(log.engine, lambda conn: rewrite_from(conn, 25))
    assert (await log.verify()).ok  # the limit documented in docs/audit.md
    result = await log.verify(expect_seq=anchor[0], expect_hash=anchor[1])
    assert (result.ok, result.first_bad_seq) == (False, 40)
    assert result.problem is not None
    assert "anchored hash" in result.problem

    await _restore(log.engine, snapshot)
    await _tamper(log.engine, lambda conn: conn.execute(delete(audit_events).where(audit_events.c.seq > 30)))
    await _tamper(log.engine, lambda conn: conn.execute(update(audit_head).values(seq=30, hash=events[29].hash)))
    assert (await log.verify()).ok
    result = await log.verify(expect_seq=anchor[0], expect_hash=anchor[1])
    assert (result.ok, result.first_bad_seq) == (False, 31)
    assert (await log.verify(expect_seq=30, expect_hash=events[29].hash)).ok


# -- export -------------------------------------------------------------------------------------


def _independent_verify(lines: list[str], prev_hash: str = GENESIS_HASH) -> str:
    """The auditor's check from docs/audit.md, with nothing but hashlib and json."""
    for line in lines:
        record = json.loads(line)
        claimed = record.pop("hash")
        assert record["prev_hash"] == prev_hash
        canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert (
            json.dumps({**record, "hash": claimed}, sort_keys=True, separators=(",", ":"), ensure_ascii=False) == line
        )
        assert hashlib.sha256(canonical.encode("utf-8")).hexdigest() == claimed
        prev_hash = claimed
    return prev_hash


async def test_export_writes_one_json_object_per_line_equal_to_events(log: AuditLog) -> None:
    events = await _seed(log, 1205)  # more than one export page
    out = io.StringIO()
    assert await log.export(out) == 1205
    lines = out.getvalue().splitlines()
    assert len(lines) == 1205
    assert out.getvalue().endswith("\n")
    assert [AuditEvent.model_validate_json(line) for line in lines] == events
    assert json.loads(lines[0])["at"] == "2025-01-31T09:15:03.123457Z"
    assert _independent_verify(lines) == (await log.verify()).head_hash

    tail = io.StringIO()
    assert await log.export(tail, after_seq=1200) == 5
    assert tail.getvalue().splitlines() == lines[1200:]
    assert _independent_verify(tail.getvalue().splitlines(), events[1199].hash) == events[-1].hash


async def test_reading_a_record_with_unparseable_data_names_it(log: AuditLog) -> None:
    from custody.audit import AuditTampered

    await _seed(log, 5)
    await _tamper(log.engine, _set(3, data="[broken"))
    with pytest.raises(AuditTampered, match="record 3"):
        await log.export(io.StringIO())


# -- CLI ----------------------------------------------------------------------------------------


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("CUSTODY_DATA_DIR", str(settings.data_dir))
    if settings.database_url:
        monkeypatch.setenv("CUSTODY_DATABASE_URL", settings.database_url)
    return settings


def _with_log(settings: Settings, work: Callable[[AuditLog], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        context = await Context.open(settings)
        try:
            return await work(AuditLog(context.engine))
        finally:
            await context.close()

    return asyncio.run(run())


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(audit_app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_cli_verify_prints_the_head_and_exits_1_naming_the_first_bad_record(env: Settings) -> None:
    events = _with_log(env, lambda log: _seed(log, 12))
    code, out, err = cli("verify", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report == {
        "ok": True,
        "count": 12,
        "head_seq": 12,
        "head_hash": events[-1].hash,
        "first_bad_seq": None,
        "problem": None,
    }
    code, out, _ = cli("verify")
    assert code == 0
    assert f"12:{events[-1].hash}" in out
    assert cli("verify", "--expect", f"12:{events[-1].hash}")[0] == 0

    _with_log(env, lambda log: _tamper(log.engine, _set(7, actor="operator:op_evil")))
    code, out, err = cli("verify")
    assert code == 1
    assert out == ""
    assert err.startswith("error [audit_tampered]: first bad record 7: record 7 was modified")
    code, _, err = cli("verify", "--json")
    problem = json.loads(err)
    assert code == 1
    assert (problem["code"], problem["first_bad_seq"], problem["verified"]) == ("audit_tampered", 7, 6)


def test_cli_verify_with_a_wrong_anchor_fails(env: Settings) -> None:
    _with_log(env, lambda log: _seed(log, 3))
    code, _, err = cli("verify", "--expect", f"2:{'0' * 64}")
    assert code == 1
    assert "first bad record 2" in err
    assert "anchored" in err
    code, _, err = cli("verify", "--expect", f"2:{'z' * 64}")
    assert code == 1
    assert err.startswith("error [invalid_request]")
    code, _, err = cli("verify", "--expect", "nonsense")
    assert code == 1
    assert err.startswith("error [invalid_request]")


def test_cli_export_writes_json_lines_to_stdout_or_a_private_file(env: Settings, tmp_path: Path) -> None:
    events = _with_log(env, lambda log: _seed(log, 8))
    code, out, err = cli("export")
    assert code == 0, err
    assert [AuditEvent.model_validate_json(line) for line in out.splitlines()] == events
    assert "exported 8 records" in err

    target = tmp_path / "audit.jsonl"
    code, out, err = cli("export", "--output", str(target), "--after-seq", "5", "--json")
    assert code == 0, err
    assert json.loads(out) == {"exported": 3, "after_seq": 5, "output": str(target)}
    assert [AuditEvent.model_validate_json(line) for line in target.read_text().splitlines()] == events[5:]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
