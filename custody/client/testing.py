"""``FakeCustody``: an in-memory custody service for your tests (needs eth-account).

It answers the agent API exactly as the service does (paths, status codes, problem
documents, decimal strings), signs with real eth-account keys, and lets a test script
what the policy decides::

    fake = FakeCustody()
    wallet = fake.add_wallet("research-agent")
    with fake.client() as custody:                       # or httpx.MockTransport(fake.handler)
        fake.require_approval_next()
        outcome = custody.sign_message(wallet.id, "hello")
        fake.approve(outcome.payment_id)
        payment = custody.wait_for_approval(outcome.payment_id)

Idempotency (as the service does it): the answer to a processed request (a signature, a
pending approval, or any error from the payment path: 400, 403, 404, 423) is stored under
its ``Idempotency-Key`` and replayed for the same body; the same key with another body gets
409 ``idempotency_conflict``. Transient answers (every 5xx, e.g. ``signer_unavailable``) and
answers given before the request is processed (401, 429) are not stored, so a retry with
the same key proceeds.
Long polls (``?wait=``) answer at once: the fake has no other actor to wait for.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data
from eth_account.signers.local import LocalAccount

from custody import errors as _errors
from custody.client._client import DEFAULT_TIMEOUT, AsyncCustodyClient, CustodyClient
from custody.client._exceptions import error_class_for
from custody.client._models import Reason

__all__ = ["FakeCustody", "FakeWallet"]

PROBLEM_JSON = "application/problem+json"
_NUMERIC_FIELDS = frozenset(
    {"nonce", "gas", "gasPrice", "maxFeePerGas", "maxPriorityFeePerGas", "value", "chainId", "type"}
)
_STORED_STATUSES = frozenset({200, 202, 400, 403, 404, 413, 423})
_SIGN_ROUTE = re.compile(r"^/v1/wallets/([^/]+)/sign/(transaction|typed-data|message)$")
_LIMITS_ROUTE = re.compile(r"^/v1/wallets/([^/]+)/limits$")
_PAYMENT_ROUTE = re.compile(r"^/v1/payments/([^/]+)$")


class _Problem(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: Mapping[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra

    @classmethod
    def of(cls, error: _errors.CustodyError) -> _Problem:
        return cls(error.status, error.code, error.detail, **error.extra)


@dataclass
class FakeWallet:
    id: str
    name: str
    account: LocalAccount
    visible: bool = True  # False: it exists, but this API key may not use it (looks missing: 404)
    frozen: bool = False
    limits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return str(self.account.address)


@dataclass
class _Payment:
    payment_id: str
    wallet_id: str
    kind: str
    payload: Any
    status: str
    expires_at: datetime
    result: dict[str, Any] | None = None
    reasons: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Scripted:
    kind: str  # "deny" | "approval" | "fail"
    status: int = 0
    code: str = ""
    detail: str = ""
    reasons: list[dict[str, Any]] = field(default_factory=list)
    group: str = "approvers"
    m: int = 1
    headers: dict[str, str] = field(default_factory=dict)


def _reason_json(reason: Reason | Mapping[str, Any]) -> dict[str, Any]:
    data = reason.model_dump(mode="json", exclude_none=True) if isinstance(reason, Reason) else dict(reason)
    for key in ("limit", "remaining"):
        if isinstance(data.get(key), int):
            data[key] = str(data[key])  # integers above 2**53 travel as decimal strings
    data.setdefault("code", "policy_denied")
    data.setdefault("message", "denied by the test")
    return data


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class FakeCustody:
    """An in-memory agent API. Route requests to it with ``httpx.MockTransport(fake.handler)``."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str = "http://custody.test",
        now: Callable[[], datetime] | None = None,
        approval_window: timedelta = timedelta(hours=1),
    ) -> None:
        self.api_key = api_key or f"cak.fake.{secrets.token_urlsafe(16)}"
        self.base_url = base_url
        self.wallets: dict[str, FakeWallet] = {}
        self.payments: dict[str, _Payment] = {}
        self.requests: list[httpx.Request] = []
        self.frozen_everything = False
        self._now = now or (lambda: datetime.now(UTC))
        self._approval_window = approval_window
        self._script: deque[_Scripted] = deque()
        self._failures: deque[_Scripted] = deque()
        self._idempotency: dict[str, tuple[str, int, dict[str, Any], dict[str, str]]] = {}

    # ------------------------------------------------------------------ set up and script

    def add_wallet(
        self, name: str = "agent", *, key: bytes | str | None = None, visible: bool = True, wallet_id: str | None = None
    ) -> FakeWallet:
        """A wallet with a real key (random unless ``key`` is given); ``visible=False`` makes it foreign."""
        account: LocalAccount = Account.from_key(key) if key is not None else Account.create()
        wallet = FakeWallet(wallet_id or f"wal_{secrets.token_hex(8)}", name, account, visible=visible)
        self.wallets[wallet.id] = wallet
        return wallet

    def deny_next(
        self, reasons: Iterable[Reason | Mapping[str, Any]] = (), *, detail: str = "denied by policy"
    ) -> None:
        """The next sign call is denied (403 ``policy_denied`` with these reasons)."""
        self._script.append(_Scripted("deny", reasons=[_reason_json(r) for r in reasons], detail=detail))

    def require_approval_next(
        self, *, group: str = "approvers", m: int = 1, reasons: Iterable[Reason | Mapping[str, Any]] = ()
    ) -> None:
        """The next sign call is held for human approval (202 ``pending_approval``)."""
        self._script.append(_Scripted("approval", group=group, m=m, reasons=[_reason_json(r) for r in reasons]))

    def fail_next(
        self,
        code: str = "signer_unavailable",
        *,
        times: int = 1,
        status: int | None = None,
        detail: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """The next ``times`` requests (any route) fail with this problem, before anything else happens."""
        cls = error_class_for(code)
        resolved = status if status is not None else (cls.status if cls is not None else 500)
        text = detail or (cls.title if cls is not None else code)
        for _ in range(times):
            self._failures.append(
                _Scripted("fail", status=resolved, code=code, detail=text, headers=dict(headers or {}))
            )

    def approve(self, payment_id: str) -> None:
        """A human approves: the fake signs with the wallet's key."""
        payment = self._pending(payment_id)
        payment.result = self._sign(self.wallets[payment.wallet_id], payment.kind, payment.payload)
        payment.status = "signed"

    def reject(self, payment_id: str) -> None:
        self._pending(payment_id).status = "rejected"

    def expire(self, payment_id: str) -> None:
        self._pending(payment_id).status = "expired"

    def deny(self, payment_id: str, reasons: Iterable[Reason | Mapping[str, Any]] = ()) -> None:
        """A pending payment is denied on re-evaluation (e.g. the budget was used up meanwhile)."""
        payment = self._pending(payment_id)
        payment.status = "denied"
        payment.reasons = [_reason_json(r) for r in reasons]

    def set_limits(self, wallet_id: str, limits: Iterable[Mapping[str, Any]]) -> None:
        """What ``GET /v1/wallets/{id}/limits`` answers (ints become decimal strings)."""
        self.wallets[wallet_id].limits = [
            {key: str(value) if key in {"limit", "remaining"} else value for key, value in limit.items()}
            for limit in limits
        ]

    # ------------------------------------------------------------------ clients

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)

    def client(self, **kwargs: Any) -> CustodyClient:
        """A ``CustodyClient`` wired to this fake (no retry delay unless you pass ``retry_backoff``)."""
        kwargs.setdefault("retry_backoff", 0.0)
        kwargs.setdefault("timeout", DEFAULT_TIMEOUT)
        return CustodyClient(self.base_url, self.api_key, transport=self.transport(), **kwargs)

    def async_client(self, **kwargs: Any) -> AsyncCustodyClient:
        kwargs.setdefault("retry_backoff", 0.0)
        kwargs.setdefault("timeout", DEFAULT_TIMEOUT)
        return AsyncCustodyClient(self.base_url, self.api_key, transport=self.transport(), **kwargs)

    # ------------------------------------------------------------------ the HTTP side

    def handler(self, request: httpx.Request) -> httpx.Response:
        """The ``httpx.MockTransport`` handler (works for sync and async clients)."""
        self.requests.append(request)
        try:
            return self._route(request)
        except _Problem as problem:
            return self._problem_response(request, problem)

    def _problem_response(self, request: httpx.Request, problem: _Problem) -> httpx.Response:
        cls = error_class_for(problem.code)
        body = {
            "type": f"https://agent-custody.dev/problems/{problem.code}",
            "title": cls.title if cls is not None else problem.code,
            "status": problem.status,
            "detail": problem.detail,
            "code": problem.code,
            "instance": request.url.path,
            **problem.extra,
        }
        headers = {"content-type": PROBLEM_JSON, **problem.headers}
        if problem.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return httpx.Response(problem.status, content=json.dumps(body).encode(), headers=headers)

    def _route(self, request: httpx.Request) -> httpx.Response:
        if self._failures:
            failure = self._failures.popleft()
            raise _Problem(failure.status, failure.code, failure.detail, failure.headers)
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            raise _Problem.of(_errors.Unauthorized("a valid agent API key is required"))
        path = request.url.path
        if request.method == "GET" and path == "/v1/wallets":
            visible = [w for w in self.wallets.values() if w.visible]
            return _json(200, {"wallets": [{"id": w.id, "name": w.name, "address": w.address} for w in visible]})
        if match := _LIMITS_ROUTE.match(path):
            self._method(request, "GET")
            return _json(200, {"limits": self._wallet(match.group(1)).limits})
        if match := _PAYMENT_ROUTE.match(path):
            self._method(request, "GET")
            return self._payment_status(request, match.group(1))
        if match := _SIGN_ROUTE.match(path):
            self._method(request, "POST")
            return self._idempotent(request, lambda body: self._sign_call(match.group(1), match.group(2), body))
        raise _Problem.of(_errors.NotFound("no such resource"))

    @staticmethod
    def _method(request: httpx.Request, allowed: str) -> None:
        if request.method != allowed:
            raise _Problem(405, "http_405", "Method Not Allowed")

    def _wallet(self, wallet_id: str) -> FakeWallet:
        wallet = self.wallets.get(wallet_id)
        if wallet is None or not wallet.visible:  # a foreign wallet looks exactly like a missing one
            raise _Problem.of(_errors.NotFound(f"no wallet {wallet_id}"))
        return wallet

    def _idempotent(self, request: httpx.Request, handle: Callable[[dict[str, Any]], httpx.Response]) -> httpx.Response:
        try:
            body = json.loads(request.content or b"null")
        except ValueError:
            raise _Problem.of(_errors.InvalidRequest("the body is not JSON")) from None
        if not isinstance(body, dict):
            raise _Problem.of(_errors.InvalidRequest("the body must be a JSON object"))
        key = request.headers.get("Idempotency-Key")
        if key is not None and not 0 < len(key) <= 200:
            raise _Problem.of(_errors.InvalidRequest("Idempotency-Key must be 1–200 characters"))
        fingerprint = hashlib.sha256(
            (request.url.path + "\n" + json.dumps(body, sort_keys=True, separators=(",", ":"))).encode()
        ).hexdigest()
        if key is not None and key in self._idempotency:
            stored_fingerprint, status, stored_body, headers = self._idempotency[key]
            if stored_fingerprint != fingerprint:
                raise _Problem.of(_errors.IdempotencyConflict("this Idempotency-Key was used with another request"))
            return httpx.Response(status, content=json.dumps(stored_body).encode(), headers=headers)
        try:
            response = handle(body)
        except _Problem as problem:
            response = self._problem_response(request, problem)
        if key is not None and response.status_code in _STORED_STATUSES:
            self._idempotency[key] = (
                fingerprint,
                response.status_code,
                json.loads(response.content),
                {"content-type": response.headers["content-type"]},
            )
        return response

    def _sign_call(self, wallet_id: str, kind: str, body: dict[str, Any]) -> httpx.Response:
        wallet = self._wallet(wallet_id)
        for name in ("purpose", "origin"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise _Problem.of(_errors.InvalidRequest(f"'{name}' must be a string or null"))
        field_name = {"transaction": "transaction", "typed-data": "typed_data", "message": "message"}[kind]
        if field_name not in body:
            raise _Problem.of(_errors.InvalidRequest(f"'{field_name}' is required"))
        payload = body[field_name]
        if self.frozen_everything or wallet.frozen:
            raise _Problem.of(_errors.Frozen("this wallet is frozen by an operator"))
        result = self._sign(wallet, kind, payload)  # validates the request even when it will be held
        scripted = self._script.popleft() if self._script else None
        if scripted is not None and scripted.kind == "deny":
            raise _Problem(403, "policy_denied", scripted.detail, reasons=scripted.reasons)
        payment_id = f"pay_{secrets.token_hex(8)}"
        if scripted is not None and scripted.kind == "approval":
            payment = _Payment(
                payment_id, wallet.id, kind, payload, "pending_approval", self._now() + self._approval_window
            )
            self.payments[payment_id] = payment
            return _json(
                202,
                {
                    "status": "pending_approval",
                    "payment_id": payment_id,
                    "expires_at": _iso(payment.expires_at),
                    "quorum": {"group": scripted.group, "m": scripted.m},
                    "reasons": scripted.reasons,
                },
            )
        self.payments[payment_id] = _Payment(payment_id, wallet.id, kind, payload, "signed", self._now(), result)
        return _json(200, {"status": "signed", "payment_id": payment_id, "result": result})

    def _payment_status(self, request: httpx.Request, payment_id: str) -> httpx.Response:
        wait = request.url.params.get("wait")
        if wait is not None and (not wait.isdigit() or int(wait) > 30):
            raise _Problem.of(_errors.InvalidRequest("wait must be whole seconds from 0 to 30"))
        payment = self.payments.get(payment_id)
        if payment is None or not self.wallets[payment.wallet_id].visible:
            raise _Problem.of(_errors.NotFound(f"no payment {payment_id}"))
        body: dict[str, Any] = {"payment_id": payment.payment_id, "status": payment.status}
        if payment.result is not None:
            body["result"] = payment.result
        if payment.reasons:
            body["reasons"] = payment.reasons
        if payment.status == "pending_approval":
            body["expires_at"] = _iso(payment.expires_at)
        return _json(200, body)

    def _pending(self, payment_id: str) -> _Payment:
        payment = self.payments[payment_id]
        if payment.status != "pending_approval":
            raise ValueError(f"payment {payment_id} is {payment.status}, not pending")
        return payment

    # ------------------------------------------------------------------ signing (as the service's signer)

    def _sign(self, wallet: FakeWallet, kind: str, payload: Any) -> dict[str, Any]:
        account = wallet.account
        if kind == "transaction":
            tx = _normalize_transaction(payload, account.address)
            try:
                signed_tx = account.sign_transaction(tx)
            except (TypeError, ValueError, KeyError) as exc:
                raise _Problem.of(_errors.InvalidTransaction(f"transaction rejected: {type(exc).__name__}")) from None
            return {"raw_transaction": signed_tx.raw_transaction.to_0x_hex(), "hash": signed_tx.hash.to_0x_hex()}
        if kind == "typed-data":
            if not isinstance(payload, dict) or any(
                k not in payload for k in ("types", "primaryType", "domain", "message")
            ):
                raise _Problem.of(_errors.UnsupportedSigningMethod("typed data must be the full EIP-712 document"))
            try:
                signed = account.sign_message(encode_typed_data(full_message=payload))
            except (TypeError, ValueError, KeyError, AttributeError) as exc:
                raise _Problem.of(_errors.InvalidRequest(f"typed data rejected: {type(exc).__name__}")) from None
        else:
            if not isinstance(payload, str):
                raise _Problem.of(_errors.UnsupportedSigningMethod("only text messages are signed"))
            signed = account.sign_message(encode_defunct(text=payload))
        return {"signature": signed.signature.to_0x_hex(), "message_hash": signed.message_hash.to_0x_hex()}


def _json(status: int, body: dict[str, Any]) -> httpx.Response:
    return httpx.Response(status, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def _normalize_transaction(payload: Any, address: str) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise _Problem.of(_errors.InvalidTransaction("the transaction must be an object"))
    if "authorizationList" in payload or str(payload.get("type")) in {"4", "0x4"}:
        raise _Problem.of(_errors.UnsupportedSigningMethod("EIP-7702 authorizations are refused"))
    tx: dict[str, Any] = {}
    for key, value in payload.items():
        if key in _NUMERIC_FIELDS and isinstance(value, str):
            try:
                tx[key] = int(value, 16) if value.lower().startswith("0x") else int(value)
            except ValueError:
                raise _Problem.of(_errors.InvalidTransaction(f"'{key}' is not a number")) from None
        else:
            tx[key] = value
    if not isinstance(tx.get("chainId"), int) or tx["chainId"] < 1:
        raise _Problem.of(_errors.InvalidTransaction("chainId is required"))
    sender = tx.pop("from", None)
    if sender is not None and str(sender).lower() != address.lower():
        raise _Problem.of(_errors.InvalidTransaction("'from' is not this wallet's address"))
    if tx.get("type") == 0:
        tx.pop("type")
    return tx
