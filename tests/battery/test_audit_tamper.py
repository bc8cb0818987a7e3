"""Audit tamper battery: over a 1,000-record log, every kind of change is caught and the first bad record named.

The tampering goes around the service, straight at the stored bytes, the way someone with the
database file or a database login would: SQLite through the stdlib ``sqlite3`` module on the file,
PostgreSQL through its own asyncpg connection. "Stored bytes" of a record are, per field:

- ``seq``: the 8-byte big-endian integer;
- ``at``: on SQLite the text SQLite holds; on PostgreSQL the 8-byte count of microseconds since
  2000-01-01 that ``timestamptz`` is;
- ``kind``, ``actor``, ``subject``, ``data``, ``prev_hash``, ``hash``: the UTF-8 bytes of the text.

A single-byte change flips one bit of one byte. SQLite stores any bytes as text, even invalid
UTF-8; PostgreSQL refuses invalid UTF-8, NUL, a duplicate ``seq`` and a timestamp out of its
range, so such a change cannot be made there and another bit of the same byte is tried. Every
change that can be stored must make ``verify`` fail and name the changed record.

CI: every record of the 1,000 changed by one byte (all of them on SQLite, every tenth on
PostgreSQL), every byte of whole records (record 4 on SQLite, 12 on PostgreSQL), deletions,
insertions, reorderings and truncations at ten positions, every byte of the head's seq and a
quarter of its hash. ``--soak``: every byte of every record (every bit of three of them), every
position for the structural changes, every bit of the head.

The per-record sweep runs from the last record down without restoring in between: the record
just changed is then always the first bad one, and verify stops there, so the records after it
(already changed) are never reached. Anything undetected would show as a later first bad record.
"""

from __future__ import annotations

import random
import re
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import asyncpg
import pytest
from sqlalchemy import insert, update

from custody.audit import GENESIS_HASH, AuditLog, VerifyResult, canonical_json, event_hash
from custody.audit.log import audit_events, audit_head
from custody.services.context import Context
from custody.settings import Settings

N = 1000
SEED = 7_000_007
T0 = datetime(2025, 1, 31, 9, 15, 2, 123456, tzinfo=UTC)
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
FIELDS = ("seq", "at", "kind", "actor", "subject", "data", "prev_hash", "hash")
TEXT_FIELDS = FIELDS[2:]
KINDS = (
    "payment.decided",
    "payment.signed",
    "approval.voted",
    "wallet.created",
    "policy.set",
    "freeze.set",
    "agent_key.issued",
    "kek.rotated",
)

Row = dict[str, bytes | None]  # stored bytes per field; subject may be NULL


# -- the log ------------------------------------------------------------------------------------


def build_records(n: int = N) -> list[dict[str, Any]]:
    """n chained records with varied kinds, actors, NULL subjects, big integers and non-ASCII text."""
    rng = random.Random(SEED)
    records, prev = [], GENESIS_HASH
    for seq in range(1, n + 1):
        at = T0 + timedelta(seconds=37 * seq, microseconds=rng.randrange(1_000_000))
        kind = KINDS[seq % len(KINDS)]
        actor = rng.choice(["system", "signer", f"agent:agt_{seq % 11}", f"operator:op_{seq % 5}"])
        subject = None if seq % 9 == 0 else f"pay_{seq:05d}"
        data: dict[str, Any] = {"amount": 10**18 + rng.getrandbits(80), "wallet_id": f"wal_{seq % 13}"}
        if seq % 2:
            data["approved"] = seq % 3 == 0
        if seq % 4 == 0:
            data["note"] = "naïve ☃ 🦊"
        if seq % 6 == 0:
            data["reasons"] = [{"code": "within_budget", "rule": f"r{seq % 7}"}]
        if seq % 50 == 0:
            data = {}
        digest = event_hash(seq=seq, at=at, kind=kind, actor=actor, subject=subject, data=data, prev_hash=prev)
        records.append(
            {
                "seq": seq,
                "at": at,
                "kind": kind,
                "actor": actor,
                "subject": subject,
                "data": canonical_json(data),
                "prev_hash": prev,
                "hash": digest,
            }
        )
        prev = digest
    return records


