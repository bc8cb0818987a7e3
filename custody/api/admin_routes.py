"""The operator API: agents and keys, wallet policies and grants, approvals, the kill switch."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field, field_validator

from custody.api.deps import (
    ID_PATTERN,
    TEXT_PATTERN,
    Admin,
    AgentId,
    AnyOperator,
    Approver,
    Ctx,
    KeyId,
    OperatorId,
    PaymentId,
    WalletId,
    WebhookId,
    problem_responses,
)
from custody.audit.log import AuditEvent, VerifyResult
from custody.errors import NotFound
from custody.payments import agents as agent_service
from custody.payments import documents
from custody.payments import service as payment_service
from custody.schemas import RequestBody
from custody.services import operators as operator_service
from custody.webhooks import outbox

router = APIRouter(prefix="/admin/v1")
_ERRORS = problem_responses(400, 401, 403, 404, 409, 413, 423, 503)


class AgentCreate(RequestBody):
    name: str = Field(min_length=1, max_length=100)


class AgentOut(BaseModel):
    id: str
    name: str
    created_at: str


class AgentList(BaseModel):
    agents: list[AgentOut]


class KeyCreate(RequestBody):
    wallet_ids: list[Annotated[str, Field(pattern=ID_PATTERN)]] = Field(
        min_length=1, description="The wallets this key may use."
    )
    expires_at: datetime | None = None

    @field_validator("expires_at")
    @classmethod
    def _storable(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            try:
                value.astimezone(UTC)  # e.g. 9999-12-31T23:59-14:00 is after year 9999 in UTC
            except OverflowError:
                raise ValueError("expires_at is out of range") from None
        return value


class KeyOut(BaseModel):
    id: str
    agent_id: str
    wallet_ids: list[str]
    created_at: str
    expires_at: str | None
    revoked_at: str | None


class IssuedKey(BaseModel):
    key: KeyOut
    api_key: str = Field(description="Shown once; only a digest is stored.")


class KeyList(BaseModel):
    keys: list[KeyOut]


class PolicyIn(RequestBody):
    document: dict[str, Any] = Field(description="A policy document (see docs/policies.md).")


class PolicyOut(BaseModel):
    wallet_id: str
    version: int
    document: dict[str, Any]
    created_at: str
    created_by: str


class PolicyHistory(BaseModel):
    versions: list[PolicyOut]


class GrantOut(BaseModel):
    agent_id: str
    wallet_id: str
    version: int


class Vote(RequestBody):
    comment: str | None = Field(default=None, max_length=2000, pattern=TEXT_PATTERN)


class VoteResult(BaseModel):
    payment_id: str
    status: str
    approvals: list[str] | None = None
    result: dict[str, Any] | None = None
    reasons: list[dict[str, Any]] | None = None


class Approvals(BaseModel):
    pending: list[dict[str, Any]]


class FreezeIn(RequestBody):
    scope: Literal["all", "wallet", "agent"]
    target: str | None = Field(
        default=None, max_length=40, pattern=r"^[A-Za-z0-9_]+$", description="The wallet or agent id (not for 'all')."
    )
    reason: str | None = Field(default=None, max_length=2000, pattern=TEXT_PATTERN)


class Freezes(BaseModel):
    freezes: list[dict[str, Any]]


def _key(key: agent_service.AgentKey) -> KeyOut:
    return KeyOut(
        id=key.id,
        agent_id=key.agent_id,
        wallet_ids=list(key.wallet_ids),
        created_at=key.created_at.isoformat(),
        expires_at=key.expires_at.isoformat() if key.expires_at else None,
        revoked_at=key.revoked_at.isoformat() if key.revoked_at else None,
    )


def _policy(version: documents.PolicyVersion) -> PolicyOut:
    return PolicyOut(
        wallet_id=version.wallet_id,
        version=version.version,
        document=version.document,
        created_at=version.created_at.isoformat(),
        created_by=version.created_by,
    )


@router.post("/agents", response_model=AgentOut, status_code=201, tags=["agents"], responses=_ERRORS)
async def create_agent(body: AgentCreate, ctx: Ctx, operator: Admin) -> AgentOut:
    agent = await agent_service.create_agent(ctx, body.name, f"operator:{operator.id}")
    return AgentOut(id=agent.id, name=agent.name, created_at=agent.created_at.isoformat())


@router.get("/agents", response_model=AgentList, tags=["agents"], responses=_ERRORS)
async def list_agents(ctx: Ctx, _: AnyOperator) -> AgentList:
    return AgentList(
        agents=[
            AgentOut(id=a.id, name=a.name, created_at=a.created_at.isoformat())
            for a in await agent_service.list_agents(ctx)
        ]
    )


@router.post("/agents/{agent_id}/keys", response_model=IssuedKey, status_code=201, tags=["agents"], responses=_ERRORS)
async def issue_key(agent_id: AgentId, body: KeyCreate, ctx: Ctx, operator: Admin) -> IssuedKey:
    """Issue an API key for an agent, scoped to wallets; the key is in this response only."""
    key, secret = await agent_service.issue_key(
        ctx, agent_id, body.wallet_ids, body.expires_at, f"operator:{operator.id}"
    )
    return IssuedKey(key=_key(key), api_key=secret)


@router.get("/agents/{agent_id}/keys", response_model=KeyList, tags=["agents"], responses=_ERRORS)
async def list_keys(agent_id: AgentId, ctx: Ctx, _: AnyOperator) -> KeyList:
    await agent_service.get_agent(ctx, agent_id)
    return KeyList(keys=[_key(k) for k in await agent_service.list_keys(ctx, agent_id)])


@router.delete("/agents/{agent_id}/keys/{key_id}", status_code=204, tags=["agents"], responses=_ERRORS)
async def revoke_key(agent_id: AgentId, key_id: KeyId, ctx: Ctx, operator: Admin) -> Response:
    """Revoke a key; it stops working immediately."""
    await agent_service.revoke_key(ctx, agent_id, key_id, f"operator:{operator.id}")
    return Response(status_code=204)


@router.put("/wallets/{wallet_id}/policy", response_model=PolicyOut, tags=["policies"], responses=_ERRORS)
async def set_policy(wallet_id: WalletId, body: PolicyIn, ctx: Ctx, operator: Admin) -> PolicyOut:
    """Set a new policy version for a wallet (versions are kept)."""
    return _policy(await documents.set_policy(ctx, wallet_id, body.document, operator.id))


@router.get("/wallets/{wallet_id}/policy", response_model=PolicyOut, tags=["policies"], responses=_ERRORS)
async def get_policy(wallet_id: WalletId, ctx: Ctx, _: AnyOperator) -> PolicyOut:
    history = await documents.policy_history(ctx, wallet_id)
    if not history:
        raise NotFound("this wallet has no policy")
    return _policy(history[-1])


@router.get("/wallets/{wallet_id}/policy/versions", response_model=PolicyHistory, tags=["policies"], responses=_ERRORS)
async def policy_versions(wallet_id: WalletId, ctx: Ctx, _: AnyOperator) -> PolicyHistory:
    history = await documents.policy_history(ctx, wallet_id)
    if not history and await ctx.wallets.get(wallet_id) is None:
        raise NotFound("no such wallet")  # as for the wallet itself, not an empty history
    return PolicyHistory(versions=[_policy(v) for v in history])


@router.get("/wallets/{wallet_id}/policy/diff", tags=["policies"], responses=_ERRORS)
async def policy_diff(
    wallet_id: WalletId,
    ctx: Ctx,
    _: AnyOperator,
    old: Annotated[int, Query(alias="from", ge=1)],
    new: Annotated[int, Query(alias="to", ge=1)],
) -> dict[str, str]:
    """A unified diff between two versions of a wallet's policy."""
    return {"diff": await documents.policy_diff(ctx, wallet_id, old, new)}


