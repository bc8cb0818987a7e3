"""The authorization matrix: every route of the app × every kind of caller × own, foreign, missing
and malformed ids, against the declared table in ``authz_table``; and server-owned fields in
write bodies, which must change nothing."""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts

from custody.api.app import create_app
from custody.services.operators import ensure_first_admin
from custody.settings import Settings
from tests.battery.api_seed import (
    World,
    bearer,
    grant,
    pending_payment,
    policy,
    redact,
    seed,
    small_payment,
    typed_mail,
)
from tests.battery.authz_table import AGENTS, IDENTITIES, TABLE, Identity, Rule
from tests.conftest import SignerThread

MALFORMED = ("\x00", "x" * 41, "wal-é")
PREFIXES = {
    "wallet_id": "wal_",
    "wallet_ids": "wal_",
    "target": "wal_",
    "payment_id": "pay_",
    "agent_id": "agt_",
    "key_id": "key_",
    "operator_id": "op_",
    "webhook_id": "whk_",
}
CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found"}


def app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path template) of every route the app serves, read from the app itself."""
    found = set()
    for route in iter_route_contexts(app.routes):
        methods = set(route.methods or ())
        if "GET" in methods:
            methods.discard("HEAD")  # Starlette answers HEAD for every GET route by itself
        found |= {(method, str(route.path)) for method in methods}
    return found


@dataclass
class Env:
    app: FastAPI
    admin: httpx.AsyncClient  # sends as the admin: set-up only
    raw: httpx.AsyncClient  # sends exactly the headers given
    world: World
    count: itertools.count[int]

    def token(self, who: Identity) -> str | None:
        w = self.world
        return {
            "anonymous": None,
            "malformed": "cak",
            "revoked_key": w.revoked_key,
            "expired_key": w.expired_key,
            "revoked_operator": w.revoked_operator,
            "agent_a": w.key_a,
            "agent_b": w.key_b,
            "viewer": w.viewer,
            "approver": w.approver,
            "admin": w.admin,
        }[who]

    async def own(self, name: str, who: Identity, route: tuple[str, str], fresh: bool) -> str:
        """An id the caller may use. With ``fresh``, a resource the call consumes is made anew;
        without, an existing one is named (for callers that must be refused before any lookup)."""
        w, b = self.world, who == "agent_b"
        method, path = route
        stable = {
            "payment_id": w.pending_a,
            "target": w.spare_wallet,
            "key_id": w.spare_key_ids[0],
            "operator_id": w.spare_operator_ids[0],
            "webhook_id": w.webhook_ids[0],
        }
        if not fresh and name in stable and (name != "payment_id" or path.startswith("/admin/")):
            return stable[name]
        if name == "wallet_id":
            return w.wallet_b if b else w.wallet_a
        if name == "wallet_ids":
            return w.wallet_a
        if name == "agent_id":
            return w.agent_a
        if name == "payment_id" and path.startswith("/admin/"):
            return await pending_payment(self.admin, w, nonce=next(self.count))
        if name == "payment_id":
            return w.signed_b if b else w.signed_a
        if name == "target":
            if method == "DELETE":
                frozen = await self.admin.post("/admin/v1/freezes", json={"scope": "wallet", "target": w.spare_wallet})
                assert frozen.status_code == 204, frozen.text
            return w.spare_wallet
        if name == "key_id":
            issued = await self.admin.post(f"/admin/v1/agents/{w.agent_a}/keys", json={"wallet_ids": [w.wallet_a]})
            return str(issued.json()["key"]["id"])
        if name == "operator_id":
            created = await self.admin.post(
                "/admin/v1/operators", json={"name": f"matrix-{next(self.count)}", "role": "viewer"}
            )
            return str(created.json()["operator"]["id"])
        if name == "webhook_id":
            created = await self.admin.post("/admin/v1/webhooks", json={"url": "http://127.0.0.1:9/matrix"})
            return str(created.json()["webhook"]["id"])
        raise AssertionError(f"no own value for {name}")

    def foreign(self, name: str, who: Identity) -> str:
        """The same kind of resource, belonging to the other agent's wallet."""
        w, b = self.world, who == "agent_b"
        if name == "wallet_id":
            return w.wallet_a if b else w.wallet_b
        if name == "payment_id":
            return w.signed_a if b else w.signed_b
        raise AssertionError(f"no foreign value for {name}")


