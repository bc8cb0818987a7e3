"""The admin API through the real application: auth, wallets, problem+json, readiness."""

from __future__ import annotations

import httpx
import pytest
from web3 import Web3

from custody.services import operators as operator_service
from custody.services.context import Context
from custody.settings import Settings
from tests.conftest import SignerThread

API = tuple[httpx.AsyncClient, str]


async def test_healthz_answers_without_credentials(api: API) -> None:
    client, _ = api
    response = await client.get("/healthz", headers={"Authorization": ""})
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


async def test_readyz_is_ready_with_database_and_unsealed_signer(api: API) -> None:
    client, _ = api
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "database": "ok", "signer": "ok", "redis": "disabled"}


async def test_readyz_is_503_when_the_signer_is_down(api: API, signer: SignerThread) -> None:
    client, _ = api
    signer.stop()
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["signer"] == "unavailable"


async def test_created_wallet_has_a_checksummed_address_and_no_key_material(api: API) -> None:
    client, _ = api
    response = await client.post("/admin/v1/wallets", json={"name": "research-agent"})
    assert response.status_code == 201
    wallet = response.json()
    assert set(wallet) == {"id", "name", "address", "public_key", "key_version", "created_at"}
    assert Web3.is_checksum_address(wallet["address"])
    assert wallet["public_key"].startswith("0x04")
    assert len(bytes.fromhex(wallet["public_key"][2:])) == 65
    listed = (await client.get("/admin/v1/wallets")).json()["wallets"]
    assert [w["id"] for w in listed] == [wallet["id"]]
    assert (await client.get(f"/admin/v1/wallets/{wallet['id']}")).json() == wallet


async def test_duplicate_wallet_name_is_a_conflict_and_creates_nothing(api: API) -> None:
    client, _ = api
    assert (await client.post("/admin/v1/wallets", json={"name": "dup"})).status_code == 201
    response = await client.post("/admin/v1/wallets", json={"name": "dup"})
    assert response.status_code == 409
    assert response.json()["code"] == "conflict"
    assert len((await client.get("/admin/v1/wallets")).json()["wallets"]) == 1


@pytest.mark.parametrize("name", ["", "has space", "-leading-dash", "x" * 101, "名前", "trailing\n"])
async def test_invalid_wallet_names_are_refused_with_a_problem(api: API, name: str) -> None:
    client, _ = api
    response = await client.post("/admin/v1/wallets", json={"name": name})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "invalid_request"
    assert (await client.get("/admin/v1/wallets")).json()["wallets"] == []


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer ", "Bearer nonsense", "Bearer cop.op_0000000000000000.wrong", "Basic YWRtaW46YWRtaW4="],
)
async def test_admin_routes_refuse_missing_or_bad_credentials(api: API, authorization: str | None) -> None:
    client, _ = api
    headers = {"Authorization": authorization} if authorization else {}
    request = client.build_request("GET", "/admin/v1/wallets", headers=headers)
    if authorization is None:
        del request.headers["Authorization"]
    response = await client.send(request)
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


async def test_a_token_with_the_right_id_and_a_wrong_secret_is_refused(api: API) -> None:
    client, token = api
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    response = await client.get("/admin/v1/wallets", headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401


async def test_a_viewer_can_list_but_not_create_wallets(api: API, settings: Settings) -> None:
    client, _ = api
    ctx = await Context.open(settings)
    try:
        _, viewer = await operator_service.issue_operator(ctx, "auditor", "viewer")
    finally:
        await ctx.close()
    headers = {"Authorization": f"Bearer {viewer}"}
    assert (await client.get("/admin/v1/wallets", headers=headers)).status_code == 200
    response = await client.post("/admin/v1/wallets", json={"name": "nope"}, headers=headers)
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"


async def test_unknown_wallet_and_unknown_route_are_problem_404s(api: API) -> None:
    client, _ = api
    for path in ("/admin/v1/wallets/wal_missing", "/no/such/route"):
        response = await client.get(path)
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "not_found"


async def test_wallet_creation_with_the_signer_down_is_503_and_stores_nothing(api: API, signer: SignerThread) -> None:
    client, _ = api
    signer.stop()
    response = await client.post("/admin/v1/wallets", json={"name": "later"})
    assert response.status_code == 503
    assert response.json()["code"] == "signer_unavailable"
    assert (await client.get("/admin/v1/wallets")).json()["wallets"] == []


async def test_openapi_describes_every_route_with_problem_responses(api: API) -> None:
    client, _ = api
    spec = (await client.get("/openapi.json")).json()
    assert {"/healthz", "/readyz", "/admin/v1/wallets", "/admin/v1/wallets/{wallet_id}"} <= set(spec["paths"])
    from fastapi.routing import APIRoute

    from custody.api import admin_routes, agent_routes

    app = client._transport.app  # type: ignore[attr-defined]
    declared = [*app.router.routes, *agent_routes.router.routes, *admin_routes.router.routes]
    assert set(spec["paths"]) == {route.path for route in declared if isinstance(route, APIRoute)}
    create = spec["paths"]["/admin/v1/wallets"]["post"]
    assert {"201", "400", "401", "403", "409", "503"} <= set(create["responses"])
    assert "WalletOut" in spec["components"]["schemas"]
    assert "private" not in str(spec["components"]["schemas"]["WalletOut"]).lower()


async def test_a_sealed_signer_makes_the_service_not_ready_and_creates_nothing(
    settings: Settings, signer: SignerThread
) -> None:
    from custody.api.app import create_app
    from custody.services.operators import ensure_first_admin

    signer.stop()
    sealed_settings = settings.model_copy(update={"kek_source": "passphrase"})  # no passphrase given
    sealed = SignerThread(sealed_settings).start()
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app):
            token = await ensure_first_admin(app.state.ctx)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://custody.test") as client:
                ready = await client.get("/readyz")
                assert ready.status_code == 503
                assert ready.json()["signer"] == "sealed"
                created = await client.post(
                    "/admin/v1/wallets", json={"name": "x"}, headers={"Authorization": f"Bearer {token}"}
                )
                assert created.status_code == 503
                assert created.json()["code"] == "signer_sealed"
                assert "passphrase" in created.json()["detail"]
                assert await app.state.ctx.wallets.list() == []
    finally:
        sealed.stop()


async def test_a_deeply_nested_body_is_a_400_not_a_crash(api: API) -> None:
    client, _ = api
    body = "[" * 100_000 + "]" * 100_000
    response = await client.post("/admin/v1/wallets", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_request"
    assert (await client.get("/healthz")).status_code == 200


async def test_a_body_over_one_mebibyte_is_refused_with_413(api: API) -> None:
    client, _ = api
    response = await client.post("/admin/v1/wallets", json={"name": "x" * (1 << 20)})
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"
    assert (await client.get("/admin/v1/wallets")).json()["wallets"] == []


async def test_a_wrong_method_is_a_problem_with_the_http_title(api: API) -> None:
    client, _ = api
    response = await client.delete("/admin/v1/wallets")
    assert response.status_code == 405
    assert response.json()["title"] == "Method Not Allowed"
    assert response.json()["code"] == "http_405"
