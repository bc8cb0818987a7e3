"""The agent tools: one framework-neutral toolkit behind the MCP server, LangChain and OpenAI Agents.

:class:`CustodyTools` wraps a :class:`~custody.client.CustodyClient` (the agent's API key) and,
for paying, a web3.py connection per chain. Every method returns a plain JSON-able ``dict``;
amounts, limits and budgets are integers in base units written as decimal strings. A failure
the model can act on (a policy denial, a frozen wallet, a rate limit, a missing wallet, a
service that is down, a bad argument) raises :class:`CustodyToolError`: ``str(error)`` is a
short message for the model and ``error.data`` the same as JSON. The adapters hand that
message to the model instead of a traceback.

A payment held for human approval is a result (``status: pending_approval``), never an
error, and never decided here: operators approve through the admin API or the CLI.

Needs web3 (paying) and x402 (``sign_x402_payment``) besides the SDK.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import json
import re
import threading
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from eth_abi.abi import encode as abi_encode
from eth_utils.address import is_checksum_address, to_checksum_address
from pydantic import BeforeValidator, Field
from web3 import Web3
from web3.exceptions import TimeExhausted, TransactionNotFound

from custody.client import (
    ApprovalPending,
    CustodyAccount,
    CustodyClient,
    CustodyConnectionError,
    CustodyError,
    DependencyUnavailable,
    Forbidden,
    Frozen,
    IdempotencyConflict,
    InvalidRequest,
    InvalidResponse,
    MessageSignature,
    NotFound,
    Payment,
    PolicyDenied,
    RateLimited,
    Reason,
    SignResult,
    TransactionSignature,
    Unauthorized,
    Wallet,
)

if TYPE_CHECKING:
    from x402 import SpendControls

__all__ = [
    "TOOL_DESCRIPTIONS",
    "AmountArg",
    "CustodyToolError",
    "CustodyTools",
    "ToolSpec",
    "parse_amount",
]

MAX_UINT256 = 2**256 - 1
ERC20_TRANSFER_SELECTOR = bytes.fromhex("a9059cbb")  # transfer(address,uint256)
NATIVE_TRANSFER_GAS = 21_000
_DIGITS = re.compile(r"[0-9]+")
_HEX_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_PAYMENT_STATUS_MAX_WAIT = 30


class CustodyToolError(Exception):
    """A failure the model can act on. ``str(error)`` is the message; ``data`` has ``code`` and details."""

    def __init__(self, message: str, *, code: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.data: dict[str, Any] = {"status": "error", "code": code, "message": message, **data}


# ---------------------------------------------------------------------------- arguments


def parse_amount(value: object, name: str = "amount") -> int:
    """An amount in base units: an ``int`` or a string of digits; floats and decimals are refused."""
    if isinstance(value, bool):
        raise CustodyToolError(f"{name} must be an integer in base units, not a boolean", code="invalid_argument")
    if isinstance(value, float | Decimal):
        raise CustodyToolError(
            f"{name} must be an integer in base units (e.g. wei, or 10^-decimals of a token), not a "
            f"{type(value).__name__} ({value!r}): multiply by 10^decimals yourself and send whole digits, "
            'e.g. 1.5 USDC with 6 decimals is "1500000"',
            code="invalid_argument",
        )
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        if not _DIGITS.fullmatch(text):
            raise CustodyToolError(
                f"{name} must be a whole number of base units written as digits only (got {value[:40]!r}); "
                'no decimal point, sign, exponent or unit: 1.5 USDC with 6 decimals is "1500000"',
                code="invalid_argument",
            )
        number = int(text)
    else:
        raise CustodyToolError(f"{name} must be an integer in base units", code="invalid_argument")
    if number <= 0:
        raise CustodyToolError(f"{name} must be greater than zero", code="invalid_argument")
    if number > MAX_UINT256:
        raise CustodyToolError(f"{name} is larger than a uint256", code="invalid_argument")
    return number


def _amount_argument(value: object) -> object:
    """Pydantic hook for tool schemas: turn a CustodyToolError into a validation error with the same text."""
    try:
        return parse_amount(value)
    except CustodyToolError as exc:
        raise ValueError(exc.message) from None


AMOUNT_HELP = (
    "Integer amount in base units (wei for the native coin; for a token, the amount times 10^decimals), "
    'as digits, e.g. "1500000" for 1.5 USDC (6 decimals). Never a decimal or a float.'
)
# The amount parameter of the adapters' tool schemas: an integer or a string of digits.
AmountArg = Annotated[int | str, BeforeValidator(_amount_argument), Field(description=AMOUNT_HELP)]


def _address(value: object, name: str) -> str:
    """A checksummed address; a mixed-case address with a wrong checksum is refused (likely a typo)."""
    if not isinstance(value, str) or not _HEX_ADDRESS.fullmatch(value.strip()):
        raise CustodyToolError(f"{name} must be a 0x-prefixed 20-byte hex address", code="invalid_argument")
    text = value.strip()
    body = text[2:]
    if body != body.lower() and body != body.upper() and not is_checksum_address(text):
        raise CustodyToolError(
            f"{name} {text} has a wrong checksum (mixed case that does not match EIP-55): check the address",
            code="invalid_argument",
        )
    return str(to_checksum_address(text))


def _decimal_or_none(value: int | None) -> str | None:
    return None if value is None else str(value)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return str(value.isoformat().replace("+00:00", "Z"))


def _reason(reason: Reason) -> dict[str, Any]:
    return {
        "code": reason.code,
        "rule_id": reason.rule_id,
        "message": reason.message,
        "counter": reason.counter,
        "limit": _decimal_or_none(reason.limit),
        "remaining": _decimal_or_none(reason.remaining),
        "resets_at": _iso(reason.resets_at),
    }


def _reason_line(reason: Reason) -> str:
    line = f"- {reason.code}"
    if reason.rule_id:
        line += f" (rule {reason.rule_id})"
    line += f": {reason.message}"
    if reason.remaining is not None:
        line += f"; remaining {reason.remaining} base units"
        if reason.counter:
            line += f" of {reason.counter}"
        if reason.limit is not None:
            line += f" (limit {reason.limit})"
    if reason.resets_at is not None:
        line += f"; resets at {_iso(reason.resets_at)}"
    return line


# ---------------------------------------------------------------------------- errors for the model


def _tool_error(exc: CustodyError) -> CustodyToolError:
    """The SDK's error as a message the model can act on (never carries the API key)."""
    detail = exc.detail
    if isinstance(exc, PolicyDenied):
        lines = [
            "Denied by policy: nothing was signed. Repeating the same request will be denied again; change it "
            "(a smaller amount, an allowed payee, asset or chain) or wait until the budget resets. Reasons:",
            *(_reason_line(reason) for reason in exc.reasons),
        ]
        if not exc.reasons:
            lines.append(f"- {detail}")
        extra: dict[str, Any] = {"reasons": [_reason(r) for r in exc.reasons]}
        if isinstance(exc.extra.get("payment_id"), str):
            extra["payment_id"] = exc.extra["payment_id"]
        error = CustodyToolError("\n".join(lines), code="policy_denied", **extra)
        error.data["status"] = "denied"
        return error
    if isinstance(exc, Frozen):
        return CustodyToolError(
            "Frozen: an operator froze this wallet, this agent or all signing. Nothing can be signed until an "
            "operator unfreezes it; do not retry, tell the user.",
            code="frozen",
        )
    if isinstance(exc, RateLimited):
        after = f"after {exc.retry_after:g} seconds" if exc.retry_after is not None else "in a little while"
        return CustodyToolError(
            f"Rate limited: too many requests. Nothing was signed; try again {after}.",
            code="rate_limited",
            retry_after=exc.retry_after,
        )
    if isinstance(exc, NotFound):
        return CustodyToolError(
            f"Not found: {detail}. This agent's key may only use the wallets listed by the `wallets` tool, "
            "and only see its own payments.",
            code="not_found",
        )
    if isinstance(exc, CustodyConnectionError | DependencyUnavailable):
        return CustodyToolError(
            f"The custody service is unavailable right now ({exc.code}); nothing was signed. Try again in a minute.",
            code=exc.code,
        )
    if isinstance(exc, Unauthorized):
        return CustodyToolError(
            "The custody service refused this agent's API key (unauthorized): it may be revoked or expired. "
            "An operator must issue a new key; do not retry.",
            code="unauthorized",
        )
    if isinstance(exc, Forbidden):
        return CustodyToolError(f"Forbidden: {detail}", code="forbidden")
    if isinstance(exc, IdempotencyConflict):
        return CustodyToolError(f"Conflict: {detail}", code="idempotency_conflict")
    if isinstance(exc, InvalidRequest):
        return CustodyToolError(f"The custody service refused the request ({exc.code}): {detail}", code=exc.code)
    if isinstance(exc, InvalidResponse):
        return CustodyToolError(
            f"The custody service gave an answer that could not be trusted or read ({detail}); nothing was paid.",
            code="invalid_response",
        )
    return CustodyToolError(f"The custody service answered {exc.code}: {detail}", code=exc.code)


