"""One error tree for the whole service.

Every error carries a stable ``code`` (what clients match on), an HTTP ``status``
(used by the API's single problem+json handler) and a ``title``. Messages are meant
for people and never contain key material: error text is built from ids and codes,
never from secret values.

    CustodyError
    ├── InvalidRequest          400  invalid_request
    │   ├── UnsupportedSigningMethod  400  unsupported_signing_method
    │   ├── InvalidTransaction        400  invalid_transaction
    │   └── KekVersionUnchanged       400  kek_version_unchanged
    ├── PayloadTooLarge         413  payload_too_large
    ├── Unauthorized            401  unauthorized
    ├── Forbidden               403  forbidden
    ├── NotFound                404  not_found
    ├── PolicyDenied            403  policy_denied (carries every reason)
    ├── Conflict                409  conflict
    │   └── IdempotencyConflict 409  idempotency_conflict
    ├── Frozen                  423  frozen
    ├── ConfigurationError      (startup only) insecure_configuration
    ├── KeyDecryptionError      500  key_decryption_failed (uniform for any tamper)
    └── DependencyUnavailable   503  dependency_unavailable
        ├── DatabaseUnavailable 503  database_unavailable
        ├── SignerUnavailable   503  signer_unavailable
        └── SignerSealed        503  signer_sealed
"""

from __future__ import annotations

from typing import Any, ClassVar


class CustodyError(Exception):
    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        self.detail = detail or self.title
        self.extra = extra
        super().__init__(self.detail)

    def to_problem(self) -> dict[str, Any]:
        """The RFC 9457 problem document for this error (no ``instance``)."""
        body: dict[str, Any] = {
            "type": f"https://agent-custody.dev/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        body.update(self.extra)
        return body


class InvalidRequest(CustodyError):
    code = "invalid_request"
    status = 400
    title = "Invalid request"


class UnsupportedSigningMethod(InvalidRequest):
    code = "unsupported_signing_method"
    title = "Signing method refused"


class InvalidTransaction(InvalidRequest):
    code = "invalid_transaction"
    title = "Invalid transaction"


class KekVersionUnchanged(InvalidRequest):
    code = "kek_version_unchanged"
    title = "No newer key-encryption key version"


class PayloadTooLarge(CustodyError):
    code = "payload_too_large"
    status = 413
    title = "Request body too large"


class Unauthorized(CustodyError):
    code = "unauthorized"
    status = 401
    title = "Authentication required"


class Forbidden(CustodyError):
    code = "forbidden"
    status = 403
    title = "Not allowed"


class NotFound(CustodyError):
    code = "not_found"
    status = 404
    title = "Not found"


class Conflict(CustodyError):
    code = "conflict"
    status = 409
    title = "Conflict"


class IdempotencyConflict(Conflict):
    code = "idempotency_conflict"
    title = "Idempotency key reused with another request"


class PolicyDenied(CustodyError):
    code = "policy_denied"
    status = 403
    title = "Denied by policy"


class Frozen(CustodyError):
    code = "frozen"
    status = 423
    title = "Frozen by an operator"


class ConfigurationError(CustodyError):
    code = "insecure_configuration"
    status = 500
    title = "Refusing to start with this configuration"


class KeyDecryptionError(CustodyError):
    """Raised for every failure to open a wrapped key: one message, no hint of which byte."""

    code = "key_decryption_failed"
    status = 500
    title = "Stored key material could not be decrypted"


class RateLimited(CustodyError):
    """Too many requests from one agent; ``retry_after`` (seconds) is in the body and the header."""

    code = "rate_limited"
    status = 429
    title = "Too many requests"


class DependencyUnavailable(CustodyError):
    code = "dependency_unavailable"
    status = 503
    title = "A required dependency is unavailable"


class DatabaseUnavailable(DependencyUnavailable):
    code = "database_unavailable"
    title = "The database is unavailable"


class SignerUnavailable(DependencyUnavailable):
    code = "signer_unavailable"
    title = "The signer is not reachable"


class AuditUnavailable(DependencyUnavailable):
    """The audit record could not be written, so the action it records was not taken."""

    code = "audit_unavailable"
    title = "The audit log cannot be written"


class SignerSealed(DependencyUnavailable):
    code = "signer_sealed"
    title = "The signer is sealed"


_BY_CODE: dict[str, type[CustodyError]] = {}


def _register(cls: type[CustodyError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(CustodyError)


def error_from_code(code: str, detail: str | None = None, **extra: Any) -> CustodyError:
    """Rebuild an error from its stable code (used by the signer client and the SDK)."""
    cls = _BY_CODE.get(code, CustodyError)
    return cls(detail, **extra)
