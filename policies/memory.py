"""An in-memory ``SpendView``: the reference implementation for tests and dry runs."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from policies.spend import SpendRecord


class MemorySpend:
    """A ``SpendView`` over a list of ``SpendRecord`` (posted and pending alike)."""

    def __init__(self, records: Iterable[SpendRecord] = ()) -> None:
        self._records = sorted(records, key=lambda record: record.at)

    def _in_range(
        self, counter: str, since: datetime, until: datetime, agent_id: str | None
    ) -> list[tuple[datetime, int]]:
        return [
            (record.at, record.debits[counter])
            for record in self._records
            if since <= record.at < until
            and counter in record.debits
            and (agent_id is None or record.agent_id == agent_id)
        ]

    def total(self, counter: str, since: datetime, until: datetime, *, agent_id: str | None = None) -> int:
        return sum(amount for _, amount in self._in_range(counter, since, until, agent_id))

    def reached_at(
        self,
        counter: str,
        since: datetime,
        until: datetime,
        threshold: int,
        *,
        agent_id: str | None = None,
    ) -> datetime | None:
        running = 0
        for at, amount in self._in_range(counter, since, until, agent_id):
            running += amount
            if running >= threshold:
                return at
        return None

    def has_paid(self, payee: str) -> bool:
        wanted = payee.lower()
        return any(record.payee is not None and record.payee.lower() == wanted for record in self._records)
