"""Window arithmetic: rolling windows and calendar periods, in pure functions.

Rolling window of length ``W`` at ``now``: a payment made at ``t`` counts while
``now < t + W``, i.e. it frees up exactly ``W`` after it was made. As a half-open range that is
``[now - W + 1 µs, now + W)``: payments stamped up to ``W`` in the future (a replica whose clock
runs ahead) are counted too, which is the conservative choice.

Calendar period (day, ISO week starting Monday, month) in a time zone: ``[start, end)`` where
``start`` is the first instant of the local period and ``end`` the first instant of the next one.
Across a DST change a local day is 23 or 25 hours long; the bounds are real instants, so nothing is
counted twice or missed.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

Period = Literal["day", "week", "month"]

RESOLUTION = timedelta(microseconds=1)


def rolling_window(now: datetime, length: timedelta) -> tuple[datetime, datetime]:
    """The half-open range of payment times that count in a rolling window at ``now`` (in UTC:
    arithmetic on local wall-clock times would be wrong across DST changes)."""
    now = now.astimezone(UTC)
    return now - length + RESOLUTION, now + length


def _local_start(day: date, zone: ZoneInfo) -> datetime:
    # fold=0 maps a local midnight that falls in a DST gap (zones that change at 00:00, such as
    # America/Santiago) to the transition instant, which is the first instant of that day.
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def period_start_date(day: date, period: Period) -> date:
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def next_period_date(start: date, period: Period) -> date:
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(weeks=1)
    if start.month == 12:
        return date(start.year + 1, 1, 1)
    return date(start.year, start.month + 1, 1)


def calendar_window(now: datetime, period: Period, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The calendar period containing ``now`` in ``zone``, as UTC instants ``[start, end)``."""
    local_day = now.astimezone(zone).date()
    start = period_start_date(local_day, period)
    return _local_start(start, zone), _local_start(next_period_date(start, period), zone)
