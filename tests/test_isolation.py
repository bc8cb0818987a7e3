"""The API process runs where the KEK does not exist for it, and still serves; no key reaches it.

The signer runs as its own process with its data directory. The API process starts in a
private mount namespace in which the signer's directory (KEK included) is replaced by an
empty, mode-000 tmpfs: it can reach the signer only through the socket. The test proves
the KEK is unreadable from the API's namespace, that wallets are created and listed
through it, and that neither the KEK nor an imported private key is anywhere in the API
process's memory.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from web3 import Web3

from tests.canary import find

CANARY = bytes.fromhex("feedface" * 8)
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _namespaces_available() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False)
    return None if probe.returncode == 0 else "mount namespaces need root: " + probe.stderr.decode().strip()


@pytest.fixture
def workdir() -> Iterator[Path]:
    reason = _namespaces_available()
    if reason:
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    path = Path(tempfile.mkdtemp(prefix="cst-iso-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _wait_for(predicate: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _process_memory(pid: int) -> bytes:
    chunks = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            address, perms = line.split()[:2]
            if not perms.startswith("r") or "[vvar]" in line or "[vsyscall]" in line:
                continue
            start, end = (int(x, 16) for x in address.split("-"))
            try:
                mem.seek(start)
                chunks.append(mem.read(end - start))
            except (OSError, ValueError, OverflowError):
                continue
    return b"".join(chunks)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("pg_database") if request.param == "postgresql" else None


def test_api_without_access_to_the_kek_creates_wallets_and_never_holds_key_material(
    workdir: Path, database_url: str | None
) -> None:
    signer_dir, api_dir, sock_dir = workdir / "signer", workdir / "api", workdir / "sock"
    for path in (signer_dir, api_dir, sock_dir):
        path.mkdir(mode=0o700)
    socket_path = sock_dir / "signer.sock"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODY_")}
    signer_env = base_env | {"CUSTODY_DATA_DIR": str(signer_dir), "CUSTODY_SIGNER_SOCKET": str(socket_path)}
    api_env = base_env | {
        "CUSTODY_DATA_DIR": str(api_dir),
        "CUSTODY_SIGNER_SOCKET": str(socket_path),
        "CUSTODY_KEK_DIR": str(signer_dir / "kek"),  # where the KEK is: the API still must not read it
    }
    if database_url:
        api_env["CUSTODY_DATABASE_URL"] = database_url
    python = [sys.executable, "-m", "custody"]
    signer = subprocess.Popen([*python, "signer", "run"], env=signer_env, stderr=subprocess.DEVNULL)
    api: subprocess.Popen[bytes] | None = None
    try:
        _wait_for(socket_path.exists, "the signer socket")
        kek_file = signer_dir / "kek" / "v1.key"
        assert kek_file.exists()
        kek = base64.b64decode(kek_file.read_bytes())

        # An operator imports a known key on the host (CLI, stdin), against the API's database.
        imported = subprocess.run(
            [*python, "wallet", "import", "canary", "--json"],
            input=CANARY.hex().encode(),
            env=api_env,
            capture_output=True,
            check=True,
            timeout=60,
        )
        assert CANARY.hex().encode() not in imported.stdout + imported.stderr

        port = _free_port()
        log = workdir / "api.log"
        hide = f'mount -t tmpfs -o mode=000 none {signer_dir} && exec "$@"'
        with log.open("wb") as sink:
            api = subprocess.Popen(
                [
                    "unshare",
                    "-m",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    hide,
                    "sh",
                    *python,
                    "serve",
                    "--no-signer",
                    "--port",
                    str(port),
                ],
                env=api_env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(url + "/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(ready, "the API")

        # From inside the API's mount namespace the KEK does not exist.
        peek = subprocess.run(
            ["nsenter", "-t", str(api.pid), "-m", "cat", str(kek_file)], capture_output=True, check=False
        )
        assert peek.returncode != 0
        assert peek.stdout == b""

        token = re.search(rb"CUSTODY_ADMIN_TOKEN=(\S+)", log.read_bytes())
        assert token is not None
        headers = {"Authorization": f"Bearer {token.group(1).decode()}"}
        created = httpx.post(url + "/admin/v1/wallets", json={"name": "isolated"}, headers=headers, timeout=10)
        assert created.status_code == 201
        assert Web3.is_checksum_address(created.json()["address"])
        listed = httpx.get(url + "/admin/v1/wallets", headers=headers, timeout=10).json()["wallets"]
        assert {w["name"] for w in listed} == {"canary", "isolated"}

        memory = _process_memory(api.pid)
        assert created.json()["address"].encode() in memory  # the scan does see the process's data
        assert find(CANARY, memory) == []
        assert find(kek, memory) == []
        assert find(CANARY, log.read_bytes()) == []
    finally:
        for process in (api, signer):
            if process is not None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
