"""/metrics on the real app, both backends: decisions by outcome and reason, latencies, gauges, HTTP."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from web3 import Web3

from custody.observability import metrics as metrics_module
from custody.settings import Settings
from tests.conftest import SignerThread
from tests.observability.conftest import running
from tests.payments.helpers import agent_key, native_policy, set_policy, transfer, wallet

API = tuple[httpx.AsyncClient, str]
# For behaviour that does not depend on the database, one backend is enough.
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])
CHAIN = 31337
BOB = Web3.to_checksum_address("0x" + "b0" * 20)
EVE = Web3.to_checksum_address("0x" + "e0" * 20)
ETH = 10**18


class Scrape:
    """The samples of one /metrics answer."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float | None:
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) <= 1
        return found[0] if found else None

    def label_sets(self, name: str) -> list[dict[str, str]]:
        return [dict(s.labels) for s in self.samples if s.name == name]


async def _scrape(client: httpx.AsyncClient, **kw: Any) -> Scrape:
    response = await client.get("/metrics", **kw)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


async def _setup(client: httpx.AsyncClient) -> tuple[str, dict[str, str]]:
    payer = await wallet(client)
    await set_policy(client, payer["id"], native_policy(CHAIN, [BOB], ETH, approval_above=ETH // 2))
    _, key = await agent_key(client, [payer["id"]])
    return payer["id"], {"Authorization": f"Bearer {key}"}


async def _pay(
    client: httpx.AsyncClient, headers: dict[str, str], wallet_id: str, value: int, nonce: int, to: str = BOB
) -> httpx.Response:
    body = {"transaction": transfer(CHAIN, to, value, nonce)}
    return await client.post(f"/v1/wallets/{wallet_id}/sign/transaction", json=body, headers=headers)


async def test_metrics_count_allowed_denied_and_pending_decisions_with_reasons_latencies_and_gauges(api: API) -> None:
    client, _ = api
    wallet_id, headers = await _setup(client)
    allowed = await _pay(client, headers, wallet_id, ETH // 10, nonce=0)
    denied = await _pay(client, headers, wallet_id, 1, nonce=1, to=EVE)
    pending = await _pay(client, headers, wallet_id, 6 * ETH // 10, nonce=2)
    assert [allowed.status_code, denied.status_code, pending.status_code] == [200, 403, 202]
    denied_codes = {r["code"] for r in denied.json()["reasons"]}
    pending_codes = {r["code"] for r in pending.json()["reasons"]}
    assert "payee_not_allowlisted" in denied_codes

    scrape = await _scrape(client)
    decisions = scrape.label_sets("custody_decisions_total")
    assert {d["reason"] for d in decisions if d["outcome"] == "denied"} == denied_codes
    assert {d["reason"] for d in decisions if d["outcome"] == "pending"} == pending_codes
    assert [d["reason"] for d in decisions if d["outcome"] == "allowed"] == ["allowed"]
    for code in denied_codes:
        assert scrape.value("custody_decisions_total", outcome="denied", reason=code) == 1
    assert scrape.value("custody_decisions_total", outcome="allowed", reason="allowed") == 1
    for outcome in ("allowed", "denied", "pending"):
        assert scrape.value("custody_decision_seconds_count", outcome=outcome) == 1
    assert scrape.value("custody_signing_seconds_count", method="transaction", result="ok") == 1
    assert scrape.value("custody_pending_approvals") == 1
    assert scrape.value("custody_signer_up") == 1
    assert scrape.value("custody_signer_sealed") == 0
    assert scrape.value("custody_database_up") == 1

    approved = await client.post(f"/admin/v1/approvals/{pending.json()['payment_id']}/approve", json={})
    assert approved.json()["status"] == "signed"
    after = await _scrape(client)
    assert {d["reason"] for d in after.label_sets("custody_decisions_total") if d["outcome"] == "approved"} == (
        pending_codes
    )
    assert after.value("custody_signing_seconds_count", method="transaction", result="ok") == 2
    assert after.value("custody_pending_approvals") == 0


async def test_rejections_and_refusals_before_a_decision_are_counted_by_code(api: API) -> None:
    client, _ = api
    wallet_id, headers = await _setup(client)
    pending = await _pay(client, headers, wallet_id, 6 * ETH // 10, nonce=0)
    rejected = await client.post(f"/admin/v1/approvals/{pending.json()['payment_id']}/reject", json={})
    assert rejected.json()["status"] == "rejected"
    assert (await _pay(client, headers, "wal_unknown", 1, nonce=0)).status_code == 404
    freeze = await client.post("/admin/v1/freezes", json={"scope": "wallet", "target": wallet_id})
    assert freeze.status_code == 204
    assert (await _pay(client, headers, wallet_id, 1, nonce=0)).status_code == 423

    scrape = await _scrape(client)
    assert scrape.value("custody_decisions_total", outcome="refused", reason="not_found") == 1
    assert scrape.value("custody_decisions_total", outcome="refused", reason="frozen") == 1
    assert scrape.value("custody_decisions_total", outcome="rejected", reason="approval_rejected") == 1
    assert scrape.value("custody_pending_approvals") == 0
    assert scrape.value("custody_decision_seconds_count", outcome="refused") == 1  # only the frozen one was timed
    assert scrape.value("custody_signing_seconds_count", method="transaction", result="ok") is None


@sqlite_only
async def test_metrics_refuse_anonymous_and_unknown_tokens_by_default(api: API) -> None:
    client, _ = api
    for authorization in (None, "Bearer cop.op_nobody.not-a-secret"):
        request = client.build_request("GET", "/metrics")
        del request.headers["Authorization"]
        if authorization:
            request.headers["Authorization"] = authorization
        response = await client.send(request)
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "unauthorized"
        assert "custody_" not in response.text


@sqlite_only
async def test_metrics_are_public_only_when_configured(settings: Settings, signer: SignerThread) -> None:
    async with running(settings, metrics_public=True) as (client, _, _):
        anonymous = await client.get("/metrics")
    assert anonymous.status_code == 200
    assert Scrape(anonymous.text).value("custody_signer_sealed") == 0


@sqlite_only
async def test_http_metrics_label_route_templates_and_status_classes_never_raw_paths(api: API) -> None:
    client, _ = api
    wallet_id, headers = await _setup(client)
    assert (await client.get("/v1/payments/pay_rawid0123456789", headers=headers)).status_code == 404
    assert (await client.get("/no/such/path/secret-looking-segment")).status_code == 404
    scrape = await _scrape(client)
    requests, seconds = "custody_http_requests_total", "custody_http_request_seconds_count"
    assert scrape.value(requests, method="GET", route="/v1/payments/{payment_id}", status="4xx") == 1
    assert scrape.value(requests, method="GET", route="unmatched", status="4xx") == 1
    assert scrape.value(requests, method="PUT", route="/admin/v1/wallets/{wallet_id}/policy", status="2xx") == 1
    assert scrape.value(seconds, method="PUT", route="/admin/v1/wallets/{wallet_id}/policy") == 1
    for raw in ("pay_rawid0123456789", "secret-looking-segment", wallet_id):
        assert raw not in scrape.text


class _Broken:
    def labels(self, *args: object) -> Any:
        raise RuntimeError("metrics backend exploded")


@sqlite_only
async def test_a_failing_metric_never_breaks_a_payment(
    settings: Settings, signer: SignerThread, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(metrics_module, "_warned", set())
    async with running(settings) as (client, app, token):
        client.headers["Authorization"] = f"Bearer {token}"
        for name in ("decisions", "decision_seconds", "signing_seconds", "http_requests"):
            monkeypatch.setattr(app.state.metrics, name, _Broken())
        wallet_id, headers = await _setup(client)
        with caplog.at_level(logging.WARNING, logger="custody.metrics"):
            signed = await _pay(client, headers, wallet_id, ETH // 10, nonce=0)
            denied = await _pay(client, headers, wallet_id, 1, nonce=1, to=EVE)
            scrape = await client.get("/metrics")
    assert signed.status_code == 200
    assert signed.json()["status"] == "signed"
    assert denied.status_code == 403
    assert scrape.status_code == 200
    warnings = [r.getMessage() for r in caplog.records if r.name == "custody.metrics"]
    assert "metrics update decided failed: RuntimeError" in warnings
    assert all("exploded" not in w for w in warnings)


@sqlite_only
async def test_a_signer_that_went_away_shows_as_down_and_its_failed_signature_is_timed(
    api: API, signer: SignerThread
) -> None:
    client, _ = api
    wallet_id, headers = await _setup(client)
    signer.stop()
    failed = await _pay(client, headers, wallet_id, ETH // 10, nonce=0)
    assert failed.status_code == 503
    assert failed.json()["code"] == "signer_unavailable"
    scrape = await _scrape(client)
    assert scrape.value("custody_signing_seconds_count", method="transaction", result="error") == 1
    assert scrape.value("custody_signer_up") == 0
    assert scrape.value("custody_signer_sealed") is None
    assert scrape.value("custody_database_up") == 1