Request = tuple[dict[str, Any] | None, dict[str, Any] | None]  # JSON body, query parameters
# What each route is sent besides its path ids; ``ids`` holds every id the route names.
RECIPES: dict[tuple[str, str], Callable[[World, dict[str, str], int], Request]] = {
    ("POST", "/v1/wallets/{wallet_id}/sign/transaction"): lambda w, ids, n: (small_payment(n), None),
    ("POST", "/v1/wallets/{wallet_id}/sign/typed-data"): lambda w, ids, n: (typed_mail(), None),
    ("POST", "/v1/wallets/{wallet_id}/sign/message"): lambda w, ids, n: ({"message": f"matrix {n}"}, None),
    ("POST", "/admin/v1/wallets"): lambda w, ids, n: ({"name": f"matrix-{n}"}, None),
    ("POST", "/admin/v1/agents"): lambda w, ids, n: ({"name": f"matrix-{n}"}, None),
    ("POST", "/admin/v1/agents/{agent_id}/keys"): lambda w, ids, n: ({"wallet_ids": [ids["wallet_ids"]]}, None),
    ("PUT", "/admin/v1/wallets/{wallet_id}/policy"): lambda w, ids, n: ({"document": policy()}, None),
    ("GET", "/admin/v1/wallets/{wallet_id}/policy/diff"): lambda w, ids, n: (None, {"from": 1, "to": 1}),
    ("PUT", "/admin/v1/agents/{agent_id}/grants/{wallet_id}"): lambda w, ids, n: ({"document": grant(w.agent_a)}, None),
    ("POST", "/admin/v1/approvals/{payment_id}/approve"): lambda w, ids, n: ({"comment": "matrix"}, None),
    ("POST", "/admin/v1/approvals/{payment_id}/reject"): lambda w, ids, n: ({"comment": "matrix"}, None),
    ("POST", "/admin/v1/freezes"): lambda w, ids, n: ({"scope": "wallet", "target": ids["target"]}, None),
    ("DELETE", "/admin/v1/freezes/{scope}"): lambda w, ids, n: (None, {"target": ids["target"]}),
    ("POST", "/admin/v1/webhooks"): lambda w, ids, n: ({"url": "http://127.0.0.1:9/matrix"}, None),
    ("POST", "/admin/v1/operators"): lambda w, ids, n: ({"name": f"matrix-{n}", "role": "viewer"}, None),
}
FIXED_PATH = {"scope": "wallet"}  # path parameters that are not ids


def variants(rule: Rule, who: Identity) -> list[tuple[str, str | None, str | None]]:
    """(variant, id name, value): own; foreign (agent routes); per id, missing and malformed ids.

    A caller that is refused gets one malformed id per parameter: it is refused before any id is read.
    """
    found: list[tuple[str, str | None, str | None]] = [("own", None, None)]
    malformed = MALFORMED if who in rule.allowed else MALFORMED[:1]
    for name in rule.ids:
        if rule.credential == "agent":
            found.append(("foreign", name, None))
        found.append(("missing", name, PREFIXES[name] + secrets.token_hex(10 if name == "payment_id" else 8)))
        found += [("malformed", name, value) for value in malformed]
    return found


def expected(rule: Rule, who: Identity, variant: str) -> int:
    refused = rule.expected_for(who)
    if refused is not None:
        return refused
    return {"own": rule.ok, "foreign": 404, "missing": rule.missing, "malformed": rule.malformed}[variant]


@pytest.fixture
async def env(settings: Settings, signer: SignerThread) -> AsyncIterator[Env]:
    settings = settings.model_copy(update={"agent_rate_limit_per_minute": 1_000_000})
    app = create_app(settings, background=False)
    async with app.router.lifespan_context(app):
        token = await ensure_first_admin(app.state.ctx)
        assert token is not None
        transport = httpx.ASGITransport(app=app)
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://custody.test") as admin,
            httpx.AsyncClient(transport=transport, base_url="http://custody.test") as raw,
        ):
            world = await seed(admin, token, app.state.ctx.engine)
            yield Env(app, admin, raw, world, itertools.count())


