"""``evaluate``: judge one intent against a wallet's policy (and an agent's grant).

Pure: the spend history and the current time are passed in; nothing here reads a clock, a file,
a socket or a database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from policies._context import EvalContext
from policies.decision import (
    CumulativeConstraint,
    Debit,
    Decision,
    Quorum,
    Reason,
    RuleVerdict,
    Source,
    VerdictName,
)
from policies.document import Grant, Policy
from policies.intent import DangerousOperation, Intent, IntentKind
from policies.rules import AllowDangerous, AnyRule, RuleResult
from policies.spend import PAYMENTS_COUNTER, USD_COUNTER, SpendView, asset_counter

DEFAULT_RULE_ID = "default"
EXPIRY_RULE_ID = "expires_at"
GRANT_RULE_ID = "grant"

_NOT_PERMITTED_CODES = {
    IntentKind.CONTRACT_CALL: "contract_call_not_allowed",
    IntentKind.TYPED_DATA: "typed_data_not_allowed",
}


@dataclass
class _Tally:
    """Everything the rules of a policy (and a grant) said, in rule order."""

    verdicts: list[RuleVerdict] = field(default_factory=list)
    denials: list[Reason] = field(default_factory=list)
    approvals: list[Reason] = field(default_factory=list)
    permits: list[Reason] = field(default_factory=list)
    quorums: list[Quorum] = field(default_factory=list)
    constraints: list[CumulativeConstraint] = field(default_factory=list)

    def record(self, source: Source, rule_id: str, rule_type: str, result: RuleResult) -> None:
        self.verdicts.append(
            RuleVerdict(
                source=source,
                rule_id=rule_id,
                rule_type=rule_type,
                verdict=result.verdict,
                reasons=result.reasons,
            )
        )
        if result.verdict == "deny":
            self.denials += result.reasons
        elif result.verdict == "needs_approval":
            self.approvals += result.reasons
        if result.approval is not None:
            self.quorums.append(result.approval)
        self.constraints += result.constraints

    def pseudo(self, source: Source, rule_id: str, rule_type: str, denials: Sequence[Reason]) -> None:
        verdict: VerdictName = "deny" if denials else "pass"
        self.record(source, rule_id, rule_type, RuleResult(verdict, tuple(denials)))


def _reason(code: str, rule_id: str, message: str) -> Reason:
    return Reason(code=code, rule_id=rule_id, message=message)


def _judge_rules(tally: _Tally, ctx: EvalContext, rules: Sequence[AnyRule], *, permits_required: bool) -> None:
    intent = ctx.intent
    permitted_by: list[AnyRule] = []
    near_misses: list[Reason] = []
    covered: set[DangerousOperation] = set()
    for rule in rules:
        result = rule.verify(ctx)
        tally.record(ctx.source, rule.id, rule.type, result)
        if not rule.permit:
            continue
        if result.verdict == "allow":
            permitted_by.append(rule)
            if isinstance(rule, AllowDangerous):
                covered |= rule.operations & intent.dangerous_operations
        else:
            near_misses += result.reasons
    if not permits_required:
        return
    denials: list[Reason] = []
    for operation in sorted(intent.dangerous_operations - covered):
        if operation is DangerousOperation.MESSAGE_SIGNING:
            denials.append(
                _reason(
                    "message_signing_not_allowed",
                    DEFAULT_RULE_ID,
                    "signing messages is off unless an allow_dangerous rule allows message_signing",
                )
            )
        else:
            denials.append(
                _reason(
                    "dangerous_operation",
                    DEFAULT_RULE_ID,
                    f"{operation.value} is dangerous and off unless an allow_dangerous rule allows it",
                )
            )
    if not permitted_by and not denials:
        denials = near_misses or [
            _reason(
                _NOT_PERMITTED_CODES.get(intent.kind, "no_rule_allows"),
                DEFAULT_RULE_ID,
                f"no rule allows {_describe(intent)} (deny by default)",
            )
        ]
    tally.pseudo(ctx.source, DEFAULT_RULE_ID, "default", denials)
    if not denials:
        tally.permits += [
            _reason("allowed", rule.id, f"{_describe(intent)} is allowed by rule {rule.id!r}") for rule in permitted_by
        ]


def _describe(intent: Intent) -> str:
    if intent.kind is IntentKind.CONTRACT_CALL:
        return f"a call to {intent.target} (selector {intent.selector}) on chain {intent.chain_id}"
    if intent.kind is IntentKind.TYPED_DATA:
        return f"typed data {intent.primary_type!r} on chain {intent.chain_id}"
    return f"{intent.kind.value} on chain {intent.chain_id}"


def _expiry(tally: _Tally, source: Source, expires_at: datetime | None, now: datetime, code: str) -> None:
    if expires_at is None:
        return
    expired = now >= expires_at
    tally.pseudo(
        source,
        EXPIRY_RULE_ID,
        "expiry",
        [_reason(code, EXPIRY_RULE_ID, f"the {source} expired at {expires_at.isoformat()}")] if expired else [],
    )


def debits_of(ctx: EvalContext) -> tuple[Debit, ...]:
    """What the ledger records for this intent: asset counters, micro-USD and one payment."""
    intent = ctx.intent
    amounts: dict[str, int] = {}
    if intent.moves_value:
        amounts[ctx.principal_counter] = intent.amount
    if intent.max_gas_cost:
        native = asset_counter(intent.chain_id, "native")
        amounts[native] = amounts.get(native, 0) + intent.max_gas_cost
    if intent.moves_value:
        usd = ctx.principal_usd()
        if usd is not None:
            amounts[USD_COUNTER] = usd
        amounts[PAYMENTS_COUNTER] = 1
    return tuple(Debit(counter=counter, amount=amount) for counter, amount in amounts.items())


def _strictest(quorums: Sequence[Quorum]) -> tuple[Quorum, ...]:
    by_group: dict[str, int] = {}
    for quorum in quorums:
        by_group[quorum.group] = max(quorum.m, by_group.get(quorum.group, 0))
    ordered = sorted(by_group.items(), key=lambda item: (-item[1], item[0]))
    return tuple(Quorum(group=group, m=m) for group, m in ordered)


def evaluate(policy: Policy, intent: Intent, spend: SpendView, now: datetime, grant: Grant | None = None) -> Decision:
    """Judge ``intent`` against ``policy`` (and ``grant``) given the spend history at ``now``.

    Every rule is evaluated and every reason collected. Deny if any rule denies or nothing
    permits the intent; else needs_approval if any rule asks for approval; else allow. A grant's
    rules are evaluated against the agent's own spend and can only add denials or approvals.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    now = now.astimezone(UTC)  # all arithmetic on instants, never on local wall-clock times
    tally = _Tally()
    base = EvalContext(
        intent=intent,
        spend=spend,
        now=now,
        zone=ZoneInfo(policy.timezone),
        assets=policy.assets,
        groups=policy.approver_groups,
        source="policy",
        agent_scope=None,
    )
    _expiry(tally, "policy", policy.expires_at, now, "policy_expired")
    _judge_rules(tally, base, policy.rules, permits_required=True)
    if grant is not None:
        mismatch = []
        if grant.agent_id != intent.agent_id or grant.wallet_id not in (None, intent.wallet_id):
            mismatch.append(
                _reason(
                    "grant_mismatch",
                    GRANT_RULE_ID,
                    f"the grant is for agent {grant.agent_id!r}"
                    + (f" on wallet {grant.wallet_id!r}" if grant.wallet_id else "")
                    + f", not agent {intent.agent_id!r} on wallet {intent.wallet_id!r}",
                )
            )
        tally.pseudo("grant", GRANT_RULE_ID, "grant", mismatch)
        _expiry(tally, "grant", grant.expires_at, now, "grant_expired")
        scoped = EvalContext(
            intent=intent,
            spend=spend,
            now=now,
            zone=base.zone,
            assets=policy.assets,
            groups=policy.approver_groups,
            source="grant",
            agent_scope=grant.agent_id,
        )
        _judge_rules(tally, scoped, grant.rules, permits_required=any(rule.permit for rule in grant.rules))
    debits = debits_of(base)
    verdicts = tuple(tally.verdicts)
    if tally.denials:
        return Decision(outcome="deny", reasons=tuple(tally.denials), debits=debits, verdicts=verdicts)
    constraints = tuple(tally.constraints)
    if tally.approvals:
        approvals = _strictest(tally.quorums)
        return Decision(
            outcome="needs_approval",
            reasons=tuple(tally.approvals),
            quorum=approvals[0],
            approvals=approvals,
            constraints=constraints,
            debits=debits,
            verdicts=verdicts,
        )
    return Decision(
        outcome="allow",
        reasons=tuple(tally.permits),
        constraints=constraints,
        debits=debits,
        verdicts=verdicts,
    )
