"""Column types: exact integers of any size (wei amounts exceed 64 bits)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Numeric, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine


class BigInt(TypeDecorator[int]):
    """An unbounded integer: NUMERIC(78, 0) on PostgreSQL, decimal text on SQLite.

    SQLite has no integer wider than 64 bits, so sums over this column use the
    ``custody_sum`` aggregate registered on every SQLite connection.
    """

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(Numeric(78, 0))
        return dialect.type_descriptor(Text())

    def process_bind_param(self, value: int | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("money is an integer in base units")
        return value if dialect.name == "postgresql" else str(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:
        return None if value is None else int(value)


class ExactSum:
    """SQLite aggregate: the exact sum of decimal-text integers (``custody_sum``)."""

    def __init__(self) -> None:
        self.total = 0

    def step(self, value: str | int | None) -> None:
        if value is not None:
            self.total += int(value)

    def finalize(self) -> str:
        return str(self.total)


def exact_add(a: str | int | None, b: str | int | None) -> str:
    """SQLite function ``custody_add``: the exact sum of two decimal-text integers."""
    return str(int(a or 0) + int(b or 0))


_Moment = TypeVar("_Moment", datetime, datetime | None)


def as_utc(value: _Moment) -> _Moment:
    """A stored timestamp as an aware UTC datetime (SQLite hands them back naive; all are UTC)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)