@router.put("/agents/{agent_id}/grants/{wallet_id}", response_model=GrantOut, tags=["policies"], responses=_ERRORS)
async def set_grant(agent_id: AgentId, wallet_id: WalletId, body: PolicyIn, ctx: Ctx, operator: Admin) -> GrantOut:
    """Give an agent a grant on a wallet; it can only narrow the wallet's policy."""
    await agent_service.get_agent(ctx, agent_id)
    if await ctx.wallets.get(wallet_id) is None:
        raise NotFound("no such wallet")
    version = await documents.set_grant(ctx, agent_id, wallet_id, body.document, operator.id)
    return GrantOut(agent_id=agent_id, wallet_id=wallet_id, version=version)


@router.get("/approvals", response_model=Approvals, tags=["approvals"], responses=_ERRORS)
async def approvals(ctx: Ctx, _: AnyOperator) -> Approvals:
    """Payments waiting for approval (expired ones are not listed)."""
    return Approvals(pending=await payment_service.pending_approvals(ctx))


@router.post("/approvals/{payment_id}/approve", response_model=VoteResult, tags=["approvals"], responses=_ERRORS)
async def approve(payment_id: PaymentId, body: Vote, ctx: Ctx, operator: Approver) -> VoteResult:
    """Approve; the last approval of the quorum re-evaluates, reserves and signs."""
    return VoteResult.model_validate(await payment_service.vote(ctx, operator, payment_id, "approve", body.comment))


