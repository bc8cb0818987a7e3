"""The tamper-evident audit log: append-only, hash-chained, verifiable and exportable."""

from custody.audit.log import (
    GENESIS_HASH,
    AuditEvent,
    AuditLog,
    AuditTampered,
    VerifyResult,
    canonical_json,
    event_hash,
)

__all__ = [
    "GENESIS_HASH",
    "AuditEvent",
    "AuditLog",
    "AuditTampered",
    "VerifyResult",
    "canonical_json",
    "event_hash",
]
