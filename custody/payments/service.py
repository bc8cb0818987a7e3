"""The payment path: decide, reserve, sign, record; approvals; the kill switch.

One request, from an agent's key to a signature:

1. The wallet must be in the key's scope (a foreign id looks exactly like a missing one),
   and nothing may be frozen (wallet, agent, or everything).
2. The request is decoded into an intent and checked for what the signer would refuse,
   so nothing is reserved for a request that cannot be signed.
3. One SQL transaction takes the wallet's write lock (``SELECT … FOR UPDATE`` on
   PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), reads what it has spent through the engine's
   questions and evaluates. An allowed payment is signed while the lock is held, and the
   payment, its signature, its debits, its audit records and the Idempotency-Key's answer
   are written in that same transaction. Concurrent requests on one wallet queue on the
   lock, so a cap is never exceeded.
4. The signature leaves the service only after that transaction commits. A crash or a
   failed commit before then loses the signature with everything else: nothing is counted
   and nothing was handed out. If the signer fails, the payment is recorded as ``failed``
   with nothing debited, and the caller gets the signer's 503.

Needs-approval is a result, not an error: the payment waits (nothing reserved) until an
operator quorum approves; then it is evaluated again against the current policy and
budgets, reserved and signed in the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NoReturn

from sqlalchemy import Table, bindparam, delete, exists, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from custody import failpoints
from custody.audit.log import Record
from custody.chain import DecodeError, decode_message, decode_transaction, decode_typed_data
from custody.errors import (
    Conflict,
    CustodyError,
    DependencyUnavailable,
    Forbidden,
    Frozen,
    IdempotencyConflict,
    InvalidRequest,
    NotFound,
    PolicyDenied,
    UnsupportedSigningMethod,
)
from custody.keys.envelope import KeyEnvelope
from custody.payments.agents import AgentPrincipal
from custody.payments.documents import GrantInvalid, current_grant, current_policy, grant_from_text, policy_from_text
from custody.payments.ledger import decide, payments, record, release, remaining
from custody.payments.models import ApprovalVoteRow, FreezeRow, IdempotencyRow
from custody.services.context import Context
from custody.signer import evm
from custody.storage.db import reading, write_transaction
from custody.storage.interfaces import Operator
from custody.storage.prepared import Prepared
from custody.storage.types import as_utc
from custody.webhooks import outbox
from policies import Decision, Intent, Quorum, Reason

Method = Literal["transaction", "typed_data", "message"]
idempotency_keys: Table = IdempotencyRow.__table__  # type: ignore[attr-defined]
approval_votes: Table = ApprovalVoteRow.__table__  # type: ignore[attr-defined]
freezes: Table = FreezeRow.__table__  # type: ignore[attr-defined]
# Statements of the payment path, built once (constructing one costs about as much as running it).
_INSERT_CLAIM = Prepared.insert(
    idempotency_keys, "agent_id", "key", "body_hash", "created_at", "owner", "payment_id", "status_code", "response"
)
_INSERT_PAYMENT = Prepared.insert(
    payments,
    *("id", "wallet_id", "agent_id", "key_id", "method", "request", "payee", "status", "decision", "result"),
    *("quorum_group", "quorum_m", "created_at", "updated_at", "expires_at"),
)
_CLAIM_ROW = (
    (idempotency_keys.c.agent_id == bindparam("agent"))
    & (idempotency_keys.c.key == bindparam("idempotency_key"))
    & (idempotency_keys.c.owner == bindparam("claim_owner"))
)
_BIND_ANSWER = Prepared(
    update(idempotency_keys)
    .where(_CLAIM_ROW)
    .values(payment_id=bindparam("payment"), status_code=bindparam("status_code"), response=bindparam("response"))
)
APPROVAL_TTL = timedelta(hours=24)
IDEMPOTENCY_WAIT = 10.0


@dataclass(frozen=True)
class Response:
    """What the API sends back: a status code and a JSON body (kept for idempotent replays)."""

    status_code: int
    body: dict[str, Any]


def _now() -> datetime:
    return datetime.now(UTC)


def reason_json(reason: Reason) -> dict[str, Any]:
    """A reason on the wire: integers that may exceed 2**53 as decimal strings."""
    data = reason.model_dump(mode="json", exclude_none=True)
    for field in ("limit", "remaining"):
        if field in data:
            data[field] = str(data[field])
    return data


def _decision_json(decision: Decision) -> str:
    return decision.model_dump_json(exclude={"verdicts"})


# The kill switch -----------------------------------------------------------------------


async def _frozen(conn: AsyncConnection, wallet_id: str, agent_id: str) -> str | None:
    row = (
        await conn.execute(
            select(freezes.c.scope, freezes.c.target)
            .where(
                or_(
                    freezes.c.scope == "all",
                    (freezes.c.scope == "wallet") & (freezes.c.target == wallet_id),
                    (freezes.c.scope == "agent") & (freezes.c.target == agent_id),
                )
            )
            .limit(1)
        )
    ).first()
    if row is None:
        return None
    return "everything is frozen" if row.scope == "all" else f"this {row.scope} is frozen"


async def freeze(ctx: Context, scope: str, target: str, operator: Operator, reason: str | None) -> None:
    scope, target = _freeze_key(scope, target)
    # Freezing something that does not exist would look like a freeze and stop nothing.
    if scope == "wallet" and await ctx.wallets.get(target) is None:
        raise NotFound("no such wallet (freeze takes the wallet id, not its address)")
    if scope == "agent":
        from custody.payments.agents import get_agent

        await get_agent(ctx, target)
    async with write_transaction(ctx.engine) as conn:
        exists = (
            await conn.execute(select(freezes.c.scope).where(freezes.c.scope == scope, freezes.c.target == target))
        ).first()
        if exists is not None:
            return  # already frozen: freezing is idempotent
        await conn.execute(
            insert(freezes).values(scope=scope, target=target, frozen_at=_now(), frozen_by=operator.id, reason=reason)
        )
        await ctx.audit.append_in(
            conn,
            "freeze.set",
            actor=f"operator:{operator.id}",
            subject=target if scope != "all" else None,
            data={"scope": scope, "reason": reason},
        )


async def unfreeze(ctx: Context, scope: str, target: str, operator: Operator) -> bool:
    scope, target = _freeze_key(scope, target)
    async with write_transaction(ctx.engine) as conn:
        result = await conn.execute(delete(freezes).where(freezes.c.scope == scope, freezes.c.target == target))
        if result.rowcount:
            await ctx.audit.append_in(
                conn,
                "freeze.lifted",
                actor=f"operator:{operator.id}",
                subject=target if scope != "all" else None,
                data={"scope": scope},
            )
    return bool(result.rowcount)


async def list_freezes(ctx: Context) -> list[dict[str, Any]]:
    async with ctx.engine.connect() as conn:
        rows = await conn.execute(select(freezes).order_by(freezes.c.frozen_at))
        return [
            {
                "scope": r.scope,
                "target": r.target if r.scope != "all" else None,
                "frozen_at": (as_utc(r.frozen_at) or r.frozen_at).isoformat(),
                "frozen_by": r.frozen_by,
                "reason": r.reason,
            }
            for r in rows
        ]


def _freeze_key(scope: str, target: str | None) -> tuple[str, str]:
    if scope == "all":
        return "all", "*"
    if scope not in ("wallet", "agent") or not target:
        raise InvalidRequest("freeze scope is 'all', or 'wallet' / 'agent' with an id")
    return scope, target


# Decoding -------------------------------------------------------------------------------


def _intent(method: Method, body: Mapping[str, Any], wallet_id: str, address: str, agent_id: str) -> Intent:
    purpose, origin = body.get("purpose"), body.get("origin")
    try:
        if method == "transaction":
            tx = body.get("transaction")
            if not isinstance(tx, Mapping):
                raise InvalidRequest("transaction must be an object")
            normalized = evm.normalize_transaction(tx)
            return decode_transaction(
                normalized,
                chain_id=normalized["chainId"],
                wallet_id=wallet_id,
                agent_id=agent_id,
                purpose=purpose,
                origin=origin,
            )
        if method == "typed_data":
            document = body.get("typed_data")
            if not isinstance(document, Mapping) or any(
                key not in document for key in ("types", "primaryType", "domain", "message")
            ):
                raise UnsupportedSigningMethod("typed data must be the full EIP-712 document")
            chain = document["domain"].get("chainId") if isinstance(document["domain"], Mapping) else None
            return decode_typed_data(
                document,
                chain_id=int(chain or body.get("chain_id") or 0),
                wallet_id=wallet_id,
                agent_id=agent_id,
                wallet_address=address,
                purpose=purpose,
                origin=origin,
            )
        text = body.get("message")
        if not isinstance(text, str):
            raise UnsupportedSigningMethod("only text messages are signed (EIP-191 personal_sign)")
        return decode_message(
            text,
            chain_id=int(body.get("chain_id") or 1),
            wallet_id=wallet_id,
            agent_id=agent_id,
            purpose=purpose,
            origin=origin,
        )
    except DecodeError as error:
        raise InvalidRequest(str(error), decode_error=error.code) from None
    except (TypeError, ValueError) as error:
        raise InvalidRequest(f"the request cannot be read: {type(error).__name__}") from None


# Idempotency ----------------------------------------------------------------------------


def _body_hash(wallet_id: str, method: str, body: Mapping[str, Any]) -> str:
    canonical = json.dumps({"wallet": wallet_id, "method": method, "body": body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class Claim:
    """This request's hold on an Idempotency-Key; ``owner`` fences out a superseded attempt.

    The claim's row is written in the decision's own transaction (first, before the wallet
    lock) and given its answer before that transaction commits, so a payment, its claim and
    the answer commit together; ``stored`` says that has happened.
    """

    agent_id: str
    key: str
    owner: str
    body_hash: str = ""
    stored: bool = False

    def where(self) -> Any:
        return (
            (idempotency_keys.c.agent_id == self.agent_id)
            & (idempotency_keys.c.key == self.key)
            & (idempotency_keys.c.owner == self.owner)
        )


def _lease(ctx: Context) -> timedelta:
    return timedelta(seconds=ctx.settings.reservation_lease_seconds)


class ClaimTaken(Exception):
    """Another request holds (or held) this Idempotency-Key: its answer is this request's answer."""