@router.post("/approvals/{payment_id}/reject", response_model=VoteResult, tags=["approvals"], responses=_ERRORS)
async def reject(payment_id: PaymentId, body: Vote, ctx: Ctx, operator: Approver) -> VoteResult:
    return VoteResult.model_validate(await payment_service.vote(ctx, operator, payment_id, "reject", body.comment))


@router.get("/freezes", response_model=Freezes, tags=["kill switch"], responses=_ERRORS)
async def list_freezes(ctx: Ctx, _: AnyOperator) -> Freezes:
    return Freezes(freezes=await payment_service.list_freezes(ctx))


@router.post("/freezes", status_code=204, tags=["kill switch"], responses=_ERRORS)
async def freeze(body: FreezeIn, ctx: Ctx, operator: Admin) -> Response:
    """Freeze a wallet, an agent, or everything: new requests and pending approvals stop at once."""
    await payment_service.freeze(ctx, body.scope, body.target or "", operator, body.reason)
    return Response(status_code=204)


@router.delete("/freezes/{scope}", status_code=204, tags=["kill switch"], responses=_ERRORS)
async def unfreeze(
    scope: Literal["all", "wallet", "agent"],
    ctx: Ctx,
    operator: Admin,
    target: Annotated[str | None, Query(pattern=ID_PATTERN, description="The wallet or agent id.")] = None,
) -> Response:
    if not await payment_service.unfreeze(ctx, scope, target or "", operator):
        raise NotFound("nothing is frozen there")
    return Response(status_code=204)


class AuditEvents(BaseModel):
    events: list[AuditEvent]


