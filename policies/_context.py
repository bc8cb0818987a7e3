"""What every rule sees while one intent is judged (no I/O: the spend view is passed in)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from fractions import Fraction
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies._values import NATIVE, AssetKey, Price, usd_value
from policies.decision import Source
from policies.intent import Intent
from policies.spend import SpendView, asset_counter


class AssetSpec(BaseModel):
    """An asset the policy names: where it lives, its decimals, and (optionally) its USD price."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chain_id: int = Field(ge=1)
    address: AssetKey = Field(description='"native" or the token contract address')
    decimals: int = Field(ge=0, le=77)
    usd_price: Price | None = Field(default=None, description='USD per whole unit, e.g. "1" for a USD stablecoin')
    symbol: str | None = None

    @property
    def counter(self) -> str:
        return asset_counter(self.chain_id, self.address)


class ApproverGroup(BaseModel):
    """A named group of people who can approve; rules ask for M of them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    members: tuple[str, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> ApproverGroup:
        if len(set(self.members)) != len(self.members):
            raise ValueError("members must be unique")
        return self


@dataclass(frozen=True)
class EvalContext:
    """One evaluation: the intent, the spend view, the time, and the policy's tables."""

    intent: Intent
    spend: SpendView
    now: datetime
    zone: ZoneInfo
    assets: Mapping[str, AssetSpec]
    groups: Mapping[str, ApproverGroup]
    source: Source
    agent_scope: str | None
    _by_counter: dict[str, AssetSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_counter", {spec.counter: spec for spec in self.assets.values()})

    @property
    def principal_counter(self) -> str:
        return asset_counter(self.intent.chain_id, self.intent.asset)

    def debit_in(self, counter: str) -> int:
        """What this intent adds to an asset counter: its amount, plus gas for the native coin."""
        intent = self.intent
        total = intent.amount if intent.moves_value and counter == self.principal_counter else 0
        if counter == asset_counter(intent.chain_id, NATIVE):
            total += intent.max_gas_cost
        return total

    def principal_price(self) -> tuple[int, Fraction] | None:
        """(decimals, USD price) of the intent's asset, or None when it has no price."""
        spec = self._by_counter.get(self.principal_counter)
        if spec is None or spec.usd_price is None:
            return None
        return spec.decimals, spec.usd_price

    def principal_usd(self) -> int | None:
        """Micro-USD value of the intent's amount, rounded up; None when the asset is unpriced."""
        price = self.principal_price()
        if price is None:
            return None
        return usd_value(self.intent.amount, *price)

    def is_new_payee(self) -> bool:
        counterparty = self.intent.counterparty
        return counterparty is not None and not self.spend.has_paid(counterparty)
