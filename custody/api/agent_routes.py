"""The agent API (v1): sign, payment status, the agent's wallets. Authenticated by agent keys."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from custody.api.deps import Agent, Ctx, PaymentId, WalletId, problem_responses
from custody.api.problems import PROBLEM_JSON
from custody.payments import service
from custody.schemas import RequestBody

router = APIRouter(prefix="/v1", tags=["agent"])
_ERRORS = problem_responses(400, 401, 403, 404, 409, 413, 423, 429, 503)
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=200, description="Same key and body: same response, errors included."),
]


class _Context(RequestBody):
    purpose: str | None = Field(default=None, max_length=500, description="Why the agent pays (for people).")
    origin: str | None = Field(default=None, max_length=2000, description="What is paid for, e.g. a URL.")


class SignTransaction(_Context):
    transaction: dict[str, Any] = Field(description="eth-account style transaction; integers may be decimal strings")


class SignTypedData(_Context):
    typed_data: dict[str, Any] = Field(description="The full EIP-712 document: types, primaryType, domain, message.")
    chain_id: int | None = Field(default=None, description="Only when the domain has no chainId.")


class SignMessage(_Context):
    message: str = Field(description="Text to sign with EIP-191 personal_sign.")
    chain_id: int | None = Field(default=None, description="The chain the policy should judge against (default 1).")


class ReasonOut(BaseModel):
    code: str
    rule_id: str
    message: str
    counter: str | None = None
    limit: str | None = Field(default=None, description="Base units as a decimal string.")
    remaining: str | None = Field(default=None, description="Base units as a decimal string.")
    resets_at: str | None = None


class QuorumOut(BaseModel):
    group: str
    m: int


class Signed(BaseModel):
    status: Literal["signed"]
    payment_id: str
    result: dict[str, Any] = Field(description="raw_transaction and hash, or signature and message_hash.")


class Pending(BaseModel):
    status: Literal["pending_approval"]
    payment_id: str
    expires_at: str | None
    quorum: QuorumOut | None
    reasons: list[ReasonOut]


class PaymentOut(BaseModel):
    payment_id: str
    wallet_id: str
    status: Literal["pending_approval", "reserved", "signed", "denied", "rejected", "expired", "failed"]
    result: dict[str, Any] | None = None
    reasons: list[ReasonOut] | None = None
    expires_at: str | None = None
    quorum: QuorumOut | None = None


class AgentWallet(BaseModel):
    id: str
    name: str
    address: str


class AgentWallets(BaseModel):
    wallets: list[AgentWallet]


_SIGN_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": Signed, "description": "Signed."},
    202: {"model": Pending, "description": "Waits for human approval; poll the payment."},
    **_ERRORS,
}


def _reply(response: service.Response, request: Request) -> JSONResponse:
    if response.status_code >= 400:  # a replayed error: the same problem document as the first time
        body = response.body | {"instance": request.url.path}
        return JSONResponse(body, status_code=response.status_code, media_type=PROBLEM_JSON)
    return JSONResponse(response.body, status_code=response.status_code)


@router.get("/wallets", response_model=AgentWallets, responses=_ERRORS)
async def agent_wallets(ctx: Ctx, agent: Agent) -> AgentWallets:
    """The wallets this key may use."""
    found = [await ctx.wallets.get(wallet_id) for wallet_id in sorted(agent.wallet_ids)]
    return AgentWallets(wallets=[AgentWallet(id=w.id, name=w.name, address=w.address) for w in found if w])


@router.post("/wallets/{wallet_id}/sign/transaction", response_model=Signed, responses=_SIGN_RESPONSES)
async def sign_transaction(
    wallet_id: WalletId,
    body: SignTransaction,
    ctx: Ctx,
    agent: Agent,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Sign an EVM transaction if the wallet's policy allows it (ERC-20 payees and amounts are read)."""
    payload = body.model_dump(exclude_none=True)
    return _reply(await service.submit(ctx, agent, wallet_id, "transaction", payload, idempotency_key), request)


@router.post("/wallets/{wallet_id}/sign/typed-data", response_model=Signed, responses=_SIGN_RESPONSES)
async def sign_typed_data(
    wallet_id: WalletId,
    body: SignTypedData,
    ctx: Ctx,
    agent: Agent,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Sign an EIP-712 document (e.g. an x402 TransferWithAuthorization) if the policy allows it."""
    payload = body.model_dump(exclude_none=True)
    return _reply(await service.submit(ctx, agent, wallet_id, "typed_data", payload, idempotency_key), request)


@router.post("/wallets/{wallet_id}/sign/message", response_model=Signed, responses=_SIGN_RESPONSES)
async def sign_message(
    wallet_id: WalletId,
    body: SignMessage,
    ctx: Ctx,
    agent: Agent,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Sign a text message (EIP-191); message signing is off unless a rule allows it."""
    payload = body.model_dump(exclude_none=True)
    return _reply(await service.submit(ctx, agent, wallet_id, "message", payload, idempotency_key), request)


@router.get("/payments/{payment_id}", response_model=PaymentOut, response_model_exclude_none=True, responses=_ERRORS)
async def payment(
    payment_id: PaymentId,
    ctx: Ctx,
    agent: Agent,
    wait: Annotated[float, Query(ge=0, le=30, description="Hold up to this many seconds for a change.")] = 0,
) -> PaymentOut:
    """A payment's status; with ``wait``, a bounded long poll for a pending approval."""
    return PaymentOut.model_validate(await service.payment_status(ctx, agent, payment_id, wait))


class LimitOut(BaseModel):
    rule_id: str
    source: Literal["policy", "grant"]
    counter: str = Field(description='"<chain id>:<asset>" in base units, "usd" in micro-USD, or "payments".')
    limit: str
    spent: str
    remaining: str
    window_start: str
    window_end: str
    resets_at: str | None


class Limits(BaseModel):
    limits: list[LimitOut]


@router.get("/wallets/{wallet_id}/limits", response_model=Limits, responses=_ERRORS)
async def wallet_limits(wallet_id: WalletId, ctx: Ctx, agent: Agent) -> Limits:
    """What may I spend? Each cap and velocity limit, what remains now, and when it resets."""
    return Limits.model_validate({"limits": await service.spending_limits(ctx, agent, wallet_id)})
