"""The agent API over HTTP: :class:`CustodyClient` (sync) and :class:`AsyncCustodyClient`.

Both build the same requests and read the same responses (``_BaseClient``); only sending
and sleeping differ. Retries: only idempotent requests (every GET, and the sign calls,
which always carry an ``Idempotency-Key``), only for 503 answers and connection errors,
a bounded number of times with exponential backoff. Never for a 4xx.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from custody.client._exceptions import (
    ApprovalExpired,
    ApprovalRejected,
    ApprovalTimeout,
    CustodyConnectionError,
    CustodyError,
    DependencyUnavailable,
    InvalidResponse,
    InvalidTransaction,
    PolicyDenied,
    RateLimited,
    error_class_for,
    problem_extras,
)
from custody.client._models import (
    Limit,
    MessageSignature,
    Payment,
    SignResult,
    TransactionSignature,
    Wallet,
    parse_reasons,
)

__all__ = ["DEFAULT_TIMEOUT", "AsyncCustodyClient", "CustodyClient"]

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_RETRIES = 2
DEFAULT_RETRY_BACKOFF = 0.5
MAX_BACKOFF = 8.0
MAX_WAIT = 30  # seconds the server holds a long poll at most
MAX_IDEMPOTENCY_KEY = 200
_MIN_POLL_INTERVAL = 1.0
_USER_AGENT = "agent-custody-sdk/0.1"
# Transaction integers sent as decimal strings (safe for any JSON reader).
_QUANTITY_FIELDS = frozenset({"value", "gas", "gasPrice", "maxFeePerGas", "maxPriorityFeePerGas", "nonce", "chainId"})
_ADDRESS_FIELDS = frozenset({"to", "from"})
_DOMAIN_TYPES = {
    "name": "string",
    "version": "string",
    "chainId": "uint256",
    "verifyingContract": "address",
    "salt": "bytes32",
}

ModelT = TypeVar("ModelT", bound=BaseModel)
SignT = TypeVar("SignT", bound=SignResult[Any])
_TxResult = SignResult[TransactionSignature]
_MessageResult = SignResult[MessageSignature]


# ---------------------------------------------------------------------------- wire encoding


def _jsonable(value: Any) -> Any:
    """bytes become 0x-hex, tuples lists, mappings dicts; everything else is left to JSON."""
    if isinstance(value, bytes | bytearray | memoryview):
        return "0x" + bytes(value).hex()
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def _checksum(value: Any, field_name: str) -> Any:
    """A checksummed address string when eth-utils is installed; a string is passed on as given otherwise."""
    if value is None:
        return None
    try:
        from eth_utils.address import to_checksum_address
    except ImportError:  # the SDK's base install: the caller must give checksummed strings
        if isinstance(value, str):
            return value
        raise InvalidTransaction(f"'{field_name}' must be a checksummed address string") from None
    if isinstance(value, bytes | bytearray):
        value = "0x" + bytes(value).hex()
    try:
        return to_checksum_address(value)
    except (TypeError, ValueError):
        raise InvalidTransaction(f"'{field_name}' is not an address") from None


def _quantity(value: Any, field_name: str) -> str:
    if isinstance(value, bool):
        raise InvalidTransaction(f"'{field_name}' must be an integer")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value, 16) if value.lower().startswith("0x") else int(value, 10)
        except ValueError:
            raise InvalidTransaction(f"'{field_name}' is not a number") from None
    else:
        raise InvalidTransaction(f"'{field_name}' must be an integer")
    if number < 0:
        raise InvalidTransaction(f"'{field_name}' must not be negative")
    return str(number)


def encode_transaction(tx: Mapping[str, Any]) -> dict[str, Any]:
    """An eth-account style transaction dict as the API wants it (integers as decimal strings)."""
    if not isinstance(tx, Mapping):
        raise InvalidTransaction("the transaction must be a mapping")
    out: dict[str, Any] = {}
    for key, value in tx.items():
        if key in _QUANTITY_FIELDS:
            out[key] = _quantity(value, key)
        elif key == "type":
            out[key] = int(_quantity(value, key))
        elif key in _ADDRESS_FIELDS:
            out[key] = _checksum(value, key)
        else:
            out[key] = _jsonable(value)
    return out


def _is_integer_type(type_name: str) -> bool:
    return type_name.startswith(("uint", "int"))


def _encode_typed_value(types: Mapping[str, Any], type_name: str, value: Any) -> Any:
    if value is None:
        return None
    if type_name.endswith("]") and isinstance(value, list | tuple):
        inner = type_name[: type_name.rindex("[")]
        return [_encode_typed_value(types, inner, item) for item in value]
    if type_name in types and isinstance(value, Mapping):
        return _encode_struct(types, type_name, value)
    if _is_integer_type(type_name) and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _jsonable(value)


def _encode_struct(types: Mapping[str, Any], type_name: str, data: Mapping[str, Any]) -> dict[str, Any]:
    fields: dict[str, str] = {}
    for entry in types.get(type_name) or []:
        if isinstance(entry, Mapping) and isinstance(entry.get("name"), str) and isinstance(entry.get("type"), str):
            fields[entry["name"]] = entry["type"]
    return {
        str(key): _encode_typed_value(types, fields[key], item) if key in fields else _jsonable(item)
        for key, item in data.items()
    }


def encode_typed_data(document: Mapping[str, Any]) -> dict[str, Any]:
    """A full EIP-712 document for the wire: integer fields (by their EIP-712 type) as decimal strings.

    Only fields typed ``int*``/``uint*`` change, so the document hashes exactly as before
    (eth-account reads decimal strings for integer types).
    """
    types = document.get("types")
    if not isinstance(types, Mapping):
        return dict(_jsonable(document))
    domain_types = types.get("EIP712Domain") or [{"name": k, "type": v} for k, v in _DOMAIN_TYPES.items()]
    all_types = {**types, "EIP712Domain": domain_types}
    out: dict[str, Any] = {}
    for key, value in document.items():
        if key == "domain" and isinstance(value, Mapping):
            out[key] = _encode_struct(all_types, "EIP712Domain", value)
        elif key == "message" and isinstance(value, Mapping) and isinstance(document.get("primaryType"), str):
            out[key] = _encode_struct(all_types, document["primaryType"], value)
        else:
            out[key] = _jsonable(value)
    return out


# ---------------------------------------------------------------------------- reading responses


def _retry_after_seconds(response: httpx.Response) -> float | None:
    raw = response.headers.get("Retry-After")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        return None  # an HTTP date: not used by this API
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def error_from_response(response: httpx.Response) -> CustodyError:
    """Rebuild the typed error from a problem document (``code`` decides the class)."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("code"), str):
        fallback_code = f"http_{status}"
        message = f"HTTP {status} without a problem document"
        problem = {
            "type": "about:blank",
            "title": response.reason_phrase,
            "status": status,
            "detail": message,
            "code": fallback_code,
        }
        return CustodyError(message, problem=problem, code=fallback_code, status=status)
    code: str = body["code"]
    detail = body["detail"] if isinstance(body.get("detail"), str) else None
    extras = {
        key: value for key, value in problem_extras(body).items() if key not in {"problem", "reasons", "retry_after"}
    }
    cls = error_class_for(code)
    if cls is None:
        return CustodyError(detail, problem=body, code=code, status=status, **extras)
    if cls is PolicyDenied:
        try:
            reasons = parse_reasons(body.get("reasons"))
        except ValidationError:
            return InvalidResponse("a policy denial carried reasons the SDK could not read", problem=body)
        return PolicyDenied(detail, reasons=reasons, problem=body, **extras)
    if cls is RateLimited:
        return RateLimited(detail, retry_after=_retry_after_seconds(response), problem=body, **extras)
    return cls(detail, problem=body, **extras)