# ---------------------------------------------------------------------------- the toolkit


@dataclass(frozen=True)
class ToolSpec:
    """One tool as every adapter registers it: a name, a description for the model and a typed function."""

    name: str
    description: str
    function: Callable[..., dict[str, Any]]

    def adapt(
        self,
        on_error: Callable[[CustodyToolError], Exception],
        convert: Callable[[dict[str, Any]], Any] | None = None,
        returns: Any = None,
    ) -> Callable[..., Any]:
        """The function for a framework: the same parameters (annotations resolved), ``on_error`` applied
        to a :class:`CustodyToolError`, and the result passed through ``convert`` (typed ``returns``)."""
        hints = typing.get_type_hints(self.function, include_extras=True)
        signature = inspect.signature(self.function)
        parameters = [p.replace(annotation=hints[p.name]) for p in signature.parameters.values()]
        return_type = returns if returns is not None else hints.get("return", Any)
        function = self.function

        def tool(*args: Any, **kwargs: Any) -> Any:
            try:
                result = function(*args, **kwargs)
            except CustodyToolError as exc:
                raise on_error(exc) from None
            return convert(result) if convert is not None else result

        tool.__name__ = tool.__qualname__ = self.name
        tool.__doc__ = self.description
        tool.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=parameters, return_annotation=return_type
        )
        tool.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": return_type}
        return tool


