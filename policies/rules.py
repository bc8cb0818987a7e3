"""The rules: small frozen models, each with ``verify(ctx) -> RuleResult``.

Two families (see docs/policies.md):

* **Permit rules** (``allow_transfers``, ``allow_contract_call``, ``allow_typed_data``,
  ``allow_dangerous``) say what may be signed at all. An intent needs at least one permit rule
  that matches it; otherwise it is denied (deny by default).
* **Constraint rules** (everything else) limit what is permitted. Every one is evaluated and
  every failure is reported; any ``deny`` denies, any ``needs_approval`` holds the intent for
  approval when nothing denies.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, ClassVar, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies._context import EvalContext
from policies._values import Address, Amount, Duration, Selector, TimeZoneName, UsdAmount
from policies.decision import CumulativeConstraint, Quorum, Reason, VerdictName
from policies.intent import AllowanceType, DangerousOperation, IntentKind
from policies.spend import PAYMENTS_COUNTER, USD_COUNTER
from policies.windows import Period, calendar_window, rolling_window

RuleId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
TransferKind = Literal["native_transfer", "token_transfer", "payment_authorization", "allowance"]


@dataclass(frozen=True)
class RuleResult:
    """A rule's verdict with its reasons, the cumulative limits it relied on, and any quorum."""

    verdict: VerdictName
    reasons: tuple[Reason, ...] = ()
    constraints: tuple[CumulativeConstraint, ...] = ()
    approval: Quorum | None = None


NOT_APPLICABLE = RuleResult("not_applicable")
PASS = RuleResult("pass")
NO_MATCH = RuleResult("no_match")


class Rule(BaseModel):
    """Base of every rule: an ``id`` unique in its document and an optional description."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    permit: ClassVar[bool] = False

    id: RuleId
    description: str | None = None

    def verify(self, ctx: EvalContext) -> RuleResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def reason(self, code: str, message: str, **figures: object) -> Reason:
        return Reason.model_validate({"code": code, "rule_id": self.id, "message": message, **figures})

    def deny(self, code: str, message: str, **figures: object) -> RuleResult:
        return RuleResult("deny", (self.reason(code, message, **figures),))


# --------------------------------------------------------------------------- measuring amounts


@dataclass(frozen=True)
class Measure:
    """What an amount rule measures for this intent: a counter and the amount this intent adds."""

    counter: str
    amount: int


class AmountLimit(Rule):
    """Mixin: a limit either in an asset's base units (``asset`` + ``max``) or in USD (``max_usd``)."""

    limit_required: ClassVar[bool] = True

    asset: str | None = Field(default=None, description="An asset name from the policy's assets table.")
    max: Amount | None = None
    max_usd: UsdAmount | None = None

    @model_validator(mode="after")
    def _one_limit(self) -> AmountLimit:
        if self.max_usd is not None:
            if self.asset is not None or self.max is not None:
                raise ValueError("give either a USD amount, or an asset and an amount, not both")
        elif (self.asset is None) != (self.max is None):
            raise ValueError("an asset limit needs both the asset and the amount")
        elif self.asset is None and self.limit_required:
            raise ValueError("give either a USD amount, or an asset and an amount")
        return self

    @property
    def has_limit(self) -> bool:
        return self.max is not None or self.max_usd is not None

    @property
    def limit(self) -> int:
        return self.max if self.max is not None else self.max_usd  # type: ignore[return-value]  # one is set (validator)

    def measure(self, ctx: EvalContext) -> Measure | RuleResult:
        """The measure, or a result when the rule cannot apply (not applicable / unpriced)."""
        if self.asset is None:
            if not ctx.intent.moves_value:
                return NOT_APPLICABLE
            usd = ctx.principal_usd()
            if usd is None:
                return self.deny(
                    "asset_unpriced",
                    f"{ctx.intent.asset} on chain {ctx.intent.chain_id} has no USD price, "
                    "so a USD limit cannot be checked",
                    counter=USD_COUNTER,
                    limit=self.limit,
                )
            return Measure(USD_COUNTER, usd)
        spec = ctx.assets.get(self.asset)
        if spec is None:
            return self.deny("unknown_reference", f"asset {self.asset!r} is not in the policy's assets")
        amount = ctx.debit_in(spec.counter)
        if amount == 0:
            return NOT_APPLICABLE
        return Measure(spec.counter, amount)


def _unit(counter: str) -> str:
    return "micro-USD" if counter == USD_COUNTER else f"base units of {counter}"


