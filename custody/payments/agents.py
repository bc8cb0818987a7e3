"""Agents and their API keys: issued by operators, shown once, stored hashed, scoped to wallets.

A key looks like ``cak.<key id>.<secret>``. Lookup is by id; the secret's SHA-256 digest
is compared in constant time. Expired and revoked keys stop working at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from custody.errors import Conflict, InvalidRequest, NotFound, Unauthorized
from custody.payments.models import AgentKeyRow, AgentRow
from custody.services.context import Context
from custody.storage.db import reading, write_transaction
from custody.storage.prepared import Prepared
from custody.storage.types import as_utc

agents: Table = AgentRow.__table__  # type: ignore[attr-defined]
agent_keys: Table = AgentKeyRow.__table__  # type: ignore[attr-defined]
KEY_PREFIX = "cak"
_DUMMY = hashlib.sha256(b"no such key").hexdigest()
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


@dataclass(frozen=True)
class Agent:
    id: str
    name: str
    created_at: datetime


@dataclass(frozen=True)
class AgentKey:
    id: str
    agent_id: str
    wallet_ids: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class AgentPrincipal:
    """Who is calling: the agent and the wallets its key may use."""

    agent: Agent
    key_id: str
    wallet_ids: frozenset[str]


async def create_agent(ctx: Context, name: str, actor: str) -> Agent:
    if not _NAME.fullmatch(name):
        raise InvalidRequest("an agent name is 1-100 letters, digits, '.', '_' or '-'", field="name")
    agent = Agent("agt_" + secrets.token_hex(8), name, datetime.now(UTC))
    try:
        async with write_transaction(ctx.engine) as conn:
            await conn.execute(insert(agents).values(id=agent.id, name=agent.name, created_at=agent.created_at))
            await ctx.audit.append_in(conn, "agent.created", actor=actor, subject=agent.id, data={"name": name})
    except IntegrityError:
        raise Conflict(f"an agent named {name!r} already exists") from None
    return agent


async def list_agents(ctx: Context) -> list[Agent]:
    async with ctx.engine.connect() as conn:
        rows = await conn.execute(select(agents).order_by(agents.c.created_at, agents.c.id))
        return [Agent(r.id, r.name, as_utc(r.created_at)) for r in rows]


async def get_agent(ctx: Context, agent_id: str) -> Agent:
    async with ctx.engine.connect() as conn:
        row = (await conn.execute(select(agents).where(agents.c.id == agent_id))).first()
    if row is None:
        raise NotFound("no such agent")
    return Agent(row.id, row.name, as_utc(row.created_at))


async def issue_key(
    ctx: Context, agent_id: str, wallet_ids: list[str], expires_at: datetime | None, actor: str
) -> tuple[AgentKey, str]:
    await get_agent(ctx, agent_id)
    if not wallet_ids:
        raise InvalidRequest("a key must be scoped to at least one wallet", field="wallet_ids")
    for wallet_id in wallet_ids:
        if await ctx.wallets.get(wallet_id) is None:
            raise NotFound(f"no such wallet: {wallet_id}")
    now = datetime.now(UTC)
    if expires_at is not None and (expires_at.tzinfo is None or expires_at <= now):
        raise InvalidRequest("expires_at must be a time zone aware moment in the future", field="expires_at")
    key = AgentKey("key_" + secrets.token_hex(8), agent_id, tuple(sorted(set(wallet_ids))), now, expires_at, None)
    secret = secrets.token_urlsafe(32)
    async with write_transaction(ctx.engine) as conn:
        await ctx.audit.append_in(
            conn,
            "agent_key.issued",
            actor=actor,
            subject=agent_id,
            data={
                "key_id": key.id,
                "wallet_ids": list(key.wallet_ids),
                "expires_at": expires_at.isoformat() if expires_at else None,
            },
        )
        await conn.execute(
            insert(agent_keys).values(
                id=key.id,
                agent_id=agent_id,
                secret_hash=hashlib.sha256(secret.encode()).hexdigest(),
                wallet_ids=json.dumps(list(key.wallet_ids)),
                created_at=now,
                expires_at=expires_at,
            )
        )
    return key, f"{KEY_PREFIX}.{key.id}.{secret}"


async def list_keys(ctx: Context, agent_id: str) -> list[AgentKey]:
    async with ctx.engine.connect() as conn:
        rows = await conn.execute(
            select(agent_keys).where(agent_keys.c.agent_id == agent_id).order_by(agent_keys.c.created_at)
        )
        return [
            AgentKey(
                r.id,
                r.agent_id,
                tuple(json.loads(r.wallet_ids)),
                as_utc(r.created_at),
                as_utc(r.expires_at),
                as_utc(r.revoked_at),
            )
            for r in rows
        ]


async def revoke_key(ctx: Context, agent_id: str, key_id: str, actor: str) -> None:
    async with write_transaction(ctx.engine) as conn:
        result = await conn.execute(
            update(agent_keys)
            .where(agent_keys.c.id == key_id, agent_keys.c.agent_id == agent_id, agent_keys.c.revoked_at.is_(None))
            .values(revoked_at=datetime.now(UTC))
        )
        if result.rowcount == 1:
            await ctx.audit.append_in(conn, "agent_key.revoked", actor=actor, subject=agent_id, data={"key_id": key_id})
    if result.rowcount != 1:
        raise NotFound("no such active key")


_KEY_LOOKUP = Prepared(
    select(agent_keys, agents.c.name, agents.c.created_at.label("agent_created"))
    .join(agents, agents.c.id == agent_keys.c.agent_id)
    .where(agent_keys.c.id == bindparam("key"))
)


async def authenticate(ctx: Context, token: str | None) -> AgentPrincipal:
    if not token:
        raise Unauthorized("an agent API key is required (Authorization: Bearer cak....)")
    prefix, _, rest = token.partition(".")
    key_id, _, secret = rest.partition(".")
    row = None
    if prefix == KEY_PREFIX and key_id:
        async with reading(ctx.engine) as conn:
            row = await _KEY_LOOKUP.first(conn, {"key": key_id})
    expected = row.secret_hash if row is not None else _DUMMY
    matches = hmac.compare_digest(hashlib.sha256(secret.encode()).hexdigest(), expected)
    now = datetime.now(UTC)
    expires_at = as_utc(row.expires_at) if row is not None else None
    if row is None or not matches or row.revoked_at is not None or (expires_at is not None and expires_at <= now):
        raise Unauthorized("the agent API key is not valid")
    agent = Agent(row.agent_id, row.name, as_utc(row.agent_created))
    return AgentPrincipal(agent, row.id, frozenset(json.loads(row.wallet_ids)))
