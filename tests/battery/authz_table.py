"""Who may call each route: the declared authorization table the matrix test holds the app to.

Every route of the application (method and path template) has one rule. A caller that is not
allowed gets 401 when it holds no credential of the kind the route takes (none, a malformed
one, a revoked or expired one, or one of the other kind: an agent key on an operator route or
the reverse), and 403 when it is an operator whose role is too low. An allowed caller gets
``ok`` for its own resources, 404 for another wallet's (it looks exactly like a missing one),
404 for a well-formed id that does not exist and 400 for a malformed one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Identity = Literal[
    "anonymous",
    "malformed",
    "revoked_key",
    "expired_key",
    "revoked_operator",
    "agent_a",
    "agent_b",
    "viewer",
    "approver",
    "admin",
]
IDENTITIES: tuple[Identity, ...] = (
    "anonymous",
    "malformed",
    "revoked_key",
    "expired_key",
    "revoked_operator",
    "agent_a",
    "agent_b",
    "viewer",
    "approver",
    "admin",
)
EVERYONE: frozenset[Identity] = frozenset(IDENTITIES)
AGENTS: frozenset[Identity] = frozenset({"agent_a", "agent_b"})
OPERATORS: frozenset[Identity] = frozenset({"viewer", "approver", "admin"})
APPROVERS: frozenset[Identity] = frozenset({"approver", "admin"})
ADMINS: frozenset[Identity] = frozenset({"admin"})


@dataclass(frozen=True)
class Rule:
    allowed: frozenset[Identity]
    credential: Literal["none", "agent", "operator"]
    ok: int
    ids: tuple[str, ...] = ()  # the parameters (path, query or body) that name a resource
    missing: int = 404
    malformed: int = 400

    def expected_for(self, who: Identity) -> int | None:
        """The status for a caller that is not allowed; None when it is (then the ids decide)."""
        if who in self.allowed:
            return None
        if self.credential == "operator" and who in OPERATORS:
            return 403
        return 401


def _public() -> Rule:
    return Rule(EVERYONE, "none", 200)


def _agent(ok: int = 200, *ids: str) -> Rule:
    return Rule(AGENTS, "agent", ok, ids)


def _operator(allowed: frozenset[Identity], ok: int = 200, *ids: str) -> Rule:
    return Rule(allowed, "operator", ok, ids)


TABLE: dict[tuple[str, str], Rule] = {
    # Health and documentation: public.
    ("GET", "/healthz"): _public(),
    ("GET", "/readyz"): _public(),
    ("GET", "/openapi.json"): _public(),
    ("GET", "/docs"): _public(),
    ("GET", "/docs/oauth2-redirect"): _public(),
    ("GET", "/redoc"): _public(),
    ("GET", "/metrics"): _operator(OPERATORS),
    # The agent API: agent keys only, each limited to the wallets it was issued for.
    ("GET", "/v1/wallets"): _agent(),
    ("POST", "/v1/wallets/{wallet_id}/sign/transaction"): _agent(200, "wallet_id"),
    ("POST", "/v1/wallets/{wallet_id}/sign/typed-data"): _agent(200, "wallet_id"),
    ("POST", "/v1/wallets/{wallet_id}/sign/message"): _agent(200, "wallet_id"),
    ("GET", "/v1/payments/{payment_id}"): _agent(200, "payment_id"),
    ("GET", "/v1/wallets/{wallet_id}/limits"): _agent(200, "wallet_id"),
    # The operator API: reads for any operator, votes for approvers, changes for admins.
    ("POST", "/admin/v1/wallets"): _operator(ADMINS, 201),
    ("GET", "/admin/v1/wallets"): _operator(OPERATORS),
    ("GET", "/admin/v1/wallets/{wallet_id}"): _operator(OPERATORS, 200, "wallet_id"),
    ("POST", "/admin/v1/agents"): _operator(ADMINS, 201),
    ("GET", "/admin/v1/agents"): _operator(OPERATORS),
    ("POST", "/admin/v1/agents/{agent_id}/keys"): _operator(ADMINS, 201, "agent_id", "wallet_ids"),
    ("GET", "/admin/v1/agents/{agent_id}/keys"): _operator(OPERATORS, 200, "agent_id"),
    ("DELETE", "/admin/v1/agents/{agent_id}/keys/{key_id}"): _operator(ADMINS, 204, "agent_id", "key_id"),
    ("PUT", "/admin/v1/wallets/{wallet_id}/policy"): _operator(ADMINS, 200, "wallet_id"),
    ("GET", "/admin/v1/wallets/{wallet_id}/policy"): _operator(OPERATORS, 200, "wallet_id"),
    ("GET", "/admin/v1/wallets/{wallet_id}/policy/versions"): _operator(OPERATORS, 200, "wallet_id"),
    ("GET", "/admin/v1/wallets/{wallet_id}/policy/diff"): _operator(OPERATORS, 200, "wallet_id"),
    ("PUT", "/admin/v1/agents/{agent_id}/grants/{wallet_id}"): _operator(ADMINS, 200, "agent_id", "wallet_id"),
    ("GET", "/admin/v1/approvals"): _operator(OPERATORS),
    ("POST", "/admin/v1/approvals/{payment_id}/approve"): _operator(APPROVERS, 200, "payment_id"),
    ("POST", "/admin/v1/approvals/{payment_id}/reject"): _operator(APPROVERS, 200, "payment_id"),
    ("GET", "/admin/v1/freezes"): _operator(OPERATORS),
    ("POST", "/admin/v1/freezes"): _operator(ADMINS, 204, "target"),
    ("DELETE", "/admin/v1/freezes/{scope}"): _operator(ADMINS, 204, "target"),
    ("GET", "/admin/v1/audit"): _operator(OPERATORS),
    ("GET", "/admin/v1/audit/verify"): _operator(OPERATORS),
    ("POST", "/admin/v1/webhooks"): _operator(ADMINS, 201),
    ("GET", "/admin/v1/webhooks"): _operator(OPERATORS),
    ("DELETE", "/admin/v1/webhooks/{webhook_id}"): _operator(ADMINS, 204, "webhook_id"),
    ("GET", "/admin/v1/webhooks/deliveries"): _operator(OPERATORS),
    ("POST", "/admin/v1/operators"): _operator(ADMINS, 201),
    ("GET", "/admin/v1/operators"): _operator(OPERATORS),
    ("DELETE", "/admin/v1/operators/{operator_id}"): _operator(ADMINS, 204, "operator_id"),
}