@pytest.fixture
async def log(settings: Settings) -> AsyncIterator[AuditLog]:
    """A log of N records, written as the service writes them (same table, same column types)."""
    context = await Context.open(settings)
    try:
        records = build_records()
        async with context.engine.begin() as conn:
            await conn.execute(insert(audit_events), records)
            await conn.execute(update(audit_head).where(audit_head.c.id == 1).values(seq=N, hash=records[-1]["hash"]))
        audit = AuditLog(context.engine)
        result = await audit.verify()
        assert (result.ok, result.count, result.head_hash) == (True, N, records[-1]["hash"])
        yield audit
    finally:
        await context.close()


# -- raw access to the stored bytes -------------------------------------------------------------


class Store(Protocol):
    async def rows(self) -> dict[int, Row]: ...
    async def head(self) -> tuple[int, str]: ...
    async def write(self, seq: int, field: str, value: bytes | None) -> bool: ...
    async def write_head_hash(self, value: bytes) -> bool: ...
    async def execute(self, sql: str, *args: Any) -> None: ...
    async def load(self, rows: Iterable[Row], head: tuple[int, str]) -> None: ...
    async def close(self) -> None: ...


def _int8(value: int) -> bytes:
    return value.to_bytes(8, "big", signed=True)


def _from_int8(value: bytes) -> int:
    return int.from_bytes(value, "big", signed=True)


