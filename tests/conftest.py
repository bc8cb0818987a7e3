"""Shared fixtures: backends (SQLite and a private PostgreSQL database), a running signer, the API.

PostgreSQL tests create their own database on the shared server and drop it afterwards.
Without a reachable server they are skipped on a laptop and FAIL when CI is set.
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from custody.services.context import Context
from custody.settings import Settings
from custody.signer.client import SignerClient
from custody.signer.server import serve

PG_ADMIN_DSN = os.environ.get("CUSTODY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run long soak tests")
    parser.addoption("--docker", action="store_true", help="run checks that need the Docker client with compose")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--docker"):
        # Not a skip: these checks are not part of the run unless asked for (no compose client here).
        kept = [item for item in items if "docker" not in item.keywords]
        config.hook.pytest_deselected(items=[item for item in items if "docker" in item.keywords])
        items[:] = kept
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak test: run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their settings explicitly; a developer's CUSTODY_* variables must not leak in."""
    for name in list(os.environ):
        if name.startswith("CUSTODY_") and name != "CUSTODY_TEST_PG":
            monkeypatch.delenv(name)


def _pg_unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"PostgreSQL is required in CI: {reason}")
    pytest.skip(f"PostgreSQL not reachable: {reason}")


async def _pg(statement: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database; dropped after the test."""
    name = "custody_test_" + secrets.token_hex(6)
    try:
        asyncio.run(_pg(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        _pg_unavailable(str(exc))
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(_pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private directory (Unix socket paths are limited to ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="cst-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(backend: str, short_dir: Path, request: pytest.FixtureRequest) -> Settings:
    database_url = request.getfixturevalue("pg_database") if backend == "postgresql" else None
    return Settings(
        data_dir=short_dir / "data",
        database_url=database_url,
        kek_scrypt_n=2**10,
        webhook_interval_seconds=0.05,
        webhook_backoff_seconds=0.01,
    )


class SignerThread:
    """The real signer server on its real socket, in a thread of the test process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self.core: object = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()

            def ready(core: object) -> None:
                self.core = core
                self._ready.set()

            await serve(self.settings, stop=self._stop, ready=ready)

        try:
            self._loop.run_until_complete(main())
        finally:
            self._loop.close()

    def start(self) -> SignerThread:
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("signer did not start")
        return self

    def stop(self) -> None:
        if self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def signer(settings: Settings) -> Iterator[SignerThread]:
    running = SignerThread(settings).start()
    try:
        yield running
    finally:
        running.stop()
        gc.collect()  # surface unclosed-resource warnings in the test that caused them


@pytest.fixture
async def opened(settings: Settings) -> AsyncIterator[Context]:
    """The service context on the test's backend, without a signer (for what never signs)."""
    context = await Context.open(settings)
    try:
        yield context
    finally:
        await context.close()


@pytest.fixture
def ctx(signer: SignerThread, opened: Context) -> Context:
    """The service context with the real signer running (started first, stopped last)."""
    return opened


@pytest.fixture
async def signer_client(settings: Settings, signer: SignerThread) -> AsyncIterator[SignerClient]:
    client = SignerClient(settings.socket_path)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def api(settings: Settings, signer: SignerThread) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """The real app (lifespan included) over ASGI, and the first admin's token."""
    async for client in _in_process_api(settings, background=True):
        yield client


@pytest.fixture
async def admin_api(settings: Settings, signer: SignerThread) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """As ``api``, for setting up what a test then uses through ``live_server`` with synchronous clients.

    Those calls block this event loop. The in-process app therefore runs nothing in the
    background (audit sealer, sweep, webhooks): on SQLite a write transaction it had begun
    would hold the database's lock across the block, and the live server's payment would wait
    for it until its timeout (503).
    """
    async for client in _in_process_api(settings, background=False):
        yield client


async def _in_process_api(settings: Settings, *, background: bool) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    from custody.api.app import create_app
    from custody.services.operators import ensure_first_admin

    app = create_app(settings, background=background)
    async with app.router.lifespan_context(app):
        token = await ensure_first_admin(app.state.ctx)
        assert token is not None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://custody.test") as client:
            client.headers["Authorization"] = f"Bearer {token}"
            yield client, token


class LiveServer:
    """uvicorn serving the real app on a free loopback port, in a thread."""

    def __init__(self, settings: Settings) -> None:
        import uvicorn

        from custody.api.app import create_app

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the API did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def live_server(settings: Settings, signer: SignerThread) -> Iterator[LiveServer]:
    server = LiveServer(settings).start()
    try:
        yield server
    finally:
        server.stop()


REDIS_URL = os.environ.get("CUSTODY_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A private key prefix on the shared Redis; every key under it is deleted afterwards."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        if IN_CI:
            pytest.fail(f"Redis is required in CI: {exc}")
        pytest.skip(f"Redis not reachable: {exc}")
    prefix = f"custody-test-{secrets.token_hex(4)}:"
    try:
        yield prefix
    finally:
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
        client.close()


class PrivateRedis:
    """A redis-server of the test's own (own port, own directory), to stop and pause at will."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        executable = shutil.which("redis-server")
        if executable is None:
            if IN_CI:
                pytest.fail("redis-server is required in CI")
            pytest.skip("redis-server is not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [executable, *args, "--dir", str(self.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.02)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            self.process.wait(10)
        self.process = None


@pytest.fixture
def private_redis(short_dir: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(short_dir / "redis").start()
    try:
        yield server
    finally:
        server.stop()