class WindowSpec(BaseModel):
    """Mixin: a rolling window (``rolling: "24h"``) or a calendar period (``period: day``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rolling: Duration | None = None
    period: Period | None = None
    timezone: TimeZoneName | None = Field(
        default=None, description="For calendar periods; defaults to the policy's time zone."
    )

    @model_validator(mode="after")
    def _one_window(self) -> WindowSpec:
        if (self.rolling is None) == (self.period is None):
            raise ValueError('give exactly one of rolling (e.g. "24h") or period (day, week, month)')
        if self.timezone is not None and self.period is None:
            raise ValueError("timezone applies only to a calendar period")
        return self

    def window(self, ctx: EvalContext) -> tuple[datetime, datetime]:
        if self.rolling is not None:
            return rolling_window(ctx.now, self.rolling)
        zone = ZoneInfo(self.timezone) if self.timezone is not None else ctx.zone
        return calendar_window(ctx.now, self.period, zone)  # type: ignore[arg-type]  # set (validator)

    def resets_at(self, ctx: EvalContext, counter: str, start: datetime, end: datetime, excess: int) -> datetime | None:
        """When ``excess`` of the window's spend has freed up (rolling) or the period ends."""
        if self.rolling is None:
            return end
        reached = ctx.spend.reached_at(counter, start, end, excess, agent_id=ctx.agent_scope)
        return None if reached is None else reached + self.rolling

    @property
    def window_text(self) -> str:
        return f"rolling {self.rolling}" if self.rolling is not None else f"calendar {self.period}"

    def check_cumulative(
        self, rule: Rule, ctx: EvalContext, counter: str, amount: int, limit: int, code: str
    ) -> RuleResult:
        start, end = self.window(ctx)
        spent = ctx.spend.total(counter, start, end, agent_id=ctx.agent_scope)
        if spent + amount > limit:
            excess = spent + amount - limit
            resets = None if amount > limit else self.resets_at(ctx, counter, start, end, excess)
            return rule.deny(
                code,
                f"{spent} + {amount} would exceed {limit} {_unit(counter)} ({self.window_text} window)",
                counter=counter,
                limit=limit,
                remaining=max(0, limit - spent),
                resets_at=resets,
            )
        constraint = CumulativeConstraint(
            rule_id=rule.id,
            source=ctx.source,
            counter=counter,
            agent_id=ctx.agent_scope,
            window_start=start,
            window_end=end,
            limit=limit,
            amount=amount,
        )
        return RuleResult("pass", constraints=(constraint,))


class ApprovalSpec(BaseModel):
    """M approvals from a named group (used as a mixin and as a nested field)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    group: str
    m: int = Field(default=1, ge=1)

    def quorum_result(self, rule: Rule, ctx: EvalContext, why: str) -> RuleResult:
        group = ctx.groups.get(self.group)
        if group is None:
            return rule.deny("unknown_reference", f"approver group {self.group!r} is not in the policy")
        if self.m > len(group.members):
            return rule.deny(
                "unknown_reference",
                f"approver group {self.group!r} has fewer than {self.m} members",
            )
        return RuleResult(
            "needs_approval",
            (rule.reason("approval_required", f"{why}: needs {self.m} of group {self.group!r}"),),
            approval=Quorum(group=self.group, m=self.m),
        )


# --------------------------------------------------------------------------- permit rules


class AllowTransfers(Rule):
    """Permits payments of the listed kinds (other rules still limit them)."""

    permit: ClassVar[bool] = True
    type: Literal["allow_transfers"] = "allow_transfers"
    kinds: frozenset[TransferKind] = frozenset({"native_transfer", "token_transfer", "payment_authorization"})

    def verify(self, ctx: EvalContext) -> RuleResult:
        return RuleResult("allow") if ctx.intent.kind.value in self.kinds else NO_MATCH


class ArgumentConstraint(BaseModel):
    """A constraint on a static ABI argument (a 32-byte word) of the call, by position."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0, le=63)
    max: Amount | None = Field(default=None, description="The argument, as uint256, is at most this.")
    equals: Address | None = Field(default=None, description="The argument is exactly this address.")

    @model_validator(mode="after")
    def _one_check(self) -> ArgumentConstraint:
        if (self.max is None) == (self.equals is None):
            raise ValueError("give exactly one of max or equals")
        return self

    def failure(self, calldata: bytes) -> str | None:
        start = 4 + 32 * self.index
        word = calldata[start : start + 32]
        if len(word) < 32:
            return f"argument {self.index} is missing from the calldata"
        value = int.from_bytes(word, "big")
        if self.max is not None:
            return None if value <= self.max else f"argument {self.index} is {value}, above {self.max}"
        if word[:12] == bytes(12) and "0x" + word[12:].hex() == self.equals:
            return None
        return f"argument {self.index} is not {self.equals}"