async def _insert_claim(conn: AsyncConnection, claim: Claim, payment_id: str | None, response: Response | None) -> None:
    values: dict[str, Any] = {
        "agent_id": claim.agent_id,
        "key": claim.key,
        "body_hash": claim.body_hash,
        "created_at": _now(),
        "owner": claim.owner,
        "payment_id": payment_id,
        "status_code": None if response is None else response.status_code,
        "response": None if response is None else json.dumps(response.body),
    }
    try:
        await _INSERT_CLAIM.run(conn, values)
    except IntegrityError:
        raise ClaimTaken from None


async def _answer_for(ctx: Context, claim: Claim, deadline: float) -> Response | None:
    """The response already given (or being given) for a taken key; None when the key is free again.

    A committed claim carries its answer. One without (written by an earlier version, see
    :func:`recover_interrupted`) that is older than the reservation lease belongs to a
    request whose process died: it is resolved from its payment (see :func:`_recover_claim`).
    """
    where = (idempotency_keys.c.agent_id == claim.agent_id) & (idempotency_keys.c.key == claim.key)
    while True:
        async with reading(ctx.engine) as conn:
            row = (await conn.execute(select(idempotency_keys).where(where))).first()
        if row is None:
            return None  # released by a failed attempt a moment ago: claim it again
        if row.body_hash != claim.body_hash:
            raise IdempotencyConflict("this Idempotency-Key was used for a different request")
        if row.status_code is not None:
            return Response(int(row.status_code), json.loads(row.response))
        created = as_utc(row.created_at) or _now()
        if _now() - created > _lease(ctx):
            return await _recover_claim(ctx, row.agent_id, row.key, row.owner)
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise Conflict("a request with this Idempotency-Key is still being processed")
        # Only an earlier version's claim is ever seen unanswered: look again shortly.
        await asyncio.sleep(min(left, 0.05))


