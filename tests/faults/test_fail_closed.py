"""Fail closed: with PostgreSQL, Redis, the signer or the audit write stopped, paused or slowed.

Every case: a payment request gets a 503 with a stable code and no stack trace, nothing is
signed, the ledger is unchanged, and payments go through again within seconds of the
dependency's return. Redis is the exception by design: without it rate limiting degrades
to per process and payments go on, with every cap still enforced by the database.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import select
from web3 import Web3

from custody.api.app import create_app
from custody.payments.ledger import ledger_entries, payments
from custody.services.operators import ensure_first_admin
from custody.settings import Settings
from custody.storage.db import create_engine
from tests.conftest import PrivateRedis, SignerThread
from tests.faults.faults import FaultProxy, PrivatePostgres
from tests.payments.helpers import GAS, agent_key, native_policy, set_policy, transfer, wallet
from tests.processes import signer_process, signer_ready, wait_for

CHAIN = 31337
BOB = Web3.to_checksum_address("0x" + "b0" * 20)
EACH = 10**15
TIMEOUT = 1.5  # the database and signer timeouts these tests run with
RECOVERY = 15.0  # "within seconds of the dependency's return", with room for a loaded CI machine


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres().init().start()
    try:
        yield server
    finally:
        server.destroy()


async def _fresh_database(admin_url: str) -> str:
    name = "custody_fault_" + str(time.monotonic_ns())
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return admin_url.rsplit("/", 1)[0] + "/" + name


def _settings(short_dir: Path, database_url: str | None, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": short_dir / "data",
        "database_url": database_url,
        "kek_scrypt_n": 2**10,
        "database_timeout_seconds": TIMEOUT,
        "signer_timeout_seconds": TIMEOUT,
        "agent_rate_limit_per_minute": 0,
    }
    return Settings(**(values | extra))


class Service:
    """The real app in process, a wallet with a cap of ``slots`` payments, and an agent's headers."""

    def __init__(self, client: httpx.AsyncClient, settings: Settings, wallet_id: str, agent: dict[str, str]) -> None:
        self.client = client
        self.settings = settings
        self.wallet_id = wallet_id
        self.agent = agent
        self.nonce = 0
        self.signed = 0

    async def pay(self) -> httpx.Response:
        self.nonce += 1
        response = await self.client.post(
            f"/v1/wallets/{self.wallet_id}/sign/transaction",
            json={"transaction": transfer(CHAIN, BOB, EACH, self.nonce)},
            headers=self.agent,
        )
        if response.status_code == 200:
            self.signed += 1
        return response

    async def refused(self, code: str) -> None:
        """The request during the fault: a clean 503 with ``code``, quickly."""
        started = time.monotonic()
        response = await self.pay()
        assert response.status_code == 503, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["code"] == code
        assert "Traceback" not in response.text
        assert "File \"" not in response.text
        assert time.monotonic() - started < 4 * TIMEOUT + 3

    async def recovers(self) -> float:
        """Seconds until a payment is signed again."""
        started = time.monotonic()
        while time.monotonic() - started < RECOVERY:
            response = await self.pay()
            if response.status_code == 200:
                return time.monotonic() - started
            assert response.status_code == 503, response.text
            await asyncio.sleep(0.2)
        raise AssertionError(f"still failing {RECOVERY} s after the dependency came back")

    async def books(self) -> None:
        """Only the payments answered 200 were signed; the ledger holds exactly their reservations."""
        engine = create_engine(self.settings.sqlalchemy_url)
        try:
            async with engine.connect() as conn:
                rows = (await conn.execute(select(payments).where(payments.c.wallet_id == self.wallet_id))).all()
                entries = (
                    await conn.execute(select(ledger_entries).where(ledger_entries.c.wallet_id == self.wallet_id))
                ).all()
        finally:
            await engine.dispose()
        statuses = [r.status for r in rows]
        assert statuses.count("signed") == self.signed
        assert "reserved" not in statuses
        signed_ids = {r.id for r in rows if r.status == "signed"}
        assert {e.payment_id for e in entries} == signed_ids
        native = sum(int(e.amount) for e in entries if e.counter == f"{CHAIN}:native")
        assert native == self.signed * (EACH + GAS)
        for row in rows:
            if row.status != "signed":
                assert row.result is None or json.loads(row.result) is None


async def _service(settings: Settings, slots: int = 50) -> AsyncIterator[Service]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        token = await ensure_first_admin(app.state.ctx)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://custody.test", timeout=60) as client:
            client.headers["Authorization"] = f"Bearer {token}"
            payer = await wallet(client)
            await set_policy(client, payer["id"], native_policy(CHAIN, [BOB], slots * (EACH + GAS)))
            _, key = await agent_key(client, [payer["id"]])
            service = Service(client, settings, payer["id"], {"Authorization": f"Bearer {key}"})
            assert (await service.pay()).status_code == 200  # warm: the pool holds live connections
            yield service


async def _with_thread_signer(settings: Settings, body: Callable[[Service], Any]) -> None:
    signer = SignerThread(settings).start()
    try:
        async for service in _service(settings):
            await body(service)
    finally:
        signer.stop()
        gc.collect()  # surface unclosed-resource warnings in the test that caused them


# PostgreSQL ---------------------------------------------------------------------------------


@pytest.mark.postgres
async def test_a_stopped_database_refuses_payments_and_service_resumes(
    private_pg: PrivatePostgres, short_dir: Path
) -> None:
    settings = _settings(short_dir, await _fresh_database(private_pg.url))

    async def body(service: Service) -> None:
        private_pg.stop()
        try:
            await service.refused("database_unavailable")
        finally:
            private_pg.start()
        await service.recovers()
        await service.books()

    await _with_thread_signer(settings, body)


