"""The spend ledger: what the policy engine reads, answered by indexed range sums in SQL.

The engine is pure and synchronous; the database is asynchronous. :func:`decide` bridges
them: it evaluates against a :class:`RecordedSpend` that answers from values fetched
so far and records every question it could not answer; the questions are fetched (in
the caller's transaction, so under its wallet lock) and the evaluation runs again, until
it asked nothing new. Each question is one indexed query over
``ledger_entries (wallet_id, counter, at)``: its cost depends on the payments inside the
window, not on the length of the history.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from custody.payments.models import LedgerEntryRow, PaymentRow
from policies import Decision, Grant, Intent, Limit, Policy, SpendView, evaluate, limits

ledger_entries: Table = LedgerEntryRow.__table__  # type: ignore[attr-defined]
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


async def _answer(conn: AsyncConnection, wallet_id: str, question: Question) -> Any:
    kind = question[0]
    if kind == "total":
        _, counter, since, until, agent_id = question
        sqlite = conn.dialect.name == "sqlite"
        summed = func.custody_sum(ledger_entries.c.amount) if sqlite else func.sum(ledger_entries.c.amount)
        value = (
            await conn.execute(select(summed).where(*_window(wallet_id, counter, since, until, agent_id)))
        ).scalar()
        return int(value or 0)
    if kind == "reached":
        _, counter, since, until, threshold, agent_id = question
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
                return at if at.tzinfo else at.replace(tzinfo=since.tzinfo)
        return None
    _, payee = question
    found = await conn.execute(
        select(payments.c.id)
        .where(payments.c.wallet_id == wallet_id, payments.c.payee == payee, payments.c.status.in_(SPENDING))
        .limit(1)
    )
    return found.first() is not None


async def answered(conn: AsyncConnection, wallet_id: str, judge: Callable[[SpendView], T]) -> T:
    """Run a pure ``judge`` over the ledger: fetch what it asks, run it again, until it asks nothing new."""
    spend = RecordedSpend()
    for _ in range(_MAX_ROUNDS):
        spend.missing = []
        answer = judge(spend)
        if not spend.missing:
            return answer
        for question in spend.missing:
            spend.answers[question] = await _answer(conn, wallet_id, question)
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