async def _audit_head(env: Env) -> int:
    head = await env.app.state.ctx.audit.head()
    return int(head[0]) if head else 0


def test_every_route_of_the_app_is_in_the_table_and_nothing_else(tmp_path: Path) -> None:
    served = app_routes(create_app(Settings(data_dir=tmp_path), background=False))
    assert served - TABLE.keys() == set(), "routes without a rule: add them to tests/battery/authz_table.py"
    assert TABLE.keys() - served == set(), "rules for routes the app does not have"


def test_every_id_a_route_names_has_a_request_recipe() -> None:
    for (method, path), rule in TABLE.items():
        in_path = {name for name in rule.ids if "{" + name + "}" in path}
        if set(rule.ids) - in_path or method in ("POST", "PUT"):
            assert (method, path) in RECIPES, f"{method} {path} needs a recipe for its body or query"


async def test_authorization_matrix_holds_for_every_route_caller_and_id(env: Env) -> None:
    mismatches: list[str] = []
    for route, rule in sorted(TABLE.items()):
        method, template = route
        for who in IDENTITIES:
            not_found: dict[str, dict[str, Any]] = {}
            for variant, name, value in variants(rule, who):
                ids = {n: await env.own(n, who, route, fresh=who in rule.allowed) for n in rule.ids}
                if name is not None:
                    ids[name] = env.foreign(name, who) if variant == "foreign" else str(value)
                body, params = RECIPES.get(route, lambda w, i, n: (None, None))(env.world, ids, next(env.count))
                segments = {**FIXED_PATH, **{n: quote(v, safe="") for n, v in ids.items()}}
                path = template.format(**{k: v for k, v in segments.items() if "{" + k + "}" in template})
                token = env.token(who)
                before = await _audit_head(env)
                response = await env.raw.request(
                    method, path, json=body, params=params, headers=bearer(token) if token else {}
                )
                want = expected(rule, who, variant)
                label = f"{method} {template} as {who}, {variant} {name or ''}={value!r}"
                if response.status_code != want:
                    mismatches.append(f"{label}: {response.status_code}, expected {want}: {response.text[:200]}")
                    continue
                if want >= 400:
                    problem = response.json()
                    if response.headers["content-type"] != "application/problem+json" or problem.get(
                        "code"
                    ) != CODES.get(want):
                        mismatches.append(f"{label}: not the expected problem document: {response.text[:200]}")
                if want in (401, 403) and await _audit_head(env) != before:
                    mismatches.append(f"{label}: a refused caller changed the audit log")
                if want == 404 and who in AGENTS and variant in ("foreign", "missing"):
                    not_found[variant] = {k: v for k, v in response.json().items() if k != "instance"}
            if len(not_found) == 2 and not_found["foreign"] != not_found["missing"]:
                mismatches.append(f"{method} {template} as {who}: a foreign id answers unlike a missing one")
    assert not mismatches, redact(f"{len(mismatches)} mismatches:\n" + "\n".join(mismatches))


LATER = "2020-01-01T00:00:00+00:00"