class SqliteStore:
    """The database file, through the stdlib driver: any bytes can be stored as text."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA busy_timeout=10000")
        self.db.execute("PRAGMA synchronous=OFF")  # tampering need not survive a power cut

    async def rows(self) -> dict[int, Row]:
        columns = ", ".join(f"CAST({f} AS BLOB)" for f in FIELDS[1:])
        out: dict[int, Row] = {}
        for seq, *values in self.db.execute(f"SELECT seq, {columns} FROM audit_events ORDER BY seq"):  # noqa: S608
            out[seq] = {"seq": _int8(seq), **dict(zip(FIELDS[1:], values, strict=True))}
        return out

    async def head(self) -> tuple[int, str]:
        seq, digest = self.db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        return int(seq), str(digest)

    async def write(self, seq: int, field: str, value: bytes | None) -> bool:
        assert field in FIELDS
        try:
            if field == "seq":
                assert value is not None
                self.db.execute("UPDATE audit_events SET seq = ? WHERE seq = ?", (_from_int8(value), seq))
            else:
                self.db.execute(f"UPDATE audit_events SET {field} = CAST(? AS TEXT) WHERE seq = ?", (value, seq))  # noqa: S608
        except sqlite3.IntegrityError:
            return False  # a duplicate seq
        return True

    async def write_head_hash(self, value: bytes) -> bool:
        self.db.execute("UPDATE audit_head SET hash = CAST(? AS TEXT) WHERE id = 1", (value,))
        return True

    async def execute(self, sql: str, *args: Any) -> None:
        self.db.execute(sql.replace("$1", "?").replace("$2", "?"), args)

    async def load(self, rows: Iterable[Row], head: tuple[int, str]) -> None:
        self.db.execute("BEGIN")
        self.db.execute("DELETE FROM audit_events")
        self.db.executemany(
            "INSERT INTO audit_events (seq, at, kind, actor, subject, data, prev_hash, hash) VALUES "
            "(?, CAST(? AS TEXT), CAST(? AS TEXT), CAST(? AS TEXT), CAST(? AS TEXT), CAST(? AS TEXT),"
            " CAST(? AS TEXT), CAST(? AS TEXT))",
            [(_from_int8(r["seq"] or b""), *(r[f] for f in FIELDS[1:])) for r in rows],
        )
        self.db.execute("DELETE FROM audit_head")
        self.db.execute("INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?)", head)
        self.db.execute("COMMIT")

    async def close(self) -> None:
        self.db.close()


_PG_AT = "timestamptz '2000-01-01 00:00:00+00' + make_interval(days => {d}::int, secs => {s}::float8)"


def _pg_at_args(value: bytes) -> tuple[int, float]:
    """Microseconds since 2000-01-01 as whole days and the seconds left (exact to the microsecond)."""
    days, rest = divmod(_from_int8(value), 86_400_000_000)
    if not -(2**31) <= days < 2**31:
        raise OverflowError("beyond PostgreSQL's date range")
    return days, rest / 1_000_000


class PostgresStore:
    """A plain database login: PostgreSQL itself refuses some bytes (invalid UTF-8, NUL, range)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    @classmethod
    async def open(cls, url: str) -> PostgresStore:
        conn = await asyncpg.connect(url)
        await conn.execute("SET synchronous_commit TO off")
        return cls(conn)

    async def rows(self) -> dict[int, Row]:
        records = await self.conn.fetch(
            "SELECT seq, (extract(epoch FROM at - timestamptz '2000-01-01 00:00:00+00') * 1000000)::bigint AS us,"
            " kind, actor, subject, data, prev_hash, hash FROM audit_events ORDER BY seq"
        )
        out: dict[int, Row] = {}
        for r in records:
            row: Row = {"seq": _int8(r["seq"]), "at": _int8(r["us"])}
            for field in TEXT_FIELDS:
                row[field] = None if r[field] is None else r[field].encode()
            out[r["seq"]] = row
        return out

    async def head(self) -> tuple[int, str]:
        record = await self.conn.fetchrow("SELECT seq, hash FROM audit_head WHERE id = 1")
        return int(record["seq"]), str(record["hash"])

    async def write(self, seq: int, field: str, value: bytes | None) -> bool:
        assert field in FIELDS
        try:
            if field == "seq":
                assert value is not None
                await self.conn.execute("UPDATE audit_events SET seq = $1 WHERE seq = $2", _from_int8(value), seq)
            elif field == "at":
                assert value is not None
                at = _PG_AT.format(d="$1", s="$2")
                await self.conn.execute(f"UPDATE audit_events SET at = {at} WHERE seq = $3", *_pg_at_args(value), seq)  # noqa: S608
            else:
                text = None if value is None else value.decode("utf-8")
                if text is not None and "\0" in text:
                    return False
                await self.conn.execute(f"UPDATE audit_events SET {field} = $1 WHERE seq = $2", text, seq)  # noqa: S608
        except (UnicodeDecodeError, OverflowError, asyncpg.PostgresError):
            return False
        return True

    async def write_head_hash(self, value: bytes) -> bool:
        try:
            await self.conn.execute("UPDATE audit_head SET hash = $1 WHERE id = 1", value.decode("utf-8"))
        except UnicodeDecodeError:
            return False
        return True

    async def execute(self, sql: str, *args: Any) -> None:
        await self.conn.execute(sql, *args)

    async def load(self, rows: Iterable[Row], head: tuple[int, str]) -> None:
        at = _PG_AT.format(d="$2", s="$3")
        async with self.conn.transaction():
            await self.conn.execute("DELETE FROM audit_events")
            await self.conn.executemany(
                "INSERT INTO audit_events (seq, at, kind, actor, subject, data, prev_hash, hash) VALUES "  # noqa: S608
                f"($1, {at}, $4, $5, $6, $7, $8, $9)",
                [
                    (
                        _from_int8(r["seq"] or b""),
                        *_pg_at_args(r["at"] or b""),
                        *(None if r[f] is None else (r[f] or b"").decode() for f in TEXT_FIELDS),
                    )
                    for r in rows
                ],
            )
            await self.conn.execute("DELETE FROM audit_head")
            await self.conn.execute("INSERT INTO audit_head (id, seq, hash) VALUES (1, $1, $2)", *head)

    async def close(self) -> None:
        await self.conn.close()


@pytest.fixture
async def store(settings: Settings, log: AuditLog) -> AsyncIterator[Store]:
    opened: Store
    if settings.uses_sqlite:
        opened = SqliteStore(settings.sqlalchemy_url.partition(":///")[2])
    else:
        assert settings.database_url is not None
        opened = await PostgresStore.open(settings.database_url)
    try:
        yield opened
    finally:
        await opened.close()


# -- checking -----------------------------------------------------------------------------------