class AllowContractCall(Rule):
    """Permits calls to one function of one contract, optionally constraining its arguments."""

    permit: ClassVar[bool] = True
    type: Literal["allow_contract_call"] = "allow_contract_call"
    contract: Address
    selector: Selector
    chain_ids: frozenset[int] | None = None
    args: tuple[ArgumentConstraint, ...] = ()

    def verify(self, ctx: EvalContext) -> RuleResult:
        intent = ctx.intent
        if intent.target != self.contract or intent.selector != self.selector:
            return NO_MATCH
        if self.chain_ids is not None and intent.chain_id not in self.chain_ids:
            return NO_MATCH
        calldata = bytes.fromhex((intent.calldata or "0x")[2:])
        failures = [msg for arg in self.args if (msg := arg.failure(calldata)) is not None]
        if failures:
            return RuleResult(
                "no_match",
                tuple(self.reason("call_argument_not_allowed", msg) for msg in failures),
            )
        return RuleResult("allow")


class DomainMatch(BaseModel):
    """The EIP-712 domain fields to match; fields left out match anything."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = None
    version: str | None = None
    chain_id: int | None = None
    verifying_contract: Address | None = None


class AllowTypedData(Rule):
    """Permits EIP-712 documents of one primary type in a matching domain."""

    permit: ClassVar[bool] = True
    type: Literal["allow_typed_data"] = "allow_typed_data"
    primary_type: str
    domain: DomainMatch = DomainMatch()

    def verify(self, ctx: EvalContext) -> RuleResult:
        intent = ctx.intent
        if intent.domain is None or intent.primary_type != self.primary_type:
            return NO_MATCH
        wanted = self.domain.model_dump(exclude_none=True)
        actual = intent.domain.model_dump()
        if any(actual[key] != value for key, value in wanted.items()):
            return NO_MATCH
        return RuleResult("allow")


class AllowDangerous(Rule):
    """Explicitly allows dangerous operations, optionally only for some spenders and chains.

    An intent with dangerous operations is refused unless every one of them is named by some
    ``allow_dangerous`` rule whose scope matches; such rules also permit the intent.
    """

    permit: ClassVar[bool] = True
    type: Literal["allow_dangerous"] = "allow_dangerous"
    operations: frozenset[DangerousOperation] = Field(min_length=1)
    spenders: frozenset[Address] | None = Field(
        default=None, description="Only when the spender (or delegate, or payee) is one of these."
    )
    chain_ids: frozenset[int] | None = None

    def in_scope(self, ctx: EvalContext) -> bool:
        intent = ctx.intent
        if self.chain_ids is not None and intent.chain_id not in self.chain_ids:
            return False
        return self.spenders is None or intent.counterparty in self.spenders

    def verify(self, ctx: EvalContext) -> RuleResult:
        operations = ctx.intent.dangerous_operations
        if not operations:
            return NOT_APPLICABLE
        if self.in_scope(ctx) and operations & self.operations:
            return RuleResult("allow")
        return NO_MATCH


# --------------------------------------------------------------------------- constraint rules


class MaxPerPayment(AmountLimit):
    """A single payment is at most ``max`` of an asset (gas included for the native coin), or
    ``max_usd``."""

    type: Literal["max_per_payment"] = "max_per_payment"

    def verify(self, ctx: EvalContext) -> RuleResult:
        measure = self.measure(ctx)
        if isinstance(measure, RuleResult):
            return measure
        if measure.amount > self.limit:
            return self.deny(
                "per_payment_max_exceeded",
                f"{measure.amount} is above the per-payment maximum of {self.limit} {_unit(measure.counter)}",
                counter=measure.counter,
                limit=self.limit,
            )
        return PASS


class Cap(AmountLimit, WindowSpec):
    """Cumulative spend (posted and pending) in a window stays within the limit."""

    type: Literal["cap"] = "cap"

    def verify(self, ctx: EvalContext) -> RuleResult:
        measure = self.measure(ctx)
        if isinstance(measure, RuleResult):
            return measure
        return self.check_cumulative(self, ctx, measure.counter, measure.amount, self.limit, "cap_exceeded")


class Velocity(WindowSpec, Rule):
    """At most ``max_payments`` payments in the window."""

    type: Literal["velocity"] = "velocity"
    max_payments: int = Field(ge=1)

    def verify(self, ctx: EvalContext) -> RuleResult:
        if not ctx.intent.moves_value:
            return NOT_APPLICABLE
        return self.check_cumulative(self, ctx, PAYMENTS_COUNTER, 1, self.max_payments, "velocity_exceeded")


class Payee(BaseModel):
    """An address with a label a person recognises."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: Address
    label: str | None = None