async def _recover_claim(ctx: Context, agent_id: str, key: str, owner: str | None) -> Response | None:
    """Resolve an abandoned claim: replay a signature that was recorded, else release and forget it.

    Returns the response to replay, or None when the key is free to be claimed again.
    """
    async with write_transaction(ctx.engine) as conn:
        query = select(idempotency_keys).where(idempotency_keys.c.agent_id == agent_id, idempotency_keys.c.key == key)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        row = (await conn.execute(query)).first()
        if row is None or row.owner != owner:
            return None  # resolved by someone else meanwhile: look again
        if row.status_code is not None:
            return Response(int(row.status_code), json.loads(row.response))
        if row.payment_id is not None:
            payment = (await conn.execute(select(payments).where(payments.c.id == row.payment_id))).first()
            if payment is not None and payment.status == "signed":
                response = Response(
                    200, {"status": "signed", "payment_id": payment.id, "result": json.loads(payment.result)}
                )
                await conn.execute(
                    update(idempotency_keys)
                    .where(idempotency_keys.c.agent_id == agent_id, idempotency_keys.c.key == key)
                    .values(status_code=response.status_code, response=json.dumps(response.body))
                )
                return response
            if payment is not None and payment.status == "reserved":
                await _interrupt(ctx, conn, payment.id)
        await conn.execute(
            delete(idempotency_keys).where(
                idempotency_keys.c.agent_id == agent_id,
                idempotency_keys.c.key == key,
                idempotency_keys.c.status_code.is_(None),
            )
        )
    return None


async def _bind(conn: AsyncConnection, claim: Claim | None, payment_id: str, response: Response) -> None:
    """In a payment's transaction: tie the claim to its payment and its final answer."""
    if claim is None:
        return
    values: dict[str, Any] = {
        "agent": claim.agent_id,
        "idempotency_key": claim.key,
        "claim_owner": claim.owner,
        "payment": payment_id,
        "status_code": response.status_code,
        "response": json.dumps(response.body),
    }
    if await _BIND_ANSWER.run(conn, values) != 1:
        # The claim was inserted by this transaction and nobody else can see it yet. Not a
        # CustodyError: that would be stored as the key's answer; this rolls back and forgets.
        raise RuntimeError("the Idempotency-Key claim of this transaction is gone")


async def _settle(ctx: Context, claim: Claim, response: Response | None) -> None:
    """After a request failed: store a refusal made before any decision, for replays.

    A decided request's answer committed with its decision (``claim.stored``); any other
    failure leaves no trace, so a retry with the same key runs afresh. If the key was taken
    meanwhile (or before: this may be a replay, or a changed body), ClaimTaken sends the
    caller to the answer stored for it, or to 409.
    """
    if claim.stored or response is None:
        return
    async with ctx.engine.begin() as conn:
        await _insert_claim(conn, claim, None, response)


async def _interrupt(ctx: Context, conn: AsyncConnection, payment_id: str) -> bool:
    """Release a reservation that will never be signed (in the caller's transaction).

    Conditional on the payment still being ``reserved``, so it happens at most once, and
    never to a payment whose signature was recorded.
    """
    result = await conn.execute(
        update(payments)
        .where(payments.c.id == payment_id, payments.c.status == "reserved")
        .values(status="failed", updated_at=_now())
    )
    if result.rowcount != 1:
        return False
    await release(conn, payment_id)
    await ctx.audit.append_in(
        conn, "payment.interrupted", actor="custody", subject=payment_id, data={"code": "interrupted"}
    )
    return True


async def recover_interrupted(ctx: Context) -> int:
    """Release every reservation older than the lease that was never signed; forget dead claims.

    This version never commits a reservation without its signature, nor a claim without its
    answer: both commit with the decision. Versions before it committed the reservation and
    the claim first and signed afterwards, so a process that died in between left them
    behind. The sweep resolves those (from a database such a version wrote, or from its
    replicas during a rolling upgrade). Returns how many reservations were released.
    """
    cutoff = _now() - _lease(ctx)
    async with ctx.engine.connect() as conn:
        stale = (
            await conn.execute(
                select(payments.c.id).where(payments.c.status == "reserved", payments.c.updated_at < cutoff).limit(500)
            )
        ).all()
    released = 0
    for (payment_id,) in stale:
        async with write_transaction(ctx.engine) as conn:
            released += await _interrupt(ctx, conn, payment_id)
        await ctx.shared.wake(f"payment:{payment_id}")
    async with write_transaction(ctx.engine) as conn:
        failed = select(payments.c.id).where(payments.c.status == "failed")
        await conn.execute(
            delete(idempotency_keys).where(
                idempotency_keys.c.status_code.is_(None),
                idempotency_keys.c.created_at < cutoff,
                or_(idempotency_keys.c.payment_id.is_(None), idempotency_keys.c.payment_id.in_(failed)),
            )
        )
    return released


# The request ----------------------------------------------------------------------------


