"""The policy engine of Agent Custody: pure rules that judge every signing request.

No I/O: the current time and the spend history are passed in. Public API::

    evaluate(policy, intent, spend, now, grant=None) -> Decision
    limits(policy, spend, now, grant=None) -> tuple[Limit, ...]   (what may I spend?)
    load_policy(mapping) -> Policy          load_grant(mapping, policy=None) -> Grant
    policy_json_schema() -> dict            grant_json_schema() -> dict
"""

from policies._context import ApproverGroup, AssetSpec
from policies._values import MICRO_USD, NATIVE, usd_value
from policies.decision import CumulativeConstraint, Debit, Decision, Quorum, Reason, RuleVerdict
from policies.document import (
    SCHEMA_VERSION,
    Grant,
    Policy,
    PolicyValidationError,
    grant_json_schema,
    load_grant,
    load_policy,
    policy_json_schema,
)
from policies.engine import evaluate
from policies.intent import AllowanceType, DangerousOperation, Intent, IntentKind, TypedDataDomain
from policies.limits import Limit, limits
from policies.memory import MemorySpend
from policies.spend import PAYMENTS_COUNTER, USD_COUNTER, SpendRecord, SpendView, asset_counter

__all__ = [
    "MICRO_USD",
    "NATIVE",
    "PAYMENTS_COUNTER",
    "SCHEMA_VERSION",
    "USD_COUNTER",
    "AllowanceType",
    "ApproverGroup",
    "AssetSpec",
    "CumulativeConstraint",
    "DangerousOperation",
    "Debit",
    "Decision",
    "Grant",
    "Intent",
    "IntentKind",
    "Limit",
    "MemorySpend",
    "Policy",
    "PolicyValidationError",
    "Quorum",
    "Reason",
    "RuleVerdict",
    "SpendRecord",
    "SpendView",
    "TypedDataDomain",
    "asset_counter",
    "evaluate",
    "grant_json_schema",
    "limits",
    "load_grant",
    "load_policy",
    "policy_json_schema",
    "usd_value",
]
