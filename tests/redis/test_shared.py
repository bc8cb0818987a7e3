"""What replicas share through Redis: rate limits, wake-ups, short locks; and how each degrades."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from web3 import Web3

from custody.api.app import create_app
from custody.services.operators import ensure_first_admin
from custody.services.shared import REDIS_TIMEOUT, Shared
from custody.settings import Settings
from tests.conftest import REDIS_URL, PrivateRedis, SignerThread
from tests.payments.helpers import agent_key, native_policy, set_policy, transfer, wallet

CHAIN = 31337
BOB = Web3.to_checksum_address("0x" + "b0" * 20)


async def _two(url: str, prefix: str) -> AsyncIterator[tuple[Shared, Shared]]:
    a, b = Shared(url, prefix), Shared(url, prefix)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


@pytest.fixture
async def replicas(redis_prefix: str) -> AsyncIterator[tuple[Shared, Shared]]:
    async for pair in _two(REDIS_URL, redis_prefix):
        yield pair


async def test_rate_limits_are_counted_across_replicas(replicas: tuple[Shared, Shared]) -> None:
    a, b = replicas
    answers = [await (a if n % 2 else b).hit("agent:x", 5, 60) for n in range(6)]
    assert answers[:5] == [None] * 5
    assert answers[5] is not None
    assert 0 < answers[5] <= 60
    assert await a.hit("agent:other", 5, 60) is None  # each agent has its own window


async def test_a_wake_up_reaches_a_waiter_in_another_replica(replicas: tuple[Shared, Shared]) -> None:
    a, b = replicas
    await asyncio.sleep(0.2)  # let both listeners subscribe
    async with a.waiter("payment:p1") as woken:
        await b.wake("payment:p1")  # b has no local waiter: only Redis can carry this
        await asyncio.wait_for(woken.wait(), 5)


async def test_a_short_lock_is_held_by_one_replica_at_a_time(replicas: tuple[Shared, Shared]) -> None:
    a, b = replicas
    token = await a.try_lock("sweep", 5)
    assert token is not None
    assert await b.try_lock("sweep", 5) is None
    await a.unlock("sweep", token)
    assert await b.try_lock("sweep", 5) is not None


async def test_without_redis_the_same_features_work_in_one_process() -> None:
    local = Shared()
    assert await local.ping() == "disabled"
    assert [await local.hit("agent:x", 2, 60) for _ in range(3)][2] is not None
    token = await local.try_lock("sweep", 5)
    assert token is not None
    assert await local.try_lock("sweep", 5) is None
    async with local.waiter("payment:p") as woken:
        await local.wake("payment:p")
        assert woken.is_set()
    await local.close()


@pytest.mark.parametrize("fault", ["stopped", "paused"])
async def test_a_failing_redis_degrades_to_local_state_quickly(private_redis: PrivateRedis, fault: str) -> None:
    shared = Shared(private_redis.url, "t:")
    await shared.start()
    try:
        assert await shared.ping() == "ok"
        if fault == "stopped":
            private_redis.stop()
        else:
            assert private_redis.process is not None
            os.kill(private_redis.process.pid, signal.SIGSTOP)
        started = time.monotonic()
        answers = [await shared.hit("agent:x", 2, 60) for _ in range(3)]
        assert time.monotonic() - started < 3 * REDIS_TIMEOUT + 1  # one timeout, then local at once
        assert answers[:2] == [None, None]
        assert answers[2] is not None
        assert await shared.ping() == "unavailable"
        assert await shared.try_lock("sweep", 5) is not None
    finally:
        await shared.close()


# Through the API ---------------------------------------------------------------------------


@pytest.fixture
def redis_settings(short_dir: Path, redis_prefix: str) -> Settings:
    return Settings(
        data_dir=short_dir / "data",
        kek_scrypt_n=2**10,
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        agent_rate_limit_per_minute=4,
    )


async def _app_client(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://custody.test") as client:
            yield client, app


async def test_the_api_answers_429_with_retry_after_for_a_chatty_agent_on_any_replica(redis_settings: Settings) -> None:
    signer = SignerThread(redis_settings).start()
    try:
        async for one, app in _app_client(redis_settings):
            token = await ensure_first_admin(app.state.ctx)
            one.headers["Authorization"] = f"Bearer {token}"
            payer = await wallet(one)
            await set_policy(one, payer["id"], native_policy(CHAIN, [BOB], 10**18))
            _, key = await agent_key(one, [payer["id"]])
            agent = {"Authorization": f"Bearer {key}"}
            async for two, _ in _app_client(redis_settings):
                codes = []
                for n in range(5):
                    client = one if n % 2 else two
                    codes.append((await client.get("/v1/wallets", headers=agent)).status_code)
                assert codes == [200, 200, 200, 200, 429]
                limited = await one.post(
                    f"/v1/wallets/{payer['id']}/sign/transaction",
                    json={"transaction": transfer(CHAIN, BOB, 1, 0)},
                    headers=agent,
                )
                assert limited.status_code == 429
                assert limited.json()["code"] == "rate_limited"
                assert 1 <= int(limited.headers["Retry-After"]) <= 60
                ready = (await two.get("/readyz")).json()
                assert ready["redis"] == "ok"
                assert ready["status"] == "ready"
    finally:
        signer.stop()


async def test_an_approval_on_one_replica_wakes_the_agent_waiting_on_another(redis_settings: Settings) -> None:
    settings = redis_settings.model_copy(update={"agent_rate_limit_per_minute": 0})
    signer = SignerThread(settings).start()
    try:
        async for one, app in _app_client(settings):
            token = await ensure_first_admin(app.state.ctx)
            one.headers["Authorization"] = f"Bearer {token}"
            payer = await wallet(one)
            await set_policy(one, payer["id"], native_policy(CHAIN, [BOB], 10**18, approval_above=10))
            _, key = await agent_key(one, [payer["id"]])
            agent = {"Authorization": f"Bearer {key}"}
            pending = await one.post(
                f"/v1/wallets/{payer['id']}/sign/transaction",
                json={"transaction": transfer(CHAIN, BOB, 10**6, 0)},
                headers=agent,
            )
            assert pending.status_code == 202
            payment_id = pending.json()["payment_id"]
            async for two, app_two in _app_client(settings):
                # Replica two would look at the database itself only after 30 s: only Redis can wake it.
                app_two.state.ctx.shared.redis_poll_interval = 30.0
                waiting = asyncio.create_task(two.get(f"/v1/payments/{payment_id}?wait=20", headers=agent))
                await asyncio.sleep(0.3)
                assert not waiting.done()
                assert (await one.post(f"/admin/v1/approvals/{payment_id}/approve", json={})).status_code == 200
                answer = await asyncio.wait_for(waiting, 10)
                assert answer.json()["status"] == "signed"
    finally:
        signer.stop()



