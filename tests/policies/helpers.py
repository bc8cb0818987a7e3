"""Builders shared by the engine tests: a policy from rules, intents, and spend records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from policies import Decision, Intent, MemorySpend, SpendRecord, evaluate, load_policy
from policies.document import Grant, Policy, load_grant

USDC = "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"
DAI = "0x50c5725949a6f0c72e6c4a641f24049a917db0cb"
ODD = "0x00000000000000000000000000000000000000aa"  # an unpriced token
ALICE = "0x" + "a1" * 20
BOB = "0x" + "b0" * 20
EVE = "0x" + "ee" * 20
ROUTER = "0x" + "c0" * 20
BASE = 8453
NOW = datetime(2025, 3, 12, 15, 30, tzinfo=UTC)  # a Wednesday
MS = timedelta(milliseconds=1)

ASSETS: dict[str, Any] = {
    "usdc": {"chain_id": BASE, "address": USDC, "decimals": 6, "usd_price": "1"},
    "dai": {"chain_id": BASE, "address": DAI, "decimals": 18, "usd_price": "0.9998"},
    "eth": {"chain_id": BASE, "address": "native", "decimals": 18, "usd_price": "2500"},
    "odd": {"chain_id": BASE, "address": ODD, "decimals": 0},
}
GROUPS: dict[str, Any] = {
    "treasury": {"members": ["ana", "ben", "cy"]},
    "security": {"members": ["sam", "sue"]},
}
PAY = {"id": "pay", "type": "allow_transfers"}


def policy(*rules: dict[str, Any], **fields: Any) -> Policy:
    document: dict[str, Any] = {
        "schema_version": 1,
        "assets": ASSETS,
        "approver_groups": GROUPS,
        "rules": list(rules),
    }
    document.update(fields)
    return load_policy(document)


def grant(*rules: dict[str, Any], agent_id: str = "agent-1", **fields: Any) -> Grant:
    return load_grant({"schema_version": 1, "agent_id": agent_id, "rules": list(rules), **fields})


def pay(amount: int, *, asset: str = USDC, payee: str = ALICE, **fields: Any) -> Intent:
    """A token payment (or a native transfer with asset="native")."""
    kind = "native_transfer" if asset == "native" else "token_transfer"
    values: dict[str, Any] = {
        "kind": kind,
        "chain_id": BASE,
        "wallet_id": "w1",
        "agent_id": "agent-1",
        "asset": asset,
        "amount": amount,
        "payee": payee,
    }
    values.update(fields)
    return Intent(**values)


def intent(kind: str, **fields: Any) -> Intent:
    values: dict[str, Any] = {"kind": kind, "chain_id": BASE, "wallet_id": "w1", "agent_id": "agent-1"}
    values.update(fields)
    return Intent(**values)


def spent(
    at: datetime,
    amount: int,
    *,
    counter: str = f"{BASE}:{USDC}",
    payee: str | None = ALICE,
    agent_id: str | None = "agent-1",
    usd: int | None = None,
) -> SpendRecord:
    debits = {counter: amount, "payments": 1}
    if usd is not None:
        debits["usd"] = usd
    return SpendRecord(at=at, debits=debits, payee=payee, agent_id=agent_id)


def judge(
    rules_or_policy: Policy | list[dict[str, Any]],
    the_intent: Intent,
    records: list[SpendRecord] | None = None,
    now: datetime = NOW,
    the_grant: Grant | None = None,
) -> Decision:
    the_policy = rules_or_policy if isinstance(rules_or_policy, Policy) else policy(*rules_or_policy)
    return evaluate(the_policy, the_intent, MemorySpend(records or []), now, the_grant)
