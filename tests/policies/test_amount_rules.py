"""Per-payment maximums, cumulative caps and velocity, at their boundaries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from tests.policies.helpers import BASE, MS, NOW, ODD, PAY, USDC, intent, judge, pay, policy, spent

MAX_10 = {"id": "max", "type": "max_per_payment", "asset": "usdc", "max": "10000000"}


@pytest.mark.parametrize(("amount", "outcome"), [(9_999_999, "allow"), (10_000_000, "allow"), (10_000_001, "deny")])
def test_per_payment_max_allows_up_to_and_including_the_maximum(amount: int, outcome: str) -> None:
    decision = judge([PAY, MAX_10], pay(amount))
    assert decision.outcome == outcome
    if outcome == "deny":
        (reason,) = decision.reasons
        assert (reason.code, reason.rule_id, reason.limit) == ("per_payment_max_exceeded", "max", 10_000_000)
        assert reason.counter == f"{BASE}:{USDC}"


def test_per_payment_max_in_an_asset_does_not_apply_to_other_assets() -> None:
    decision = judge([PAY, MAX_10], pay(10**30, asset=ODD))
    assert decision.outcome == "allow"
    (verdict,) = [v for v in decision.verdicts if v.rule_id == "max"]
    assert verdict.verdict == "not_applicable"


def test_gas_counts_against_the_native_per_payment_maximum() -> None:
    rule = {"id": "max-eth", "type": "max_per_payment", "asset": "eth", "max": 1000}
    assert judge([PAY, rule], pay(900, asset="native", max_gas_cost=100)).outcome == "allow"
    decision = judge([PAY, rule], pay(900, asset="native", max_gas_cost=101))
    assert decision.codes == ("per_payment_max_exceeded",)


def test_gas_of_a_token_payment_counts_against_the_native_maximum() -> None:
    rule = {"id": "max-eth", "type": "max_per_payment", "asset": "eth", "max": 1000}
    assert judge([PAY, rule], pay(5, max_gas_cost=1001)).codes == ("per_payment_max_exceeded",)


@pytest.mark.parametrize(("amount", "outcome"), [(19_999_999, "allow"), (20_000_000, "allow"), (20_000_001, "deny")])
def test_usd_per_payment_max_on_a_stablecoin_at_one_dollar(amount: int, outcome: str) -> None:
    rule = {"id": "usd", "type": "max_per_payment", "max_usd": "20"}
    assert judge([PAY, rule], pay(amount)).outcome == outcome


def test_usd_value_is_rounded_up_so_a_fraction_of_a_micro_dollar_over_denies() -> None:
    # 1 wei of ETH at $2500 is 2.5e-12 micro-USD: rounded up to 1 micro-USD.
    rule = {"id": "usd", "type": "max_per_payment", "max_usd": "0.000001"}
    assert judge([PAY, rule], pay(1, asset="native")).outcome == "allow"
    # 400_000_001 wei * 2500 $/ETH = 1.0000000025 micro-USD -> 2 micro-USD.
    assert judge([PAY, rule], pay(400_000_000, asset="native")).outcome == "allow"
    assert judge([PAY, rule], pay(400_000_001, asset="native")).codes == ("per_payment_max_exceeded",)


def test_usd_rule_denies_a_payment_in_an_unpriced_asset() -> None:
    rule = {"id": "usd", "type": "max_per_payment", "max_usd": "1000000"}
    decision = judge([PAY, rule], pay(1, asset=ODD))
    (reason,) = decision.reasons
    assert (reason.code, reason.rule_id, reason.counter) == ("asset_unpriced", "usd", "usd")


def test_usd_rule_does_not_apply_to_a_call_that_moves_no_value() -> None:
    rules = [
        {"id": "usd", "type": "max_per_payment", "max_usd": "1"},
        {"id": "call", "type": "allow_contract_call", "contract": ODD, "selector": "0x12345678"},
    ]
    decision = judge(rules, intent("contract_call", target=ODD, selector="0x12345678", calldata="0x12345678"))
    assert decision.outcome == "allow"


DAILY_100 = {"id": "daily", "type": "cap", "asset": "usdc", "max": 100, "rolling": "24h"}


@pytest.mark.parametrize(("already", "outcome"), [(69, "allow"), (70, "allow"), (71, "deny")])
def test_rolling_cap_counts_past_spend_plus_this_payment(already: int, outcome: str) -> None:
    decision = judge([PAY, DAILY_100], pay(30), [spent(NOW - timedelta(hours=1), already)])
    assert decision.outcome == outcome


def test_denies_when_daily_cap_would_be_exceeded_and_says_what_remains_and_when() -> None:
    records = [spent(NOW - timedelta(hours=20), 50), spent(NOW - timedelta(hours=2), 40)]
    decision = judge([PAY, DAILY_100], pay(30), records)
    (reason,) = decision.reasons
    assert reason.code == "cap_exceeded"
    assert reason.remaining == 10
    assert reason.limit == 100
    # 20 over: the 50 paid 20 h ago must free up, 24 h after it was paid.
    assert reason.resets_at == NOW + timedelta(hours=4)
    assert decision.constraints == ()


def test_rolling_cap_frees_a_payment_exactly_one_window_after_it() -> None:
    window = timedelta(hours=24)
    for offset, outcome in [(-MS, "allow"), (timedelta(0), "allow"), (MS, "deny")]:
        record = spent(NOW - window + offset, 100)
        assert judge([PAY, DAILY_100], pay(1), [record]).outcome == outcome, offset


def test_rolling_cap_counts_pending_reservations_stamped_slightly_in_the_future() -> None:
    assert judge([PAY, DAILY_100], pay(1), [spent(NOW + timedelta(seconds=5), 100)]).outcome == "deny"


def test_a_payment_larger_than_the_cap_never_resets() -> None:
    (reason,) = judge([PAY, DAILY_100], pay(101)).reasons
    assert (reason.code, reason.remaining, reason.resets_at) == ("cap_exceeded", 100, None)


def test_allow_returns_the_cumulative_constraint_for_the_ledger() -> None:
    decision = judge([PAY, DAILY_100], pay(30))
    (constraint,) = decision.constraints
    assert constraint.counter == f"{BASE}:{USDC}"
    assert (constraint.limit, constraint.amount, constraint.rule_id) == (100, 30, "daily")
    assert constraint.window_start == NOW - timedelta(hours=24) + timedelta(microseconds=1)
    assert constraint.window_end == NOW + timedelta(hours=24)
    assert (constraint.source, constraint.agent_id) == ("policy", None)


def test_calendar_day_cap_resets_at_local_midnight() -> None:
    rule = {"id": "day", "type": "cap", "max_usd": "20", "period": "day", "timezone": "America/New_York"}
    # 15:30 UTC is 11:30 in New York (EDT from 9 March 2025).
    records = [spent(datetime(2025, 3, 12, 4, 0, tzinfo=UTC), 15_000_000, usd=15_000_000)]  # 00:00 EDT
    decision = judge([PAY, rule], pay(6_000_000), records)
    (reason,) = decision.reasons
    assert reason.code == "cap_exceeded"
    assert reason.counter == "usd"
    assert reason.remaining == 5_000_000
    assert reason.resets_at == datetime(2025, 3, 13, 4, 0, tzinfo=UTC)
    before_midnight = [spent(datetime(2025, 3, 12, 4, 0, tzinfo=UTC) - MS, 15_000_000, usd=15_000_000)]
    assert judge([PAY, rule], pay(6_000_000), before_midnight).outcome == "allow"


def test_calendar_cap_uses_the_policy_time_zone_by_default() -> None:
    rule = {"id": "day", "type": "cap", "asset": "usdc", "max": 10, "period": "day"}
    tokyo = policy(PAY, rule, timezone="Asia/Tokyo")
    # 15:30 UTC is 00:30 on 13 March in Tokyo: the payment at 14:00 UTC was "yesterday".
    assert judge(tokyo, pay(10), [spent(datetime(2025, 3, 12, 14, 0, tzinfo=UTC), 10)]).outcome == "allow"
    assert judge(tokyo, pay(10), [spent(datetime(2025, 3, 12, 15, 0, tzinfo=UTC), 10)]).outcome == "deny"


VELOCITY_3 = {"id": "speed", "type": "velocity", "max_payments": 3, "rolling": "1h"}


@pytest.mark.parametrize(("count", "outcome"), [(1, "allow"), (2, "allow"), (3, "deny")])
def test_velocity_allows_at_most_n_payments_per_window(count: int, outcome: str) -> None:
    records = [spent(NOW - timedelta(minutes=10 * (i + 1)), 1) for i in range(count)]
    decision = judge([PAY, VELOCITY_3], pay(1), records)
    assert decision.outcome == outcome
    if outcome == "deny":
        (reason,) = decision.reasons
        assert (reason.code, reason.remaining, reason.counter) == ("velocity_exceeded", 0, "payments")
        assert reason.resets_at == NOW - timedelta(minutes=30) + timedelta(hours=1)


def test_velocity_does_not_count_a_request_that_moves_nothing() -> None:
    records = [spent(NOW - timedelta(minutes=1), 1) for _ in range(3)]
    rules = [VELOCITY_3, {"id": "call", "type": "allow_contract_call", "contract": ODD, "selector": "0x12345678"}]
    the_intent = intent("contract_call", target=ODD, selector="0x12345678")
    assert judge(rules, the_intent, records).outcome == "allow"


def test_rolling_window_arithmetic_is_on_instants_even_when_now_is_given_in_local_time() -> None:
    paris = ZoneInfo("Europe/Paris")
    # 30 March 2025 03:30 Paris (UTC+2) is 01:30 UTC; 24 h earlier is 29 March 01:30 UTC.
    now = datetime(2025, 3, 30, 3, 30, tzinfo=paris)
    record = spent(datetime(2025, 3, 29, 1, 30, tzinfo=UTC) + MS, 100)
    assert judge([PAY, DAILY_100], pay(1), [record], now=now).outcome == "deny"
    record = spent(datetime(2025, 3, 29, 1, 30, tzinfo=UTC), 100)
    assert judge([PAY, DAILY_100], pay(1), [record], now=now).outcome == "allow"
