"""Errors the SDK raises, rebuilt from the server's stable ``code``.

Every class here subclasses both the SDK's :class:`CustodyError` (which adds the
``problem`` document and the response's ``status``/``code``) and the server-side class
of the same name in :mod:`custody.errors`, so ``except custody.errors.NotFound`` and
``except custody.client.NotFound`` both catch a 404 from the API.

    CustodyError                         (any code the SDK does not know: .code, .status from the response)
    ├── InvalidRequest                   400  invalid_request
    │   ├── UnsupportedSigningMethod     400  unsupported_signing_method
    │   └── InvalidTransaction           400  invalid_transaction
    ├── Unauthorized                     401  unauthorized
    ├── Forbidden                        403  forbidden
    ├── PolicyDenied                     403  policy_denied      .reasons: list[Reason]
    ├── NotFound                         404  not_found          (a foreign wallet looks the same)
    ├── Conflict                         409  conflict
    │   └── IdempotencyConflict          409  idempotency_conflict
    ├── PayloadTooLarge                  413  payload_too_large
    ├── Frozen                           423  frozen
    ├── RateLimited                      429  rate_limited       .retry_after: float | None
    ├── KeyDecryptionError               500  key_decryption_failed
    ├── DependencyUnavailable            503  dependency_unavailable
    │   ├── DatabaseUnavailable          503  database_unavailable
    │   ├── SignerUnavailable            503  signer_unavailable
    │   └── SignerSealed                 503  signer_sealed
    ├── InvalidResponse                  (client side) the server's answer was not the documented contract,
    │                                    or a signature does not belong to the wallet's address
    ├── CustodyConnectionError           (client side) the service could not be reached (after retries)
    └── ApprovalError                    (client side) outcomes of a payment held for human approval
        ├── ApprovalPending              202  approval_pending   (CustodyAccount only: web3 needs a signature now)
        │   └── ApprovalTimeout          wait_for_approval gave up while the payment was still pending
        ├── ApprovalRejected             a human rejected the payment
        └── ApprovalExpired              nobody approved it in time

"Needs approval" from :class:`~custody.client.CustodyClient` is a *result* (``.pending``),
never an exception; only :class:`~custody.client.CustodyAccount` turns it into
:class:`ApprovalPending`, because eth-account callers expect a signature synchronously.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from custody import errors as _errors

if TYPE_CHECKING:
    from custody.client._models import Reason, SignResult

_STANDARD_PROBLEM_KEYS = frozenset({"type", "title", "status", "detail", "code", "instance"})


class CustodyError(_errors.CustodyError):
    """Base of every SDK error.

    ``code`` and ``status`` are the class's own for known codes; for a code the SDK does
    not know, they are the response's. ``problem`` is the whole RFC 9457 document (or, for
    errors raised on the client side, the document this error would have).
    """

    problem: dict[str, Any]

    def __init__(
        self,
        detail: str | None = None,
        *,
        problem: dict[str, Any] | None = None,
        code: str | None = None,
        status: int | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail, **extra)
        # Instance values shadow the class defaults only for codes this SDK does not know.
        if code is not None:
            self.__dict__["code"] = code
        if status is not None:
            self.__dict__["status"] = status
        self.problem = dict(problem) if problem is not None else self.to_problem()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status}, detail={self.detail!r})"


class InvalidRequest(CustodyError, _errors.InvalidRequest):
    pass


class UnsupportedSigningMethod(InvalidRequest, _errors.UnsupportedSigningMethod):
    pass


class InvalidTransaction(InvalidRequest, _errors.InvalidTransaction):
    pass


class Unauthorized(CustodyError, _errors.Unauthorized):
    pass


class Forbidden(CustodyError, _errors.Forbidden):
    pass


class PolicyDenied(CustodyError, _errors.PolicyDenied):
    """The policy refused the request. ``reasons`` says which rule, why, and what budget remains."""

    reasons: list[Reason]

    def __init__(self, detail: str | None = None, *, reasons: list[Reason] | None = None, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.reasons = list(reasons or [])


class NotFound(CustodyError, _errors.NotFound):
    pass


class Conflict(CustodyError, _errors.Conflict):
    pass


class IdempotencyConflict(Conflict, _errors.IdempotencyConflict):
    pass


class PayloadTooLarge(CustodyError, _errors.PayloadTooLarge):
    pass


class Frozen(CustodyError, _errors.Frozen):
    pass


class RateLimited(CustodyError):
    """Too many requests; ``retry_after`` (seconds, from the Retry-After header) says when to try again."""

    code: ClassVar[str] = "rate_limited"
    status: ClassVar[int] = 429
    title: ClassVar[str] = "Too many requests"
    retry_after: float | None

    def __init__(self, detail: str | None = None, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.retry_after = retry_after


class KeyDecryptionError(CustodyError, _errors.KeyDecryptionError):
    pass


class DependencyUnavailable(CustodyError, _errors.DependencyUnavailable):
    pass


class DatabaseUnavailable(DependencyUnavailable, _errors.DatabaseUnavailable):
    pass


class SignerUnavailable(DependencyUnavailable, _errors.SignerUnavailable):
    pass


class SignerSealed(DependencyUnavailable, _errors.SignerSealed):
    pass


class InvalidResponse(CustodyError):
    code: ClassVar[str] = "invalid_response"
    status: ClassVar[int] = 502
    title: ClassVar[str] = "The service's response does not follow the API contract"


class CustodyConnectionError(CustodyError):
    code: ClassVar[str] = "connection_error"
    status: ClassVar[int] = 503
    title: ClassVar[str] = "The custody service could not be reached"


class ApprovalError(CustodyError):
    """A payment that was held for human approval did not end in a signature (yet)."""

    code: ClassVar[str] = "approval_error"
    status: ClassVar[int] = 409
    title: ClassVar[str] = "The payment was not approved"
    payment_id: str

    def __init__(self, detail: str | None = None, *, payment_id: str, **kwargs: Any) -> None:
        super().__init__(detail, payment_id=payment_id, **kwargs)
        self.payment_id = payment_id


class ApprovalPending(ApprovalError):
    """The payment needs a human's approval; wait with ``client.wait_for_approval(exc.payment_id)``."""

    code: ClassVar[str] = "approval_pending"
    status: ClassVar[int] = 202
    title: ClassVar[str] = "The payment is waiting for human approval"
    result: SignResult[Any] | None

    def __init__(
        self, detail: str | None = None, *, payment_id: str, result: SignResult[Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(detail, payment_id=payment_id, **kwargs)
        self.result = result


class ApprovalTimeout(ApprovalPending):
    code: ClassVar[str] = "approval_timeout"
    title: ClassVar[str] = "Still waiting for human approval"


class ApprovalRejected(ApprovalError):
    code: ClassVar[str] = "approval_rejected"
    status: ClassVar[int] = 403
    title: ClassVar[str] = "A human rejected the payment"


class ApprovalExpired(ApprovalError):
    code: ClassVar[str] = "approval_expired"
    status: ClassVar[int] = 410
    title: ClassVar[str] = "The approval window ended without a decision"


_BY_CODE: dict[str, type[CustodyError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        UnsupportedSigningMethod,
        InvalidTransaction,
        Unauthorized,
        Forbidden,
        PolicyDenied,
        NotFound,
        Conflict,
        IdempotencyConflict,
        PayloadTooLarge,
        Frozen,
        RateLimited,
        KeyDecryptionError,
        DependencyUnavailable,
        DatabaseUnavailable,
        SignerUnavailable,
        SignerSealed,
    )
}


def error_class_for(code: str) -> type[CustodyError] | None:
    """The SDK class for a stable code, or ``None`` when the SDK does not know it."""
    return _BY_CODE.get(code)


def problem_extras(problem: dict[str, Any]) -> dict[str, Any]:
    """The members of a problem document beyond the RFC 9457 ones and ``code``."""
    return {key: value for key, value in problem.items() if key not in _STANDARD_PROBLEM_KEYS}
