"""Operator webhooks: signed, delivered from a transactional outbox, retried, bounded."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from custody.webhooks.outbox import MAX_ATTEMPTS, sign, verify
from tests.payments.test_payments import ETH, _pay, _setup
from tests.test_isolation import _free_port

API = tuple[httpx.AsyncClient, str]


class Receiver:
    """A real HTTP endpoint on loopback that records what it gets; fails the first N calls."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        self.calls = 0
        self.port = _free_port()
        app = Starlette(routes=[Route("/hook", self.handle, methods=["POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def handle(self, request: Request) -> Response:
        self.calls += 1
        if self.calls <= self.fail_first:
            return Response(status_code=500)
        self.received.append((dict(request.headers), await request.body()))
        return Response(status_code=204)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def __enter__(self) -> Receiver:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


async def _until(predicate: Any) -> None:
    async with asyncio.timeout(20):
        while not predicate():  # noqa: ASYNC110 - the receiver runs on another thread and loop
            await asyncio.sleep(0.05)


def test_signatures_verify_and_refuse_tampering_and_replays() -> None:
    body = b'{"event":"payment.signed"}'
    header = sign("whsec_k", 1_000, body)
    assert verify("whsec_k", header, body, now=1_010)
    assert not verify("whsec_k", header, body + b" ", now=1_010)
    assert not verify("whsec_other", header, body, now=1_010)
    assert not verify("whsec_k", header, body, now=2_000)
    assert not verify("whsec_k", "garbage", body, now=1_010)


async def test_approval_flow_events_are_delivered_signed(api: API) -> None:
    client, _ = api
    payer, headers = await _setup(api, approval_above=ETH // 2)
    with Receiver() as receiver:
        created = await client.post("/admin/v1/webhooks", json={"url": receiver.url})
        assert created.status_code == 201
        key = created.json()["signing_key"]
        assert "signing_key" not in str((await client.get("/admin/v1/webhooks")).json())
        payment_id = (await _pay(client, headers, payer["id"], 6 * ETH // 10)).json()["payment_id"]
        assert (await client.post(f"/admin/v1/approvals/{payment_id}/approve", json={})).status_code == 200
        await _until(lambda: len(receiver.received) >= 3)
    events = []
    for request_headers, body in receiver.received:
        assert verify(key, request_headers["custody-signature"], body)
        payload = json.loads(body)
        assert payload["id"] == request_headers["custody-delivery"]
        assert payload["data"]["payment_id"] == payment_id
        events.append(payload["event"])
    assert sorted(events) == ["payment.approved", "payment.pending_approval", "payment.signed"]


async def test_a_failing_endpoint_is_retried_until_it_answers(api: API) -> None:
    client, _ = api
    payer, headers = await _setup(api)
    with Receiver(fail_first=2) as receiver:
        await client.post("/admin/v1/webhooks", json={"url": receiver.url, "events": ["payment.signed"]})
        assert (await _pay(client, headers, payer["id"], 1)).status_code == 200
        await _until(lambda: len(receiver.received) == 1)
    assert receiver.calls == 3

    # The dispatcher records the delivery once the receiver's answer is back: give it that moment.
    async def delivered() -> list[dict[str, Any]]:
        response = await client.get("/admin/v1/webhooks/deliveries", params={"status": "delivered"})
        return list(response.json()["deliveries"])

    async with asyncio.timeout(20):
        while not await delivered():  # noqa: ASYNC110 - polls the API, which has no event to wait on
            await asyncio.sleep(0.05)
    assert [d["attempts"] for d in await delivered()] == [3]


async def test_deliveries_give_up_after_a_bounded_number_of_attempts(api: API) -> None:
    client, _ = api
    payer, headers = await _setup(api)
    port = _free_port()  # nothing listens there
    await client.post("/admin/v1/webhooks", json={"url": f"http://127.0.0.1:{port}/hook"})
    assert (await _pay(client, headers, payer["id"], 1)).status_code == 200

    async def failed() -> list[dict[str, Any]]:
        response = await client.get("/admin/v1/webhooks/deliveries", params={"status": "failed"})
        return list(response.json()["deliveries"])

    deadline = time.monotonic() + 20
    while not (found := await failed()):
        assert time.monotonic() < deadline, "the delivery never gave up"
        await asyncio.sleep(0.1)
    assert found[0]["attempts"] == MAX_ATTEMPTS
    assert found[0]["last_error"]


@pytest.mark.parametrize("body", [{"url": "ftp://x"}, {"url": "http://x", "events": ["payment.exploded"]}])
async def test_invalid_webhooks_are_refused(api: API, body: dict[str, Any]) -> None:
    client, _ = api
    response = await client.post("/admin/v1/webhooks", json=body)
    assert response.status_code == 400
    assert (await client.get("/admin/v1/webhooks")).json()["webhooks"] == []


async def test_the_dispatcher_is_woken_only_when_a_payment_queued_a_delivery(
    api: API, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _ = api
    ctx = client._transport.app.state.ctx  # type: ignore[attr-defined]
    payer, headers = await _setup(api)
    woken = asyncio.Event()  # the running dispatcher keeps (and clears) its own
    monkeypatch.setattr(ctx, "outbox_wake", woken)
    assert (await _pay(client, headers, payer["id"], 1)).status_code == 200
    assert not woken.is_set()  # no webhook: nothing to deliver, no database poll

    with Receiver() as receiver:
        await client.post("/admin/v1/webhooks", json={"url": receiver.url, "events": ["payment.signed"]})
        assert (await _pay(client, headers, payer["id"], 1, nonce=1)).status_code == 200
        assert woken.is_set()