def _segment(value: str, what: str) -> str:
    if not isinstance(value, str) or value in {"", ".", ".."}:
        raise ValueError(f"{what} must be a non-empty id")
    return quote(value, safe="")


def _idempotency_key(given: str | None) -> str:
    if given is None:
        return str(uuid.uuid4())
    if not isinstance(given, str) or not 0 < len(given) <= MAX_IDEMPOTENCY_KEY or not given.isascii():
        raise ValueError(f"idempotency_key must be 1–{MAX_IDEMPOTENCY_KEY} ASCII characters")
    if not given.isprintable():
        raise ValueError("idempotency_key must be printable")
    return given


@dataclass(frozen=True)
class _Call:
    method: Literal["GET", "POST"]
    path: str
    json: dict[str, Any] | None = None
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    extra_read_timeout: float = 0.0
    idempotent: bool = True  # every call of the agent API is: GETs, and sign calls with their key


class _BaseClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float | httpx.Timeout,
        max_retries: int,
        retry_backoff: float,
    ) -> None:
        if not api_key:
            raise ValueError("api_key is required")
        if max_retries < 0 or retry_backoff < 0:
            raise ValueError("max_retries and retry_backoff must not be negative")
        self.base_url = base_url
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Accept": "application/json, application/problem+json",
            "User-Agent": _USER_AGENT,
        }

    def __repr__(self) -> str:  # never the API key
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # -- building requests

    def _request_timeout(self, call: _Call) -> httpx.Timeout:
        if not call.extra_read_timeout or self._timeout.read is None:
            return self._timeout
        return httpx.Timeout(
            connect=self._timeout.connect,
            read=self._timeout.read + call.extra_read_timeout,
            write=self._timeout.write,
            pool=self._timeout.pool,
        )

    def _sign_call(
        self,
        kind: str,
        wallet_id: str,
        payload: dict[str, Any],
        purpose: str | None,
        origin: str | None,
        idempotency_key: str | None,
    ) -> _Call:
        body = {**payload, "purpose": purpose, "origin": origin}
        return _Call(
            "POST",
            f"/v1/wallets/{_segment(wallet_id, 'wallet_id')}/sign/{kind}",
            json=body,
            headers={"Idempotency-Key": _idempotency_key(idempotency_key)},
        )

    @staticmethod
    def _payment_call(payment_id: str, wait: int | None) -> _Call:
        params: dict[str, str] = {}
        if wait is not None:
            if isinstance(wait, bool) or not isinstance(wait, int) or not 0 <= wait <= MAX_WAIT:
                raise ValueError(f"wait must be whole seconds from 0 to {MAX_WAIT}")
            params["wait"] = str(wait)
        return _Call(
            "GET",
            f"/v1/payments/{_segment(payment_id, 'payment_id')}",
            params=params,
            extra_read_timeout=float(wait or 0),
        )

    # -- retries

    def _should_retry(self, call: _Call, attempt: int, response: httpx.Response | None) -> bool:
        if not call.idempotent or attempt >= self.max_retries:
            return False
        return response is None or response.status_code == 503

    def _retry_delay(self, attempt: int, response: httpx.Response | None) -> float:
        delay: float = min(MAX_BACKOFF, self.retry_backoff * float(2**attempt))
        if response is not None:
            retry_after = _retry_after_seconds(response)
            if retry_after is not None:
                delay = min(MAX_BACKOFF, max(delay, retry_after))
        return delay

    # -- reading responses

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        if response.is_error:
            raise error_from_response(response)
        try:
            body = response.json()
        except ValueError:
            raise InvalidResponse(f"HTTP {response.status_code} with a body that is not JSON") from None
        if not isinstance(body, dict):
            raise InvalidResponse("the response is not a JSON object")
        return body

    @classmethod
    def _model(cls, model: type[ModelT], data: Any) -> ModelT:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise InvalidResponse(f"unexpected {model.__name__} document ({exc.error_count()} errors)") from None

    @classmethod
    def _list(cls, response: httpx.Response, key: str, model: type[ModelT]) -> list[ModelT]:
        items = cls._json(response).get(key)
        if not isinstance(items, list):
            raise InvalidResponse(f"the response has no '{key}' list")
        return [cls._model(model, item) for item in items]

    @classmethod
    def _sign_result(cls, response: httpx.Response, model: type[SignT]) -> SignT:
        body = cls._json(response)
        if response.status_code not in (200, 202):
            raise InvalidResponse(f"unexpected HTTP {response.status_code} for a sign call")
        result = cls._model(model, body)
        if result.signed and result.result is None:
            raise InvalidResponse("a signed response without a result")
        return result

    @staticmethod
    def _final_payment(payment: Payment) -> Payment | None:
        """The payment when signed; raises for the other final states; ``None`` while pending."""
        if payment.status == "signed":
            return payment
        pid = payment.payment_id
        if payment.status == "rejected":
            raise ApprovalRejected(f"payment {pid} was rejected", payment_id=pid)
        if payment.status == "expired":
            raise ApprovalExpired(f"payment {pid} expired before anyone approved it", payment_id=pid)
        if payment.status == "denied":
            raise PolicyDenied(f"payment {pid} was denied by policy", reasons=list(payment.reasons), payment_id=pid)
        if payment.status == "failed":
            raise DependencyUnavailable(
                f"payment {pid} could not be signed and its reservation was released; nothing was signed",
                payment_id=pid,
            )
        return None


