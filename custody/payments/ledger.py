"""The spend ledger: what the policy engine reads, answered in SQL at a cost that does not grow with history.

The engine is pure and synchronous; the database is asynchronous. :func:`decide` bridges
them: it evaluates against a :class:`RecordedSpend` that answers from values fetched
so far and records every question it could not answer; the questions are fetched (in
the caller's transaction, so under its wallet lock) and the evaluation runs again, until
it asked nothing new.

A window total is exact and cheap: whole hours are read from ``ledger_buckets`` (totals
by the hour and by the minute, kept in the same transaction as every entry), the part
of an hour at the window's start from minute totals and at most one minute of
``ledger_entries`` (an indexed range), and the window's end from the entries after it
(none, as a policy's windows end in the future). A 30-day window reads at most 721 hour
rows and 30 minute rows per agent that spent in it, however many payments it holds; the
price is two total rows per debit instead of one, and a minute row for each minute in which
an agent spent (never pruned). :func:`_edges` has the details.

Every instant is turned to UTC first: SQLite stores a timestamp's wall-clock digits and
drops its offset, so a bound in another offset would be compared as if it were UTC.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Table, bindparam, delete, exists, func, literal_column, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from custody.payments.models import LedgerBucketRow, LedgerEntryRow, PaymentRow
from custody.storage.prepared import Prepared
from policies import Decision, Grant, Intent, Limit, Policy, SpendView, evaluate, limits

ledger_entries: Table = LedgerEntryRow.__table__  # type: ignore[attr-defined]
ledger_buckets: Table = LedgerBucketRow.__table__  # type: ignore[attr-defined]
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)
SPANS = (HOUR, MINUTE)  # the totals kept for every entry
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
payments: Table = PaymentRow.__table__  # type: ignore[attr-defined]
# Payments whose spend counts: reserved (signing under way or crashed) and signed.
SPENDING = ("reserved", "signed")
_MAX_ROUNDS = 6

Question = tuple[Any, ...]
T = TypeVar("T")


class RecordedSpend:
    """A :class:`policies.SpendView` over fetched answers; unknown questions are recorded."""

    def __init__(self) -> None:
        self.answers: dict[Question, Any] = {}
        self.missing: list[Question] = []

    def _ask(self, question: Question, default: Any) -> Any:
        if question in self.answers:
            return self.answers[question]
        if question not in self.missing:
            self.missing.append(question)
        return default

    def total(self, counter: str, since: datetime, until: datetime, *, agent_id: str | None = None) -> int:
        return int(self._ask(("total", counter, since, until, agent_id), 0))

    def reached_at(
        self, counter: str, since: datetime, until: datetime, threshold: int, *, agent_id: str | None = None
    ) -> datetime | None:
        answer: datetime | None = self._ask(("reached", counter, since, until, threshold, agent_id), None)
        return answer

    def has_paid(self, payee: str) -> bool:
        return bool(self._ask(("paid", payee), False))


def _window(wallet_id: str, counter: str, since: datetime, until: datetime, agent_id: str | None) -> list[Any]:
    conditions = [
        ledger_entries.c.wallet_id == wallet_id,
        ledger_entries.c.counter == counter,
        ledger_entries.c.at >= since,
        ledger_entries.c.at < until,
    ]
    if agent_id is not None:
        conditions.append(ledger_entries.c.agent_id == agent_id)
    return conditions


def _utc(at: datetime) -> datetime:
    """``at`` as an aware UTC datetime (a naive one is taken to be UTC, as stored ones are)."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _floor(at: datetime, span: timedelta = HOUR) -> datetime:
    """The start of the hour (or minute) holding ``at``, in UTC."""
    at = _utc(at)
    return at - (at - _EPOCH) % span


def _sum(dialect: str, column: Any) -> Any:
    return func.custody_sum(column) if dialect == "sqlite" else func.sum(column)


def _range_sum(dialect: str, n: int, since: str, until: str, scoped: bool, span: timedelta | None = None) -> Any:
    """Window ``n``'s amounts over ``[since, until)``: entries, or (with ``span``) the totals of that span."""
    table, at = (ledger_entries, ledger_entries.c.at) if span is None else (ledger_buckets, ledger_buckets.c.bucket)
    conditions = [
        table.c.wallet_id == bindparam("wallet"),
        table.c.counter == bindparam(f"c{n}"),
        at >= bindparam(since),
        at < bindparam(until),
    ]
    if span is not None:
        conditions.append(table.c.span == bindparam(f"{since}_span", int(span.total_seconds())))
    if scoped:
        conditions.append(table.c.agent_id == bindparam(f"a{n}"))
    return select(_sum(dialect, table.c.amount)).where(*conditions).scalar_subquery()