@pytest.mark.postgres
async def test_a_paused_database_refuses_payments_within_the_timeout(
    private_pg: PrivatePostgres, short_dir: Path
) -> None:
    settings = _settings(short_dir, await _fresh_database(private_pg.url))

    async def body(service: Service) -> None:
        private_pg.pause()
        try:
            await service.refused("database_unavailable")
        finally:
            private_pg.resume()
        await service.recovers()
        await service.books()

    await _with_thread_signer(settings, body)


@pytest.mark.postgres
async def test_a_slow_database_link_refuses_payments_and_service_resumes(
    pg_database: str, short_dir: Path
) -> None:
    target_port = int(pg_database.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    proxy = FaultProxy(target_port).start()
    try:
        url = pg_database.replace(f":{target_port}/", f":{proxy.port}/")
        settings = _settings(short_dir, url)

        async def body(service: Service) -> None:
            proxy.delay = 2 * TIMEOUT
            try:
                await service.refused("database_unavailable")
            finally:
                proxy.delay = 0.0
            await service.recovers()
            await service.books()

        await _with_thread_signer(settings, body)
    finally:
        proxy.stop()


@pytest.mark.postgres
async def test_a_failing_audit_write_refuses_the_payment_and_records_nothing(
    pg_database: str, short_dir: Path
) -> None:
    settings = _settings(short_dir, pg_database)
    admin = pg_database.replace("postgresql://", "postgresql://", 1)

    async def sql(statement: str) -> None:
        conn = await asyncpg.connect(admin, timeout=10)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    async def body(service: Service) -> None:
        await sql(
            "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'audit storage full'; END $$"
        )
        await sql(
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_pending FOR EACH ROW EXECUTE FUNCTION refuse_audit()"
        )
        try:
            await service.refused("audit_unavailable")
        finally:
            await sql("DROP TRIGGER refuse_audit ON audit_pending")
        await service.recovers()
        await service.books()

    await _with_thread_signer(settings, body)


# Redis ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["stopped", "paused", "slowed"])
async def test_without_redis_payments_go_on_and_caps_still_hold(
    private_redis: PrivateRedis, short_dir: Path, fault: str
) -> None:
    import os
    import signal

    proxy = FaultProxy(private_redis.port).start()
    url = f"redis://127.0.0.1:{proxy.port}/0"
    settings = _settings(short_dir, None, redis_url=url, agent_rate_limit_per_minute=1000)
    signer = SignerThread(settings).start()
    try:
        async for service in _service(settings, slots=3):
            if fault == "stopped":
                private_redis.stop()
            elif fault == "paused":
                assert private_redis.process is not None
                os.kill(private_redis.process.pid, signal.SIGSTOP)
            else:
                proxy.delay = 1.0  # four times the Redis timeout
            started = time.monotonic()
            assert (await service.pay()).status_code == 200
            assert (await service.pay()).status_code == 200
            assert time.monotonic() - started < 4  # at most one Redis timeout, then local state
            denied = await service.pay()
            assert denied.status_code == 403  # the cap is the database's: never fails open
            assert (await service.client.get("/readyz")).json()["redis"] == "unavailable"
            await service.books()
    finally:
        signer.stop()
        proxy.stop()
        gc.collect()  # surface unclosed-resource warnings in the test that caused them


# The signer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["stopped", "paused"])
async def test_an_unreachable_signer_refuses_payments_and_releases_the_reservation(
    short_dir: Path, fault: str
) -> None:
    import signal

    settings = _settings(short_dir, None)
    signer = signer_process(settings, short_dir / "signer.log").start()
    try:
        wait_for(lambda: signer_ready(settings), "the signer", 30)
        async for service in _service(settings):
            if fault == "stopped":
                signer.stop()
            else:
                signer.signal(signal.SIGSTOP)
            try:
                await service.refused("signer_unavailable")
            finally:
                if fault == "stopped":
                    signer.start()
                else:
                    signer.signal(signal.SIGCONT)
            await service.recovers()
            await service.books()
    finally:
        signer.stop()
        gc.collect()  # surface unclosed-resource warnings in the test that caused them


@pytest.mark.postgres
async def test_a_signature_that_cannot_be_recorded_releases_its_reservation_for_the_retry(
    pg_database: str, short_dir: Path
) -> None:
    """The audit write fails only for the signature record: nothing is handed out, nothing stays counted."""
    settings = _settings(short_dir, pg_database)

    async def sql(statement: str) -> None:
        conn = await asyncpg.connect(pg_database, timeout=10)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    signer = SignerThread(settings).start()
    try:
        async for service in _service(settings, slots=2):  # the warm-up used one slot: one is left
            await sql(
                "CREATE FUNCTION refuse_signed() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'audit storage full'; END $$"
            )
            await sql(
                "CREATE TRIGGER refuse_signed BEFORE INSERT ON audit_pending FOR EACH ROW "
                "WHEN (NEW.kind = 'payment.signed') EXECUTE FUNCTION refuse_signed()"
            )
            path = f"/v1/wallets/{service.wallet_id}/sign/transaction"
            body = {"transaction": transfer(CHAIN, BOB, EACH, 99)}
            headers = service.agent | {"Idempotency-Key": "invoice-77"}
            first = await service.client.post(path, json=body, headers=headers)
            assert first.status_code == 503
            assert first.json()["code"] == "audit_unavailable"
            await sql("DROP TRIGGER refuse_signed ON audit_pending")
            retry = await service.client.post(path, json=body, headers=headers)
            assert retry.status_code == 200, retry.text  # the first attempt's reservation is not counted
            service.signed += 1
            await service.books()
    finally:
        signer.stop()
        gc.collect()