async def submit(
    ctx: Context,
    principal: AgentPrincipal,
    wallet_id: str,
    method: Method,
    body: dict[str, Any],
    idempotency_key: str | None,
) -> Response:
    """Handle one signing request; the same key and body always get the same response.

    A twin request (same key) waits for the first one's transaction: on PostgreSQL at the
    claim's unique index, on SQLite at the write lock. It then finds the committed answer,
    or no claim at all if the first one failed, and runs afresh.
    """
    if idempotency_key is None:
        return await _submit(ctx, principal, wallet_id, method, body)
    if not 0 < len(idempotency_key) <= 200:
        raise InvalidRequest("Idempotency-Key must be 1-200 characters")
    agent_id, body_hash = principal.agent.id, _body_hash(wallet_id, method, body)
    deadline = asyncio.get_running_loop().time() + IDEMPOTENCY_WAIT
    while True:
        claim = Claim(agent_id, idempotency_key, secrets.token_hex(16), body_hash)
        try:
            return await _submit_claimed(ctx, principal, wallet_id, method, body, claim)
        except ClaimTaken:
            pass
        answer = await _answer_for(ctx, claim, deadline)
        if answer is not None:
            return answer


async def _submit_claimed(
    ctx: Context, principal: AgentPrincipal, wallet_id: str, method: Method, body: dict[str, Any], claim: Claim
) -> Response:
    try:
        response = await _submit(ctx, principal, wallet_id, method, body, claim)
    except ClaimTaken:
        raise
    except (DependencyUnavailable, Frozen):
        await _settle(ctx, claim, None)  # transient: a retry may succeed
        raise
    except CustodyError as error:
        # Decided answers were stored with the decision; this stores refusals made before one.
        # A server-side failure (5xx) is not an answer to keep: a retry may succeed.
        await _settle(ctx, claim, Response(error.status, error.to_problem()) if error.status < 500 else None)
        raise
    except BaseException:
        await _settle(ctx, claim, None)
        raise
    return response


@dataclass(frozen=True)
class Standing:
    """What a decision starts from, read under the wallet's write lock."""

    frozen: str | None
    policy: str | None
    grant: str | None
    address: str
    envelope: KeyEnvelope
    webhooks: bool  # whether any webhook is registered (none: no deliveries to queue)


@functools.cache
def _standing_statement() -> Prepared:
    from custody.payments.documents import agent_grants, wallet_policies
    from custody.storage.sql import wallet_keys, wallets
    from custody.webhooks.outbox import webhooks

    wallet_id: Any = bindparam("wallet")
    agent_id: Any = bindparam("agent")
    frozen = (
        select(freezes.c.scope)
        .where(
            or_(
                freezes.c.scope == "all",
                (freezes.c.scope == "wallet") & (freezes.c.target == wallet_id),
                (freezes.c.scope == "agent") & (freezes.c.target == agent_id),
            )
        )
        .limit(1)
        .scalar_subquery()
    )
    policy = (
        select(wallet_policies.c.document)
        .where(wallet_policies.c.wallet_id == wallet_id)
        .order_by(wallet_policies.c.version.desc())
        .limit(1)
        .scalar_subquery()
    )
    grant = (
        select(agent_grants.c.document)
        .where(agent_grants.c.agent_id == agent_id, agent_grants.c.wallet_id == wallet_id)
        .scalar_subquery()
    )
    return Prepared(
        select(
            frozen.label("frozen"),
            policy.label("policy"),
            grant.label("grant"),
            exists(select(webhooks.c.id)).label("webhooks"),
            wallets.c.address,
            wallets.c.key_version,
            wallet_keys.c.kek_version,
            wallet_keys.c.wrapped_dek,
            wallet_keys.c.ciphertext,
        )
        .join(
            wallet_keys,
            (wallet_keys.c.wallet_id == wallets.c.id) & (wallet_keys.c.key_version == wallets.c.key_version),
        )
        .where(wallets.c.id == wallet_id)
    )


async def _standing(conn: AsyncConnection, wallet_id: str, agent_id: str) -> Standing:
    """Lock the wallet, then read its freezes, policy, the agent's grant, its key and the webhooks.

    On PostgreSQL the lock is a statement of its own: a statement reads the data committed
    when it started, so a read that waited for the lock inside the same statement would miss
    a freeze or a policy committed while it waited. SQLite's transaction holds the database's
    write lock from its start (``BEGIN IMMEDIATE``).
    """
    await _locked(conn, wallet_id)
    row = await _standing_statement().first(conn, {"wallet": wallet_id, "agent": agent_id})
    if row is None:
        raise NotFound("no such wallet")
    scope = row.frozen
    frozen_text = None if scope is None else ("everything is frozen" if scope == "all" else f"this {scope} is frozen")
    envelope = KeyEnvelope(wallet_id, row.key_version, row.kek_version, bytes(row.wrapped_dek), bytes(row.ciphertext))
    return Standing(frozen_text, row.policy, row.grant, row.address, envelope, bool(row.webhooks))


@functools.cache
def _lock_statement() -> Prepared:
    from custody.storage.sql import wallets

    return Prepared(select(wallets.c.id).where(wallets.c.id == bindparam("wallet")).with_for_update())


async def _locked(conn: AsyncConnection, wallet_id: str) -> None:
    """Take the wallet's write lock (PostgreSQL; SQLite's write transaction already holds one)."""
    if conn.dialect.name == "postgresql":
        await _lock_statement().first(conn, {"wallet": wallet_id})