def server_owned(w: World) -> dict[tuple[str, str], dict[str, Any]]:
    """Per write route, fields the server owns (ids, times, versions, states, keys, roles)."""
    payment = {"payment_id": "pay_" + "0" * 20, "status": "signed", "wallet_id": w.wallet_b, "agent_id": w.agent_b}
    vote = {"operator_id": w.viewer_id, "approvals": [w.viewer_id, w.approver_id], "status": "signed"}
    return {
        ("POST", "/v1/wallets/{wallet_id}/sign/transaction"): payment | {"key_id": w.key_b_id},
        ("POST", "/v1/wallets/{wallet_id}/sign/typed-data"): payment,
        ("POST", "/v1/wallets/{wallet_id}/sign/message"): payment,
        ("POST", "/admin/v1/wallets"): {
            "id": "wal_" + "0" * 20,
            "address": "0x" + "11" * 20,
            "public_key": "0x04" + "22" * 64,
            "key_version": 7,
            "created_at": LATER,
        },
        ("POST", "/admin/v1/agents"): {"id": "agt_" + "0" * 16, "created_at": LATER},
        ("POST", "/admin/v1/agents/{agent_id}/keys"): {
            "id": "key_" + "0" * 16,
            "agent_id": w.agent_b,
            "api_key": "cak.key_0000000000000000.chosen",
            "created_at": LATER,
            "revoked_at": None,
        },
        ("PUT", "/admin/v1/wallets/{wallet_id}/policy"): {
            "version": 99,
            "wallet_id": w.wallet_b,
            "created_by": w.viewer_id,
            "created_at": LATER,
        },
        ("PUT", "/admin/v1/agents/{agent_id}/grants/{wallet_id}"): {
            "version": 99,
            "agent_id": w.agent_b,
            "wallet_id": w.wallet_b,
        },
        ("POST", "/admin/v1/approvals/{payment_id}/approve"): vote,
        ("POST", "/admin/v1/approvals/{payment_id}/reject"): vote,
        ("POST", "/admin/v1/freezes"): {"frozen_by": w.viewer_id, "frozen_at": LATER},
        ("POST", "/admin/v1/webhooks"): {"id": "whk_" + "0" * 16, "signing_key": "whsec_chosen", "created_at": LATER},
        ("POST", "/admin/v1/operators"): {
            "id": "op_" + "0" * 16,
            "token": "cop.op_0000000000000000.chosen",
            "is_admin": True,
            "roles": ["admin"],
            "revoked_at": None,
            "created_at": LATER,
        },
    }


def test_every_write_route_is_checked_for_server_owned_fields(tmp_path: Path) -> None:
    served = app_routes(create_app(Settings(data_dir=tmp_path), background=False))
    writes = {(method, path) for method, path in served if method in ("POST", "PUT", "PATCH")}
    world = World(**dict.fromkeys(World.__dataclass_fields__, "x"))
    assert writes == set(server_owned(world)), "a write route without a server-owned fields check"


async def test_server_owned_fields_in_write_bodies_are_refused_and_change_nothing(env: Env) -> None:
    mismatches = []
    for route, fields in server_owned(env.world).items():
        method, template = route
        who: Identity = "agent_a" if template.startswith("/v1/") else "admin"
        for field, value in fields.items():
            rule = TABLE[route]
            ids = {n: await env.own(n, who, route, fresh=True) for n in rule.ids}
            body, params = RECIPES.get(route, lambda w, i, n: ({}, None))(env.world, ids, next(env.count))
            path = template.format(**{n: v for n, v in ids.items() if "{" + n + "}" in template})
            before = await _audit_head(env)
            response = await env.raw.request(
                method, path, json={**(body or {}), field: value}, params=params, headers=bearer(env.token(who) or "")
            )
            problem = response.json()
            locations = [error.get("loc") for error in problem.get("errors", [])]
            refused = response.status_code == 400 and problem.get("code") == "invalid_request"
            if not refused or ["body", field] not in locations:
                mismatches.append(f"{method} {template} with {field}: {response.status_code} {response.text[:200]}")
            if await _audit_head(env) != before:
                mismatches.append(f"{method} {template} with {field}: something changed")
    assert not mismatches, redact("\n".join(mismatches))


async def test_a_grant_document_cannot_name_another_agent_or_wallet(env: Env) -> None:
    w = env.world
    document = grant(w.agent_b) | {"wallet_id": w.wallet_b}
    response = await env.admin.put(f"/admin/v1/agents/{w.agent_a}/grants/{w.wallet_a}", json={"document": document})
    assert response.status_code == 200, response.text
    assert (response.json()["agent_id"], response.json()["wallet_id"]) == (w.agent_a, w.wallet_a)
    limits_a = (await env.raw.get(f"/v1/wallets/{w.wallet_a}/limits", headers=bearer(w.key_a))).json()["limits"]
    limits_b = (await env.raw.get(f"/v1/wallets/{w.wallet_b}/limits", headers=bearer(w.key_b))).json()["limits"]
    assert [limit["rule_id"] for limit in limits_a if limit["source"] == "grant"] == ["agent-daily"]
    assert [limit for limit in limits_b if limit["source"] == "grant"] == []


