"""An append-only, hash-chained audit log (format: docs/audit.md).

Every record carries ``hash = sha256(canonical_json({seq, at, kind, actor, subject, data,
prev_hash}))`` and the previous record's hash, so changing, deleting, inserting or reordering a
record breaks the chain at that record. The one-row ``audit_head`` table names the newest record,
so deleting records at the tail is caught too. Chaining locks the head row, which serializes it
on both backends: the chain never forks.

A record written inside a caller's transaction (:meth:`AuditLog.append_in`: every payment
decision and signature) goes to ``audit_pending`` and commits or rolls back with that
transaction, without touching the head, so concurrent payments do not queue on one lock.
:meth:`AuditLog.seal` chains pending records in id order, in batches; each API process seals
every ``audit_seal_interval_seconds``, and every read of the log (events, export, verify) seals
first, so a reader never sees a chain that lacks a committed record. :meth:`AuditLog.append`
(its own transaction) seals and chains its record at once.

The log records who did what, never credentials: an actor is ``operator:<id>``, ``agent:<id>`` or a
bare component name, and :meth:`AuditLog.append` refuses ``data`` with keys that look like secrets.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import IO, Any, Final

from pydantic import BaseModel, ConfigDict
from sqlalchemy import LargeBinary, Table, bindparam, cast, delete, func, insert, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from custody.audit.models import AuditEventRow, AuditHeadRow, AuditPendingRow
from custody.errors import AuditUnavailable, CustodyError
from custody.storage.db import is_database_outage, write_transaction
from custody.storage.prepared import Prepared

GENESIS_HASH: Final = "0" * 64
"""The ``prev_hash`` of the first record (and the head's hash while the log is empty)."""

_log = logging.getLogger("custody.audit")
audit_events: Table = AuditEventRow.__table__  # type: ignore[attr-defined]
audit_head: Table = AuditHeadRow.__table__  # type: ignore[attr-defined]
audit_pending: Table = AuditPendingRow.__table__  # type: ignore[attr-defined]

_PAGE: Final = 1000
_MAX_DATA_BYTES: Final = 64 * 1024
_MAX_DEPTH: Final = 32
_KIND = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")
# A component ("system", "signer") or "<type>:<id>". No dots: a credential (cop.<id>.<secret>) cannot pass.
_ACTOR = re.compile(r"[a-z][a-z_]*(:[A-Za-z0-9_\-]+)?")
_SUBJECT = re.compile(r"[A-Za-z0-9_.:\-]+")
_HASH = re.compile(r"[0-9a-f]{64}")
_TEXT_COLUMNS: Final = ("kind", "actor", "subject", "data", "prev_hash", "hash", "at")
# Key words that name secret material, matched case-insensitively inside a key ("apiToken",
# "wallet_private_key")...
_SECRET_PARTS: Final = ("privatekey", "privkey", "secret", "token", "passphrase", "password", "kek", "mnemonic", "seed")
# ...unless the key's last word says it is a reference to one, not the thing ("kek_version", "token_address").
_REFERENCE_WORDS: Final = frozenset({"id", "ids", "version", "versions", "source", "address", "count", "type", "kind"})


class AuditTampered(CustodyError):
    """The audit log failed verification (or a record could not be read back)."""

    code = "audit_tampered"
    status = 500
    title = "The audit log failed verification"


class AuditEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    seq: int
    at: datetime
    kind: str
    actor: str
    subject: str | None
    data: dict[str, Any]
    prev_hash: str
    hash: str

    def to_json_line(self) -> str:
        """The export form: canonical JSON of every field, ``at`` as in the hash (no newline)."""
        return canonical_json({**_hashed_fields(self), "hash": self.hash})


class VerifyResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    ok: bool
    count: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None = None
    problem: str | None = None


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 text (not ``\\u`` escapes), integers as JSON numbers."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def format_at(at: datetime) -> str:
    """ISO-8601 in UTC with microseconds and a ``Z``: ``2025-01-31T09:15:02.123456Z``."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_hash(
    *, seq: int, at: datetime, kind: str, actor: str, subject: str | None, data: Mapping[str, Any], prev_hash: str
) -> str:
    body = {
        "seq": seq,
        "at": format_at(at),
        "kind": kind,
        "actor": actor,
        "subject": subject,
        "data": data,
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def _stored_at(at: datetime) -> str:
    """A UTC timestamp as the database holds it (SQLite's text) or renders it (PostgreSQL)."""
    return (
        f"{at.year:04d}-{at.month:02d}-{at.day:02d} {at.hour:02d}:{at.minute:02d}:{at.second:02d}.{at.microsecond:06d}"
    )


def _hashed_fields(event: AuditEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "at": format_at(event.at),
        "kind": event.kind,
        "actor": event.actor,
        "subject": event.subject,
        "data": event.data,
        "prev_hash": event.prev_hash,
    }


# -- input checks -------------------------------------------------------------------------------


def _key_words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()
    return [word for word in re.split(r"[^a-z0-9]+", spaced) if word]


def looks_secret(key: str) -> bool:
    """True for a data key that names secret material (``privateKey``, ``api_token``, ``kek``)."""
    words = _key_words(key)
    if words and words[-1] in _REFERENCE_WORDS:
        return False
    joined = "".join(words)
    return any(part in joined for part in _SECRET_PARTS)


def _clean(value: Any, path: str, depth: int) -> Any:
    """A JSON-native copy of ``value``; ValueError for secrets, floats and anything not plain JSON."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"audit data nested deeper than {_MAX_DEPTH} levels at {path}")
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"audit data at {path} is not valid Unicode text") from None
        return value
    if isinstance(value, float):
        raise ValueError(f"audit data at {path} is a float: record amounts as integers (base units) or strings")
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"audit data keys must be strings (at {path})")
            if looks_secret(key):
                raise ValueError(
                    f"refusing to record {path}.{key}: it looks like a secret; record credentials by id only"
                )
            out[key] = _clean(item, f"{path}.{key}", depth + 1)
        return out
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return [_clean(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise ValueError(f"audit data at {path} is a {type(value).__name__}: only JSON values can be recorded")


def _check_field(name: str, value: str | None, pattern: re.Pattern[str], max_length: int) -> None:
    if value is None and name == "subject":
        return
    if not isinstance(value, str) or len(value) > max_length or not pattern.fullmatch(value):
        raise ValueError(f"invalid audit {name} {value!r}")


def _prepare(
    kind: str, actor: str, subject: str | None, data: Mapping[str, Any] | None, at: datetime | None
) -> tuple[datetime, dict[str, Any], str]:
    _check_field("kind", kind, _KIND, 64)
    _check_field("actor", actor, _ACTOR, 100)
    _check_field("subject", subject, _SUBJECT, 100)
    if at is None:
        at = datetime.now(UTC)
    elif at.tzinfo is None:
        raise ValueError("audit timestamps must be timezone-aware")
    cleaned = _clean(dict(data or {}), "data", 0)
    text = canonical_json(cleaned)
    if len(text.encode("utf-8")) > _MAX_DATA_BYTES:
        raise ValueError(f"audit data is larger than {_MAX_DATA_BYTES} bytes")
    return at.astimezone(UTC), cleaned, text


# -- reading rows back --------------------------------------------------------------------------


class _Raw:
    """A stored row, parsed as far as it can be; ``error`` says why it could not be."""

    __slots__ = (
        "actor",
        "at",
        "at_text",
        "data",
        "data_text",
        "error",
        "hash",
        "kind",
        "prev_hash",
        "seq",
        "subject",
    )

    def __init__(self, row: Any) -> None:
        self.seq: int = int(row.seq)
        self.error: str | None = None
        texts: dict[str, str | None] = {}
        for name in _TEXT_COLUMNS:
            value = getattr(row, name)
            try:
                texts[name] = value.decode("utf-8") if isinstance(value, bytes) else value
            except UnicodeDecodeError:
                texts[name] = ""
                self.error = self.error or f"its {name} is not valid UTF-8 text"
        self.kind: str = texts["kind"] or ""
        self.actor: str = texts["actor"] or ""
        self.subject: str | None = texts["subject"]
        self.data_text: str = texts["data"] or ""
        self.prev_hash: str = texts["prev_hash"] or ""
        self.hash: str = texts["hash"] or ""
        self.at_text: str = texts["at"] or ""
        self.at = datetime.fromtimestamp(0, UTC)
        self.data: dict[str, Any] = {}
        if self.error:
            return
        try:
            self.at = datetime.fromisoformat(self.at_text).replace(tzinfo=UTC)
        except ValueError:
            self.error = "its timestamp is not a valid date"
            return
        try:
            data = json.loads(self.data_text)
        except (TypeError, ValueError):
            self.error = "its data is not valid JSON"
            return
        if not isinstance(data, dict):
            self.error = "its data is not a JSON object"
            return
        self.data = data

    def event(self) -> AuditEvent:
        if self.error:
            raise AuditTampered(f"audit record {self.seq} cannot be read: {self.error}", first_bad_seq=self.seq)
        return AuditEvent(
            seq=self.seq,
            at=self.at,
            kind=self.kind,
            actor=self.actor,
            subject=self.subject,
            data=self.data,
            prev_hash=self.prev_hash,
            hash=self.hash,
        )

    def problem(self, expected_seq: int, prev_hash: str) -> str | None:
        """Why this row does not continue the chain ending in ``prev_hash`` at ``expected_seq - 1``."""
        if self.seq > expected_seq:
            if expected_seq == self.seq - 1:
                return f"record {expected_seq} is missing (deleted): the log jumps to record {self.seq}"
            return f"records {expected_seq}..{self.seq - 1} are missing (deleted): the log jumps to record {self.seq}"
        if self.seq < expected_seq:
            return f"record {self.seq} appears twice"
        if self.error:
            return f"record {self.seq} was modified: {self.error}"
        if self.prev_hash != prev_hash:
            what = "the start of the chain" if self.seq == 1 else f"the hash of record {self.seq - 1}"
            return (
                f"record {self.seq} does not link to {what} (prev_hash differs): "
                "a record was inserted, deleted, reordered or modified here"
            )
        if self.data_text != canonical_json(self.data):
            return f"record {self.seq} was modified: its data is not in canonical form"
        if self.at_text != _stored_at(self.at):
            return f"record {self.seq} was modified: its timestamp is not in the stored form"
        recomputed = event_hash(
            seq=self.seq,
            at=self.at,
            kind=self.kind,
            actor=self.actor,
            subject=self.subject,
            data=self.data,
            prev_hash=self.prev_hash,
        )
        if recomputed != self.hash:
            return f"record {self.seq} was modified: its contents do not match its hash"
        return None


@dataclass(frozen=True)
class _Statements:
    take_lock: Any
    head: Any
    advance: Any


@functools.lru_cache(maxsize=4)
def _statements(dialect: str) -> _Statements:
    """Chaining's statements, built once per dialect (values are bound at execution)."""
    advance = (
        update(audit_head).where(audit_head.c.id == 1).values(seq=bindparam("head_seq"), hash=bindparam("head_hash"))
    )
    head = select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1).with_for_update()
    # SQLite: take the write lock before reading the head, so two sealers never read the same head.
    take_lock = update(audit_head).where(audit_head.c.id == 1).values(seq=audit_head.c.seq)
    return _Statements(take_lock if dialect == "sqlite" else None, head, advance)


_INSERT_PENDING = Prepared.insert(audit_pending, "at", "kind", "actor", "subject", "data")
_INSERT_EVENTS = insert(audit_events)
_PENDING = select(audit_pending).order_by(audit_pending.c.id).limit(bindparam("batch"))
_SEAL_BATCH: Final = 1000
_Staged = tuple[datetime, str, str, str | None, dict[str, Any], str]


def _unavailable(error: DBAPIError) -> Exception:
    if is_database_outage(error):
        return error
    # The caller's transaction rolls back with it: no action goes unrecorded.
    return AuditUnavailable(f"the audit record could not be written ({type(error.orig).__name__})")


def as_utc_aware(at: datetime) -> datetime:
    """A stored timestamp as UTC (SQLite hands it back without a zone)."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


@dataclass(frozen=True)
class Record:
    """One event to record inside a caller's transaction (see :meth:`AuditLog.append_all_in`)."""

    kind: str
    actor: str
    subject: str | None = None
    data: Mapping[str, Any] | None = None
    at: datetime | None = None


class AuditLog:
    """The audit log over the service's database (tables from migration 0002)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def append(
        self,
        kind: str,
        *,
        actor: str,
        subject: str | None = None,
        data: Mapping[str, Any] | None = None,
        at: datetime | None = None,
    ) -> AuditEvent:
        """Record one event in its own transaction, chained at once (after any pending records)."""
        at, cleaned, text = _prepare(kind, actor, subject, data, at)
        async with write_transaction(self.engine) as conn:
            events = await self._chain(conn, own=(at, kind, actor, subject, cleaned, text))
        return events[-1]

    async def append_in(
        self,
        conn: AsyncConnection,
        kind: str,
        *,
        actor: str,
        subject: str | None = None,
        data: Mapping[str, Any] | None = None,
        at: datetime | None = None,
    ) -> None:
        """Record one event inside the caller's open transaction: it commits or rolls back with it.

        The record is queued (``audit_pending``), not chained: the caller's transaction takes no
        lock of the log's. It is chained at the next :meth:`seal`, before anyone can read it.
        """
        await self.append_all_in(conn, [Record(kind, actor, subject, data, at)])

    async def append_all_in(self, conn: AsyncConnection, records: Sequence[Record]) -> None:
        """Record several events inside the caller's open transaction, in this order, in one statement."""
        rows = []
        for record in records:
            at, _, text = _prepare(record.kind, record.actor, record.subject, record.data, record.at)
            rows.append({"at": at, "kind": record.kind, "actor": record.actor, "subject": record.subject, "data": text})
        if not rows:
            return
        try:
            await _INSERT_PENDING.run(conn, rows[0] if len(rows) == 1 else rows)
        except DBAPIError as error:
            raise _unavailable(error) from None

    async def seal(self) -> int:
        """Chain every committed pending record, oldest first; returns how many were chained."""
        sealed = 0
        while True:
            async with write_transaction(self.engine) as conn:
                events = await self._chain(conn)
            sealed += len(events)
            if len(events) < _SEAL_BATCH:
                return sealed

    async def _seal_for_reading(self) -> None:
        # Chain what is queued so a reader sees every committed record. A broken head (or an
        # unreadable one) stops sealing; reading goes on, and verify names the break.
        try:
            await self.seal()
        except (AuditTampered, AuditUnavailable, DBAPIError) as error:
            _log.warning("audit records could not be chained before reading: %s", type(error).__name__)

    async def _chain(self, conn: AsyncConnection, own: _Staged | None = None) -> list[AuditEvent]:
        """Under the head's lock: chain up to a batch of pending records, then ``own``."""
        statements = _statements(conn.dialect.name)
        try:
            if statements.take_lock is not None:
                await conn.execute(statements.take_lock)
            head = (await conn.execute(statements.head)).first()
            if head is None:
                raise AuditTampered("the audit chain head (audit_head id 1) is missing; run `custody audit verify`")
            pending = (await conn.execute(_PENDING, {"batch": _SEAL_BATCH})).all()
            records: list[_Staged] = [
                (as_utc_aware(row.at), row.kind, row.actor, row.subject, json.loads(row.data), row.data)
                for row in pending
            ]
            if own is not None:
                records.append(own)
            seq, prev_hash = int(head.seq), str(head.hash)
            rows: list[dict[str, Any]] = []
            events: list[AuditEvent] = []
            for at, kind, actor, subject, data, text in records:
                seq += 1
                digest = event_hash(
                    seq=seq, at=at, kind=kind, actor=actor, subject=subject, data=data, prev_hash=prev_hash
                )
                event = AuditEvent(
                    seq=seq, at=at, kind=kind, actor=actor, subject=subject, data=data, prev_hash=prev_hash, hash=digest
                )
                events.append(event)
                rows.append({**event.model_dump(), "data": text})  # the stored form of the data: its canonical text
                prev_hash = digest
            if rows:
                await conn.execute(_INSERT_EVENTS, rows)
                await conn.execute(statements.advance, {"head_seq": seq, "head_hash": prev_hash})
            if pending:
                await conn.execute(delete(audit_pending).where(audit_pending.c.id.in_([row.id for row in pending])))
        except DBAPIError as error:
            raise _unavailable(error) from None
        return events

    async def _page(self, conn: AsyncConnection, after_seq: int, limit: int) -> list[_Raw]:
        # Every column is read as raw text and parsed here, so one malformed row is reported, not raised:
        # SQLite hands back its stored bytes (which need not be UTF-8), PostgreSQL a fixed-format UTC
        # timestamp (which may lie outside Python's date range).
        columns: list[Any] = [audit_events.c[name] for name in _TEXT_COLUMNS]
        if conn.dialect.name == "sqlite":
            columns = [cast(column, LargeBinary).label(column.name) for column in columns]
        else:
            at = func.to_char(func.timezone("UTC", audit_events.c.at), "YYYY-MM-DD HH24:MI:SS.US BC")
            columns[-1] = func.replace(at, " AD", "").label("at")
        query = (
            select(audit_events.c.seq, *columns)
            .where(audit_events.c.seq > after_seq)
            .order_by(audit_events.c.seq)
            .limit(limit)
        )
        return [_Raw(row) for row in await conn.execute(query)]

    async def events(self, *, after_seq: int = 0, limit: int = 1000) -> list[AuditEvent]:
        """Records with ``seq > after_seq``, oldest first, at most ``limit`` (1..10000)."""
        if not 1 <= limit <= 10_000:
            raise ValueError("limit must be between 1 and 10000")
        await self._seal_for_reading()
        async with self.engine.connect() as conn:
            rows = await self._page(conn, after_seq, limit)
        return [row.event() for row in rows]

    async def head(self) -> tuple[int, str] | None:
        """The stored chain head: (seq, hash) of the newest record, or None if the row is gone."""
        await self._seal_for_reading()
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1))).first()
        return (int(row.seq), str(row.hash)) if row else None

    async def export(self, out: IO[str], *, after_seq: int = 0) -> int:
        """Write records after ``after_seq`` as JSON lines (see :meth:`AuditEvent.to_json_line`)."""
        written = 0
        while True:
            batch = await self.events(after_seq=after_seq, limit=_PAGE)
            if not batch:
                return written
            for event in batch:
                out.write(event.to_json_line() + "\n")
            written += len(batch)
            after_seq = batch[-1].seq

    async def verify(self, *, expect_seq: int | None = None, expect_hash: str | None = None) -> VerifyResult:
        """Walk the whole chain and the head; name the first record where it breaks.

        ``expect_seq``/``expect_hash`` is an anchor kept outside this database (an earlier
        ``verify``'s head): it catches a chain rewritten consistently from that record on.
        """
        if (expect_seq is None) != (expect_hash is None):
            raise ValueError("give both expect_seq and expect_hash, or neither")
        if expect_hash is not None and not _HASH.fullmatch(expect_hash):
            raise ValueError("expect_hash must be 64 lowercase hex digits")
        await self._seal_for_reading()
        expected, prev_hash, count = 1, GENESIS_HASH, 0
        head: Any = None

        def result(bad_seq: int | None, problem: str | None) -> VerifyResult:
            return VerifyResult(
                ok=problem is None,
                count=count,
                head_seq=int(head.seq) if head is not None else 0,
                head_hash=str(head.hash) if head is not None else "",
                first_bad_seq=bad_seq,
                problem=problem,
            )

        async with self.engine.connect() as conn:
            while True:
                rows = await self._page(conn, expected - 1, _PAGE)
                if rows:
                    for row in rows:
                        problem = row.problem(expected, prev_hash)
                        if problem:
                            head = await self._head_row(conn)
                            return result(min(row.seq, expected), problem)
                        if row.seq == expect_seq and row.hash != expect_hash:
                            head = await self._head_row(conn)
                            return result(
                                row.seq,
                                f"record {row.seq} does not match the anchored hash: the chain was rewritten",
                            )
                        expected, prev_hash, count = row.seq + 1, row.hash, count + 1
                    continue
                # The records ran out: the head must name the last one.
                head = await self._head_row(conn)
                last = expected - 1
                if head is None:
                    return result(expected, "the chain head (audit_head id 1) is missing")
                if head.seq > last:
                    if await self._page(conn, last, 1):
                        continue  # appended while we read; keep walking
                    missing = f"record {expected}" if head.seq == expected else f"records {expected}..{head.seq}"
                    return result(
                        expected, f"{missing} missing (deleted from the tail): the head names record {head.seq}"
                    )
                if head.seq < last:
                    return result(
                        max(int(head.seq) + 1, 1),
                        f"the head names record {head.seq} but the log runs to {last}: "
                        "records were added without the head, or the head was modified",
                    )
                if head.hash != prev_hash:
                    return result(
                        max(last, 1), f"the head hash does not match record {last}: the head or the log was modified"
                    )
                if expect_seq is not None and expect_seq > last:
                    return result(expected, f"anchored record {expect_seq} is missing: the log ends at {last}")
                return result(None, None)

    async def _head_row(self, conn: AsyncConnection) -> Any:
        digest: Any = audit_head.c.hash
        if conn.dialect.name == "sqlite":  # stored bytes, which need not be UTF-8 (see _page)
            digest = cast(digest, LargeBinary).label("hash")
        row = (await conn.execute(select(audit_head.c.seq, digest).where(audit_head.c.id == 1))).first()
        if row is None or not isinstance(row.hash, bytes):
            return row
        return SimpleNamespace(seq=row.seq, hash=row.hash.decode("utf-8", "replace"))