def _total_columns(dialect: str, n: int, scoped: bool) -> list[Any]:
    """The four sums that make window ``n`` (see :func:`_edges`)."""
    return [
        _range_sum(dialect, n, f"ss{n}", f"su{n}", scoped),
        _range_sum(dialect, n, f"ms{n}", f"mu{n}", scoped, MINUTE),
        _range_sum(dialect, n, f"hs{n}", f"hu{n}", scoped, HOUR),
        _range_sum(dialect, n, f"es{n}", f"eu{n}", scoped),
    ]


def _edges(since: datetime, until: datetime) -> tuple[int, dict[str, datetime]]:
    """How the total over ``[since, until)`` is read: ``sign * (entries + minutes) + hours - entries after``.

    The hours run from the hour holding ``since`` (or the next one) to the end of the hour
    holding ``until`` (or to ``until`` when it is on the hour). The rest corrects them:

    * At the start, whichever part of since's hour is shorter, at most half an hour: the part
      before ``since`` is subtracted from its whole hour, or the part after it is added to the
      hours that follow. That part is read as minute totals and the entries of one minute.
    * At the end, the entries from ``until`` to the end of its hour are subtracted. A policy's
      windows end in the future, so these are normally none.

    Any range may be empty (``since`` or ``until`` on the hour or the minute, or both in one
    hour). The result is exact in every case: each total holds exactly the entries in its span.
    """
    hour, minute = _floor(since), _floor(since, MINUTE)
    if since - hour < HOUR / 2:  # subtract [hour, since): minutes up to since's minute, then entries
        sign, hours_from = -1, hour
        entries, minutes = (minute, since), (hour, minute)
    else:  # add [since, next hour): entries up to the next minute, then minutes
        sign, hours_from = 1, hour + HOUR
        next_minute = minute if minute == since else minute + MINUTE
        entries, minutes = (since, next_minute), (next_minute, hour + HOUR)
    last = _floor(until)
    hours_to = last if until == last else last + HOUR
    ranges = {
        "ss": entries[0],
        "su": entries[1],
        "ms": minutes[0],
        "mu": minutes[1],
        "hs": hours_from,
        "hu": hours_to,
        "es": until,
        "eu": hours_to,
    }
    return sign, ranges


# A question's shape: ("total", agent-scoped) or ("paid",).
Shape = tuple[Any, ...]


@functools.lru_cache(maxsize=256)
def _statement(dialect: str, shapes: tuple[Shape, ...]) -> Prepared:
    """One SELECT that answers every question of these shapes, built once (values are bound at execution)."""
    columns: list[Any] = []
    for n, shape in enumerate(shapes):
        if shape[0] == "total":
            columns.extend(_total_columns(dialect, n, shape[1]))
        else:
            paid = select(payments.c.id).where(
                payments.c.wallet_id == bindparam("wallet"),
                payments.c.payee == bindparam(f"p{n}"),
                # Not IN (...): that would be expanded at every execution.
                or_(*(payments.c.status == status for status in SPENDING)),
            )
            columns.append(exists(paid))
    return Prepared(select(*columns))


async def window_total(
    conn: AsyncConnection, wallet_id: str, counter: str, since: datetime, until: datetime, agent_id: str | None
) -> int:
    """Exact sum of a counter over ``[since, until)``."""
    answers = await _fetch(conn, wallet_id, [("total", counter, since, until, agent_id)])
    return int(answers[("total", counter, since, until, agent_id)])


@functools.lru_cache(maxsize=4)
def _upsert(dialect: str) -> Prepared:
    """Add to one total (run with many parameter sets): built once, so its compiled form is cached.

    (A multi-row VALUES statement would save a round trip, but SQLAlchemy compiles it afresh every
    time, which costs more than the round trip.)
    """
    keys = ["wallet_id", "counter", "span", "bucket", "agent_id"]
    bound: dict[str, Any] = {name: bindparam(name) for name in [*keys, "amount"]}
    if dialect == "postgresql":
        pg = postgresql.insert(ledger_buckets).values(bound)
        return Prepared(
            pg.on_conflict_do_update(
                # Written out: the column's Python-side type is text-backed, and would make "+" a concatenation.
                index_elements=keys,
                set_={"amount": literal_column("ledger_buckets.amount + excluded.amount")},
            )
        )
    lite = sqlite.insert(ledger_buckets).values(bound)
    return Prepared(
        lite.on_conflict_do_update(
            index_elements=keys, set_={"amount": func.custody_add(ledger_buckets.c.amount, lite.excluded.amount)}
        )
    )


_INSERT_ENTRIES = Prepared.insert(ledger_entries, "payment_id", "wallet_id", "agent_id", "counter", "amount", "at")


Totals = dict[tuple[str, str, str, int, datetime], int]


async def _bump(conn: AsyncConnection, changes: Totals) -> None:
    """Add amounts to totals, keyed (wallet, agent, counter, span in seconds, start)."""
    if not changes:
        return
    values = [
        {
            "wallet_id": wallet_id,
            "agent_id": agent_id,
            "counter": counter,
            "span": span,
            "bucket": bucket,
            "amount": amount,
        }
        for (wallet_id, agent_id, counter, span, bucket), amount in changes.items()
    ]
    await _upsert(conn.dialect.name).run(conn, values)


