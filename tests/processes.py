"""Real service processes for tests that kill, restart or starve them: the signer and the API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

from custody.services.context import Context
from custody.services.operators import ensure_first_admin
from custody.settings import Settings


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def first_admin_token(settings: Settings) -> str:
    """Create the first admin on ``settings``' database (migrating it) and return its token."""
    ctx = await Context.open(settings)
    try:
        token = await ensure_first_admin(ctx)
    finally:
        await ctx.close()
    assert token is not None
    return token


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a `custody` process needs to run on ``settings`` (no developer CUSTODY_* leaks in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODY_")}
    env |= {
        "CUSTODY_DATA_DIR": str(settings.data_dir),
        "CUSTODY_SIGNER_SOCKET": str(settings.socket_path),
        "CUSTODY_KEK_SCRYPT_N": str(settings.kek_scrypt_n),
    }
    if settings.database_url:
        env["CUSTODY_DATABASE_URL"] = settings.database_url
    if settings.redis_url:
        env["CUSTODY_REDIS_URL"] = settings.redis_url
        env["CUSTODY_REDIS_PREFIX"] = settings.redis_prefix
    return env | {f"CUSTODY_{k.upper()}": v for k, v in extra.items()}


class Process:
    """One `python -m custody ...` process; restartable, logs to a file."""

    def __init__(self, args: list[str], env: Mapping[str, str], log: Path) -> None:
        self.args = args
        self.env = dict(env)
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Process:
        with self.log.open("ab") as sink:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "custody", *self.args], env=self.env, stdout=sink, stderr=subprocess.STDOUT
            )
        self.starts += 1
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            assert self.popen is not None
            self.popen.send_signal(sig)

    def stop(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
            self.popen.terminate()
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def signer_process(settings: Settings, log: Path, **extra: str) -> Process:
    return Process(["signer", "run"], service_env(settings, **extra), log)


def api_process(settings: Settings, port: int, log: Path, **extra: str) -> Process:
    return Process(["serve", "--no-signer", "--port", str(port)], service_env(settings, **extra), log)


def signer_ready(settings: Settings) -> bool:
    if not settings.socket_path.exists():
        return False
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(settings.socket_path))
        except OSError:
            return False
    return True


def api_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class Supervisor:
    """Restart any of ``processes`` that died (the way systemd or a container runtime would)."""

    def __init__(self, *processes: Process) -> None:
        self.processes = processes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for process in self.processes:
                if not process.alive:
                    process.start()

    def __enter__(self) -> Supervisor:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for process in self.processes:
            process.stop()