class CustodyClient(_BaseClient):
    """A synchronous client of the agent API.

    >>> with CustodyClient("http://127.0.0.1:8700", api_key) as custody:   # doctest: +SKIP
    ...     outcome = custody.sign_transaction(wallet_id, tx, purpose="pay invoice 42")
    ...     if outcome.pending:
    ...         payment = custody.wait_for_approval(outcome.payment_id)
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        retry_backoff: float = DEFAULT_RETRY_BACKOFF,
    ) -> None:
        super().__init__(base_url, api_key, timeout=timeout, max_retries=max_retries, retry_backoff=retry_backoff)
        self._http = httpx.Client(base_url=base_url, headers=self._headers, timeout=self._timeout, transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> httpx.Response:
        attempt = 0
        while True:
            response: httpx.Response | None = None
            try:
                response = self._http.request(
                    call.method,
                    call.path,
                    json=call.json,
                    params=call.params or None,
                    headers=call.headers,
                    timeout=self._request_timeout(call),
                )
            except httpx.TransportError as exc:
                if not self._should_retry(call, attempt, None):
                    raise CustodyConnectionError(f"{type(exc).__name__} talking to {self.base_url}") from exc
            else:
                if not self._should_retry(call, attempt, response):
                    return response
                response.close()
            time.sleep(self._retry_delay(attempt, response))
            attempt += 1

    def wallets(self) -> list[Wallet]:
        """The wallets this API key may use."""
        return self._list(self._send(_Call("GET", "/v1/wallets")), "wallets", Wallet)

    def sign_transaction(
        self,
        wallet_id: str,
        tx: Mapping[str, Any],
        *,
        purpose: str | None = None,
        origin: str | None = None,
        idempotency_key: str | None = None,
    ) -> SignResult[TransactionSignature]:
        """Ask for a transaction signature; returns signed, or pending a human's approval."""
        call = self._sign_call(
            "transaction", wallet_id, {"transaction": encode_transaction(tx)}, purpose, origin, idempotency_key
        )
        return self._sign_result(self._send(call), _TxResult)

    def sign_typed_data(
        self,
        wallet_id: str,
        typed_data: Mapping[str, Any],
        *,
        purpose: str | None = None,
        origin: str | None = None,
        idempotency_key: str | None = None,
    ) -> SignResult[MessageSignature]:
        """Sign a full EIP-712 document (domain, types, primaryType, message), never a hash."""
        call = self._sign_call(
            "typed-data", wallet_id, {"typed_data": encode_typed_data(typed_data)}, purpose, origin, idempotency_key
        )
        return self._sign_result(self._send(call), _MessageResult)

    def sign_message(
        self,
        wallet_id: str,
        text: str,
        *,
        purpose: str | None = None,
        origin: str | None = None,
        idempotency_key: str | None = None,
    ) -> SignResult[MessageSignature]:
        """EIP-191 ``personal_sign`` of a text message."""
        call = self._sign_call("message", wallet_id, {"message": text}, purpose, origin, idempotency_key)
        return self._sign_result(self._send(call), _MessageResult)

    def payment(self, payment_id: str, *, wait: int | None = None) -> Payment:
        """A payment's state; with ``wait`` (0–30 s) the server answers when it changes or the wait ends."""
        return self._model(Payment, self._json(self._send(self._payment_call(payment_id, wait))))

    def wait_for_approval(self, payment_id: str, *, timeout: float = 300.0) -> Payment:
        """Long-poll until the payment is final: the signed payment, or ApprovalRejected / ApprovalExpired /
        PolicyDenied; ApprovalTimeout when ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        while True:
            started = time.monotonic()
            wait = max(0, min(MAX_WAIT, math.ceil(deadline - started)))
            payment = self.payment(payment_id, wait=wait)
            final = self._final_payment(payment)
            if final is not None:
                return final
            now = time.monotonic()
            if now >= deadline:
                raise ApprovalTimeout(f"payment {payment_id} is still waiting for approval", payment_id=payment_id)
            time.sleep(min(max(0.0, _MIN_POLL_INTERVAL - (now - started)), deadline - now))

    def limits(self, wallet_id: str) -> list[Limit]:
        """What this wallet may still spend, per cumulative limit."""
        call = _Call("GET", f"/v1/wallets/{_segment(wallet_id, 'wallet_id')}/limits")
        return self._list(self._send(call), "limits", Limit)


class AsyncCustodyClient(_BaseClient):
    """The asynchronous twin of :class:`CustodyClient` (same methods, awaited)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        retry_backoff: float = DEFAULT_RETRY_BACKOFF,
    ) -> None:
        super().__init__(base_url, api_key, timeout=timeout, max_retries=max_retries, retry_backoff=retry_backoff)
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=self._headers, timeout=self._timeout, transport=transport
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        attempt = 0
        while True:
            response: httpx.Response | None = None
            try:
                response = await self._http.request(
                    call.method,
                    call.path,
                    json=call.json,
                    params=call.params or None,
                    headers=call.headers,
                    timeout=self._request_timeout(call),
                )
            except httpx.TransportError as exc:
                if not self._should_retry(call, attempt, None):
                    raise CustodyConnectionError(f"{type(exc).__name__} talking to {self.base_url}") from exc
            else:
                if not self._should_retry(call, attempt, response):
                    return response
                await response.aclose()
            await asyncio.sleep(self._retry_delay(attempt, response))
            attempt += 1

    async def wallets(self) -> list[Wallet]:
        return self._list(await self._send(_Call("GET", "/v1/wallets")), "wallets", Wallet)

    async def sign_transaction(
        self,
        wallet_id: str,
        tx: Mapping[str, Any],
        *,
        purpose: str | None = None,
        origin: str | None = None,
        idempotency_key: str | None = None,
    ) -> SignResult[TransactionSignature]:
        call = self._sign_call(
            "transaction", wallet_id, {"transaction": encode_transaction(tx)}, purpose, origin, idempotency_key
        )
        return self._sign_result(await self._send(call), _TxResult)

    async def sign_typed_data(
        self,
        wallet_id: str,
        typed_data: Mapping[str, Any],
        *,
        purpose: str | None = None,
        origin: str | None = None,
        idempotency_key: str | None = None,
    ) -> SignResult[MessageSignature]:
        call = self._sign_call(
            "typed-data", wallet_id, {"typed_data": encode_typed_data(typed_data)}, purpose, origin, idempotency_key
        )
        return self._sign_result(await self._send(call), _MessageResult)

    async def sign_message(
        self,
        wallet_id: str,
        text: str,
        *,
        purpose: str | None = None,
        origin: str | None = None,
        idempotency_key: str | None = None,
    ) -> SignResult[MessageSignature]:
        call = self._sign_call("message", wallet_id, {"message": text}, purpose, origin, idempotency_key)
        return self._sign_result(await self._send(call), _MessageResult)

    async def payment(self, payment_id: str, *, wait: int | None = None) -> Payment:
        return self._model(Payment, self._json(await self._send(self._payment_call(payment_id, wait))))

    async def wait_for_approval(
        self,
        payment_id: str,
        *,
        timeout: float = 300.0,  # noqa: ASYNC109  # mirrors the sync client; the server holds each poll
    ) -> Payment:
        deadline = time.monotonic() + timeout
        while True:
            started = time.monotonic()
            wait = max(0, min(MAX_WAIT, math.ceil(deadline - started)))
            payment = await self.payment(payment_id, wait=wait)
            final = self._final_payment(payment)
            if final is not None:
                return final
            now = time.monotonic()
            if now >= deadline:
                raise ApprovalTimeout(f"payment {payment_id} is still waiting for approval", payment_id=payment_id)
            await asyncio.sleep(min(max(0.0, _MIN_POLL_INTERVAL - (now - started)), deadline - now))

    async def limits(self, wallet_id: str) -> list[Limit]:
        call = _Call("GET", f"/v1/wallets/{_segment(wallet_id, 'wallet_id')}/limits")
        return self._list(await self._send(call), "limits", Limit)
