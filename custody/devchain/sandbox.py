"""A throwaway custody service on this machine, for ``custody demo`` and the examples.

    from custody.devchain.sandbox import start_sandbox

    with start_sandbox() as sandbox:                       # `custody serve` in a fresh temporary directory
        wallet = sandbox.create_wallet("demo")
        sandbox.set_policy(wallet["id"], policy_document)
        agent_id = sandbox.create_agent("research-agent")
        api_key = sandbox.issue_key(agent_id, [wallet["id"]])
        ...                                                # the agent talks to sandbox.url with api_key

``custody serve`` runs as a child process, as a user starts it: the API in that process, the
signer in its own child process, on a free loopback port, with SQLite and a key-encryption key
file in the temporary directory, in development mode. None of your ``CUSTODY_*`` variables is
passed on, so your own data directory is never touched. Leaving the block (normally, by an
exception or by Ctrl-C) stops the service, which stops its signer, and removes the directory,
unless ``keep=True``. Needs the ``server`` extra.

Credentials (the first admin's token, operator tokens, agent API keys) are returned to the
caller and never printed or logged here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess  # nosec B404 # only to run this package's own `custody` command
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from custody.runtime import die_with_parent

__all__ = ["Sandbox", "SandboxError", "format_units", "serve_app", "start_sandbox"]

READY_TIMEOUT = 90.0  # seconds for `custody serve` and its signer to answer /readyz (slow, busy machines)
_MAX_SOCKET_PATH = 100  # Unix socket paths are limited to about 104-108 bytes


class SandboxError(RuntimeError):
    """The throwaway service could not be started or refused an operator request (no secrets in the message)."""


def format_units(amount: int, decimals: int, symbol: str = "") -> str:
    """``amount`` base units as a decimal string for people (integer arithmetic; no float is involved)."""
    sign = "-" if amount < 0 else ""
    whole, fraction = divmod(abs(amount), 10**decimals)
    text = f"{sign}{whole:,}"
    if fraction:
        text += "." + str(fraction).rjust(decimals, "0").rstrip("0")
    return f"{text} {symbol}".rstrip()


def _environment(**values: str) -> dict[str, str]:
    """This process's environment without any CUSTODY_* variable, plus ``values``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("CUSTODY_")}
    env.update(values)
    return env


@contextlib.contextmanager
def _without_custody_variables() -> Iterator[None]:
    """Hide CUSTODY_* variables from settings built in this process, and put them back afterwards."""
    saved = {name: value for name, value in os.environ.items() if name.startswith("CUSTODY_")}
    for name in saved:
        del os.environ[name]
    try:
        yield
    finally:
        os.environ.update(saved)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _first_admin_token(data_dir: Path) -> str:
    """Create the data directory's first admin (as `custody init` does) and return its token."""
    from custody.services.context import Context
    from custody.services.operators import ensure_first_admin
    from custody.settings import Settings, ensure_private_dir

    with _without_custody_variables():
        settings = Settings(data_dir=data_dir, mode="development")
    ensure_private_dir(settings.data_dir)

    async def bootstrap() -> str | None:
        ctx = await Context.open(settings)
        try:
            return await ensure_first_admin(ctx)
        finally:
            await ctx.close()

    token = asyncio.run(bootstrap())
    if token is None:
        raise SandboxError(f"{data_dir} already has operators; the sandbox needs a fresh directory")
    return token


def _signer_pid(socket_path: Path) -> int | None:
    from custody.signer.client import SignerClient

    async def status() -> dict[str, Any]:
        client = SignerClient(socket_path, timeout=5.0)
        try:
            return await client.status()
        finally:
            await client.close()

    pid = asyncio.run(status()).get("pid")
    return pid if isinstance(pid, int) else None