@router.get("/audit", response_model=AuditEvents, tags=["audit"], responses=_ERRORS)
async def audit_events(
    ctx: Ctx,
    _: AnyOperator,
    after_seq: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditEvents:
    """Audit records in order, after ``after_seq`` (page with the last seq you saw)."""
    return AuditEvents(events=await ctx.audit.events(after_seq=after_seq, limit=limit))


@router.get("/audit/verify", response_model=VerifyResult, tags=["audit"], responses=_ERRORS)
async def audit_verify(ctx: Ctx, _: AnyOperator) -> VerifyResult:
    """Re-compute the hash chain; names the first bad record if anything was changed."""
    return await ctx.audit.verify()


class WebhookIn(RequestBody):
    url: str = Field(max_length=2000, pattern=TEXT_PATTERN, description="Where to POST events (http or https).")
    events: list[str] = Field(
        default_factory=list,
        description="payment.pending_approval, payment.approved, payment.rejected, payment.signed; empty means all.",
    )


class WebhookOut(BaseModel):
    id: str
    url: str
    events: list[str]
    created_at: str


class CreatedWebhook(BaseModel):
    webhook: WebhookOut
    signing_key: str = Field(description="HMAC-SHA256 key for the Custody-Signature header; shown once.")


class Webhooks(BaseModel):
    webhooks: list[WebhookOut]


class Deliveries(BaseModel):
    deliveries: list[dict[str, Any]]


@router.post("/webhooks", response_model=CreatedWebhook, status_code=201, tags=["webhooks"], responses=_ERRORS)
async def add_webhook(body: WebhookIn, ctx: Ctx, operator: Admin) -> CreatedWebhook:
    """Register an endpoint for payment events; its signing key is in this response only."""
    hook, key = await outbox.add_webhook(ctx.engine, body.url, body.events)
    await ctx.audit.append("webhook.added", actor=f"operator:{operator.id}", subject=hook["id"], data={"url": body.url})
    return CreatedWebhook(webhook=WebhookOut.model_validate(hook), signing_key=key)


@router.get("/webhooks", response_model=Webhooks, tags=["webhooks"], responses=_ERRORS)
async def list_webhooks(ctx: Ctx, _: AnyOperator) -> Webhooks:
    return Webhooks(webhooks=[WebhookOut.model_validate(h) for h in await outbox.list_webhooks(ctx.engine)])


@router.delete("/webhooks/{webhook_id}", status_code=204, tags=["webhooks"], responses=_ERRORS)
async def remove_webhook(webhook_id: WebhookId, ctx: Ctx, operator: Admin) -> Response:
    await outbox.remove_webhook(ctx.engine, webhook_id)
    await ctx.audit.append("webhook.removed", actor=f"operator:{operator.id}", subject=webhook_id)
    return Response(status_code=204)


@router.get("/webhooks/deliveries", response_model=Deliveries, tags=["webhooks"], responses=_ERRORS)
async def webhook_deliveries(
    ctx: Ctx, _: AnyOperator, status: Literal["pending", "delivered", "failed", "cancelled"] | None = None
) -> Deliveries:
    """Deliveries and their state (failed ones ran out of retries)."""
    return Deliveries(deliveries=await outbox.list_deliveries(ctx.engine, status))


class OperatorCreate(RequestBody):
    name: str = Field(
        min_length=1, max_length=100, pattern=TEXT_PATTERN, description="What approver groups list (unique)."
    )
    role: Literal["admin", "approver", "viewer"]


class OperatorOut(BaseModel):
    id: str
    name: str
    role: str
    created_at: str
    revoked_at: str | None


class IssuedOperator(BaseModel):
    operator: OperatorOut
    token: str = Field(description="Shown once; only a digest is stored.")


class Operators(BaseModel):
    operators: list[OperatorOut]


def _operator_out(op: Any) -> OperatorOut:
    return OperatorOut(
        id=op.id,
        name=op.name,
        role=op.role,
        created_at=op.created_at.isoformat(),
        revoked_at=op.revoked_at.isoformat() if op.revoked_at else None,
    )


@router.post("/operators", response_model=IssuedOperator, status_code=201, tags=["operators"], responses=_ERRORS)
async def create_operator(body: OperatorCreate, ctx: Ctx, operator: Admin) -> IssuedOperator:
    """Issue an operator credential (admin, approver or viewer); the token is in this response only."""
    created, token = await operator_service.issue_operator(ctx, body.name, body.role)
    await ctx.audit.append(
        "operator.created",
        actor=f"operator:{operator.id}",
        subject=created.id,
        data={"name": body.name, "role": body.role},
    )
    return IssuedOperator(operator=_operator_out(created), token=token)


@router.get("/operators", response_model=Operators, tags=["operators"], responses=_ERRORS)
async def list_operators(ctx: Ctx, _: AnyOperator) -> Operators:
    return Operators(operators=[_operator_out(op) for op in await ctx.operators.list()])


@router.delete("/operators/{operator_id}", status_code=204, tags=["operators"], responses=_ERRORS)
async def revoke_operator(operator_id: OperatorId, ctx: Ctx, operator: Admin) -> Response:
    """Revoke an operator's credential; it stops working at once."""
    await operator_service.revoke_operator(ctx, operator_id, operator)
    return Response(status_code=204)