# Inputs that once reached the database and failed there (500), found by the fuzzer. Each must be
# a 400 problem and change nothing, on both backends.
def bad_inputs(w: World) -> list[tuple[str, str, dict[str, Any] | None, dict[str, Any] | None]]:
    """(method, path, JSON body, query) with text no database stores or a number none holds."""
    surrogate = "\ud800"
    return [
        ("GET", "/admin/v1/audit", None, {"after_seq": 2**64}),
        ("DELETE", "/admin/v1/freezes/agent", None, {"target": "agt_\x00"}),
        ("POST", "/admin/v1/operators", {"name": "ana\x00", "role": "viewer"}, None),
        ("POST", "/admin/v1/operators", {"name": surrogate, "role": "viewer"}, None),
        ("POST", "/admin/v1/webhooks", {"url": "http://127.0.0.1:9/\x00"}, None),
        ("POST", "/admin/v1/freezes", {"scope": "wallet", "target": w.spare_wallet, "reason": "\x00"}, None),
        ("POST", f"/admin/v1/approvals/{w.pending_a}/reject", {"comment": "no\x00"}, None),
        ("POST", f"/admin/v1/agents/{w.agent_a}/keys", {"wallet_ids": ["wal_\x00"]}, None),
        (
            "POST",
            f"/admin/v1/agents/{w.agent_a}/keys",
            {"wallet_ids": [w.wallet_a], "expires_at": "9999-12-31T23:59:59-14:00"},
            None,
        ),
        ("PUT", f"/admin/v1/wallets/{w.wallet_a}/policy", {"document": policy() | {"id": surrogate}}, None),
        ("POST", f"/v1/wallets/{w.wallet_a}/sign/message", {"message": "hi" + surrogate}, None),
        (
            "POST",
            f"/v1/wallets/{w.wallet_a}/sign/typed-data",
            {"typed_data": typed_mail()["typed_data"] | {"x": [surrogate]}},
            None,
        ),
    ]


async def test_text_or_numbers_no_database_can_store_are_refused_with_400_and_change_nothing(env: Env) -> None:
    mismatches = []
    for method, path, body, params in bad_inputs(env.world):
        token = env.world.key_a if path.startswith("/v1/") else env.world.admin
        # Sent as raw JSON: a client library would refuse to encode a lone surrogate.
        content = json.dumps(body).encode() if body is not None else None
        headers = bearer(token) | ({"Content-Type": "application/json"} if content else {})
        before = await _audit_head(env)
        response = await env.raw.request(method, path, content=content, params=params, headers=headers)
        if response.status_code != 400 or response.json().get("code") != "invalid_request":
            mismatches.append(f"{method} {path} {body or params!r}: {response.status_code} {response.text[:200]}")
        if await _audit_head(env) != before:
            mismatches.append(f"{method} {path} {body or params!r}: something changed")
    assert not mismatches, redact("\n".join(mismatches))


async def test_a_webhook_that_has_deliveries_can_be_removed(env: Env) -> None:
    hook = env.world.webhook_ids[0]
    queued = (await env.admin.get("/admin/v1/webhooks/deliveries")).json()["deliveries"]
    assert any(delivery["webhook_id"] == hook for delivery in queued)  # the seeded payments queued events
    assert (await env.admin.delete(f"/admin/v1/webhooks/{hook}")).status_code == 204
    assert hook not in [h["id"] for h in (await env.admin.get("/admin/v1/webhooks")).json()["webhooks"]]
    left = (await env.admin.get("/admin/v1/webhooks/deliveries")).json()["deliveries"]
    assert [d for d in left if d["webhook_id"] == hook] == []
    assert (await env.admin.delete(f"/admin/v1/webhooks/{hook}")).status_code == 404
