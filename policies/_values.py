"""Value types shared by intents and policy documents.

Money is integers only: amounts in base units (wei, token units), USD in integer micro-USD.
Documents may give amounts as JSON integers or as decimal-digit strings (JavaScript clients
cannot carry ``2**256 - 1`` as a number); floats are always rejected.
"""

from __future__ import annotations

import re
from datetime import timedelta
from fractions import Fraction
from typing import Annotated, Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BeforeValidator, WithJsonSchema

MICRO_USD: Final = 1_000_000
"""Micro-USD per US dollar: every USD figure in the engine is an integer of micro-USD."""

NATIVE: Final = "native"
"""The canonical asset key of a chain's native coin."""

_DIGITS = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"([0-9]+)(?:\.([0-9]+))?")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_SELECTOR = re.compile(r"0x[0-9a-fA-F]{8}")
_DURATION = re.compile(r"([0-9]+)(ms|s|m|h|d|w)")
_DURATION_UNITS: Final = {
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}


def parse_amount(value: Any) -> int:
    """An integer >= 0 from a JSON integer or a string of decimal digits; never a float."""
    if isinstance(value, bool):
        raise ValueError("must be an integer or a string of digits, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        if _DIGITS.fullmatch(value) is None:
            raise ValueError('must be a string of decimal digits (base units), e.g. "1000000"')
        return int(value)
    if isinstance(value, float):
        raise ValueError("must be an integer in base units; floats are not accepted for money")
    raise ValueError("must be an integer or a string of digits")


def parse_decimal(value: Any) -> Fraction:
    """An exact non-negative decimal from an integer or a decimal string such as ``"0.9998"``."""
    if isinstance(value, (bool, float)):
        raise ValueError('must be a decimal string such as "1" or "0.9998", not a float')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return Fraction(value)
    if isinstance(value, str):
        match = _DECIMAL.fullmatch(value)
        if match is None:
            raise ValueError('must be a decimal string such as "1" or "20.50"')
        whole, frac = match.group(1), match.group(2) or ""
        return Fraction(int(whole + frac), 10 ** len(frac))
    raise ValueError('must be a decimal string such as "1" or "20.50"')


def parse_usd(value: Any) -> int:
    """A USD figure in a document (``"20"``, ``"0.05"``) as integer micro-USD, exactly."""
    amount = parse_decimal(value) * MICRO_USD
    if amount.denominator != 1:
        raise ValueError("USD amounts have at most 6 decimal places (micro-USD)")
    return amount.numerator


def parse_address(value: Any) -> str:
    """A 20-byte hex address, canonicalised to lowercase ``0x…``."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError("an address must be a quoted string; unquoted 0x… is read as a number in YAML")
    if not isinstance(value, str) or _ADDRESS.fullmatch(value) is None:
        raise ValueError("must be a 0x-prefixed 20-byte hex address")
    return value.lower()


def parse_asset(value: Any) -> str:
    """An asset key: ``"native"`` or a token contract address (lowercase)."""
    if value == NATIVE:
        return NATIVE
    try:
        return parse_address(value)
    except ValueError:
        raise ValueError('must be "native" or a 0x-prefixed token contract address') from None


def parse_selector(value: Any) -> str:
    """A 4-byte function selector, canonicalised to lowercase ``0x12345678``."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError("a selector must be a quoted string; unquoted 0x… is read as a number in YAML")
    if not isinstance(value, str) or _SELECTOR.fullmatch(value) is None:
        raise ValueError("must be a 4-byte selector such as 0xa9059cbb")
    return value.lower()


def parse_duration(value: Any) -> timedelta:
    """A duration such as ``"90m"``, ``"24h"``, ``"7d"``, ``"1500ms"`` (one number, one unit)."""
    if isinstance(value, timedelta):
        return value
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError('must be a duration such as "1h", "24h", "7d" (units: ms, s, m, h, d, w)')
    duration = int(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if duration <= timedelta(0):
        raise ValueError("must be longer than zero")
    return duration


def check_timezone(value: str) -> str:
    """An IANA time zone name that this system knows (``"UTC"``, ``"Europe/Paris"``)."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}; use an IANA name such as Europe/Paris") from None
    return value


Amount = Annotated[
    int,
    BeforeValidator(parse_amount),
    WithJsonSchema(
        {
            "oneOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": "^[0-9]+$"},
            ],
            "description": "Integer in base units, or the same as a string of digits.",
        }
    ),
]
UsdAmount = Annotated[
    int,
    BeforeValidator(parse_usd),
    WithJsonSchema(
        {
            "oneOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^[0-9]+(\.[0-9]{1,6})?$"},
            ],
            "description": 'US dollars as a decimal string (e.g. "20" or "0.05"); held as micro-USD.',
        }
    ),
]
Price = Annotated[
    Fraction,
    BeforeValidator(parse_decimal),
    WithJsonSchema(
        {
            "oneOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
            ],
            "description": "USD price of one whole unit, as a decimal string.",
        }
    ),
]
Address = Annotated[
    str,
    BeforeValidator(parse_address),
    WithJsonSchema({"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$"}),
]
AssetKey = Annotated[
    str,
    BeforeValidator(parse_asset),
    WithJsonSchema({"type": "string", "pattern": "^(native|0x[0-9a-fA-F]{40})$"}),
]
Selector = Annotated[
    str,
    BeforeValidator(parse_selector),
    WithJsonSchema({"type": "string", "pattern": "^0x[0-9a-fA-F]{8}$"}),
]
Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    WithJsonSchema({"type": "string", "pattern": "^[0-9]+(ms|s|m|h|d|w)$"}),
]
TimeZoneName = Annotated[str, AfterValidator(check_timezone)]


def usd_value(amount: int, decimals: int, price: Fraction) -> int:
    """Micro-USD value of ``amount`` base units, rounded up (conservative for spend)."""
    scale: int = 10**decimals
    numerator = amount * MICRO_USD * price.numerator
    denominator = price.denominator * scale
    return -(-numerator // denominator)