def _changes(rows: Iterable[Any], sign: int) -> Totals:
    """Ledger entries summed per hourly and per minute total (a statement may touch each total once)."""
    changes: Totals = {}
    for row in rows:
        at = _utc(row["at"])
        for span in SPANS:
            key = (row["wallet_id"], row["agent_id"], row["counter"], int(span.total_seconds()), _floor(at, span))
            changes[key] = changes.get(key, 0) + sign * int(row["amount"])
    return changes


async def record(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Add ledger entries (a reservation) and their totals, in the caller's transaction."""
    rows = [row if row["at"].tzinfo is UTC else {**row, "at": _utc(row["at"])} for row in rows]
    if rows:
        await _INSERT_ENTRIES.run(conn, rows)
        await _bump(conn, _changes(rows, 1))


async def release(conn: AsyncConnection, payment_id: str) -> None:
    """Remove a payment's entries (a released reservation) and take them out of the totals."""
    rows = (await conn.execute(select(ledger_entries).where(ledger_entries.c.payment_id == payment_id))).all()
    await conn.execute(delete(ledger_entries).where(ledger_entries.c.payment_id == payment_id))
    await _bump(conn, _changes((row._mapping for row in rows), -1))


async def _reached(conn: AsyncConnection, wallet_id: str, question: Question) -> datetime | None:
    _, counter, since, until, threshold, agent_id = question
    since, until = _utc(since), _utc(until)
    rows = await conn.stream(
        select(ledger_entries.c.at, ledger_entries.c.amount)
        .where(*_window(wallet_id, counter, since, until, agent_id))
        .order_by(ledger_entries.c.at)
    )
    running = 0
    async for at, amount in rows:
        running += int(amount)
        if running >= threshold:
            await rows.close()
            reached: datetime = at if at.tzinfo else at.replace(tzinfo=since.tzinfo)
            return reached
    return None


async def _fetch(conn: AsyncConnection, wallet_id: str, questions: list[Question]) -> dict[Question, Any]:
    """Answer questions: every total and payee question in ONE statement, one column per sum.

    Sums are added here, not in SQL: SQLite's exact sum hands back text for amounts beyond 64 bits.
    """
    answers: dict[Question, Any] = {}
    asked: list[tuple[Question, tuple[int, ...]]] = []  # each question's columns, as the signs they add with
    shapes: list[Shape] = []
    params: dict[str, Any] = {"wallet": wallet_id}
    for question in questions:
        kind = question[0]
        if kind == "reached":
            answers[question] = await _reached(conn, wallet_id, question)
            continue
        n = len(shapes)
        if kind == "total":
            _, counter, since, until, agent_id = question
            since, until = _utc(since), _utc(until)
            if since >= until:
                answers[question] = 0
                continue
            sign, ranges = _edges(since, until)
            params |= {f"{name}{n}": at for name, at in ranges.items()}
            params[f"c{n}"] = counter
            if agent_id is not None:
                params[f"a{n}"] = agent_id
            shapes.append(("total", agent_id is not None))
            asked.append((question, (sign, sign, 1, -1)))
        else:
            params[f"p{n}"] = question[1]
            shapes.append(("paid",))
            asked.append((question, (1,)))
    if shapes:
        row = await _statement(conn.dialect.name, tuple(shapes)).first(conn, params)
        assert row is not None  # a SELECT of scalar subqueries always has its one row
        at = 0
        for question, signs in asked:
            values = row[at : at + len(signs)]
            at += len(signs)
            if question[0] == "total":
                answers[question] = sum(sign * int(value or 0) for sign, value in zip(signs, values, strict=True))
            else:
                answers[question] = bool(values[0])
    return answers


async def answered(conn: AsyncConnection, wallet_id: str, judge: Callable[[SpendView], T]) -> T:
    """Run a pure ``judge`` over the ledger: fetch what it asks, run it again, until it asks nothing new."""
    spend = RecordedSpend()
    for _ in range(_MAX_ROUNDS):
        spend.missing = []
        answer = judge(spend)
        if not spend.missing:
            return answer
        spend.answers.update(await _fetch(conn, wallet_id, spend.missing))
    raise RuntimeError("the policy engine kept asking new spend questions")


async def decide(
    conn: AsyncConnection, wallet_id: str, policy: Policy, intent: Intent, now: datetime, grant: Grant | None
) -> Decision:
    """Evaluate ``intent`` against the ledger as seen through ``conn`` (hold the wallet lock)."""
    return await answered(conn, wallet_id, lambda spend: evaluate(policy, intent, spend, now, grant))


async def remaining(
    conn: AsyncConnection, wallet_id: str, policy: Policy, now: datetime, grant: Grant | None
) -> tuple[Limit, ...]:
    """Every cumulative limit of the wallet (and the agent's grant) with what remains now."""
    return await answered(conn, wallet_id, lambda spend: limits(policy, spend, now, grant))
