"""Deny by default, permit rules, dangerous operations, approvals, grants, and the decision."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import Intent, MemorySpend, evaluate
from tests.policies.helpers import (
    ALICE,
    BASE,
    BOB,
    NOW,
    ODD,
    PAY,
    ROUTER,
    USDC,
    grant,
    intent,
    judge,
    pay,
    policy,
    spent,
)

TRANSFER = "0xa9059cbb"


def _word(value: int | str) -> str:
    return (int(value, 16) if isinstance(value, str) else value).to_bytes(32, "big").hex()


def _call(target: str, selector: str, *words: int | str, value: int = 0) -> Intent:
    calldata = selector + "".join(_word(word) for word in words)
    return intent("contract_call", target=target, selector=selector, calldata=calldata, amount=value)


def test_a_policy_without_rules_denies_everything() -> None:
    decision = judge([], pay(1))
    (reason,) = decision.reasons
    assert (decision.outcome, reason.code, reason.rule_id) == ("deny", "no_rule_allows", "default")


def test_denies_a_kind_no_rule_allows() -> None:
    rules = [{"id": "native-only", "type": "allow_transfers", "kinds": ["native_transfer"]}]
    assert judge(rules, pay(1, asset="native")).outcome == "allow"
    assert judge(rules, pay(1)).codes == ("no_rule_allows",)


def test_every_failing_rule_is_reported_not_only_the_first() -> None:
    rules = [
        PAY,
        {"id": "max", "type": "max_per_payment", "asset": "usdc", "max": 5},
        {"id": "chains", "type": "chains", "chain_ids": [1]},
        {"id": "known", "type": "payee_allowlist", "payees": [{"address": BOB}]},
        {"id": "ok", "type": "require_approval", "group": "treasury", "m": 1},
    ]
    decision = judge(rules, pay(6))
    assert decision.outcome == "deny"
    assert decision.codes == ("per_payment_max_exceeded", "chain_not_allowed", "payee_not_allowlisted")
    assert decision.quorum is None
    assert decision.constraints == ()


def test_allow_lists_the_rules_that_permitted_it() -> None:
    decision = judge([PAY], pay(1))
    assert decision.allowed
    assert [(r.code, r.rule_id) for r in decision.reasons] == [("allowed", "pay")]


def test_unknown_contract_call_is_denied() -> None:
    (reason,) = judge([PAY], _call(ROUTER, "0x12345678")).reasons
    assert reason.code == "contract_call_not_allowed"


def test_allowed_contract_call_by_address_and_selector() -> None:
    rule = {
        "id": "swap",
        "type": "allow_contract_call",
        "contract": ROUTER,
        "selector": "0x12345678",
        "chain_ids": [BASE],
    }
    assert judge([rule], _call(ROUTER, "0x12345678")).outcome == "allow"
    assert judge([rule], _call(ROUTER, "0x12345679")).codes == ("contract_call_not_allowed",)
    assert judge([rule], _call(ODD, "0x12345678")).codes == ("contract_call_not_allowed",)
    other_chain = _call(ROUTER, "0x12345678").model_copy(update={"chain_id": 1})
    assert judge([rule], other_chain).codes == ("contract_call_not_allowed",)


CONSTRAINED = {
    "id": "pay-alice",
    "type": "allow_contract_call",
    "contract": USDC,
    "selector": TRANSFER,
    "args": [{"index": 0, "equals": ALICE}, {"index": 1, "max": "100"}],
}


@pytest.mark.parametrize(("amount", "outcome"), [(99, "allow"), (100, "allow"), (101, "deny")])
def test_contract_call_argument_maximum(amount: int, outcome: str) -> None:
    assert judge([CONSTRAINED], _call(USDC, TRANSFER, ALICE, amount)).outcome == outcome


def test_contract_call_argument_must_be_the_fixed_recipient() -> None:
    decision = judge([CONSTRAINED], _call(USDC, TRANSFER, BOB, 1))
    assert decision.codes == ("call_argument_not_allowed",)
    assert decision.reasons[0].message == f"argument 0 is not {ALICE}"


def test_contract_call_with_missing_arguments_is_denied() -> None:
    decision = judge([CONSTRAINED], _call(USDC, TRANSFER, ALICE))
    assert decision.codes == ("call_argument_not_allowed",)
    assert "missing" in decision.reasons[0].message


def test_a_second_call_rule_can_allow_what_a_first_constrains() -> None:
    loose = {
        "id": "pay-bob",
        "type": "allow_contract_call",
        "contract": USDC,
        "selector": TRANSFER,
        "args": [{"index": 0, "equals": BOB}],
    }
    assert judge([CONSTRAINED, loose], _call(USDC, TRANSFER, BOB, 10**9)).outcome == "allow"


def test_address_argument_with_dirty_high_bytes_is_not_the_recipient() -> None:
    dirty = "0x" + "01" * 12 + ALICE[2:]
    assert judge([CONSTRAINED], _call(USDC, TRANSFER, dirty, 1)).codes == ("call_argument_not_allowed",)


def _typed(primary: str = "Order", **domain: object) -> Intent:
    return intent("typed_data", domain=domain or {"name": "Exchange", "chain_id": BASE}, primary_type=primary)


def test_typed_data_is_denied_unless_allowed() -> None:
    assert judge([PAY], _typed()).codes == ("typed_data_not_allowed",)


def test_allowed_typed_data_matches_domain_and_primary_type() -> None:
    rule = {
        "id": "orders",
        "type": "allow_typed_data",
        "primary_type": "Order",
        "domain": {"name": "Exchange", "chain_id": BASE, "verifying_contract": ROUTER},
    }
    good = _typed(name="Exchange", chain_id=BASE, verifying_contract=ROUTER, version="1")
    assert judge([rule], good).outcome == "allow"
    assert judge([rule], _typed("Cancel", name="Exchange", chain_id=BASE, verifying_contract=ROUTER)).outcome == "deny"
    assert judge([rule], _typed(name="Exchange", chain_id=1, verifying_contract=ROUTER)).outcome == "deny"
    assert judge([rule], _typed(name="Other", chain_id=BASE, verifying_contract=ROUTER)).outcome == "deny"
    assert judge([rule], pay(1)).codes == ("no_rule_allows",)


def test_message_signing_is_off_unless_allowed() -> None:
    (reason,) = judge([PAY], intent("message")).reasons
    assert reason.code == "message_signing_not_allowed"
    allow = {"id": "sign-in", "type": "allow_dangerous", "operations": ["message_signing"]}
    assert judge([allow], intent("message")).outcome == "allow"


UNLIMITED = {
    "kind": "allowance",
    "allowance_type": "erc20_approve",
    "asset": USDC,
    "spender": ROUTER,
    "unlimited": True,
}
ALLOWANCES = {"id": "approvals", "type": "allow_transfers", "kinds": ["allowance"]}


def test_unlimited_approval_is_dangerous_even_when_allowances_are_permitted() -> None:
    (reason,) = judge([ALLOWANCES], intent(**UNLIMITED)).reasons
    assert reason.code == "dangerous_operation"
    assert "unlimited_allowance" in reason.message


def test_bounded_approval_is_not_dangerous() -> None:
    bounded = {**UNLIMITED, "unlimited": False, "amount": 10}
    assert judge([ALLOWANCES], intent(**bounded)).outcome == "allow"


def test_allow_dangerous_can_be_scoped_to_one_spender_and_chain() -> None:
    rule = {
        "id": "router",
        "type": "allow_dangerous",
        "operations": ["unlimited_allowance"],
        "spenders": [ROUTER],
        "chain_ids": [BASE],
    }
    assert judge([rule], intent(**UNLIMITED)).outcome == "allow"
    assert judge([rule], intent(**{**UNLIMITED, "spender": BOB})).codes == ("dangerous_operation",)
    assert judge([rule], intent(**{**UNLIMITED, "chain_id": 1})).codes == ("dangerous_operation",)


def test_unlimited_permit2_needs_both_operations_allowed() -> None:
    permit2 = {**UNLIMITED, "allowance_type": "permit2"}
    only_permit2 = {"id": "p2", "type": "allow_dangerous", "operations": ["permit2"]}
    assert judge([only_permit2], intent(**permit2)).codes == ("dangerous_operation",)
    unlimited = {"id": "unl", "type": "allow_dangerous", "operations": ["unlimited_allowance"]}
    assert judge([only_permit2, unlimited], intent(**permit2)).outcome == "allow"


def test_set_approval_for_all_is_dangerous_but_revoking_it_is_not() -> None:
    grant_all = {
        "kind": "allowance",
        "allowance_type": "set_approval_for_all",
        "asset": ODD,
        "spender": ROUTER,
        "unlimited": True,
    }
    assert judge([ALLOWANCES], intent(**grant_all)).codes == ("dangerous_operation",)
    assert judge([ALLOWANCES], intent(**{**grant_all, "unlimited": False})).outcome == "allow"


def test_eip7702_delegation_is_denied_unless_allowed() -> None:
    delegation = intent("delegation", spender=ROUTER)
    assert judge([PAY], delegation).codes == ("dangerous_operation",)
    rule = {"id": "7702", "type": "allow_dangerous", "operations": ["eip7702_delegation"], "spenders": [ROUTER]}
    assert judge([rule], delegation).outcome == "allow"


def test_allow_dangerous_does_not_permit_ordinary_payments() -> None:
    rule = {"id": "sign", "type": "allow_dangerous", "operations": ["message_signing"]}
    decision = judge([rule], pay(1))
    assert decision.codes == ("no_rule_allows",)
    (verdict,) = [v for v in decision.verdicts if v.rule_id == "sign"]
    assert verdict.verdict == "not_applicable"


def test_unlimited_allowance_is_not_measured_by_amount_rules() -> None:
    rules = [
        {"id": "unl", "type": "allow_dangerous", "operations": ["unlimited_allowance"]},
        {"id": "max", "type": "max_per_payment", "asset": "usdc", "max": 1},
    ]
    decision = judge(rules, intent(**UNLIMITED))
    assert decision.outcome == "allow"
    assert decision.debits == ()


APPROVE_LARGE = {"id": "large", "type": "require_approval", "asset": "usdc", "above": 1000, "group": "treasury", "m": 2}


@pytest.mark.parametrize(("amount", "outcome"), [(999, "allow"), (1000, "allow"), (1001, "needs_approval")])
def test_approval_required_above_an_amount(amount: int, outcome: str) -> None:
    assert judge([PAY, APPROVE_LARGE], pay(amount)).outcome == outcome


def test_approval_required_above_a_usd_amount_on_an_unpriced_asset_denies() -> None:
    rule = {"id": "large", "type": "require_approval", "above_usd": "100", "group": "treasury"}
    assert judge([PAY, rule], pay(1, asset=ODD)).codes == ("asset_unpriced",)


def test_approval_required_for_new_payees_only() -> None:
    rule = {"id": "new", "type": "require_approval", "new_payee": True, "group": "security", "m": 2}
    assert judge([PAY, rule], pay(1)).outcome == "needs_approval"
    assert judge([PAY, rule], pay(1), [spent(NOW, 1)]).outcome == "allow"


def test_approval_required_by_rule_for_some_kinds() -> None:
    rule = {"id": "allowances", "type": "require_approval", "kinds": ["allowance"], "group": "security"}
    bounded = intent(**{**UNLIMITED, "unlimited": False, "amount": 10})
    assert judge([ALLOWANCES, PAY, rule], bounded).outcome == "needs_approval"
    assert judge([ALLOWANCES, PAY, rule], pay(1)).outcome == "allow"


def test_needs_approval_only_when_nothing_denies() -> None:
    rules = [PAY, APPROVE_LARGE, {"id": "max", "type": "max_per_payment", "asset": "usdc", "max": 5000}]
    assert judge(rules, pay(5000)).outcome == "needs_approval"
    decision = judge(rules, pay(5001))
    assert decision.outcome == "deny"
    assert decision.codes == ("per_payment_max_exceeded",)


def test_needs_approval_keeps_the_constraints_and_combines_quorums() -> None:
    rules = [
        PAY,
        APPROVE_LARGE,
        {"id": "large-1", "type": "require_approval", "asset": "usdc", "above": 1000, "group": "treasury", "m": 1},
        {"id": "new", "type": "require_approval", "new_payee": True, "group": "security", "m": 1},
        {"id": "daily", "type": "cap", "asset": "usdc", "max": 10**9, "rolling": "24h"},
    ]
    decision = judge(rules, pay(2000))
    assert decision.outcome == "needs_approval"
    assert [(q.group, q.m) for q in decision.approvals] == [("treasury", 2), ("security", 1)]
    assert decision.quorum == decision.approvals[0]
    assert [c.rule_id for c in decision.constraints] == ["daily"]
    assert decision.codes == ("approval_required",) * 3


def test_grant_cap_naming_an_asset_the_policy_lacks_fails_closed() -> None:
    the_grant = grant({"id": "cap", "type": "cap", "asset": "btc", "max": 1, "rolling": "1h"})
    (reason,) = judge([PAY], pay(1), the_grant=the_grant).reasons
    assert (reason.code, reason.rule_id) == ("unknown_reference", "cap")


def test_grant_quorum_referring_to_an_unknown_group_fails_closed() -> None:
    the_grant = grant(
        {"id": "ok", "type": "require_approval", "group": "nobody"},
        {"id": "ok2", "type": "require_approval", "group": "security", "m": 3},
    )
    assert judge([PAY], pay(1), the_grant=the_grant).codes == ("unknown_reference", "unknown_reference")


def test_grant_narrows_with_its_own_caps_on_the_agents_own_spend() -> None:
    the_grant = grant({"id": "agent-daily", "type": "cap", "asset": "usdc", "max": 100, "rolling": "24h"})
    wallet_spend = [spent(NOW - timedelta(hours=1), 1000, agent_id="someone-else")]
    decision = judge([PAY], pay(100), wallet_spend, the_grant=the_grant)
    assert decision.outcome == "allow"
    (constraint,) = decision.constraints
    assert (constraint.source, constraint.agent_id) == ("grant", "agent-1")
    own_spend = [spent(NOW - timedelta(hours=1), 1, agent_id="agent-1")]
    (reason,) = judge([PAY], pay(100), own_spend, the_grant=the_grant).reasons
    assert (reason.code, reason.rule_id, reason.remaining) == ("cap_exceeded", "agent-daily", 99)


def test_grant_cannot_allow_what_the_policy_denies() -> None:
    permissive = grant(
        {"id": "anything", "type": "allow_transfers", "kinds": ["token_transfer", "allowance"]},
        {"id": "all", "type": "allow_dangerous", "operations": ["unlimited_allowance"]},
    )
    assert judge([], pay(1), the_grant=permissive).codes == ("no_rule_allows",)
    assert judge([ALLOWANCES], intent(**UNLIMITED), the_grant=permissive).codes == ("dangerous_operation",)


def test_grant_with_permit_rules_narrows_what_kinds_the_agent_may_sign() -> None:
    policy_rules = [PAY, {"id": "sign", "type": "allow_dangerous", "operations": ["message_signing"]}]
    narrow = grant({"id": "native-only", "type": "allow_transfers", "kinds": ["native_transfer"]})
    assert judge(policy_rules, pay(1, asset="native"), the_grant=narrow).outcome == "allow"
    assert judge(policy_rules, pay(1), the_grant=narrow).codes == ("no_rule_allows",)
    assert judge(policy_rules, intent("message"), the_grant=narrow).codes == ("message_signing_not_allowed",)


def test_grant_for_another_agent_or_wallet_denies() -> None:
    assert judge([PAY], pay(1), the_grant=grant(agent_id="agent-2")).codes == ("grant_mismatch",)
    assert judge([PAY], pay(1), the_grant=grant(wallet_id="w2")).codes == ("grant_mismatch",)
    assert judge([PAY], pay(1), the_grant=grant(wallet_id="w1")).outcome == "allow"


def test_naive_now_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        evaluate(policy(PAY), pay(1), MemorySpend(), datetime(2025, 1, 1))


def test_debits_name_every_counter_the_ledger_must_record() -> None:
    decision = judge([PAY], pay(3_000_000, max_gas_cost=7))
    assert {(d.counter, d.amount) for d in decision.debits} == {
        (f"{BASE}:{USDC}", 3_000_000),
        (f"{BASE}:native", 7),
        ("usd", 3_000_000),
        ("payments", 1),
    }
    native = judge([PAY], pay(10**18, asset="native", max_gas_cost=5))
    assert {(d.counter, d.amount) for d in native.debits} == {
        (f"{BASE}:native", 10**18 + 5),
        ("usd", 2500 * 10**6),
        ("payments", 1),
    }
    unpriced = judge([PAY], pay(1, asset=ODD))
    assert {d.counter for d in unpriced.debits} == {f"{BASE}:{ODD}", "payments"}


RULE_POOL = [
    {"id": "max", "type": "max_per_payment", "asset": "usdc", "max": 50},
    {"id": "cap", "type": "cap", "max_usd": "0.0001", "rolling": "1h"},
    {"id": "speed", "type": "velocity", "max_payments": 2, "period": "day"},
    {"id": "known", "type": "payee_allowlist", "payees": [{"address": ALICE}]},
    {"id": "bad", "type": "payee_denylist", "payees": [{"address": BOB}]},
    {"id": "ok", "type": "require_approval", "asset": "usdc", "above": 20, "group": "treasury"},
    {"id": "new", "type": "new_payee", "asset": "usdc", "max": 30},
]


@settings(max_examples=200, deadline=None)
@given(
    policy_rules=st.lists(st.sampled_from(RULE_POOL), unique_by=lambda r: r["id"]),
    grant_rules=st.lists(st.sampled_from(RULE_POOL), unique_by=lambda r: r["id"]),
    amount=st.integers(0, 120),
    payee=st.sampled_from([ALICE, BOB]),
    history=st.lists(
        st.tuples(st.integers(-7200, 0), st.integers(1, 60), st.sampled_from(["agent-1", "x"])), max_size=4
    ),
)
def test_a_grant_only_ever_narrows_the_policy(
    policy_rules: list[dict[str, object]],
    grant_rules: list[dict[str, object]],
    amount: int,
    payee: str,
    history: list[tuple[int, int, str]],
) -> None:
    records = [spent(NOW + timedelta(seconds=s), a, agent_id=who, usd=a) for s, a, who in history]
    the_policy = policy(PAY, *policy_rules)
    alone = judge(the_policy, pay(amount, payee=payee), records)
    both = judge(the_policy, pay(amount, payee=payee), records, the_grant=grant(*grant_rules))
    rank = {"allow": 0, "needs_approval": 1, "deny": 2}
    assert rank[both.outcome] >= rank[alone.outcome]
    if alone.outcome == "deny":
        assert set(alone.reasons) <= set(both.reasons)
