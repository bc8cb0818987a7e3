"""`custody serve` as a user runs it: a fresh data dir, the signer as a child, clean shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from web3 import Web3

from tests.test_isolation import _free_port, _wait_for


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_serve_from_nothing_then_wallet_create_then_sigterm_stops_the_signer_too(short_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODY_")} | {
        "CUSTODY_DATA_DIR": str(short_dir / "data")
    }
    port = _free_port()
    log = short_dir / "serve.log"
    with log.open("wb") as sink:
        serve = subprocess.Popen(
            [sys.executable, "-m", "custody", "serve", "--port", str(port)], env=env, stdout=sink, stderr=sink
        )
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(url + "/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(ready, "custody serve")
        banner = log.read_text()
        assert "DEVELOPMENT MODE" in banner
        assert "CUSTODY_ADMIN_TOKEN=cop." in banner
        # Both long-running processes, the API and its signer, froze their start-up objects.
        assert banner.count("start-up objects kept out of garbage collection") == 2, banner
        created = subprocess.run(
            [sys.executable, "-m", "custody", "wallet", "create", "first", "--json"],
            env=env,
            capture_output=True,
            check=True,
            timeout=60,
        )
        assert Web3.is_checksum_address(json.loads(created.stdout)["address"])
        status = subprocess.run(
            [sys.executable, "-m", "custody", "signer", "status", "--json"],
            env=env,
            capture_output=True,
            check=True,
            timeout=60,
        )
        signer_pid = json.loads(status.stdout)["pid"]
        assert signer_pid != serve.pid
        assert _alive(signer_pid)
        serve.send_signal(signal.SIGTERM)
        serve.wait(20)
        assert not _alive(signer_pid), "serve exited before stopping its signer"
        assert not (short_dir / "data" / "signer.sock").exists()
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(10)