async def _submit(
    ctx: Context,
    principal: AgentPrincipal,
    wallet_id: str,
    method: Method,
    body: dict[str, Any],
    claim: Claim | None = None,
) -> Response:
    agent_id = principal.agent.id
    if wallet_id not in principal.wallet_ids:
        await _refused(ctx, agent_id, wallet_id, method, NotFound("no such wallet"))
    payment_id = "pay_" + secrets.token_hex(10)
    now = _now()
    started = time.perf_counter()
    answer: Response | None = None
    signature: Signature | None = None
    queued = 0
    undecided: CustodyError | None = None
    try:
        async with write_transaction(ctx.engine) as conn:
            if claim is not None:
                # First, so a twin request waits here (or fails) before it locks anything.
                await _insert_claim(conn, claim, payment_id, None)
            try:
                standing = await _standing(conn, wallet_id, agent_id)
                intent = _intent(method, body, wallet_id, standing.address, agent_id)
            except CustodyError as error:
                undecided = error  # rolled back: no claim, nothing recorded but the refusal below
                raise
            frozen = standing.frozen
            if frozen:
                if claim is not None:
                    # Not an answer to keep: the same request may succeed once unfrozen.
                    await conn.execute(delete(idempotency_keys).where(claim.where()))
                # Recorded, and committed, although nothing else happens.
                await ctx.audit.append_in(
                    conn,
                    "payment.refused",
                    actor=f"agent:{agent_id}",
                    subject=wallet_id,
                    data={"method": method, "code": "frozen", "intent": _intent_summary(intent)},
                )
            else:
                decision, signature, queued = await _decide_and_record(
                    ctx, conn, payment_id, wallet_id, principal, method, body, intent, now, standing
                )
                answer = _answer(payment_id, decision, signature, now)
                if answer is not None:
                    # The answer, whatever it is, commits with the decision and is what a replay gets.
                    await _bind(conn, claim, payment_id, answer)
                elif claim is not None:
                    # The signer was unavailable: nothing was signed, so a retry with this key runs afresh.
                    await conn.execute(delete(idempotency_keys).where(claim.where()))
    except CustodyError as error:
        if error is undecided:
            await _refused(ctx, agent_id, wallet_id, method, error)
        raise
    if frozen:
        ctx.metrics.refused("frozen", started)
        raise Frozen(f"{frozen}: no payment is signed until an operator unfreezes it")
    if claim is not None and answer is not None:
        claim.stored = True
    ctx.metrics.decided(decision, started)
    if queued:
        ctx.outbox_wake.set()  # webhook deliveries committed with the decision
    if signature is not None:
        _after_signing(signature)  # raises the signer's error if it failed
    if decision.outcome == "deny":
        raise _denial(payment_id, decision)
    if answer is None:
        raise DependencyUnavailable("the signer gave no signature")  # not reached: _after_signing raised
    return answer


async def _refused(ctx: Context, agent_id: str, wallet_id: str, method: str, error: CustodyError) -> NoReturn:
    """A request refused before any decision: recorded (by code; the body is not kept), then raised."""
    await ctx.audit.append(
        "payment.request_refused",
        actor=f"agent:{agent_id}",
        data={"wallet_id": wallet_id[:100], "method": method, "code": error.code},
    )
    ctx.metrics.refused(error.code)
    raise error


def _answer(payment_id: str, decision: Decision, signature: Signature | None, now: datetime) -> Response | None:
    """The answer to keep for a decided request; None when the same request may succeed if retried.

    The signer's refusal of the request itself (a 4xx) is kept: it would refuse it again. A
    signer that is unavailable or failed inside (5xx) leaves no answer, so a retry runs afresh.
    """
    if decision.outcome == "deny":
        denied = _denial(payment_id, decision)
        return Response(denied.status, denied.to_problem())
    if decision.outcome == "needs_approval":
        return Response(202, _pending_body(payment_id, decision, now + APPROVAL_TTL))
    if signature is None:
        return None
    if signature.result is not None:
        return Response(200, {"status": "signed", "payment_id": payment_id, "result": signature.result})
    error = signature.error
    if isinstance(error, CustodyError) and error.status < 500:
        return Response(error.status, error.to_problem())
    return None


def _denial(payment_id: str, decision: Decision) -> PolicyDenied:
    return PolicyDenied(_summary(decision), payment_id=payment_id, reasons=[reason_json(r) for r in decision.reasons])


async def _decide_and_record(
    ctx: Context,
    conn: AsyncConnection,
    payment_id: str,
    wallet_id: str,
    principal: AgentPrincipal,
    method: Method,
    body: dict[str, Any],
    intent: Intent,
    now: datetime,
    standing: Standing,
) -> tuple[Decision, Signature | None, int]:
    """Under the wallet lock: evaluate, sign if allowed, record the payment, its debits and its audit.

    Returns the decision, the signature (None unless allowed) and how many webhook deliveries
    were queued.
    """
    agent_id = principal.agent.id
    decision = await _evaluate(conn, wallet_id, agent_id, intent, now, standing)
    signature = await _signature(ctx, method, body, standing.envelope) if decision.outcome == "allow" else None
    if signature is not None:
        status = "signed" if signature.result is not None else "failed"
    else:
        status = {"deny": "denied", "needs_approval": "pending_approval"}[decision.outcome]
    expires_at = now + APPROVAL_TTL if decision.outcome == "needs_approval" else None
    await _INSERT_PAYMENT.run(
        conn,
        {
            "id": payment_id,
            "wallet_id": wallet_id,
            "agent_id": agent_id,
            "key_id": principal.key_id,
            "method": method,
            "request": json.dumps(body),
            "payee": intent.payee,
            "status": status,
            "decision": _decision_json(decision),
            "result": json.dumps(signature.result) if signature is not None and signature.result is not None else None,
            "quorum_group": decision.quorum.group if decision.quorum else None,
            "quorum_m": decision.quorum.m if decision.quorum else None,
            "created_at": now,
            "updated_at": now,
            "expires_at": expires_at,
        },
    )
    if status == "signed":
        await _reserve(conn, payment_id, wallet_id, agent_id, decision, now)
    queued = 0
    if decision.outcome == "needs_approval" and standing.webhooks:
        queued += await outbox.enqueue(
            conn,
            "payment.pending_approval",
            {
                "payment_id": payment_id,
                "wallet_id": wallet_id,
                "agent_id": agent_id,
                "intent": _intent_summary(intent),
                "quorum": decision.quorum.model_dump() if decision.quorum else None,
                "reasons": [reason_json(r) for r in decision.reasons],
                "expires_at": (now + APPROVAL_TTL).isoformat(),
            },
            now,
        )
    decided = Record(
        "payment.decided",
        f"agent:{agent_id}",
        payment_id,
        {
            "wallet_id": wallet_id,
            "method": method,
            "intent": _intent_summary(intent),
            "outcome": decision.outcome,
            "reasons": [{"code": r.code, "rule_id": r.rule_id} for r in decision.reasons],
        },
    )
    if signature is None:
        await ctx.audit.append_all_in(conn, [decided])
    else:
        queued += await _record_signing(
            ctx, conn, payment_id, wallet_id, signature, now, webhooks=standing.webhooks, first=decided
        )
    return decision, signature, queued


