"""What the engine answers: a decision, its reasons, and what the ledger must re-check."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Outcome = Literal["allow", "deny", "needs_approval"]
VerdictName = Literal["allow", "no_match", "pass", "deny", "needs_approval", "not_applicable"]
Source = Literal["policy", "grant"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Reason(_Frozen):
    """Why: a stable ``code``, the rule, a readable message, and budget figures where useful.

    ``remaining`` is what could still be spent (or the number of payments still possible) right
    now under ``limit``; ``resets_at`` is when enough of the window frees up for this intent (a
    rolling window) or when the calendar period ends.
    """

    code: str
    rule_id: str
    message: str
    counter: str | None = None
    limit: int | None = None
    remaining: int | None = None
    resets_at: datetime | None = None


class Quorum(_Frozen):
    """M approvals from the members of a named approver group."""

    group: str
    m: int = Field(ge=1)


class Debit(_Frozen):
    """An amount this intent adds to a ledger counter; the ledger records every debit."""

    counter: str
    amount: int = Field(ge=0)


class CumulativeConstraint(_Frozen):
    """A cumulative limit the decision relied on, to be re-checked atomically by the ledger.

    The reservation is valid only if, for every constraint,
    ``sum(amount of counter in [window_start, window_end), scoped to agent_id if set) + amount
    <= limit``.
    """

    rule_id: str
    source: Source
    counter: str
    agent_id: str | None
    window_start: datetime
    window_end: datetime
    limit: int
    amount: int


class RuleVerdict(_Frozen):
    """One rule's verdict, for ``policy explain`` and the audit log."""

    source: Source
    rule_id: str
    rule_type: str
    verdict: VerdictName
    reasons: tuple[Reason, ...] = ()


class Decision(_Frozen):
    """The engine's answer.

    ``reasons`` lists every failing rule on a deny, every approval requirement on
    needs_approval, and the rules that allowed the intent on an allow. ``approvals`` lists every
    quorum that must be met (one per approver group); ``quorum`` is the strictest of them.
    ``debits`` is what the ledger records when it reserves; ``constraints`` what it re-checks.
    """

    outcome: Outcome
    reasons: tuple[Reason, ...]
    quorum: Quorum | None = None
    approvals: tuple[Quorum, ...] = ()
    constraints: tuple[CumulativeConstraint, ...] = ()
    debits: tuple[Debit, ...] = ()
    verdicts: tuple[RuleVerdict, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.outcome == "allow"

    @property
    def codes(self) -> tuple[str, ...]:
        """The reason codes, in order (handy for callers and tests)."""
        return tuple(reason.code for reason in self.reasons)