TOOL_DESCRIPTIONS: dict[str, str] = {
    "wallets": (
        "List the wallets this agent may pay from (id, name, address; one may be the default) and the chain ids "
        "it can pay on. Call this first."
    ),
    "limits": (
        "Show the spending limits of a wallet: for each cap or rate limit, the limit, what remains now (integers "
        "in base units as decimal strings) and when it resets. Use it before paying to stay within budget."
    ),
    "pay": (
        "Pay from a wallet on a chain: the native coin, or an ERC-20 token when `token` is its contract address. "
        "The custody service checks the payment against the policy a human set, signs it and this tool sends it "
        "to the chain. Returns the transaction hash and the payment id. If the policy denies it, the answer says "
        "why and what budget remains: change the payment instead of retrying. If a human must approve it, the "
        "status is pending_approval: people decide that outside this conversation, so tell the user and check "
        "`payment_status` later; it sends the transaction once approved."
    ),
    "payment_status": (
        "The status of a payment by its id: pending_approval, signed, denied, rejected or expired. For a signed "
        "transaction it reports whether it is on chain, and sends it if an approved payment was not sent yet. "
        "`wait_seconds` (0-30) waits for a change first."
    ),
    "sign_x402_payment": (
        "Pay for an HTTP resource that answered 402 Payment Required (the x402 protocol): give the 402 response "
        "body as JSON text, or the PAYMENT-REQUIRED header value. Returns the header name and value to send with "
        "the retried request. The policy applies as for `pay`."
    ),
}


