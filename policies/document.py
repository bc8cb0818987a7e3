"""The policy document and the grant: parsing, validation errors, JSON Schema.

A policy is set by operators on a wallet. A grant is given to one agent on one wallet and can
only narrow the policy: the engine evaluates both and takes the intersection.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from policies._context import ApproverGroup, AssetSpec
from policies._values import TimeZoneName
from policies.rules import RULE_TYPES, AllowedAssets, AmountLimit, AnyRule, ApprovalSpec, NewPayee

SCHEMA_VERSION = 1


class PolicyValidationError(ValueError):
    """A document failed validation; ``errors`` lists (field path, what is wrong)."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{path}: {message}" for path, message in errors))


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError("must include a UTC offset, e.g. 2026-01-01T00:00:00Z")
    return value


def _unique_ids(rules: tuple[AnyRule, ...]) -> tuple[AnyRule, ...]:
    seen: set[str] = set()
    for rule in rules:
        if rule.id in seen:
            raise ValueError(f"rule id {rule.id!r} is used more than once")
        seen.add(rule.id)
    return rules


class _Document(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = Field(description="Version of this document format; currently 1.")
    id: str | None = None
    description: str | None = None
    expires_at: datetime | None = None
    rules: tuple[AnyRule, ...] = ()

    _check_expiry = field_validator("expires_at")(_aware)
    _check_rules = field_validator("rules")(_unique_ids)


class Policy(_Document):
    """A wallet's policy: the assets it names, approver groups, time zone and rules."""

    timezone: TimeZoneName = Field(default="UTC", description="IANA name; for calendar periods and time windows.")
    assets: dict[str, AssetSpec] = Field(default_factory=dict)
    approver_groups: dict[str, ApproverGroup] = Field(default_factory=dict)


class Grant(_Document):
    """An agent's grant on a wallet. It may only narrow the wallet's policy.

    Its rules are evaluated against the agent's own spend. Without permit rules it narrows only
    through its constraints; with permit rules, the intent must also match one of them.
    """

    wallet_id: str | None = None
    agent_id: str = Field(min_length=1)


def reference_problems(rules: tuple[AnyRule, ...], policy: Policy) -> list[tuple[str, str]]:
    """Names the rules use that the policy does not define (assets, approver groups)."""
    problems: list[tuple[str, str]] = []
    for index, rule in enumerate(rules):
        where = f"rules[{index}]"
        if isinstance(rule, AmountLimit) and rule.asset is not None and rule.asset not in policy.assets:
            problems.append((f"{where}.asset", f"{rule.asset!r} is not defined in assets"))
        if isinstance(rule, AllowedAssets):
            problems += [
                (f"{where}.assets", f"{name!r} is not defined in assets")
                for name in sorted(rule.assets - policy.assets.keys())
            ]
        approval, at = (rule.approval, f"{where}.approval") if isinstance(rule, NewPayee) else (rule, where)
        if isinstance(approval, ApprovalSpec):
            group = policy.approver_groups.get(approval.group)
            if group is None:
                problems.append((f"{at}.group", f"{approval.group!r} is not defined in approver_groups"))
            elif approval.m > len(group.members):
                problems.append(
                    (f"{at}.m", f"{approval.m} is more than the {len(group.members)} members of {approval.group!r}")
                )
    return problems


def _path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for index, item in enumerate(loc):
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif index > 0 and isinstance(loc[index - 1], int) and item in RULE_TYPES:
            continue  # the discriminated-union tag pydantic inserts after a rule's index
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or "(document)"


def _errors(error: ValidationError) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for entry in error.errors(include_url=False):
        message = entry["msg"].removeprefix("Value error, ")
        if entry["type"] == "union_tag_invalid":
            message = f"unknown rule type; expected one of: {', '.join(RULE_TYPES)}"
        found.append((_path(tuple(entry["loc"])), message))
    return found


def load_policy(data: Mapping[str, Any]) -> Policy:
    """Parse and validate a policy document; raise ``PolicyValidationError`` naming each field."""
    try:
        policy = Policy.model_validate(dict(data))
    except ValidationError as error:
        raise PolicyValidationError(_errors(error)) from None
    problems = reference_problems(policy.rules, policy)
    if problems:
        raise PolicyValidationError(problems)
    return policy


def load_grant(data: Mapping[str, Any], policy: Policy | None = None) -> Grant:
    """Parse and validate a grant; with ``policy``, also check the names it uses exist there."""
    try:
        grant = Grant.model_validate(dict(data))
    except ValidationError as error:
        raise PolicyValidationError(_errors(error)) from None
    problems = [] if policy is None else reference_problems(grant.rules, policy)
    if problems:
        raise PolicyValidationError(problems)
    return grant


def _schema(model: type[BaseModel], title: str) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": title}


def policy_json_schema() -> dict[str, Any]:
    """The JSON Schema of a policy document, for editors."""
    return _schema(Policy, "Agent Custody policy")


def grant_json_schema() -> dict[str, Any]:
    """The JSON Schema of a grant document."""
    return _schema(Grant, "Agent Custody grant")