def _intent_summary(intent: Intent) -> dict[str, Any]:
    return {
        "kind": str(intent.kind),
        "chain_id": intent.chain_id,
        "asset": intent.asset,
        "amount": intent.amount,
        "payee": intent.payee,
        "purpose": intent.purpose,
        "origin": intent.origin,
    }


def _summary(decision: Decision) -> str:
    return "; ".join(reason.message for reason in decision.reasons) or "denied by policy"


def _pending_body(payment_id: str, decision: Decision, expires_at: datetime | None) -> dict[str, Any]:
    return {
        "status": "pending_approval",
        "payment_id": payment_id,
        "expires_at": expires_at.isoformat() if expires_at else None,
        "quorum": decision.quorum.model_dump() if decision.quorum else None,
        "reasons": [reason_json(r) for r in decision.reasons],
    }


async def _evaluate(
    conn: AsyncConnection,
    wallet_id: str,
    agent_id: str,
    intent: Intent,
    now: datetime,
    standing: Standing | None = None,
) -> Decision:
    if standing is None:
        found = await current_policy(conn, wallet_id)
        policy = found[1] if found is not None else None
    else:
        policy = policy_from_text(standing.policy) if standing.policy is not None else None
    if policy is None:
        return Decision(
            outcome="deny",
            reasons=(Reason(code="no_policy", rule_id="-", message="this wallet has no policy: it signs nothing"),),
        )
    try:
        if standing is None:
            grant = await current_grant(conn, agent_id, wallet_id, policy)
        else:
            grant = grant_from_text(standing.grant, policy, agent_id) if standing.grant is not None else None
    except GrantInvalid:
        # Fail closed: the narrowing the operator meant can no longer be applied.
        message = "this agent's grant no longer fits the wallet's policy; an operator must set it again"
        return Decision(outcome="deny", reasons=(Reason(code="grant_invalid", rule_id="-", message=message),))
    return await decide(conn, wallet_id, policy, intent, now, grant)


async def _reserve(
    conn: AsyncConnection, payment_id: str, wallet_id: str, agent_id: str, decision: Decision, now: datetime
) -> None:
    rows = [
        {
            "payment_id": payment_id,
            "wallet_id": wallet_id,
            "agent_id": agent_id,
            "counter": d.counter,
            "amount": d.amount,
            "at": now,
        }
        for d in decision.debits
        if d.amount > 0
    ]
    await record(conn, rows)


@dataclass(frozen=True)
class Signature:
    """What the signer gave for a payment: its result, or the error that stopped it."""

    result: dict[str, Any] | None
    error: Exception | None = None

    @property
    def code(self) -> str:
        error = self.error
        return error.code if isinstance(error, CustodyError) else type(error).__name__


async def _signature(ctx: Context, method: str, body: Mapping[str, Any], envelope: KeyEnvelope | None) -> Signature:
    """Ask the signer, with the wallet locked and the decision's transaction open.

    A failure is returned, not raised, so the transaction can record it: the payment is
    ``failed`` and nothing is debited. Anything that is not an ``Exception`` (a cancelled
    request) rolls the transaction back instead, which also leaves nothing behind.
    """
    started = time.perf_counter()
    try:
        if envelope is None:
            raise NotFound("no such wallet")
        if method == "transaction":
            result = await ctx.signer.sign_transaction(envelope, dict(body["transaction"]))
        elif method == "typed_data":
            result = await ctx.signer.sign_typed_data(envelope, dict(body["typed_data"]))
        else:
            result = await ctx.signer.sign_message(envelope, str(body["message"]))
    except Exception as error:  # recorded with the payment, raised after the commit
        signature = Signature(None, error)
        ctx.metrics.signed(method, started, error=signature.code)
        return signature
    ctx.metrics.signed(method, started)
    failpoints.hit("payment.after_sign")
    return Signature(result)


async def _record_signing(
    ctx: Context,
    conn: AsyncConnection,
    payment_id: str,
    wallet_id: str,
    signature: Signature,
    now: datetime,
    *,
    webhooks: bool = True,
    first: Record | None = None,
) -> int:
    """In the decision's transaction: the audit record of the signature (or of its failure) and its webhooks.

    ``first`` is a record to write before it, in the same statement (the decision's). Returns how
    many webhook deliveries were queued (``webhooks=False``: none are registered, as read
    under the wallet lock, so none are looked for).
    """
    before = [first] if first is not None else []
    if signature.result is None:
        failed = Record("payment.sign_failed", "signer", payment_id, {"code": signature.code})
        await ctx.audit.append_all_in(conn, [*before, failed])
        return 0
    # The transaction hash or the message hash: what was signed, never key material.
    digest = signature.result.get("hash") or signature.result.get("message_hash")
    await ctx.audit.append_all_in(conn, [*before, Record("payment.signed", "signer", payment_id, {"hash": digest})])
    if not webhooks:
        return 0
    return await outbox.enqueue(
        conn, "payment.signed", {"payment_id": payment_id, "wallet_id": wallet_id, "hash": digest}, now
    )


def _after_signing(signature: Signature) -> dict[str, Any]:
    """After the commit: hand out the result, or raise the signer's error.

    Nobody waits on a payment signed on its first request: its id is only known from this
    answer. Approvals wake the payment's long polls themselves (:func:`vote`).
    """
    if signature.result is None:
        raise signature.error or DependencyUnavailable("the signer gave no signature")
    failpoints.hit("payment.after_record")
    return signature.result


