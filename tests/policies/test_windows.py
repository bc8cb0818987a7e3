"""Window and cap arithmetic against a small reference model; calendar periods across DST."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.memory import MemorySpend
from policies.windows import calendar_window, next_period_date, period_start_date, rolling_window
from tests.policies.helpers import NOW, PAY, judge, pay, spent

EPOCH = datetime(2025, 1, 1, tzinfo=UTC)
SECOND = timedelta(seconds=1)


# --------------------------------------------------------------------------- reference model


def reference_counts(record_at: int, now: int, window: int) -> bool:
    """A payment at ``record_at`` counts at ``now`` while now < record_at + window (and always
    if stamped in the future, up to one window ahead)."""
    return now - window < record_at < now + window


def reference_allows(records: list[tuple[int, int]], now: int, window: int, amount: int, limit: int) -> bool:
    """A payment of nothing spends nothing and is not measured; otherwise it must fit."""
    if amount == 0:
        return True
    return sum(a for t, a in records if reference_counts(t, now, window)) + amount <= limit


def reference_resets_at(records: list[tuple[int, int]], now: int, window: int, amount: int, limit: int) -> int | None:
    """The first time at or after ``now`` at which the payment fits (records aging out only)."""
    if amount > limit:
        return None
    for moment in sorted({t + window for t, _ in records if t + window > now}):
        if reference_allows(records, moment, window, amount, limit):
            return moment
    return None  # pragma: no cover - with amount <= limit the last record's expiry always fits


def _engine(records: list[tuple[int, int]], now: int, window: int, amount: int, limit: int) -> tuple[str, object]:
    rule = {"id": "cap", "type": "cap", "asset": "usdc", "max": limit, "rolling": f"{window}s"}
    spend = [spent(EPOCH + t * SECOND, a) for t, a in records]
    decision = judge([PAY, rule], pay(amount), spend, now=EPOCH + now * SECOND)
    resets = decision.reasons[0].resets_at if decision.outcome == "deny" else None
    return decision.outcome, resets


def test_rolling_cap_matches_the_reference_model_exhaustively_on_a_small_domain() -> None:
    window, limit, now = 3, 4, 6
    checked = 0
    for times in itertools.combinations_with_replacement(range(0, 8), 2):
        for amounts in itertools.product(range(1, 4), repeat=2):
            records = list(zip(times, amounts, strict=True))
            for amount in range(0, 6):
                outcome, resets = _engine(records, now, window, amount, limit)
                expected = reference_allows(records, now, window, amount, limit)
                assert (outcome == "allow") == expected, (records, amount)
                if not expected:
                    reference = reference_resets_at(records, now, window, amount, limit)
                    assert resets == (None if reference is None else EPOCH + reference * SECOND), (records, amount)
                checked += 1
    assert checked == 36 * 9 * 6


@settings(max_examples=300, deadline=None)
@given(
    records=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 10**12)), max_size=8),
    now=st.integers(0, 10**6),
    window=st.integers(1, 10**5),
    amount=st.integers(0, 10**13),
    limit=st.integers(0, 10**13),
)
def test_rolling_cap_matches_the_reference_model_on_large_domains(
    records: list[tuple[int, int]], now: int, window: int, amount: int, limit: int
) -> None:
    # Payments stamped more than a window ahead of now do not exist (clock skew is far smaller).
    records = [(t, a) for t, a in records if t < now + window]
    outcome, resets = _engine(records, now, window, amount, limit)
    expected = reference_allows(records, now, window, amount, limit)
    assert (outcome == "allow") == expected
    if not expected:
        reference = reference_resets_at(records, now, window, amount, limit)
        assert resets == (None if reference is None else EPOCH + reference * SECOND)


@settings(max_examples=200, deadline=None)
@given(
    records=st.lists(st.tuples(st.integers(-(10**6), 10**6), st.integers(1, 1000)), max_size=10),
    window=st.integers(1, 10**6),
)
def test_a_denied_payment_fits_exactly_at_resets_at_and_not_a_moment_before(
    records: list[tuple[int, int]], window: int
) -> None:
    past = [(t, a) for t, a in records if t <= 0]
    rule = {"id": "cap", "type": "cap", "asset": "usdc", "max": 1000, "rolling": f"{window}s"}
    spend = [spent(EPOCH + t * SECOND, a) for t, a in past]
    decision = judge([PAY, rule], pay(500), spend, now=EPOCH)
    if decision.outcome == "allow":
        return
    resets = decision.reasons[0].resets_at
    assert resets is not None
    assert judge([PAY, rule], pay(500), spend, now=resets).outcome == "allow"
    assert judge([PAY, rule], pay(500), spend, now=resets - timedelta(microseconds=1)).outcome == "deny"


def test_memory_spend_total_matches_a_direct_sum() -> None:
    records = [spent(EPOCH + i * SECOND, i + 1) for i in range(10)]
    view = MemorySpend(records)
    counter = next(iter(records[0].debits))
    for since, until in itertools.combinations(range(0, 12), 2):
        expected = sum(i + 1 for i in range(10) if since <= i < until)
        assert view.total(counter, EPOCH + since * SECOND, EPOCH + until * SECOND) == expected
    assert view.total(counter, EPOCH, EPOCH + 20 * SECOND, agent_id="other") == 0
    assert view.reached_at(counter, EPOCH, EPOCH + 20 * SECOND, 6) == EPOCH + 2 * SECOND
    assert view.reached_at(counter, EPOCH, EPOCH + 20 * SECOND, 10**6) is None


def test_rolling_window_bounds() -> None:
    start, end = rolling_window(NOW, timedelta(hours=1))
    assert start == NOW - timedelta(hours=1) + timedelta(microseconds=1)
    assert end == NOW + timedelta(hours=1)


# --------------------------------------------------------------------------- calendar periods

PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")
SANTIAGO = ZoneInfo("America/Santiago")


def test_day_containing_the_spring_forward_change_is_23_hours_long() -> None:
    start, end = calendar_window(datetime(2025, 3, 30, 12, tzinfo=UTC), "day", PARIS)
    assert start == datetime(2025, 3, 29, 23, tzinfo=UTC)
    assert end == datetime(2025, 3, 30, 22, tzinfo=UTC)
    assert end - start == timedelta(hours=23)


def test_day_containing_the_fall_back_change_is_25_hours_long() -> None:
    start, end = calendar_window(datetime(2025, 11, 2, 12, tzinfo=UTC), "day", NEW_YORK)
    assert (start, end) == (datetime(2025, 11, 2, 4, tzinfo=UTC), datetime(2025, 11, 3, 5, tzinfo=UTC))


def test_a_day_starting_in_a_midnight_dst_gap_starts_at_the_transition() -> None:
    # Chile moved clocks from 00:00 to 01:00 on 7 September 2025: that day starts at 01:00 -03.
    start, end = calendar_window(datetime(2025, 9, 7, 12, tzinfo=UTC), "day", SANTIAGO)
    assert start == datetime(2025, 9, 7, 4, tzinfo=UTC)
    assert start.astimezone(SANTIAGO).hour == 1
    assert end == datetime(2025, 9, 8, 3, tzinfo=UTC)


@pytest.mark.parametrize(
    ("moment", "expected_start"),
    [
        (datetime(2025, 3, 29, 23, tzinfo=UTC) - timedelta(milliseconds=1), datetime(2025, 3, 28, 23, tzinfo=UTC)),
        (datetime(2025, 3, 29, 23, tzinfo=UTC), datetime(2025, 3, 29, 23, tzinfo=UTC)),
        (datetime(2025, 3, 29, 23, tzinfo=UTC) + timedelta(milliseconds=1), datetime(2025, 3, 29, 23, tzinfo=UTC)),
    ],
)
def test_day_edges_in_paris_at_plus_minus_one_millisecond(moment: datetime, expected_start: datetime) -> None:
    assert calendar_window(moment, "day", PARIS)[0] == expected_start


def test_week_starts_on_monday_and_month_on_the_first() -> None:
    wednesday = datetime(2025, 3, 12, 15, tzinfo=UTC)
    assert calendar_window(wednesday, "week", ZoneInfo("UTC")) == (
        datetime(2025, 3, 10, tzinfo=UTC),
        datetime(2025, 3, 17, tzinfo=UTC),
    )
    # The March month in Paris spans the DST change: 31 days minus one hour.
    start, end = calendar_window(wednesday, "month", PARIS)
    assert (start, end) == (datetime(2025, 2, 28, 23, tzinfo=UTC), datetime(2025, 3, 31, 22, tzinfo=UTC))
    assert calendar_window(datetime(2025, 12, 31, 23, tzinfo=UTC), "month", ZoneInfo("UTC"))[1] == datetime(
        2026, 1, 1, tzinfo=UTC
    )


@settings(max_examples=300, deadline=None)
@given(
    moment=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC)),
    zone=st.sampled_from([PARIS, NEW_YORK, SANTIAGO, ZoneInfo("Asia/Kolkata"), ZoneInfo("Australia/Lord_Howe")]),
    period=st.sampled_from(["day", "week", "month"]),
)
def test_calendar_window_contains_now_and_its_bounds_are_local_period_starts(
    moment: datetime, zone: ZoneInfo, period: str
) -> None:
    start, end = calendar_window(moment, period, zone)  # type: ignore[arg-type]  # sampled from the literals
    assert start <= moment < end
    local_start = start.astimezone(zone).date()
    assert local_start == period_start_date(moment.astimezone(zone).date(), period)  # type: ignore[arg-type]
    assert end.astimezone(zone).date() == next_period_date(local_start, period)  # type: ignore[arg-type]
    # The instant just before the start belongs to the previous period.
    assert (start - timedelta(microseconds=1)).astimezone(zone).date() < local_start


def test_period_arithmetic_on_dates() -> None:
    assert period_start_date(date(2025, 3, 16), "week") == date(2025, 3, 10)
    assert next_period_date(date(2025, 12, 1), "month") == date(2026, 1, 1)
    assert next_period_date(date(2025, 1, 1), "day") == date(2025, 1, 2)