class PayeeAllowlist(Rule):
    """The payee (or spender) must be one of these."""

    type: Literal["payee_allowlist"] = "payee_allowlist"
    payees: tuple[Payee, ...] = Field(min_length=1)

    def verify(self, ctx: EvalContext) -> RuleResult:
        counterparty = ctx.intent.counterparty
        if counterparty is None:
            return NOT_APPLICABLE
        for payee in self.payees:
            if payee.address == counterparty:
                return RuleResult("pass", (self.reason("payee_allowlisted", f"{counterparty} is {payee.label}"),))
        return self.deny("payee_not_allowlisted", f"{counterparty} is not on the payee allowlist")


class PayeeDenylist(Rule):
    """Never pay, approve, or call these addresses."""

    type: Literal["payee_denylist"] = "payee_denylist"
    payees: tuple[Payee, ...] = Field(min_length=1)

    def verify(self, ctx: EvalContext) -> RuleResult:
        parties = {ctx.intent.counterparty, ctx.intent.target}
        hits = [payee for payee in self.payees if payee.address in parties]
        if not hits:
            return PASS
        return RuleResult(
            "deny",
            tuple(
                self.reason("payee_denylisted", f"{hit.address} ({hit.label or 'no label'}) is denylisted")
                for hit in hits
            ),
        )


class NewPayee(AmountLimit):
    """A first payment to an address never paid before: a lower maximum and/or an approval."""

    limit_required: ClassVar[bool] = False
    type: Literal["new_payee"] = "new_payee"
    approval: ApprovalSpec | None = None

    @model_validator(mode="after")
    def _something(self) -> NewPayee:
        if not self.has_limit and self.approval is None:
            raise ValueError("give a limit (asset and max, or max_usd), an approval, or both")
        return self

    def verify(self, ctx: EvalContext) -> RuleResult:
        if not ctx.is_new_payee():
            return NOT_APPLICABLE
        if self.has_limit:
            measure = self.measure(ctx)
            if isinstance(measure, Measure) and measure.amount > self.limit:
                return self.deny(
                    "new_payee_max_exceeded",
                    f"{measure.amount} is above {self.limit} {_unit(measure.counter)}, the maximum "
                    f"for a first payment to {ctx.intent.counterparty}",
                    counter=measure.counter,
                    limit=self.limit,
                )
            if isinstance(measure, RuleResult) and measure.verdict == "deny":
                return measure
        if self.approval is None:
            return PASS
        return self.approval.quorum_result(self, ctx, f"first payment to {ctx.intent.counterparty}")


class AllowedChains(Rule):
    """Only these chains."""

    type: Literal["chains"] = "chains"
    chain_ids: frozenset[int] = Field(min_length=1)

    def verify(self, ctx: EvalContext) -> RuleResult:
        if ctx.intent.chain_id in self.chain_ids:
            return PASS
        return self.deny("chain_not_allowed", f"chain {ctx.intent.chain_id} is not allowed")


ASSET_KINDS = frozenset({IntentKind.TOKEN_TRANSFER, IntentKind.ALLOWANCE, IntentKind.PAYMENT_AUTHORIZATION})


class AllowedAssets(Rule):
    """Only these assets (names from the policy's assets table) may be paid, approved or authorized."""

    type: Literal["assets"] = "assets"
    assets: frozenset[str] = Field(min_length=1)

    def verify(self, ctx: EvalContext) -> RuleResult:
        intent = ctx.intent
        if intent.kind not in ASSET_KINDS and intent.amount == 0:
            return NOT_APPLICABLE
        counters = {ctx.assets[name].counter for name in self.assets if name in ctx.assets}
        unknown = sorted(name for name in self.assets if name not in ctx.assets)
        if ctx.principal_counter in counters:
            return PASS
        if unknown:
            return self.deny("unknown_reference", f"assets {unknown} are not in the policy's assets")
        return self.deny("asset_not_allowed", f"{intent.asset} on chain {intent.chain_id} is not an allowed asset")