# Status ---------------------------------------------------------------------------------


def payment_body(row: Any, now: datetime) -> dict[str, Any]:
    status = row.status
    expires_at = as_utc(row.expires_at)
    if status == "pending_approval" and expires_at is not None and expires_at <= now:
        status = "expired"
    body: dict[str, Any] = {"payment_id": row.id, "status": status, "wallet_id": row.wallet_id}
    if row.result:
        body["result"] = json.loads(row.result)
    decision = json.loads(row.decision)
    if status in ("denied", "pending_approval"):
        body["reasons"] = [reason_json(Reason.model_validate(r)) for r in decision.get("reasons", [])]
    if status == "pending_approval" and expires_at is not None:
        body["expires_at"] = expires_at.isoformat()
        body["quorum"] = decision.get("quorum")
    return body


async def payment_status(ctx: Context, principal: AgentPrincipal, payment_id: str, wait: float = 0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(0.0, min(wait, 30.0))
    while True:
        # Listen before looking, so a change committed in between still wakes us.
        async with ctx.shared.waiter(f"payment:{payment_id}") as changed:
            async with ctx.engine.connect() as conn:
                row = (await conn.execute(select(payments).where(payments.c.id == payment_id))).first()
            if row is None or row.agent_id != principal.agent.id:
                raise NotFound("no such payment")
            body = payment_body(row, _now())
            left = deadline - loop.time()
            if body["status"] not in ("pending_approval", "reserved") or left <= 0:
                return body
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(left, ctx.shared.poll_interval))


async def spending_limits(ctx: Context, principal: AgentPrincipal, wallet_id: str) -> list[dict[str, Any]]:
    """What may this agent still spend from this wallet, per limit (amounts as decimal strings)."""
    if wallet_id not in principal.wallet_ids or await ctx.wallets.get(wallet_id) is None:
        raise NotFound("no such wallet")
    async with ctx.engine.connect() as conn:
        found = await current_policy(conn, wallet_id)
        if found is None:
            return []
        policy = found[1]
        try:
            grant = await current_grant(conn, principal.agent.id, wallet_id, policy)
        except GrantInvalid:
            raise Conflict(
                "this agent's grant no longer fits the wallet's policy; an operator must set it again"
            ) from None
        now = _now()
        return [
            {
                "rule_id": limit.rule_id,
                "source": limit.source,
                "counter": limit.counter,
                "limit": str(limit.limit),
                "spent": str(limit.spent),
                "remaining": str(limit.remaining),
                "window_start": limit.window_start.isoformat(),
                "window_end": limit.window_end.isoformat(),
                "resets_at": limit.resets_at.isoformat() if limit.resets_at else None,
            }
            for limit in await remaining(conn, wallet_id, policy, now, grant)
        ]


# Approvals ------------------------------------------------------------------------------


async def pending_approvals(ctx: Context) -> list[dict[str, Any]]:
    now = _now()
    async with ctx.engine.connect() as conn:
        rows = (await conn.execute(select(payments).where(payments.c.status == "pending_approval"))).all()
        votes = (await conn.execute(select(approval_votes))).all()
    result = []
    for row in rows:
        body = payment_body(row, now)
        if body["status"] != "pending_approval":
            continue
        body |= {
            "agent_id": row.agent_id,
            "method": row.method,
            "request": json.loads(row.request),
            "approvals": sorted(v.operator_id for v in votes if v.payment_id == row.id and v.vote == "approve"),
        }
        result.append(body)
    return result


async def vote(
    ctx: Context, operator: Operator, payment_id: str, choice: Literal["approve", "reject"], comment: str | None
) -> dict[str, Any]:
    """Record an approver's vote (see :func:`_vote`), then wake whoever waits on the payment.

    The webhook dispatcher is woken too, after the vote's transaction: a rejection, an
    approval and a signature each queue deliveries.
    """
    try:
        return await _vote(ctx, operator, payment_id, choice, comment)
    finally:
        ctx.outbox_wake.set()
        await ctx.shared.wake(f"payment:{payment_id}")


