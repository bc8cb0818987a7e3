"""The intent model: canonical forms and shape checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from policies import DangerousOperation, Intent
from tests.policies.helpers import BASE, USDC, intent


def test_addresses_and_assets_are_canonical_lowercase() -> None:
    checksummed = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    the_intent = intent("token_transfer", asset=checksummed, payee=checksummed, amount="5")
    assert the_intent.asset == USDC
    assert the_intent.payee == USDC
    assert the_intent.amount == 5


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "allowance"},
        {"kind": "token_transfer", "allowance_type": "erc20_approve"},
        {"kind": "contract_call", "target": USDC},
        {"kind": "typed_data", "primary_type": "Order"},
        {"kind": "token_transfer", "amount": 1.0},
        {"kind": "token_transfer", "amount": -1},
        {"kind": "token_transfer", "calldata": "0x123"},
        {"kind": "token_transfer", "chain_id": 0},
    ],
)
def test_malformed_intents_are_rejected(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Intent(**{"chain_id": BASE, "wallet_id": "w1", **fields})


def test_dangerous_operations_of_each_kind() -> None:
    assert intent("message").dangerous_operations == {DangerousOperation.MESSAGE_SIGNING}
    assert intent("delegation").dangerous_operations == {DangerousOperation.EIP7702_DELEGATION}
    permit2 = intent("allowance", allowance_type="permit2", unlimited=True)
    assert permit2.dangerous_operations == {DangerousOperation.PERMIT2, DangerousOperation.UNLIMITED_ALLOWANCE}
    assert intent("allowance", allowance_type="erc20_approve", amount=5).dangerous_operations == frozenset()
    assert intent("token_transfer", amount=5).moves_value
    assert not intent("allowance", allowance_type="erc20_approve", amount=5, unlimited=True).moves_value
