"""Parsing policy documents: money without floats, field-naming errors, references, JSON Schema."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import pytest
from pydantic import ValidationError

from policies import (
    PolicyValidationError,
    SpendRecord,
    grant_json_schema,
    load_grant,
    load_policy,
    policy_json_schema,
    usd_value,
)
from policies._values import parse_address, parse_amount, parse_decimal, parse_duration, parse_usd
from tests.policies.helpers import ASSETS, GROUPS, PAY, USDC


def _errors(document: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(PolicyValidationError) as caught:
        load_policy(document)
    return caught.value.errors


def _with_rule(rule: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"schema_version": 1, "assets": ASSETS, "approver_groups": GROUPS, "rules": [rule], **fields}


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (10**77, 10**77), ("1000000", 1_000_000), ("0", 0)])
def test_amounts_are_integers_or_digit_strings(value: object, expected: int) -> None:
    assert parse_amount(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.5, "floats are not accepted"),
        (True, "not a boolean"),
        (-1, "negative"),
        ("1e6", "decimal digits"),
        ("1.0", "decimal digits"),
        (None, "integer or a string"),
    ],
)
def test_amounts_reject_floats_and_other_shapes(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_amount(value)


def test_a_float_amount_in_a_document_names_the_field() -> None:
    rule = {"id": "max", "type": "max_per_payment", "asset": "usdc", "max": 1.5}
    assert _errors(_with_rule(rule)) == [
        ("rules[0].max", "must be an integer in base units; floats are not accepted for money")
    ]


def test_usd_amounts_are_exact_decimals_up_to_micro_dollars() -> None:
    assert parse_usd("20") == 20_000_000
    assert parse_usd("0.000001") == 1
    assert parse_usd(3) == 3_000_000
    with pytest.raises(ValueError, match="6 decimal places"):
        parse_usd("0.0000001")
    for bad in (0.5, "1,5", "-1", -1, [1]):
        with pytest.raises(ValueError, match=r"decimal string|negative"):
            parse_decimal(bad)


def test_usd_value_rounds_up() -> None:
    assert usd_value(1, 6, Fraction(1)) == 1
    assert usd_value(1, 7, Fraction(1)) == 1  # 0.1 micro-USD rounds up
    assert usd_value(10**18, 18, Fraction(2500)) == 2_500_000_000
    assert usd_value(0, 18, Fraction(2500)) == 0


def test_unquoted_yaml_hex_addresses_get_a_helpful_error() -> None:
    with pytest.raises(ValueError, match="quoted string"):
        parse_address(int(USDC, 16))
    rule = {"id": "call", "type": "allow_contract_call", "contract": USDC, "selector": 0xA9059CBB}
    assert _errors(_with_rule(rule))[0][0] == "rules[0].selector"


def test_durations() -> None:
    assert parse_duration("90m") == timedelta(minutes=90)
    assert parse_duration("1500ms") == timedelta(milliseconds=1500)
    assert parse_duration("1w") == timedelta(days=7)
    assert parse_duration(timedelta(hours=1)) == timedelta(hours=1)
    for bad in ("0h", "1 h", "1y", 3600):
        with pytest.raises(ValueError, match=r"duration|longer than zero"):
            parse_duration(bad)


@pytest.mark.parametrize(
    ("document", "path", "fragment"),
    [
        ({"rules": []}, "schema_version", "Field required"),
        (_with_rule(PAY, schema_version=2), "schema_version", "Input should be 1"),
        (_with_rule({"id": "x", "type": "teleport"}), "rules[0]", "unknown rule type"),
        (_with_rule({"id": "x", "type": "cap", "asset": "usdc", "max": 1}), "rules[0]", "exactly one of rolling"),
        (
            _with_rule({"id": "x", "type": "cap", "max_usd": "1", "rolling": "1h", "timezone": "UTC"}),
            "rules[0]",
            "only to a calendar period",
        ),
        (
            _with_rule({"id": "x", "type": "cap", "max_usd": "1", "period": "day", "timezone": "Mars/Olympus"}),
            "rules[0].timezone",
            "unknown time zone",
        ),
        (
            _with_rule({"id": "x", "type": "max_per_payment", "max_usd": "1", "asset": "usdc", "max": 1}),
            "rules[0]",
            "not both",
        ),
        (_with_rule({"id": "x", "type": "max_per_payment", "asset": "usdc"}), "rules[0]", "both the asset"),
        (_with_rule({"id": "x", "type": "max_per_payment"}), "rules[0]", "either a USD amount"),
        (_with_rule({"id": "x", "type": "new_payee"}), "rules[0]", "an approval, or both"),
        (
            _with_rule({"id": "x", "type": "max_per_payment", "max_usd": "1", "maxx": 2}),
            "rules[0].maxx",
            "Extra inputs",
        ),
        (_with_rule({"id": "x", "type": "time_window", "start": "09:00", "end": "09:00"}), "rules[0]", "must differ"),
        (
            _with_rule({"id": "x", "type": "time_window", "start": "09:00", "end": "10:00", "days": []}),
            "rules[0]",
            "must not be empty",
        ),
        (
            _with_rule(
                {
                    "id": "x",
                    "type": "allow_contract_call",
                    "contract": USDC,
                    "selector": "0xa9059cbb",
                    "args": [{"index": 0}],
                }
            ),
            "rules[0].args[0]",
            "exactly one of max or equals",
        ),
        (
            _with_rule({"id": "x", "type": "allow_contract_call", "contract": USDC, "selector": "transfer"}),
            "rules[0].selector",
            "4-byte selector",
        ),
        (_with_rule({"id": "bad id!", "type": "allow_transfers"}), "rules[0].id", "should match pattern"),
        (_with_rule(PAY, expires_at="2026-01-01T00:00:00"), "expires_at", "UTC offset"),
        ({"schema_version": 1, "rules": [PAY, PAY]}, "rules", "used more than once"),
        ({"schema_version": 1, "approver_groups": {"g": {"members": ["a", "a"]}}}, "approver_groups.g", "unique"),
        (
            {"schema_version": 1, "assets": {"x": {"chain_id": 1, "address": "eth", "decimals": 18}}},
            "assets.x.address",
            '"native" or a 0x',
        ),
    ],
)
def test_validation_errors_name_the_field_and_say_what_is_wrong(
    document: dict[str, Any], path: str, fragment: str
) -> None:
    errors = _errors(document)
    assert any(where == path and fragment in message for where, message in errors), errors


def test_rules_must_name_defined_assets_and_groups() -> None:
    rules = [
        {"id": "a", "type": "cap", "asset": "btc", "max": 1, "rolling": "1h"},
        {"id": "b", "type": "assets", "assets": ["usdc", "doge"]},
        {"id": "c", "type": "require_approval", "group": "board"},
        {"id": "d", "type": "new_payee", "approval": {"group": "security", "m": 3}},
    ]
    assert _errors({"schema_version": 1, "assets": ASSETS, "approver_groups": GROUPS, "rules": rules}) == [
        ("rules[0].asset", "'btc' is not defined in assets"),
        ("rules[1].assets", "'doge' is not defined in assets"),
        ("rules[2].group", "'board' is not defined in approver_groups"),
        ("rules[3].approval.m", "3 is more than the 2 members of 'security'"),
    ]


def test_error_message_lists_every_problem() -> None:
    error = PolicyValidationError([("a", "bad"), ("b.c", "worse")])
    assert str(error) == "a: bad; b.c: worse"


def test_grant_is_checked_against_the_policy() -> None:
    policy = load_policy(_with_rule(PAY))
    grant = {
        "schema_version": 1,
        "agent_id": "bot",
        "rules": [{"id": "m", "type": "max_per_payment", "asset": "btc", "max": 1}],
    }
    assert load_grant(grant).agent_id == "bot"
    with pytest.raises(PolicyValidationError) as caught:
        load_grant(grant, policy)
    assert caught.value.errors == [("rules[0].asset", "'btc' is not defined in assets")]
    with pytest.raises(PolicyValidationError) as caught:
        load_grant({"schema_version": 1, "rules": []})
    assert caught.value.errors == [("agent_id", "Field required")]


def test_json_schema_is_exported_for_editors() -> None:
    schema = policy_json_schema()
    assert schema["$schema"].endswith("2020-12/schema")
    assert schema["required"] == ["schema_version"]
    text = repr(schema)
    for rule_type in ("allow_transfers", "cap", "velocity", "require_approval", "allow_dangerous"):
        assert rule_type in text
    assert "above_usd" in text  # aliases as written in documents
    assert "agent_id" in grant_json_schema()["properties"]


def test_spend_records_need_aware_times_and_non_negative_debits() -> None:
    with pytest.raises(ValidationError, match="timezone-aware"):
        SpendRecord(at=datetime(2025, 1, 1), debits={"usd": 1})
    with pytest.raises(ValidationError, match="must not be negative"):
        SpendRecord(at=datetime(2025, 1, 1, tzinfo=UTC), debits={"usd": -1})
