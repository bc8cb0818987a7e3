"""Operator credentials: issued once, stored as a SHA-256 digest, compared in constant time.

A token looks like ``cop.<operator id>.<secret>``. The secret has 256 bits of entropy,
so a fast digest is the right tool (a password hash would add latency, not safety).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime
from typing import Literal

from custody.errors import Conflict, Forbidden, NotFound, Unauthorized
from custody.services.context import Context
from custody.storage.interfaces import Operator

Role = Literal["admin", "approver", "viewer"]
ROLES: tuple[Role, ...] = ("admin", "approver", "viewer")
TOKEN_PREFIX = "cop"  # noqa: S105  # nosec B105 # a public prefix, not a secret
_DUMMY_HASH = hashlib.sha256(b"no such operator").hexdigest()


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def issue_operator(ctx: Context, name: str, role: Role) -> tuple[Operator, str]:
    # Names are what approver groups list, so they must be unique.
    if await ctx.operators.get_by_name(name) is not None:
        raise Conflict(f"an operator named {name!r} already exists")
    operator_id = "op_" + secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    operator = Operator(operator_id, name, role, digest(secret), datetime.now(UTC), None)
    await ctx.operators.add(operator)
    return operator, f"{TOKEN_PREFIX}.{operator_id}.{secret}"


async def authenticate(ctx: Context, token: str | None) -> Operator:
    if not token:
        raise Unauthorized("an operator token is required (Authorization: Bearer ...)")
    prefix, _, rest = token.partition(".")
    operator_id, _, secret = rest.partition(".")
    operator = await ctx.operators.get(operator_id) if prefix == TOKEN_PREFIX and operator_id else None
    expected = operator.secret_hash if operator else _DUMMY_HASH
    matches = hmac.compare_digest(digest(secret), expected)
    if operator is None or not matches or operator.revoked_at is not None:
        raise Unauthorized("the operator token is not valid")
    return operator


def require_role(operator: Operator, *allowed: Role) -> None:
    if operator.role not in allowed:
        raise Forbidden(f"this needs one of the roles: {', '.join(allowed)}")


async def ensure_first_admin(ctx: Context) -> str | None:
    """Create the first admin credential if there is no operator yet; return its token once."""
    if await ctx.operators.count() > 0:
        return None
    _, token = await issue_operator(ctx, "admin", "admin")
    return token


async def revoke_operator(ctx: Context, operator_id: str, by: Operator) -> None:
    """Revoke an operator's credential at once; the last active admin cannot be revoked."""
    target = await ctx.operators.get(operator_id)
    if target is None or target.revoked_at is not None:
        raise NotFound("no such active operator")
    if target.role == "admin":
        admins = [op for op in await ctx.operators.list() if op.role == "admin" and op.revoked_at is None]
        if len(admins) <= 1:
            raise Conflict("this is the last active admin: issue another admin first")
    await ctx.operators.revoke(operator_id, datetime.now(UTC))
    await ctx.audit.append("operator.revoked", actor=f"operator:{by.id}", subject=operator_id)