class TimeWindow(Rule):
    """Only on these days, between ``start`` and ``end`` local time (``end`` exclusive; a window
    with ``end`` before ``start`` runs overnight and belongs to the day it starts)."""

    type: Literal["time_window"] = "time_window"
    days: frozenset[Weekday] = frozenset(WEEKDAYS)
    start: time
    end: time
    timezone: TimeZoneName | None = None

    @model_validator(mode="after")
    def _distinct(self) -> TimeWindow:
        if self.start == self.end:
            raise ValueError("start and end must differ")
        if not self.days:
            raise ValueError("days must not be empty")
        return self

    def _opens(self, day: date, zone: ZoneInfo) -> tuple[datetime, datetime] | None:
        if WEEKDAYS[day.weekday()] not in self.days:
            return None
        opens = datetime.combine(day, self.start, tzinfo=zone)
        closes_day = day if self.end > self.start else day + timedelta(days=1)
        return opens, datetime.combine(closes_day, self.end, tzinfo=zone)

    def verify(self, ctx: EvalContext) -> RuleResult:
        zone = ZoneInfo(self.timezone) if self.timezone is not None else ctx.zone
        today = ctx.now.astimezone(zone).date()
        next_open: datetime | None = None
        for offset in range(-1, 8):
            window = self._opens(today + timedelta(days=offset), zone)
            if window is None:
                continue
            opens, closes = window
            if opens <= ctx.now < closes:
                return PASS
            if opens > ctx.now and next_open is None:
                next_open = opens.astimezone(UTC)
        return self.deny(
            "outside_time_window",
            f"signing is allowed only {sorted(self.days, key=WEEKDAYS.index)} "
            f"{self.start.isoformat('minutes')}-{self.end.isoformat('minutes')} ({zone.key})",
            resets_at=next_open,
        )


SIGNED_PERMISSIONS = frozenset({AllowanceType.EIP2612_PERMIT, AllowanceType.PERMIT2})


class MaxValidity(Rule):
    """Signed authorizations and permits (EIP-3009, EIP-2612, Permit2) must expire within ``max``.

    A long-lived signature can be used long after the agent that asked for it was stopped.
    """

    type: Literal["max_validity"] = "max_validity"
    max: Duration

    def verify(self, ctx: EvalContext) -> RuleResult:
        intent = ctx.intent
        if intent.kind is not IntentKind.PAYMENT_AUTHORIZATION and intent.allowance_type not in SIGNED_PERMISSIONS:
            return NOT_APPLICABLE
        if intent.valid_before is None:
            return self.deny("validity_too_long", f"the signature never expires; at most {self.max} is allowed")
        if intent.valid_before - ctx.now > self.max:
            return self.deny(
                "validity_too_long",
                f"the signature is valid until {intent.valid_before.isoformat()}; at most {self.max} is allowed",
            )
        return PASS


class RequireApproval(AmountLimit, ApprovalSpec):
    """Hold for M-of-N approval: above an amount, for a new payee, for some kinds, or always.

    Conditions combine with "or" (any one triggers); with neither an amount nor ``new_payee`` the
    rule always applies (within ``kinds``).
    """

    limit_required: ClassVar[bool] = False
    type: Literal["require_approval"] = "require_approval"
    max: Amount | None = Field(default=None, alias="above")
    max_usd: UsdAmount | None = Field(default=None, alias="above_usd")
    new_payee: bool = False
    kinds: frozenset[IntentKind] | None = None

    def verify(self, ctx: EvalContext) -> RuleResult:
        if self.kinds is not None and ctx.intent.kind not in self.kinds:
            return NOT_APPLICABLE
        why: list[str] = []
        if self.has_limit:
            measure = self.measure(ctx)
            if isinstance(measure, Measure) and measure.amount > self.limit:
                why.append(f"{measure.amount} is above {self.limit} {_unit(measure.counter)}")
            if isinstance(measure, RuleResult) and measure.verdict == "deny":
                return measure
        if self.new_payee and ctx.is_new_payee():
            why.append(f"first payment to {ctx.intent.counterparty}")
        if not self.has_limit and not self.new_payee:
            why.append(f"rule requires approval for {ctx.intent.kind.value}")
        if not why:
            return PASS
        return self.quorum_result(self, ctx, "; ".join(why))


AnyRule = Annotated[
    AllowTransfers
    | AllowContractCall
    | AllowTypedData
    | AllowDangerous
    | MaxPerPayment
    | Cap
    | Velocity
    | PayeeAllowlist
    | PayeeDenylist
    | NewPayee
    | AllowedChains
    | AllowedAssets
    | TimeWindow
    | MaxValidity
    | RequireApproval,
    Field(discriminator="type"),
]
RULE_TYPES: tuple[str, ...] = (
    "allow_transfers",
    "allow_contract_call",
    "allow_typed_data",
    "allow_dangerous",
    "max_per_payment",
    "cap",
    "velocity",
    "payee_allowlist",
    "payee_denylist",
    "new_payee",
    "chains",
    "assets",
    "time_window",
    "max_validity",
    "require_approval",
)
