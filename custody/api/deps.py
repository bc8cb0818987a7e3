"""Request dependencies shared by the routers: the service context and who is calling."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from custody.api import problems
from custody.payments import agents as agent_service
from custody.payments.agents import AgentPrincipal
from custody.services import operators as operator_service
from custody.services.context import Context
from custody.storage.interfaces import Operator

operator_bearer = HTTPBearer(auto_error=False, scheme_name="operator", description="An operator token (`cop.…`)")
agent_bearer = HTTPBearer(auto_error=False, scheme_name="agent", description="An agent API key (`cak.…`)")


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": problems.Problem, "content": {problems.PROBLEM_JSON: {}}} for status in statuses}


def _context(request: Request) -> Context:
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
    return await agent_service.authenticate(ctx, credentials.credentials if credentials else None)


AnyOperator = Annotated[Operator, Depends(_operator)]
Admin = Annotated[Operator, Depends(_admin)]
Approver = Annotated[Operator, Depends(_approver)]
Agent = Annotated[AgentPrincipal, Depends(_agent)]