class CustodyTools:
    """The toolkit: ``wallets``, ``limits``, ``pay``, ``payment_status``, ``sign_x402_payment``.

    ``chains`` gives a web3 connection per chain id; ``rpc_urls`` a JSON-RPC URL per chain id
    (connected on first use, and checked to really be that chain). ``default_wallet`` (an id,
    name or address) is used when a call names no wallet; with a single wallet, that one.
    ``x402_spend_controls`` are the x402 client's own limits (``None``: the x402 package's
    defaults, known USDC deployments up to $1 a payment); the custody policy applies anyway.
    ``receipt_timeout`` is how long ``pay`` waits for the transaction to be mined.
    """

    def __init__(
        self,
        client: CustodyClient,
        *,
        chains: Mapping[int, Web3] | None = None,
        rpc_urls: Mapping[int, str] | None = None,
        default_wallet: str | None = None,
        x402_spend_controls: SpendControls | Literal[False] | None = None,
        receipt_timeout: float = 30.0,
        rpc_timeout: float = 15.0,
    ) -> None:
        self.client = client
        self.default_wallet = default_wallet
        self.x402_spend_controls = x402_spend_controls
        self.receipt_timeout = receipt_timeout
        self._rpc_timeout = rpc_timeout
        self._chains: dict[int, Web3] = dict(chains or {})
        self._checked: set[int] = set(self._chains)
        self._rpc_urls: dict[int, str] = {int(k): v for k, v in (rpc_urls or {}).items() if int(k) not in self._chains}
        self._lock = threading.Lock()
        self._wallet_locks: dict[str, threading.Lock] = {}
        self._payment_chains: dict[str, int] = {}
        self._x402_pending: dict[str, _PendingX402] = {}

    def __repr__(self) -> str:  # neither the API key nor RPC URLs (they often embed a key)
        return f"CustodyTools(client={self.client!r}, chains={self.chain_ids})"

    @property
    def chain_ids(self) -> list[int]:
        return sorted({*self._chains, *self._rpc_urls})

    # ------------------------------------------------------------------ tool specs for the adapters

    def specs(self) -> list[ToolSpec]:
        """The five tools with typed signatures, for the MCP, LangChain and OpenAI Agents adapters."""
        tools = self

        def wallets() -> dict[str, Any]:
            return tools.wallets()

        def limits(
            wallet: Annotated[
                str | None, Field(description="Wallet id, name or address; empty for the default wallet.")
            ] = None,
        ) -> dict[str, Any]:
            return tools.limits(wallet)

        def pay(
            to: Annotated[str, Field(description="The payee's 0x address.")],
            amount: AmountArg,
            chain_id: Annotated[int, Field(description="The chain id to pay on (see `wallets`).")],
            token: Annotated[
                str | None,
                Field(description="ERC-20 token contract address; empty to pay the chain's native coin."),
            ] = None,
            wallet: Annotated[
                str | None, Field(description="Wallet id, name or address; empty for the default wallet.")
            ] = None,
            purpose: Annotated[
                str | None, Field(description="Why you pay (shown to the humans who review payments).")
            ] = None,
        ) -> dict[str, Any]:
            return tools.pay(wallet, to, amount, chain_id=chain_id, token=token, purpose=purpose)

        def payment_status(
            payment_id: Annotated[str, Field(description="The payment id (pay_...) from `pay`.")],
            wait_seconds: Annotated[
                int | None, Field(description="Wait up to this many seconds (0 to 30) for a change.")
            ] = None,
        ) -> dict[str, Any]:
            return tools.payment_status(payment_id, wait=wait_seconds or 0)

        def sign_x402_payment(
            payment_required: Annotated[
                str,
                Field(description="The 402 response body as JSON text, or the PAYMENT-REQUIRED header value."),
            ],
            wallet: Annotated[
                str | None, Field(description="Wallet id, name or address; empty for the default wallet.")
            ] = None,
            purpose: Annotated[str | None, Field(description="What you pay for.")] = None,
        ) -> dict[str, Any]:
            return tools.sign_x402_payment(wallet, payment_required, purpose=purpose)

        functions: list[Callable[..., dict[str, Any]]] = [wallets, limits, pay, payment_status, sign_x402_payment]
        return [ToolSpec(f.__name__, TOOL_DESCRIPTIONS[f.__name__], f) for f in functions]

    # ------------------------------------------------------------------ wallets and limits

    def wallets(self) -> dict[str, Any]:
        """The wallets this agent may use, which one is the default, and the chains it can pay on."""
        found = self._call(self.client.wallets)
        default = self._default_of(found)
        return {
            "wallets": [
                {"id": w.id, "name": w.name, "address": w.address, "default": default is not None and w is default}
                for w in found
            ],
            "chain_ids": self.chain_ids,
        }

    def limits(self, wallet_id: str | None = None) -> dict[str, Any]:
        """Each cumulative limit of the wallet: the limit, what remains and when it resets."""
        wallet = self._wallet(wallet_id)
        found = self._call(lambda: self.client.limits(wallet.id))
        items = []
        for limit in found:
            extra = limit.model_extra or {}
            items.append(
                {
                    "rule_id": limit.rule_id,
                    "counter": limit.counter,
                    "limit": str(limit.limit),
                    "remaining": str(limit.remaining),
                    "spent": None if extra.get("spent") is None else str(extra["spent"]),
                    "window_start": _iso(limit.window_start),
                    "window_end": _iso(limit.window_end),
                    "resets_at": _iso(limit.resets_at),
                }
            )
        result: dict[str, Any] = {"wallet_id": wallet.id, "address": wallet.address, "limits": items}
        if not items:
            result["note"] = "No cumulative limits apply; the policy can still deny a payment."
        return result

    # ------------------------------------------------------------------ paying

    def pay(
        self,
        wallet_id: str | None,
        to: str,
        amount: int | str,
        *,
        chain_id: int,
        token: str | None = None,
        purpose: str | None = None,
    ) -> dict[str, Any]:
        """Build, sign (through custody, within policy) and send a native or ERC-20 transfer."""
        value = parse_amount(amount)
        payee = _address(to, "to")
        token_address = _address(token, "token") if token else None
        if isinstance(chain_id, bool) or not isinstance(chain_id, int):
            raise CustodyToolError("chain_id must be an integer chain id", code="invalid_argument")
        wallet = self._wallet(wallet_id)
        w3 = self._web3(chain_id)
        if token_address is None:
            call: dict[str, Any] = {"to": payee, "value": value, "data": b""}
        else:
            calldata = ERC20_TRANSFER_SELECTOR + abi_encode(["address", "uint256"], [payee, value])
            call = {"to": token_address, "value": 0, "data": calldata}
        summary: dict[str, Any] = {
            "chain_id": chain_id,
            "from": wallet.address,
            "to": payee,
            "amount": str(value),
            "asset": token_address or "native",
        }
        with self._wallet_lock(wallet.id):
            tx = self._chain_call(chain_id, lambda: self._build_transaction(w3, chain_id, wallet.address, call))
            outcome = self._call(lambda: self.client.sign_transaction(wallet.id, tx, purpose=purpose))
            self._payment_chains[outcome.payment_id] = chain_id
            if outcome.pending:
                return self._pending(outcome, summary)
            signed = self._checked_transaction(wallet, outcome.result)
            self._send(w3, chain_id, signed.raw_transaction, outcome.payment_id)
        return {"payment_id": outcome.payment_id, **summary, **self._on_chain(w3, chain_id, signed.hash)}

    def payment_status(self, payment_id: str, *, wait: int = 0) -> dict[str, Any]:
        """A payment's status; a signed transaction's state on chain (sent now if it was not yet)."""
        if not isinstance(payment_id, str) or not payment_id.strip():
            raise CustodyToolError("payment_id is required (pay_...)", code="invalid_argument")
        if isinstance(wait, bool) or not isinstance(wait, int) or not 0 <= wait <= _PAYMENT_STATUS_MAX_WAIT:
            raise CustodyToolError(f"wait must be 0 to {_PAYMENT_STATUS_MAX_WAIT} seconds", code="invalid_argument")
        payment = self._call(lambda: self.client.payment(payment_id.strip(), wait=wait or None))
        out: dict[str, Any] = {"payment_id": payment.payment_id, "status": payment.status}
        if payment.expires_at is not None:
            out["expires_at"] = _iso(payment.expires_at)
        if payment.reasons:
            out["reasons"] = [_reason(r) for r in payment.reasons]
        out["message"] = _STATUS_MESSAGES.get(payment.status, "")
        if isinstance(payment.result, TransactionSignature):
            out.update(self._signed_transaction_status(payment))
        elif isinstance(payment.result, MessageSignature):
            out["signature"] = payment.result.signature
            pending_x402 = self._x402_pending.get(payment.payment_id)
            if pending_x402 is not None:
                out["x402"] = pending_x402.finish(payment.result.signature)
        return out

    # ------------------------------------------------------------------ x402

    def sign_x402_payment(
        self,
        wallet_id: str | None,
        payment_required: Mapping[str, Any] | str,
        *,
        purpose: str | None = None,
    ) -> dict[str, Any]:
        """Sign an x402 payment for a 402 answer; returns the header to send with the retried request."""
        from x402 import x402ClientSync
        from x402.http.utils import encode_payment_signature_header
        from x402.mechanisms.evm.exact.register import register_exact_evm_client
        from x402.schemas import PaymentRequired, PaymentRequiredV1

        from custody.integrations.x402 import CustodyX402Signer

        document = _payment_required_document(payment_required)
        version = document.get("x402Version", 2)
        try:
            parsed: PaymentRequired | PaymentRequiredV1 = (
                PaymentRequiredV1.model_validate(document) if version == 1 else PaymentRequired.model_validate(document)
            )
        except ValueError as exc:
            raise CustodyToolError(
                f"payment_required is not an x402 payment requirement ({_first_line(exc)})", code="invalid_argument"
            ) from None
        wallet = self._wallet(wallet_id)
        signer = _RecordingSigner(CustodyX402Signer(self.client, wallet.id, purpose=purpose, address=wallet.address))
        x402 = x402ClientSync()
        register_exact_evm_client(x402, signer)
        if self.x402_spend_controls is not None:
            x402.set_spend_controls(self.x402_spend_controls)
        try:
            payload = x402.create_payment_payload(parsed)
        except ApprovalPending as pending:
            record = _PendingX402.of(parsed, signer.last)
            if record is not None:
                self._x402_pending[pending.payment_id] = record
            result: dict[str, Any] = {
                "status": "pending_approval",
                "payment_id": pending.payment_id,
                "message": (
                    "A human must approve this x402 payment first; people decide that outside this conversation. "
                    "Tell the user, and check `payment_status` with this payment_id later: once it is signed it "
                    "returns the header to send"
                    + (f", valid until {record.valid_before_iso}." if record is not None else ".")
                ),
            }
            if pending.result is not None:
                result["reasons"] = [_reason(r) for r in pending.result.reasons]
            return result
        except CustodyError as exc:
            raise _tool_error(exc) from None
        except CustodyToolError:
            raise
        except Exception as exc:  # the x402 client's own refusals: no matching requirement, spend controls
            raise CustodyToolError(
                f"Cannot pay this x402 requirement: {_first_line(exc)}", code="x402_unsupported"
            ) from None
        header_name = "PAYMENT-SIGNATURE" if payload.x402_version == 2 else "X-PAYMENT"
        accepted = getattr(payload, "accepted", None)
        return {
            "status": "signed",
            "header_name": header_name,
            "header_value": encode_payment_signature_header(payload),
            "x402_version": payload.x402_version,
            "network": getattr(accepted, "network", None),
            "asset": getattr(accepted, "asset", None),
            "pay_to": getattr(accepted, "pay_to", None),
            "amount": getattr(accepted, "amount", None),
            "message": f"Send the retried request with the header {header_name}.",
        }

    # ------------------------------------------------------------------ internals: custody

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except CustodyError as exc:
            raise _tool_error(exc) from None

    def _default_of(self, found: list[Wallet]) -> Wallet | None:
        if self.default_wallet:
            return _match_wallet(found, self.default_wallet)
        return found[0] if len(found) == 1 else None

    def _wallet(self, wallet_id: str | None) -> Wallet:
        found: list[Wallet] = self._call(self.client.wallets)
        if not found:
            raise CustodyToolError("This agent may not use any wallet: an operator must grant one.", code="not_found")
        if wallet_id is None or not str(wallet_id).strip():
            default = self._default_of(found)
            if default is None:
                raise CustodyToolError(
                    "Several wallets are available: name one (id, name or address; see `wallets`).",
                    code="invalid_argument",
                )
            return default
        wallet = _match_wallet(found, str(wallet_id).strip())
        if wallet is None:
            raise CustodyToolError(
                f"No wallet {str(wallet_id)[:80]!r} for this agent; the `wallets` tool lists the ones it may use.",
                code="not_found",
            )
        return wallet

    def _wallet_lock(self, wallet_id: str) -> threading.Lock:
        with self._lock:
            return self._wallet_locks.setdefault(wallet_id, threading.Lock())

    def _pending(self, outcome: SignResult[Any], summary: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = {
            "status": "pending_approval",
            "payment_id": outcome.payment_id,
            **summary,
            "expires_at": _iso(outcome.expires_at),
            "approvers": None if outcome.quorum is None else {"group": outcome.quorum.group, "m": outcome.quorum.m},
            "reasons": [_reason(r) for r in outcome.reasons],
            "message": (
                "A human must approve this payment; people decide that outside this conversation, not through "
                "this tool. Nothing was sent yet. Tell the user, and call `payment_status` with this payment_id "
                "later: once it is approved and signed, payment_status sends the transaction."
            ),
        }
        return result

    def _checked_transaction(self, wallet: Wallet, result: Any) -> Any:
        """eth-account's SignedTransaction, after checking the signature is this wallet's."""
        account = CustodyAccount(self.client, wallet.id, wallet.address)
        return self._call(lambda: account.signed_transaction(result))

    # ------------------------------------------------------------------ internals: chains

    def _web3(self, chain_id: int) -> Web3:
        with self._lock:
            w3 = self._chains.get(chain_id)
            if w3 is None:
                url = self._rpc_urls.get(chain_id)
                if url is None:
                    raise CustodyToolError(
                        f"No connection to chain {chain_id} is configured; chains available: {self.chain_ids}.",
                        code="unknown_chain",
                    )
                w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": self._rpc_timeout}))
                self._chains[chain_id] = w3
        if chain_id not in self._checked:
            actual = self._chain_call(chain_id, lambda: int(w3.eth.chain_id))
            if actual != chain_id:
                raise CustodyToolError(
                    f"The node configured for chain {chain_id} is on chain {actual}: fix the configuration.",
                    code="chain_mismatch",
                )
            self._checked.add(chain_id)
        return w3

    def _chain_call(self, chain_id: int, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except CustodyToolError:
            raise
        except OSError as exc:  # requests' connection errors and timeouts are OSErrors
            raise CustodyToolError(
                f"The node for chain {chain_id} cannot be reached ({type(exc).__name__}); nothing was signed. "
                "Try again later.",
                code="chain_unreachable",
            ) from None
        except Exception as exc:  # web3 and the node raise many types; the text is what helps
            raise CustodyToolError(
                f"The node for chain {chain_id} answered: {self._scrub(_first_line(exc))}", code="chain_error"
            ) from None

    def _scrub(self, text: str) -> str:
        """Node errors may quote the RPC URL or its path, which often embed a provider key."""
        for url in self._rpc_urls.values():
            parts = urlsplit(url)
            pieces = [url, parts.netloc, parts.path, parts.query, parts.username or "", parts.password or ""]
            for piece in sorted((p for p in pieces if len(p) > 1), key=len, reverse=True):
                text = text.replace(piece, "<rpc url>")
        return text

    @staticmethod
    def _build_transaction(w3: Web3, chain_id: int, sender: str, call: dict[str, Any]) -> dict[str, Any]:
        nonce = w3.eth.get_transaction_count(sender, "pending")  # type: ignore[arg-type]
        estimate = {"from": sender, **call}
        gas = int(w3.eth.estimate_gas(estimate))  # type: ignore[arg-type]
        if gas != NATIVE_TRANSFER_GAS:
            gas = gas * 6 // 5  # code runs (a token, a contract payee): a margin; unused gas is not charged
        tx: dict[str, Any] = {"chainId": chain_id, "nonce": nonce, "gas": gas, **call}
        if not call["data"]:
            tx["data"] = "0x"
        else:
            tx["data"] = "0x" + bytes(call["data"]).hex()
        base_fee = w3.eth.get_block("latest").get("baseFeePerGas")
        if base_fee is None:  # a chain without EIP-1559
            tx["gasPrice"] = int(w3.eth.gas_price)
            return tx
        tip = int(w3.eth.max_priority_fee)
        tx.update({"type": 2, "maxPriorityFeePerGas": tip, "maxFeePerGas": 2 * int(base_fee) + tip})
        return tx

    def _send(self, w3: Web3, chain_id: int, raw: bytes, payment_id: str) -> None:
        try:
            w3.eth.send_raw_transaction(raw)
        except Exception as exc:
            raise CustodyToolError(
                f"Payment {payment_id} was signed, but the node for chain {chain_id} refused the transaction: "
                f"{self._scrub(_first_line(exc))}. Nothing was paid; check the wallet's balance, then pay again.",
                code="broadcast_failed",
                payment_id=payment_id,
            ) from None

    def _on_chain(self, w3: Web3, chain_id: int, tx_hash: bytes) -> dict[str, Any]:
        """Wait up to ``receipt_timeout`` for the receipt: confirmed, reverted or still submitted."""
        hex_hash = "0x" + bytes(tx_hash).hex()
        try:
            receipt = w3.eth.wait_for_transaction_receipt(
                tx_hash,  # type: ignore[arg-type]
                timeout=self.receipt_timeout,
                poll_latency=0.2,
            )
        except TimeExhausted:
            return {
                "status": "submitted",
                "tx_hash": hex_hash,
                "message": "Sent; not mined yet. `payment_status` reports when it is.",
            }
        except Exception as exc:
            return {
                "status": "submitted",
                "tx_hash": hex_hash,
                "message": f"Sent; the node could not report the receipt ({self._scrub(_first_line(exc))}).",
            }
        return _receipt_summary(hex_hash, receipt)

    def _signed_transaction_status(self, payment: Payment) -> dict[str, Any]:
        result = payment.result
        assert isinstance(result, TransactionSignature)
        out: dict[str, Any] = {"tx_hash": result.hash}
        raw = bytes.fromhex(result.raw_transaction.removeprefix("0x"))
        chain_id = self._payment_chains.get(payment.payment_id) or _chain_id_of(raw)
        if chain_id is None or chain_id not in self.chain_ids:
            out["chain"] = "unknown: no connection to this transaction's chain is configured here"
            return out
        out["chain_id"] = chain_id
        w3 = self._web3(chain_id)
        tx_hash = bytes.fromhex(result.hash.removeprefix("0x"))
        try:
            receipt = w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
        except TransactionNotFound:
            receipt = None
        except Exception as exc:
            raise CustodyToolError(
                f"The node for chain {chain_id} answered: {self._scrub(_first_line(exc))}", code="chain_error"
            ) from None
        if receipt is not None:
            return out | _receipt_summary(result.hash, receipt, key="chain_status")
        try:
            w3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
            known = True
        except TransactionNotFound:
            known = False
        except Exception:
            known = False
        if not known:  # approved later: it is this tool's job to send it
            self._send(w3, chain_id, raw, payment.payment_id)
        chain = self._on_chain(w3, chain_id, tx_hash)
        chain["chain_status"] = chain.pop("status")
        return out | chain


# ---------------------------------------------------------------------------- helpers


_STATUS_MESSAGES = {
    "pending_approval": "Waiting for a human's decision; check again later.",
    "signed": "Signed.",
    "denied": "Denied by policy on re-evaluation; nothing was signed.",
    "rejected": "A human rejected this payment; nothing was signed. Do not retry it unchanged.",
    "expired": "Nobody approved it in time; nothing was signed.",
}


def _match_wallet(found: list[Wallet], key: str) -> Wallet | None:
    for wallet in found:
        if key in (wallet.id, wallet.name) or key.lower() == wallet.address.lower():
            return wallet
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _receipt_summary(hex_hash: str, receipt: Any, *, key: str = "status") -> dict[str, Any]:
    ok = int(receipt["status"]) == 1
    return {
        key: "confirmed" if ok else "reverted",
        "tx_hash": hex_hash,
        "block_number": int(receipt["blockNumber"]),
        "gas_used": str(int(receipt["gasUsed"])),
        "message": "Mined: the payment is on chain."
        if ok
        else "Mined but reverted: the transfer did not happen (the gas was spent). Check the token balance.",
    }


def _chain_id_of(raw: bytes) -> int | None:
    """The chain id inside a signed transaction (typed or EIP-155 legacy)."""
    try:
        if raw and raw[0] <= 0x7F:
            from eth_account.typed_transactions.typed_transaction import TypedTransaction
            from hexbytes import HexBytes

            return int(TypedTransaction.from_bytes(HexBytes(raw)).as_dict()["chainId"])
        import rlp  # type: ignore[import-untyped]  # pyrlp ships no type information

        v = int.from_bytes(rlp.decode(raw)[6], "big")
        return (v - 35) // 2 if v >= 35 else None
    except Exception:  # not a transaction we can read: the caller says so
        return None


def _payment_required_document(value: Mapping[str, Any] | str) -> dict[str, Any]:
    """The 402 body as a dict, from a mapping, JSON text, or the base64 PAYMENT-REQUIRED header."""
    if isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, str) or not value.strip():
        raise CustodyToolError("payment_required is empty", code="invalid_argument")
    text = value.strip()
    if not text.startswith("{"):
        try:
            text = base64.b64decode(text, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise CustodyToolError(
                "payment_required must be the 402 body as JSON text or the base64 PAYMENT-REQUIRED header",
                code="invalid_argument",
            ) from None
    try:
        document = json.loads(text)
    except ValueError:
        raise CustodyToolError("payment_required is not valid JSON", code="invalid_argument") from None
    if not isinstance(document, dict):
        raise CustodyToolError("payment_required must be a JSON object", code="invalid_argument")
    return document


class _RecordingSigner:
    """Passes x402's signing requests to the custody signer and remembers the last one (for approvals)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.last: tuple[dict[str, Any], dict[str, Any], str, dict[str, Any]] | None = None

    @property
    def address(self) -> str:
        return str(self._inner.address)

    def sign_typed_data(self, domain: Any, types: Any, primary_type: str, message: dict[str, Any]) -> bytes:
        self.last = (_plain(domain), _plain(types), primary_type, dict(message))
        signature: bytes = self._inner.sign_typed_data(domain, types, primary_type, message)
        return signature


def _plain(value: Any) -> Any:
    """x402's dataclasses (domain, typed-data fields) as plain dicts."""
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return {k: v for k, v in asdict(value).items() if v is not None}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class _PendingX402:
    """An x402 EIP-3009 authorization waiting for approval: enough to build the header once it is signed."""

    payment_required: Any
    requirements: Any
    authorization: dict[str, Any]

    @property
    def valid_before_iso(self) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(self.authorization["validBefore"])))

    @classmethod
    def of(cls, payment_required: Any, last: Any) -> _PendingX402 | None:
        if last is None or getattr(payment_required, "x402_version", None) != 2:
            return None
        domain, _types, primary_type, message = last
        if primary_type != "TransferWithAuthorization":
            return None
        for requirements in payment_required.accepts:
            if (
                requirements.scheme == "exact"
                and str(requirements.network) == f"eip155:{domain.get('chainId', domain.get('chain_id'))}"
                and str(requirements.asset).lower()
                == str(domain.get("verifyingContract", domain.get("verifying_contract", ""))).lower()
                and str(requirements.pay_to).lower() == str(message.get("to", "")).lower()
                and str(requirements.amount) == str(message.get("value"))
            ):
                authorization = {
                    "from": message["from"],
                    "to": message["to"],
                    "value": str(message["value"]),
                    "validAfter": str(message["validAfter"]),
                    "validBefore": str(message["validBefore"]),
                    "nonce": _hex(message["nonce"]),
                }
                return cls(payment_required, requirements, authorization)
        return None

    def finish(self, signature: str) -> dict[str, Any]:
        from x402.http.utils import encode_payment_signature_header
        from x402.schemas import PaymentPayload

        if int(self.authorization["validBefore"]) <= time.time():
            return {
                "status": "expired",
                "message": "The authorization expired before it was approved; ask the resource again.",
            }
        payload = PaymentPayload(
            x402_version=2,
            payload={"authorization": self.authorization, "signature": signature},
            accepted=self.requirements,
            resource=self.payment_required.resource,
            extensions=self.payment_required.extensions,
        )
        return {
            "status": "signed",
            "header_name": "PAYMENT-SIGNATURE",
            "header_value": encode_payment_signature_header(payload),
            "message": f"Send the retried request with the header PAYMENT-SIGNATURE before {self.valid_before_iso}.",
        }


def _hex(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    return str(value)