@dataclass(eq=False)
class Sandbox:
    """A running throwaway service: its URL, its data directory, and operator actions as its first admin."""

    url: str
    data_dir: Path
    log_path: Path
    api_pid: int
    signer_pid: int | None
    _process: subprocess.Popen[bytes] = field(repr=False)
    _admin: httpx.Client = field(repr=False)

    # -- operator actions through the admin API, as the first admin

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._admin.request(method, path, json=body)
        if response.is_success:
            return response.json() if response.content else None
        try:
            problem = response.json()
            what = f"[{problem.get('code')}] {problem.get('detail')}"
        except ValueError:
            what = f"HTTP {response.status_code}"
        raise SandboxError(f"{method} {path}: {what}")

    def create_wallet(self, name: str) -> dict[str, Any]:
        """A new wallet (``id``, ``name``, ``address``); its key is generated inside the signer."""
        return dict(self._call("POST", "/admin/v1/wallets", {"name": name}))

    def set_policy(self, wallet_id: str, document: dict[str, Any]) -> int:
        """A new version of the wallet's policy; returns the version number."""
        return int(self._call("PUT", f"/admin/v1/wallets/{wallet_id}/policy", {"document": document})["version"])

    def create_agent(self, name: str) -> str:
        """A new agent; returns its id."""
        return str(self._call("POST", "/admin/v1/agents", {"name": name})["id"])

    def issue_key(self, agent_id: str, wallet_ids: Sequence[str]) -> str:
        """A new API key for the agent, scoped to ``wallet_ids``; returned once, never printed here."""
        return str(self._call("POST", f"/admin/v1/agents/{agent_id}/keys", {"wallet_ids": list(wallet_ids)})["api_key"])

    def create_operator(self, name: str, role: str) -> tuple[str, str]:
        """A new operator credential: ``(operator id, token)``; the token is returned once."""
        created = self._call("POST", "/admin/v1/operators", {"name": name, "role": role})
        return str(created["operator"]["id"]), str(created["token"])

    def audit_verify(self) -> dict[str, Any]:
        """The audit log's hash-chain check (what `custody audit verify` prints)."""
        return dict(self._call("GET", "/admin/v1/audit/verify"))

    # -- the real `custody` command against this service

    def cli_environment(self, operator_token: str) -> dict[str, str]:
        """The environment for a `custody` command that acts on this service as the operator with that token."""
        return _environment(CUSTODY_URL=self.url, CUSTODY_ADMIN_TOKEN=operator_token)

    def run_cli(
        self, args: Sequence[str], operator_token: str, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``custody ARGS`` (this interpreter's) against this service; its output is returned, not printed."""
        # A fixed command (this interpreter, this package) with the caller's arguments, no shell.
        return subprocess.run(  # noqa: S603  # nosec B603
            [sys.executable, "-m", "custody", *args],
            env=self.cli_environment(operator_token),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    # -- shutting down

    def stop(self) -> None:
        """Stop `custody serve` and wait until its signer is gone too; close the admin client. Safe to repeat."""
        self._admin.close()
        _stop(self._process)
        if self.signer_pid is not None and not _gone(self.signer_pid, 10.0):
            # `custody serve` had no chance to stop its signer (no parent-death signal on this system).
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.signer_pid, signal.SIGTERM)
            _gone(self.signer_pid, 10.0)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited (a zombie counts as exited); False if it still runs after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
            stat = Path(f"/proc/{pid}/stat")
            if stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z":
                return True
        except (OSError, IndexError):  # no such process (or no longer ours)
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _temporary_directory() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="custody-demo-"))
    if len(str(directory / "signer.sock")) > _MAX_SOCKET_PATH:
        directory.rmdir()
        raise SandboxError(
            f"the temporary directory {directory.parent} is too deep for a Unix socket path: "
            "set TMPDIR to a shorter one (for example /tmp)"
        )
    return directory


def _tail(log_path: Path, lines: int = 12) -> str:
    """The end of the service's output (its log is masked; the first admin's token was never in it)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _wait_until_ready(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    with httpx.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            code = process.poll()
            if code is not None:
                raise SandboxError(f"`custody serve` exited with code {code}; its last output:\n{_tail(log_path)}")
            try:
                if http.get(url + "/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise SandboxError(
        f"`custody serve` was not ready within {READY_TIMEOUT:.0f} s; its last output:\n{_tail(log_path)}"
    )


@contextlib.contextmanager
def start_sandbox(*, keep: bool = False, while_starting: Callable[[], object] | None = None) -> Iterator[Sandbox]:
    """Start `custody serve` in a new temporary data directory; stop it and remove the directory on exit.

    With ``keep=True`` the directory (database, KEK file, the service's log) stays for inspection.
    ``while_starting`` is called once the service's process runs, while it starts up (to overlap
    other set-up, such as starting a dev chain, with it).
    """
    data_dir = _temporary_directory()
    process: subprocess.Popen[bytes] | None = None
    sandbox: Sandbox | None = None
    try:
        token = _first_admin_token(data_dir)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = data_dir / "serve.log"
        env = _environment(CUSTODY_DATA_DIR=str(data_dir), CUSTODY_MODE="development")
        with open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as log:
            # A fixed command (this interpreter, this package), no shell.
            process = subprocess.Popen(  # noqa: S603  # nosec B603
                [sys.executable, "-m", "custody", "serve", "--port", str(port)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=die_with_parent,
            )
        if while_starting is not None:
            while_starting()
        _wait_until_ready(process, url, log_path)
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60.0)
        sandbox = Sandbox(
            url=url,
            data_dir=data_dir,
            log_path=log_path,
            api_pid=process.pid,
            signer_pid=_signer_pid(data_dir / "signer.sock"),
            _process=process,
            _admin=admin,
        )
        yield sandbox
    finally:
        if sandbox is not None:
            sandbox.stop()
        elif process is not None:
            _stop(process)
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)


@contextlib.contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Serve an ASGI app (for example a paywall's) with uvicorn on a free loopback port, in a thread; its URL."""
    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="serve-app", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise SandboxError("the app did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()