@dataclass
class Tally:
    """How many changes were tried, detected, and refused by the database itself."""

    detected: Counter[str]
    refused: Counter[str]

    @classmethod
    def new(cls) -> Tally:
        return cls(Counter(), Counter())


def _flip(value: bytes, offset: int, bit: int) -> bytes:
    return value[:offset] + bytes([value[offset] ^ (1 << bit)]) + value[offset + 1 :]


async def expect_named(log: AuditLog, bad_seq: int, what: str, *, mention: bool = True) -> VerifyResult:
    """verify fails and names ``bad_seq`` as the first bad record (and says so in words, for records)."""
    result = await log.verify()
    assert not result.ok, f"undetected: {what}"
    assert result.first_bad_seq == bad_seq, (what, result.problem)
    assert result.problem is not None
    if mention:
        assert re.search(rf"\brecords? {bad_seq}(?![0-9])", result.problem), result.problem
    return result


async def change_byte(
    store: Store, log: AuditLog, row: Row, seq: int, field: str, offset: int, bit: int, tally: Tally
) -> bytes | None:
    """Flip one bit of one stored byte (another bit of the same byte if the database refuses); check it is named.

    Returns the stored bytes, or None if no bit of that byte could be stored. The caller restores.
    """
    original = row[field]
    if original is None:  # a NULL subject: the smallest change is to give it a value
        assert await store.write(seq, field, b"x"), f"could not set {field} of record {seq}"
        await expect_named(log, seq, f"record {seq} {field} NULL -> 'x'")
        tally.detected[field] += 1
        return b"x"
    for attempt in range(8):
        changed = _flip(original, offset, (bit + attempt) % 8)
        if await store.write(seq, field, changed):
            await expect_named(log, seq, f"record {seq} {field} byte {offset} {original!r} -> {changed!r}")
            tally.detected[field] += 1
            return changed
    tally.refused[field] += 1
    return None


async def restore(store: Store, rows: dict[int, Row], head: tuple[int, str], log: AuditLog) -> None:
    await store.load(rows.values(), head)
    result = await log.verify()
    assert (result.ok, result.count, result.head_hash) == (True, N, head[1]), result.problem


# -- single-byte changes ------------------------------------------------------------------------


async def _sweep_records(store: Store, log: AuditLog, seqs: list[int], tally: Tally) -> None:
    """One byte of each record in ``seqs``, from the last down, restoring only at the end."""
    rows, head = await store.rows(), await store.head()
    rng = random.Random(SEED + len(seqs))
    for index, seq in enumerate(sorted(seqs, reverse=True)):
        field = FIELDS[index % len(FIELDS)]
        size = len(rows[seq][field] or b"x")
        await change_byte(store, log, rows[seq], seq, field, rng.randrange(size), rng.randrange(8), tally)
    await restore(store, rows, head, log)


async def _every_byte_of(store: Store, log: AuditLog, seq: int, tally: Tally, bits: Iterable[int]) -> None:
    rows = await store.rows()
    row = rows[seq]
    for field in FIELDS:
        value = row[field]
        for offset in range(len(value) if value is not None else 1):
            for bit in bits:
                changed = await change_byte(store, log, row, seq, field, offset, (offset + bit) % 8, tally)
                if changed is not None:
                    assert await store.write(_from_int8(changed) if field == "seq" else seq, field, value)


async def test_one_byte_changed_in_any_of_the_records_is_named(settings: Settings, log: AuditLog, store: Store) -> None:
    tally = Tally.new()
    # Every third record on SQLite, every tenth on PostgreSQL; --soak changes every byte of every one.
    seqs = [*range(1, N + 1, 3 if settings.uses_sqlite else 10), N]
    await _sweep_records(store, log, seqs, tally)
    assert sum(tally.detected.values()) + sum(tally.refused.values()) == len(seqs)
    assert set(tally.detected) == set(FIELDS), tally
    if settings.uses_sqlite:
        assert set(tally.refused) <= {"seq"}, tally  # only a duplicate seq cannot be stored
        assert sum(tally.detected.values()) >= len(seqs) - 10
    assert sum(tally.detected.values()) >= 0.9 * len(seqs), tally


