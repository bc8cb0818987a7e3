"""Wallet policies and agent grants: versioned documents, validated by the policy engine."""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from custody.errors import InvalidRequest, NotFound
from custody.payments.models import GrantRow, PolicyVersionRow
from custody.services.context import Context
from custody.storage.db import write_transaction
from policies import Grant, Policy, PolicyValidationError, load_grant, load_policy

wallet_policies: Table = PolicyVersionRow.__table__  # type: ignore[attr-defined]
agent_grants: Table = GrantRow.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class PolicyVersion:
    wallet_id: str
    version: int
    document: dict[str, Any]
    created_at: datetime
    created_by: str


def _digest(document: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _invalid(error: PolicyValidationError) -> InvalidRequest:
    return InvalidRequest(
        "the policy document is not valid",
        errors=[{"field": field, "message": message} for field, message in error.errors],
    )


def validate_policy(document: dict[str, Any]) -> Policy:
    try:
        return load_policy(document)
    except PolicyValidationError as error:
        raise _invalid(error) from None


async def set_policy(ctx: Context, wallet_id: str, document: dict[str, Any], operator_id: str) -> PolicyVersion:
    if await ctx.wallets.get(wallet_id) is None:
        raise NotFound("no such wallet")
    validate_policy(document)
    now = datetime.now(UTC)
    async with write_transaction(ctx.engine) as conn:
        current = (
            await conn.execute(
                select(func.max(wallet_policies.c.version)).where(wallet_policies.c.wallet_id == wallet_id)
            )
        ).scalar()
        version = int(current or 0) + 1
        await conn.execute(
            insert(wallet_policies).values(
                wallet_id=wallet_id,
                version=version,
                document=json.dumps(document),
                created_at=now,
                created_by=operator_id,
            )
        )
        await ctx.audit.append_in(
            conn,
            "policy.set",
            actor=f"operator:{operator_id}",
            subject=wallet_id,
            data={"version": version, "sha256": _digest(document)},
        )
    return PolicyVersion(wallet_id, version, document, now, operator_id)


async def policy_history(ctx: Context, wallet_id: str) -> list[PolicyVersion]:
    async with ctx.engine.connect() as conn:
        rows = await conn.execute(
            select(wallet_policies).where(wallet_policies.c.wallet_id == wallet_id).order_by(wallet_policies.c.version)
        )
        return [
            PolicyVersion(
                r.wallet_id,
                r.version,
                json.loads(r.document),
                r.created_at if r.created_at.tzinfo else r.created_at.replace(tzinfo=UTC),
                r.created_by,
            )
            for r in rows
        ]


async def policy_diff(ctx: Context, wallet_id: str, old: int, new: int) -> str:
    versions = {v.version: v for v in await policy_history(ctx, wallet_id)}
    if old not in versions or new not in versions:
        raise NotFound("no such policy version")

    def lines(version: int) -> list[str]:
        return json.dumps(versions[version].document, indent=2, sort_keys=True).splitlines(keepends=True)

    return "".join(difflib.unified_diff(lines(old), lines(new), f"v{old}", f"v{new}"))


async def current_policy(conn: AsyncConnection, wallet_id: str) -> tuple[int, Policy] | None:
    row = (
        await conn.execute(
            select(wallet_policies.c.version, wallet_policies.c.document)
            .where(wallet_policies.c.wallet_id == wallet_id)
            .order_by(wallet_policies.c.version.desc())
            .limit(1)
        )
    ).first()
    if row is None:
        return None
    return int(row.version), policy_from_text(row.document)


@functools.lru_cache(maxsize=1024)
def policy_from_text(document: str) -> Policy:
    """Parsing is the costly part of reading a policy; a changed policy is a new text, so never stale."""
    return load_policy(json.loads(document))


async def set_grant(ctx: Context, agent_id: str, wallet_id: str, document: dict[str, Any], operator_id: str) -> int:
    document = {**document, "agent_id": agent_id, "wallet_id": wallet_id}
    async with ctx.engine.connect() as conn:
        found = await current_policy(conn, wallet_id)
    if found is None:
        raise InvalidRequest("set the wallet's policy before granting on it: a grant only narrows a policy")
    try:
        load_grant(document, found[1])
    except PolicyValidationError as error:
        raise _invalid(error) from None
    now = datetime.now(UTC)
    async with write_transaction(ctx.engine) as conn:
        existing = (
            await conn.execute(
                select(agent_grants.c.version).where(
                    agent_grants.c.agent_id == agent_id, agent_grants.c.wallet_id == wallet_id
                )
            )
        ).scalar()
        values = {"document": json.dumps(document), "created_at": now, "created_by": operator_id}
        version = 1 if existing is None else int(existing) + 1
        if existing is None:
            await conn.execute(insert(agent_grants).values(agent_id=agent_id, wallet_id=wallet_id, version=1, **values))
        else:
            await conn.execute(
                update(agent_grants)
                .where(agent_grants.c.agent_id == agent_id, agent_grants.c.wallet_id == wallet_id)
                .values(version=version, **values)
            )
        await ctx.audit.append_in(
            conn,
            "grant.set",
            actor=f"operator:{operator_id}",
            subject=agent_id,
            data={"wallet_id": wallet_id, "version": version, "sha256": _digest(document)},
        )
        return version


class GrantInvalid(Exception):
    """A stored grant no longer fits the wallet's policy (e.g. it names an asset the policy dropped)."""


async def current_grant(conn: AsyncConnection, agent_id: str, wallet_id: str, policy: Policy) -> Grant | None:
    row = (
        await conn.execute(
            select(agent_grants.c.document).where(
                agent_grants.c.agent_id == agent_id, agent_grants.c.wallet_id == wallet_id
            )
        )
    ).first()
    return None if row is None else grant_from_text(row.document, policy, agent_id)


def grant_from_text(document: str, policy: Policy, agent_id: str) -> Grant:
    """A stored grant, checked against the wallet's current policy (:class:`GrantInvalid` if it no longer fits)."""
    try:
        return load_grant(json.loads(document), policy)
    except PolicyValidationError:
        raise GrantInvalid(agent_id) from None
