"""Request dependencies shared by the routers: the service context and who is calling."""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from custody.api import problems
from custody.errors import RateLimited
from custody.payments import agents as agent_service
from custody.payments.agents import AgentPrincipal
from custody.services import operators as operator_service
from custody.services.context import Context
from custody.storage.interfaces import Operator

operator_bearer = HTTPBearer(auto_error=False, scheme_name="operator", description="An operator token (`cop.…`)")
agent_bearer = HTTPBearer(auto_error=False, scheme_name="agent", description="An agent API key (`cak.…`)")


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": problems.Problem, "content": {problems.PROBLEM_JSON: {}}} for status in statuses}


# Ids are letters, digits and "_" (wal_…, pay_…); anything else is a 400 before any lookup, so no
# character a database cannot store (NUL, a lone surrogate) reaches one.
ID_PATTERN = r"^[A-Za-z0-9_]{1,40}$"
# Free text that is stored as it is: PostgreSQL text cannot hold NUL (lone surrogates fail any pattern).
TEXT_PATTERN = r"^[^\x00]*$"
WalletId = Annotated[str, Path(pattern=ID_PATTERN, description="A wallet id (`wal_…`).")]
PaymentId = Annotated[str, Path(pattern=ID_PATTERN, description="A payment id (`pay_…`).")]
AgentId = Annotated[str, Path(pattern=ID_PATTERN, description="An agent id (`agt_…`).")]
KeyId = Annotated[str, Path(pattern=ID_PATTERN, description="An agent key id (`key_…`).")]
OperatorId = Annotated[str, Path(pattern=ID_PATTERN, description="An operator id (`op_…`).")]
WebhookId = Annotated[str, Path(pattern=ID_PATTERN, description="A webhook id (`whk_…`).")]


async def _context(request: Request) -> Context:
    # async: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per request.
    ctx: Context = request.app.state.ctx
    return ctx


Ctx = Annotated[Context, Depends(_context)]


async def _operator(
    ctx: Ctx, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(operator_bearer)]
) -> Operator:
    return await operator_service.authenticate(ctx, credentials.credentials if credentials else None)


async def _admin(operator: Annotated[Operator, Depends(_operator)]) -> Operator:
    operator_service.require_role(operator, "admin")
    return operator


async def _approver(operator: Annotated[Operator, Depends(_operator)]) -> Operator:
    operator_service.require_role(operator, "admin", "approver")
    return operator


async def _agent(
    ctx: Ctx, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(agent_bearer)]
) -> AgentPrincipal:
    principal = await agent_service.authenticate(ctx, credentials.credentials if credentials else None)
    limit = ctx.settings.agent_rate_limit_per_minute
    if limit > 0:
        wait = await ctx.shared.hit(f"agent:{principal.agent.id}", limit, 60.0)
        if wait is not None:
            raise RateLimited(
                f"more than {limit} requests in a minute from this agent; retry later",
                retry_after=math.ceil(wait),
            )
    return principal


AnyOperator = Annotated[Operator, Depends(_operator)]
Admin = Annotated[Operator, Depends(_admin)]
Approver = Annotated[Operator, Depends(_approver)]
Agent = Annotated[AgentPrincipal, Depends(_agent)]
