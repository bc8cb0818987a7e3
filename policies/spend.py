"""The spend history the engine reads: a port the ledger implements.

Counters are strings: ``"<chain_id>:<asset>"`` (base units, e.g. ``"8453:native"`` or
``"8453:0x8335…"``), ``"usd"`` (micro-USD, for payments in priced assets) and ``"payments"``
(one per payment). Every method covers posted *and* pending (reserved) spend, and ranges are
half-open: ``since <= at < until``. ``agent_id`` narrows to one agent's payments (for grants);
``None`` means the whole wallet.

The service's SQL ledger (``custody.payments.ledger``) answers ``total`` from hour and minute
totals plus a few entries at the window's edges, and ``reached_at`` by adding up the window's
entries in time order until the threshold is reached.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

USD_COUNTER = "usd"
PAYMENTS_COUNTER = "payments"


def asset_counter(chain_id: int, asset: str) -> str:
    """The ledger counter of an asset on a chain, e.g. ``"8453:native"``."""
    return f"{chain_id}:{asset}"


class SpendView(Protocol):
    """Read access to one wallet's posted and pending spend."""

    def total(self, counter: str, since: datetime, until: datetime, *, agent_id: str | None = None) -> int:
        """Sum of the counter's amounts with ``since <= at < until``."""
        ...

    def reached_at(
        self,
        counter: str,
        since: datetime,
        until: datetime,
        threshold: int,
        *,
        agent_id: str | None = None,
    ) -> datetime | None:
        """The earliest ``at`` in ``[since, until)`` by which the running sum of the counter
        (in time order, from ``since``) reaches ``threshold``; ``None`` if it never does."""
        ...

    def has_paid(self, payee: str) -> bool:
        """True if the wallet has ever paid (or reserved a payment to) this address."""
        ...


class SpendRecord(BaseModel):
    """One payment in the history: when, to whom, by which agent, and its debits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    at: datetime
    debits: Mapping[str, int]
    payee: str | None = None
    agent_id: str | None = None
    status: Literal["posted", "pending"] = "posted"
    payment_id: str | None = Field(default=None)

    @field_validator("at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("must be timezone-aware")
        return value

    @field_validator("debits")
    @classmethod
    def _non_negative(cls, value: Mapping[str, int]) -> Mapping[str, int]:
        if any(amount < 0 for amount in value.values()):
            raise ValueError("debits must not be negative")
        return value