async def test_every_byte_of_whole_records_changed_is_named(settings: Settings, log: AuditLog, store: Store) -> None:
    tally = Tally.new()
    seq = 4 if settings.uses_sqlite else 12  # both carry non-ASCII text; 12 also a nested list
    await _every_byte_of(store, log, seq, tally, bits=[0])
    rows = await store.rows()
    stored = sum(len(v) for v in rows[seq].values() if v is not None)
    assert sum(tally.detected.values()) >= 0.9 * stored, tally
    assert set(tally.detected) >= set(FIELDS) - {"subject"}, tally
    result = await log.verify()
    assert result.ok, result.problem


# -- records deleted, inserted, reordered, truncated -------------------------------------------


def _positions(soak: bool) -> list[int]:
    if soak:
        return list(range(1, N + 1))
    rng = random.Random(SEED)
    return sorted({1, 2, N // 2, N - 1, N, *rng.sample(range(3, N - 1), 5)})


def _forged(seq: int, prev_hash: str) -> Row:
    """A record whose hash the forger computed correctly, linked to ``prev_hash``."""
    at = T0 + timedelta(days=3650)
    data = {"amount": 10**24, "to": "0xattacker"}
    digest = event_hash(
        seq=seq, at=at, kind="payment.decided", actor="system", subject="pay_evil", data=data, prev_hash=prev_hash
    )
    return {
        "seq": _int8(seq),
        "at": None,  # filled per backend by _stored_at
        "kind": b"payment.decided",
        "actor": b"system",
        "subject": b"pay_evil",
        "data": canonical_json(data).encode(),
        "prev_hash": prev_hash.encode(),
        "hash": digest.encode(),
    }


def _stored_at(settings: Settings, at: datetime) -> bytes:
    if settings.uses_sqlite:
        return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f").encode()
    return _int8((at - PG_EPOCH) // timedelta(microseconds=1))


def _renumbered(rows: dict[int, Row], mapping: dict[int, int]) -> list[Row]:
    """The rows with some seq numbers moved (old -> new); rows mapped to 0 are dropped."""
    out = []
    for seq, row in rows.items():
        new = mapping.get(seq, seq)
        if new:
            out.append(row | {"seq": _int8(new)})
    return out


async def structural_changes(settings: Settings, log: AuditLog, store: Store, soak: bool) -> Counter[str]:
    rows, head = await store.rows(), await store.head()
    hashes = {seq: (row["hash"] or b"").decode() for seq, row in rows.items()}
    done: Counter[str] = Counter()
    positions = _positions(soak)

    async def case(name: str, new_rows: list[Row], bad: int, new_head: tuple[int, str] = head) -> None:
        await store.load(new_rows, new_head)
        await expect_named(log, bad, f"{name} -> first bad {bad}", mention=name != "append past the head")
        done[name] += 1

    for p in positions:
        await case("delete one", _renumbered(rows, {p: 0}), p)
        if p < N:
            await case("delete a run", _renumbered(rows, dict.fromkeys(range(p, min(p + 7, N)), 0)), p)
        # Truncation: everything after p-1 gone, the head left alone.
        await case("truncate", [rows[s] for s in range(1, p)], p)
        # A record moved: p and a later (or earlier) one swap places.
        other = N if p < N else 1
        await case("swap", _renumbered(rows, {p: other, other: p}), min(p, other))
        if p < N:
            await case("swap neighbours", _renumbered(rows, {p: p + 1, p + 1: p}), p)
        # Insertions: records p.. move up one; the head follows, so only the chain can tell.
        shifted = _renumbered(rows, {s: s + 1 for s in range(p, N + 1)})
        copy = rows[random.Random(p).choice([s for s in range(1, N + 1) if s != p])] | {"seq": _int8(p)}
        await case("insert a copy", [*shifted, copy], p, (N + 1, hashes[N]))
        forged = _forged(p, hashes[p - 1] if p > 1 else GENESIS_HASH)
        forged["at"] = _stored_at(settings, T0 + timedelta(days=3650))
        # A well-forged record is consistent with what precedes it: the break shows at the next one.
        await case("insert a forged record", [*shifted, forged], p + 1, (N + 1, hashes[N]))

    # A forged record past the head, and a truncation that also rewinds the head (caught only by an anchor).
    forged = _forged(N + 1, hashes[N])
    forged["at"] = _stored_at(settings, T0 + timedelta(days=3650))
    await case("append past the head", [*rows.values(), forged], N + 1)
    for p in positions[:3] if not soak else positions:
        if p == 1:
            continue
        await store.load([rows[s] for s in range(1, p)], (p - 1, hashes[p - 1]))
        assert (await log.verify()).ok  # the documented limit: a consistent rewind needs an anchor
        anchored = await log.verify(expect_seq=N, expect_hash=hashes[N])
        assert (anchored.ok, anchored.first_bad_seq) == (False, p), anchored.problem
        done["truncate and rewind the head (anchored)"] += 1
    await restore(store, rows, head, log)
    return done


async def test_deleted_inserted_reordered_and_truncated_records_are_named(
    settings: Settings, log: AuditLog, store: Store
) -> None:
    done = await structural_changes(settings, log, store, soak=False)
    assert done["delete one"] == done["truncate"] == done["insert a forged record"] == len(_positions(False))
    assert min(done.values()) >= 1, done


# -- the head -----------------------------------------------------------------------------------


async def head_changes(log: AuditLog, store: Store, soak: bool) -> Counter[str]:
    rows, head = await store.rows(), await store.head()
    seq, digest = head
    named: Counter[str] = Counter()
    for offset in range(8):
        for bit in (0, 7) if offset else (0, 6, 7):  # bit 7 of byte 0: a negative seq
            new_seq = _from_int8(_flip(_int8(seq), offset, bit))
            await store.execute("UPDATE audit_head SET seq = $1 WHERE id = 1", new_seq)
            bad = N + 1 if new_seq > N else max(new_seq + 1, 1)
            await expect_named(log, bad, f"head seq {seq} -> {new_seq}", mention=False)
            named["seq"] += 1
    await store.execute("UPDATE audit_head SET seq = $1 WHERE id = 1", seq)
    for offset in range(0, len(digest), 1 if soak else 4):
        for bit in range(8) if soak else [(offset // 4) % 8]:
            if await store.write_head_hash(_flip(digest.encode(), offset, bit)):
                await expect_named(log, N, f"head hash byte {offset} bit {bit}")
                named["hash"] += 1
            else:
                named["refused"] += 1  # PostgreSQL: not UTF-8
    await store.execute("DELETE FROM audit_head")
    await expect_named(log, N + 1, "head deleted", mention=False)
    named["deleted"] += 1
    await restore(store, rows, head, log)
    return named


async def test_every_byte_of_the_head_changed_is_named(log: AuditLog, store: Store) -> None:
    named = await head_changes(log, store, soak=False)
    assert named["seq"] == 17
    assert named["deleted"] == 1
    assert named["hash"] + named["refused"] == 16
    assert named["hash"] >= 14


# -- soak: everything ---------------------------------------------------------------------------


@pytest.mark.soak
async def test_soak_every_byte_of_every_record_every_position_and_every_bit_of_the_head(
    settings: Settings, log: AuditLog, store: Store
) -> None:
    tally = Tally.new()
    for seq in range(N, 0, -1):
        await _every_byte_of(store, log, seq, tally, bits=range(8) if seq in (1, N // 2, N) else [seq % 8])
    assert set(tally.refused) <= ({"seq"} if settings.uses_sqlite else set(FIELDS)), tally
    done = await structural_changes(settings, log, store, soak=True)
    assert done["delete one"] == N
    named = await head_changes(log, store, soak=True)
    assert named["hash"] + named["refused"] == 64 * 8
    assert named["refused"] == (0 if settings.uses_sqlite else 64)


def test_the_byte_model_round_trips() -> None:
    """The helpers here change exactly one bit, and the PostgreSQL timestamp split is exact."""
    assert _flip(b"abc", 1, 0) == b"acc"
    assert _from_int8(_int8(-5)) == -5
    us = (T0 - PG_EPOCH) // timedelta(microseconds=1)
    days, secs = _pg_at_args(_int8(us))
    assert days * 86_400_000_000 + round(secs * 1_000_000) == us
