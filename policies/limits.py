"""What may I spend? Every cumulative limit of a policy (and a grant) and what remains of it now."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict

from policies.decision import Source
from policies.document import Grant, Policy
from policies.rules import Cap, Velocity
from policies.spend import PAYMENTS_COUNTER, USD_COUNTER, SpendView
from policies.windows import calendar_window, rolling_window


class Limit(BaseModel):
    """One cumulative limit: its window now, what was spent in it, and what remains."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rule_id: str
    source: Source
    counter: str
    limit: int
    spent: int
    remaining: int
    window_start: datetime
    window_end: datetime
    resets_at: datetime | None


def limits(policy: Policy, spend: SpendView, now: datetime, grant: Grant | None = None) -> tuple[Limit, ...]:
    """The caps and velocity limits in force at ``now`` (timezone-aware), with what remains.

    ``resets_at`` is the end of a calendar period, or for a rolling window the moment the
    oldest spend in it stops counting (None when nothing was spent).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    now = now.astimezone(UTC)
    zone = ZoneInfo(policy.timezone)
    found: list[Limit] = []
    sources: list[tuple[Source, Policy | Grant, str | None]] = [("policy", policy, None)]
    if grant is not None:
        sources.append(("grant", grant, grant.agent_id))
    for source, document, agent_id in sources:
        for rule in document.rules:
            if isinstance(rule, Cap):
                counter = USD_COUNTER if rule.asset is None else policy.assets[rule.asset].counter
                limit = rule.limit
            elif isinstance(rule, Velocity):
                counter, limit = PAYMENTS_COUNTER, rule.max_payments
            else:
                continue
            if rule.rolling is not None:
                start, end = rolling_window(now, rule.rolling)
            else:
                start, end = calendar_window(now, rule.period, ZoneInfo(rule.timezone) if rule.timezone else zone)  # type: ignore[arg-type]
            used = spend.total(counter, start, end, agent_id=agent_id)
            if rule.rolling is None:
                resets: datetime | None = end
            else:
                oldest = spend.reached_at(counter, start, end, 1, agent_id=agent_id) if used else None
                resets = None if oldest is None else oldest + rule.rolling
            found.append(
                Limit(
                    rule_id=rule.id,
                    source=source,
                    counter=counter,
                    limit=limit,
                    spent=used,
                    remaining=max(0, limit - used),
                    window_start=start,
                    window_end=end,
                    resets_at=resets,
                )
            )
    return tuple(found)
