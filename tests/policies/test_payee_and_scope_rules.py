"""Payee lists, new payees, chains, assets, time windows, expiry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.policies.helpers import (
    ALICE,
    BASE,
    BOB,
    DAI,
    EVE,
    MS,
    NOW,
    ODD,
    PAY,
    USDC,
    grant,
    intent,
    judge,
    pay,
    policy,
    spent,
)

ALLOW = {"id": "known", "type": "payee_allowlist", "payees": [{"address": ALICE, "label": "API vendor"}]}
DENY = {"id": "blocked", "type": "payee_denylist", "payees": [{"address": EVE, "label": "scam"}, {"address": BOB}]}


def test_allowlisted_payee_passes_with_its_label() -> None:
    decision = judge([PAY, ALLOW], pay(1, payee=ALICE.upper().replace("0X", "0x")))
    assert decision.outcome == "allow"
    (verdict,) = [v for v in decision.verdicts if v.rule_id == "known"]
    assert verdict.reasons[0].code == "payee_allowlisted"
    assert "API vendor" in verdict.reasons[0].message


def test_payee_not_on_the_allowlist_is_denied() -> None:
    (reason,) = judge([PAY, ALLOW], pay(1, payee=BOB)).reasons
    assert (reason.code, reason.rule_id) == ("payee_not_allowlisted", "known")


def test_allowlist_applies_to_the_spender_of_an_allowance() -> None:
    rules = [{"id": "pay", "type": "allow_transfers", "kinds": ["allowance"]}, ALLOW]
    approve = intent("allowance", allowance_type="erc20_approve", asset=USDC, amount=5, spender=BOB)
    assert judge(rules, approve).codes == ("payee_not_allowlisted",)


def test_denylisted_payee_is_denied_with_its_label() -> None:
    (reason,) = judge([PAY, DENY], pay(1, payee=EVE)).reasons
    assert reason.code == "payee_denylisted"
    assert "scam" in reason.message
    (reason,) = judge([PAY, DENY], pay(1, payee=BOB)).reasons
    assert "no label" in reason.message


def test_denylist_also_covers_the_contract_called() -> None:
    rules = [{"id": "call", "type": "allow_contract_call", "contract": EVE, "selector": "0x12345678"}, DENY]
    assert judge(rules, intent("contract_call", target=EVE, selector="0x12345678")).codes == ("payee_denylisted",)


def test_denylist_passes_other_payees() -> None:
    assert judge([PAY, DENY], pay(1, payee=ALICE)).outcome == "allow"


def test_lists_do_not_apply_without_a_counterparty() -> None:
    rules = [{"id": "d", "type": "allow_dangerous", "operations": ["message_signing"]}, ALLOW]
    assert judge(rules, intent("message")).outcome == "allow"


NEW_CAP = {"id": "new", "type": "new_payee", "asset": "usdc", "max": 5}
NEW_APPROVAL = {"id": "new-ok", "type": "new_payee", "approval": {"group": "treasury", "m": 2}}


@pytest.mark.parametrize(("amount", "outcome"), [(4, "allow"), (5, "allow"), (6, "deny")])
def test_first_payment_to_a_new_payee_has_a_lower_maximum(amount: int, outcome: str) -> None:
    decision = judge([PAY, NEW_CAP], pay(amount))
    assert decision.outcome == outcome
    if outcome == "deny":
        assert decision.reasons[0].code == "new_payee_max_exceeded"


def test_lower_maximum_does_not_apply_to_a_payee_paid_before() -> None:
    assert judge([PAY, NEW_CAP], pay(6), [spent(NOW - timedelta(days=300), 1, payee=ALICE)]).outcome == "allow"


def test_new_payee_usd_limit_on_an_unpriced_asset_denies() -> None:
    rule = {"id": "new", "type": "new_payee", "max_usd": "5"}
    assert judge([PAY, rule], pay(1, asset=ODD)).codes == ("asset_unpriced",)


def test_new_payee_limit_in_another_asset_does_not_apply() -> None:
    assert judge([PAY, NEW_CAP], pay(10**20, asset=DAI)).outcome == "allow"


def test_first_payment_to_a_new_payee_needs_approval() -> None:
    decision = judge([PAY, NEW_APPROVAL], pay(1))
    assert decision.outcome == "needs_approval"
    assert decision.quorum is not None
    assert (decision.quorum.group, decision.quorum.m) == ("treasury", 2)
    assert decision.reasons[0].code == "approval_required"
    assert judge([PAY, NEW_APPROVAL], pay(1), [spent(NOW, 1, payee=ALICE)]).outcome == "allow"


def test_new_payee_with_limit_and_approval_denies_over_and_holds_under() -> None:
    rule = {**NEW_CAP, "approval": {"group": "security", "m": 1}}
    assert judge([PAY, rule], pay(6)).codes == ("new_payee_max_exceeded",)
    assert judge([PAY, rule], pay(5)).outcome == "needs_approval"


def test_only_allowed_chains() -> None:
    rule = {"id": "chains", "type": "chains", "chain_ids": [BASE]}
    assert judge([PAY, rule], pay(1)).outcome == "allow"
    (reason,) = judge([PAY, rule], pay(1, chain_id=1)).reasons
    assert (reason.code, reason.rule_id) == ("chain_not_allowed", "chains")


def test_only_allowed_assets() -> None:
    rule = {"id": "assets", "type": "assets", "assets": ["usdc", "eth"]}
    assert judge([PAY, rule], pay(1)).outcome == "allow"
    assert judge([PAY, rule], pay(1, asset="native")).outcome == "allow"
    assert judge([PAY, rule], pay(1, asset=DAI)).codes == ("asset_not_allowed",)
    # The same token address on another chain is another asset.
    assert judge([PAY, rule], pay(1, chain_id=1)).codes == ("asset_not_allowed",)


def test_allowed_assets_ignores_requests_without_an_asset() -> None:
    rules = [
        {"id": "assets", "type": "assets", "assets": ["usdc"]},
        {"id": "td", "type": "allow_typed_data", "primary_type": "Order"},
    ]
    assert judge(rules, intent("typed_data", domain={"name": "X"}, primary_type="Order")).outcome == "allow"


def test_grant_naming_an_asset_the_policy_lacks_fails_closed() -> None:
    the_grant = grant({"id": "only", "type": "assets", "assets": ["usdc", "nope"]})
    assert judge([PAY], pay(1, asset=DAI), the_grant=the_grant).codes == ("unknown_reference",)
    assert judge([PAY], pay(1), the_grant=the_grant).outcome == "allow"


OFFICE = {
    "id": "hours",
    "type": "time_window",
    "days": ["mon", "tue", "wed", "thu", "fri"],
    "start": "09:00",
    "end": "17:00",
    "timezone": "Europe/Paris",
}


@pytest.mark.parametrize(
    ("now", "outcome"),
    [
        (datetime(2025, 3, 12, 8, 0, tzinfo=UTC) - MS, "deny"),  # 08:59:59.999 Paris (UTC+1)
        (datetime(2025, 3, 12, 8, 0, tzinfo=UTC), "allow"),  # 09:00 Paris
        (datetime(2025, 3, 12, 16, 0, tzinfo=UTC) - MS, "allow"),  # 16:59:59.999
        (datetime(2025, 3, 12, 16, 0, tzinfo=UTC), "deny"),  # 17:00: end is exclusive
    ],
)
def test_time_window_edges(now: datetime, outcome: str) -> None:
    assert judge([PAY, OFFICE], pay(1), now=now).outcome == outcome


def test_outside_time_window_says_when_it_opens_next() -> None:
    friday_evening = datetime(2025, 3, 14, 18, 0, tzinfo=UTC)
    (reason,) = judge([PAY, OFFICE], pay(1), now=friday_evening).reasons
    assert reason.code == "outside_time_window"
    assert reason.resets_at == datetime(2025, 3, 17, 8, 0, tzinfo=UTC)  # Monday 09:00 Paris


def test_time_window_follows_daylight_saving_time() -> None:
    # Paris moves to UTC+2 on 30 March 2025: 09:00 is then 07:00 UTC.
    assert judge([PAY, OFFICE], pay(1), now=datetime(2025, 3, 31, 7, 0, tzinfo=UTC)).outcome == "allow"
    assert judge([PAY, OFFICE], pay(1), now=datetime(2025, 3, 31, 7, 0, tzinfo=UTC) - MS).outcome == "deny"


def test_overnight_window_belongs_to_the_day_it_starts() -> None:
    night = {"id": "night", "type": "time_window", "days": ["fri"], "start": "22:00", "end": "06:00"}
    saturday_early = datetime(2025, 3, 15, 5, 59, tzinfo=UTC)
    assert judge([PAY, night], pay(1), now=saturday_early).outcome == "allow"
    assert judge([PAY, night], pay(1), now=datetime(2025, 3, 15, 6, 0, tzinfo=UTC)).outcome == "deny"
    (reason,) = judge([PAY, night], pay(1), now=datetime(2025, 3, 14, 6, 0, tzinfo=UTC)).reasons
    assert reason.resets_at == datetime(2025, 3, 14, 22, 0, tzinfo=UTC)


def test_policy_expiry_edges() -> None:
    expires = NOW.isoformat()
    expiring = policy(PAY, expires_at=expires)
    assert judge(expiring, pay(1), now=NOW - MS).outcome == "allow"
    (reason,) = judge(expiring, pay(1), now=NOW).reasons
    assert (reason.code, reason.rule_id) == ("policy_expired", "expires_at")


def test_grant_expiry() -> None:
    the_grant = grant(expires_at=(NOW + MS).isoformat())
    assert judge([PAY], pay(1), the_grant=the_grant).outcome == "allow"
    assert judge([PAY], pay(1), now=NOW + MS, the_grant=the_grant).codes == ("grant_expired",)


VALIDITY = {"id": "short", "type": "max_validity", "max": "10m"}


@pytest.mark.parametrize(
    ("valid_for", "outcome"),
    [(timedelta(minutes=10) - MS, "allow"), (timedelta(minutes=10), "allow"), (timedelta(minutes=10) + MS, "deny")],
)
def test_authorizations_must_expire_within_the_maximum_validity(valid_for: timedelta, outcome: str) -> None:
    rules = [{"id": "x402", "type": "allow_transfers", "kinds": ["payment_authorization"]}, VALIDITY]
    authorization = intent("payment_authorization", asset=USDC, amount=1, payee=ALICE, valid_before=NOW + valid_for)
    decision = judge(rules, authorization)
    assert decision.outcome == outcome
    if outcome == "deny":
        assert decision.codes == ("validity_too_long",)


def test_a_permit_that_never_expires_is_too_long_but_an_approve_call_is_not_measured() -> None:
    rules = [{"id": "a", "type": "allow_transfers", "kinds": ["allowance"]}, VALIDITY]
    permit = intent("allowance", allowance_type="eip2612_permit", asset=USDC, amount=1, spender=BOB)
    assert judge(rules, permit).codes == ("validity_too_long",)
    approve = intent("allowance", allowance_type="erc20_approve", asset=USDC, amount=1, spender=BOB)
    assert judge(rules, approve).outcome == "allow"
