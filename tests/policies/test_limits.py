"""What may I spend: every cap and velocity limit with what remains and when it resets."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from policies import MemorySpend, limits
from tests.policies.helpers import BASE, NOW, PAY, USDC, grant, policy, spent

DAILY = {"id": "daily", "type": "cap", "asset": "usdc", "max": "100", "period": "day"}
HOURLY_USD = {"id": "hourly", "type": "cap", "max_usd": "5", "rolling": "1h"}
RATE = {"id": "rate", "type": "velocity", "max_payments": 3, "rolling": "1h"}


def test_lists_every_cumulative_limit_with_what_remains() -> None:
    history = MemorySpend([spent(NOW - timedelta(minutes=10), 30, usd=30)])
    found = {limit.rule_id: limit for limit in limits(policy(PAY, DAILY, HOURLY_USD, RATE), history, NOW)}
    assert set(found) == {"daily", "hourly", "rate"}
    assert (found["daily"].counter, found["daily"].spent, found["daily"].remaining) == (f"{BASE}:{USDC}", 30, 70)
    assert found["daily"].resets_at == found["daily"].window_end
    assert (found["hourly"].counter, found["hourly"].remaining) == ("usd", 5_000_000 - 30)
    assert found["hourly"].resets_at == NOW - timedelta(minutes=10) + timedelta(hours=1)
    assert (found["rate"].counter, found["rate"].spent, found["rate"].remaining) == ("payments", 1, 2)


def test_remaining_never_goes_below_zero_and_an_empty_rolling_window_has_no_reset() -> None:
    history = MemorySpend([spent(NOW - timedelta(minutes=1), 500)])
    found = {limit.rule_id: limit for limit in limits(policy(PAY, DAILY, RATE), history, NOW)}
    assert found["daily"].remaining == 0
    quiet = {limit.rule_id: limit for limit in limits(policy(PAY, RATE), MemorySpend(), NOW)}
    assert quiet["rate"].resets_at is None


def test_a_grant_adds_its_own_limits_counted_on_the_agents_spend() -> None:
    history = MemorySpend(
        [spent(NOW - timedelta(minutes=5), 40), spent(NOW - timedelta(minutes=5), 7, agent_id="other")]
    )
    found = limits(
        policy(PAY, DAILY),
        history,
        NOW,
        grant({"id": "mine", "type": "cap", "asset": "usdc", "max": "50", "period": "day", "timezone": "Asia/Tokyo"}),
    )
    by_source = {(limit.source, limit.rule_id): limit for limit in found}
    assert by_source["policy", "daily"].spent == 47
    assert by_source["grant", "mine"].spent == 40
    assert by_source["grant", "mine"].remaining == 10


def test_a_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        limits(policy(PAY, DAILY), MemorySpend(), datetime(2025, 1, 1))