async def _vote(
    ctx: Context, operator: Operator, payment_id: str, choice: Literal["approve", "reject"], comment: str | None
) -> dict[str, Any]:
    """Record an approver's vote; on the last approval needed, re-evaluate, reserve and sign.

    Who may vote, and how many votes are needed, come from the payment evaluated again now
    against the current policy (so a policy change cannot leave it stuck on an old group).
    """
    now = _now()
    async with write_transaction(ctx.engine) as conn:
        row = (await conn.execute(select(payments).where(payments.c.id == payment_id))).first()
        if row is None:
            raise NotFound("no such payment")
        await _locked(conn, row.wallet_id)
        row = (await conn.execute(select(payments).where(payments.c.id == payment_id))).one()
        if row.status != "pending_approval":
            raise Conflict(f"the payment is {row.status}, not pending approval")
        expires_at = as_utc(row.expires_at)
        if expires_at is not None and expires_at <= now:
            await conn.execute(
                update(payments).where(payments.c.id == payment_id).values(status="expired", updated_at=now)
            )
            return {"payment_id": payment_id, "status": "expired"}
        frozen = await _frozen(conn, row.wallet_id, row.agent_id)
        if frozen:
            raise Frozen(f"{frozen}: vote again after an operator unfreezes it")
        found_wallet = await ctx.wallets.with_envelope(row.wallet_id)
        if found_wallet is None:
            raise NotFound("no such payment")
        wallet, envelope = found_wallet
        body = json.loads(row.request)
        intent = _intent(row.method, body, row.wallet_id, wallet.address, row.agent_id)
        fresh = await _evaluate(conn, row.wallet_id, row.agent_id, intent, now)
        found = await current_policy(conn, row.wallet_id)
        groups = found[1].approver_groups if found else {}
        stored = Decision.model_validate_json(row.decision)
        needed = list(_quorums(fresh) if fresh.outcome == "needs_approval" else _quorums(stored))
        if not any(_member(operator, groups.get(q.group)) for q in needed):
            raise Forbidden("you are not in an approver group this payment needs")
        already = (
            await conn.execute(
                select(approval_votes.c.id).where(
                    approval_votes.c.payment_id == payment_id, approval_votes.c.operator_id == operator.id
                )
            )
        ).first()
        if already is not None:
            raise Conflict("you have already voted on this payment")
        await conn.execute(
            insert(approval_votes).values(
                payment_id=payment_id, operator_id=operator.id, vote=choice, comment=comment, at=now
            )
        )
        await ctx.audit.append_in(
            conn,
            "approval.voted",
            actor=f"operator:{operator.id}",
            subject=payment_id,
            data={"vote": choice, "comment": comment},
        )
        if choice == "reject":
            await _finish(conn, payment_id, "rejected", None, now)
            await outbox.enqueue(
                conn,
                "payment.rejected",
                {"payment_id": payment_id, "wallet_id": row.wallet_id, "by": operator.id, "comment": comment},
                now,
            )
            ctx.metrics.rejected()
            return {"payment_id": payment_id, "status": "rejected"}
        approvers = {
            v.operator_id
            for v in await conn.execute(select(approval_votes).where(approval_votes.c.payment_id == payment_id))
            if v.vote == "approve"
        }
        names = await _names(ctx, approvers)
        if fresh.outcome == "needs_approval":
            if not _quorum_met(needed, groups, approvers, names):
                await conn.execute(
                    update(payments)
                    .where(payments.c.id == payment_id)
                    .values(
                        decision=_decision_json(fresh),
                        quorum_group=fresh.quorum.group if fresh.quorum else None,
                        quorum_m=fresh.quorum.m if fresh.quorum else None,
                        updated_at=now,
                    )
                )
                return {"payment_id": payment_id, "status": "pending_approval", "approvals": sorted(approvers)}
            fresh = fresh.model_copy(update={"outcome": "allow"})
        key_problem = await _key_problem(conn, row.key_id, row.wallet_id, now)
        if key_problem is not None:
            fresh = Decision(outcome="deny", reasons=(Reason(code="key_revoked", rule_id="-", message=key_problem),))
        await ctx.audit.append_in(
            conn,
            "payment.decided",
            actor=f"operator:{operator.id}",
            subject=payment_id,
            data={
                "wallet_id": row.wallet_id,
                "method": row.method,
                "intent": _intent_summary(intent),
                "outcome": fresh.outcome,
                "reasons": [{"code": r.code, "rule_id": r.rule_id} for r in fresh.reasons],
                "after_approval": True,
            },
        )
        ctx.metrics.decided_after_approval(fresh)
        if fresh.outcome == "deny":
            await _finish(conn, payment_id, "denied", fresh, now)
            return {"payment_id": payment_id, "status": "denied", "reasons": [reason_json(r) for r in fresh.reasons]}
        # Signed with the wallet still locked; the signature leaves only after this commits.
        signature = await _signature(ctx, row.method, body, envelope)
        if signature.result is not None:
            await _finish(conn, payment_id, "signed", fresh, now, result=signature.result)
            await _reserve(conn, payment_id, row.wallet_id, row.agent_id, fresh, now)
        else:
            await _finish(conn, payment_id, "failed", fresh, now)
        await outbox.enqueue(
            conn,
            "payment.approved",
            {"payment_id": payment_id, "wallet_id": row.wallet_id, "approvers": sorted(approvers)},
            now,
        )
        await _record_signing(ctx, conn, payment_id, row.wallet_id, signature, now)
    result = _after_signing(signature)
    return {"payment_id": payment_id, "status": "signed", "result": result}


def _quorums(decision: Decision) -> tuple[Quorum, ...]:
    return decision.approvals or ((decision.quorum,) if decision.quorum else ())


async def _finish(
    conn: AsyncConnection,
    payment_id: str,
    status: str,
    decision: Decision | None,
    now: datetime,
    *,
    result: dict[str, Any] | None = None,
) -> None:
    values: dict[str, Any] = {"status": status, "updated_at": now}
    if decision is not None:
        values["decision"] = _decision_json(decision)
    if result is not None:
        values["result"] = json.dumps(result)
    await conn.execute(update(payments).where(payments.c.id == payment_id).values(**values))


async def _key_problem(conn: AsyncConnection, key_id: str | None, wallet_id: str, now: datetime) -> str | None:
    """Why the key that asked for a payment may no longer have it signed (None when it may)."""
    if key_id is None:
        return None
    from custody.payments.agents import agent_keys

    key = (await conn.execute(select(agent_keys).where(agent_keys.c.id == key_id))).first()
    if key is None or key.revoked_at is not None:
        return "the agent key that asked for this payment has been revoked"
    expires = as_utc(key.expires_at)
    if expires is not None and expires <= now:
        return "the agent key that asked for this payment has expired"
    if wallet_id not in json.loads(key.wallet_ids):
        return "the agent key that asked for this payment may no longer use this wallet"
    return None


def _member(operator: Operator, group: Any) -> bool:
    return group is not None and (operator.id in group.members or operator.name in group.members)


async def _names(ctx: Context, operator_ids: set[str]) -> dict[str, str]:
    names = {}
    for operator_id in operator_ids:
        found = await ctx.operators.get(operator_id)
        if found is not None:
            names[operator_id] = found.name
    return names


def _quorum_met(needed: Any, groups: Mapping[str, Any], approvers: set[str], names: Mapping[str, str]) -> bool:
    for quorum in needed:
        group = groups.get(quorum.group)
        if group is None:
            return False
        count = sum(1 for op in approvers if op in group.members or names.get(op) in group.members)
        if count < quorum.m:
            return False
    return True
