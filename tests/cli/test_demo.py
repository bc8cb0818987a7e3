"""`custody demo` as a user runs it: ``python -m custody demo`` in a clean environment, offline.

The output must tell the story (signed and mined; denied with reason codes and what remains;
held, approved with the real CLI command, mined), the temporary data directory and every
process must be gone afterwards (also after Ctrl-C), and no key material or credential may
appear in what the demo prints: with ``--keep`` the wallet keys, their data keys and the KEK are
decrypted from the kept directory and searched for in every encoding tests/canary.py knows.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from custody.cli import app as cli
from custody.keys.envelope import _dek_context, open_envelope
from custody.keys.kek import FileKekSource
from custody.policyfile import load_policy_file
from custody.services.context import Context
from custody.settings import Settings
from tests.canary import find
from tests.test_serve import _alive

CREDENTIAL = re.compile(r"c(ak|op)\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
TX = r"0x[0-9a-f]{64}"


def _environment(tmp: Path) -> dict[str, str]:
    """A user's shell: no CUSTODY_* variables; temporary files under ``tmp``."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CUSTODY_")} | {"TMPDIR": str(tmp)}


def _demo(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "custody", "demo", *args],
        env=_environment(tmp),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _pids(output: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"^   (?:API|signer) +pid (\d+)", output, re.MULTILINE)]


def _in_order(text: str, *patterns: str) -> None:
    """Each pattern matches, after the previous one."""
    position = 0
    for pattern in patterns:
        found = re.compile(pattern, re.MULTILINE).search(text, position)
        assert found is not None, f"{pattern!r} not found after position {position} in:\n{text}"
        position = found.end()


def test_demo_signs_and_mines_denies_with_reasons_approves_through_the_cli_and_removes_everything(
    short_dir: Path,
) -> None:
    done = _demo(short_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    _in_order(
        out,
        r"^1\. The service is running",
        r"API +pid \d+ +http://127\.0\.0\.1:\d+",
        r"signer +pid \d+ .*signer\.sock \(mode 0600; holds the keys\)",
        r"^2\. An operator sets up a wallet, a policy and an agent key",
        r"custody wallet create demo-wallet +-> 0x[0-9a-fA-F]{40} \(wal_\w+\)",
        r"custody policy set wal_\w+ /\S+/demo-policy\.yaml +-> version 1:",
        r"^3\. Allowed: the agent pays the shop 0\.1 ETH",
        rf"200 signed: tx {TX}",
        r"mined in block \d+: wallet 5 ETH -> 4\.89\d+ ETH \(0\.1 ETH paid \+ 0\.0000\d+ ETH gas\)",
        r"shop balance: 0\.1 ETH",
        r"left today: 0\.899958 ETH of 1 ETH; resets at \d{4}-\d\d-\d\dT00:00:00\+00:00",
        r"^4\. Denied: the agent tries to pay 0\.95 ETH",
        r"403 policy_denied, nothing signed",
        r"- payee_not_allowlisted \(rule payees\): 0x[0-9a-f]{40} is not on the payee allowlist",
        r"- cap_exceeded \(rule daily-eth\): ",
        r"remaining 0\.899958 ETH of 1 ETH, resets at \d{4}-\d\d-\d\dT00:00:00\+00:00",
        r"^5\. Held for approval: the agent pays the shop 0\.5 ETH",
        r"202 pending_approval: payment (pay_\w+) needs 1 of group ops; expires at \d{4}-",
        r"the agent waits: account\.wait_for_transaction",
        r"\$ CUSTODY_URL=http://127\.0\.0\.1:\d+ CUSTODY_ADMIN_TOKEN=<ana's token> custody approvals approve pay_\w+ ",
        r"^     pay_\w+: signed$",
        rf"the agent's wait returned: signed, tx {TX}",
        r"mined in block \d+: wallet 4\.89\d+ ETH -> 4\.39\d+ ETH \(0\.5 ETH paid \+ ",
        r"left today: 0\.399916 ETH of 1 ETH",
        r"^6\. x402: the agent buys a report for 0\.01 USDC",
        r"GET /report -> 402 Payment Required",
        rf'200 \{{"report": "all green"\}}; the seller\'s facilitator settled it: tx {TX}',
        r"seller's balance: 0\.01 USDC",
        r"^7\. Everything above is in the audit log",
        r"\d+ hash-chained records .* the chain verifies",
        r"^Done in [\d.]+ s\.",
        r"^Removed /\S+custody-demo-\w+\.$",
    )
    # The payment that waited is the one the operator approved.
    held = re.search(r"202 pending_approval: payment (pay_\w+)", out)
    assert held is not None
    assert f"custody approvals approve {held.group(1)} " in out
    assert f"     {held.group(1)}: signed" in out

    data_dir = re.search(r"data directory (\S+) \(temporary", out)
    assert data_dir is not None
    assert Path(data_dir.group(1)).parent == short_dir
    assert not Path(data_dir.group(1)).exists()
    assert list(short_dir.iterdir()) == []
    pids = _pids(out)
    assert len(pids) == 2
    assert not any(_alive(pid) for pid in pids)
    assert CREDENTIAL.search(done.stdout + done.stderr) is None


async def _key_material(data_dir: Path) -> dict[str, bytes]:
    """Every wallet key and data key in the kept directory, and the KEK, decrypted as the signer would."""
    settings = Settings(data_dir=data_dir)
    kek_files = sorted(settings.kek_directory.glob("v*.key"))
    found = {f"KEK {path.stem}": base64.b64decode(path.read_bytes().strip()) for path in kek_files}
    keyring = FileKekSource(settings.kek_directory, create=False).open()
    ctx = await Context.open(settings, run_migrations=False)
    try:
        for wallet in await ctx.wallets.list():
            envelope = await ctx.wallets.envelope(wallet.id)
            assert envelope is not None
            found[f"{wallet.name} private key"] = open_envelope(keyring, envelope)
            context = _dek_context(envelope.wallet_id, envelope.key_version)
            found[f"{wallet.name} data key"] = keyring.unwrap(envelope.kek_version, envelope.wrapped_dek, context)
    finally:
        await ctx.close()
    return found


def test_demo_with_keep_keeps_the_directory_and_prints_no_key_material(short_dir: Path) -> None:
    done = _demo(short_dir, "--keep")
    assert done.returncode == 0, done.stdout + done.stderr
    kept = re.search(r"^Kept (\S+): the database", done.stdout, re.MULTILINE)
    assert kept is not None, done.stdout
    data_dir = Path(kept.group(1))
    assert data_dir.parent == short_dir
    assert (data_dir / "custody.db").is_file()
    policy_file = data_dir / "demo-policy.yaml"
    assert f" {policy_file}    -> version 1:" in done.stdout
    assert load_policy_file(policy_file).id == "demo-policy"  # the printed `custody policy set` command works
    assert f"CUSTODY_DATA_DIR={data_dir} custody audit verify" in done.stdout
    assert not any(_alive(pid) for pid in _pids(done.stdout))

    secrets = asyncio.run(_key_material(data_dir))
    assert {"KEK v1", "demo-wallet private key", "demo-wallet data key"} <= set(secrets)
    printed = done.stdout + "\n" + done.stderr
    for name, secret in secrets.items():
        assert find(secret, printed) == [], name
    assert CREDENTIAL.search(printed) is None


def test_ctrl_c_stops_the_service_and_removes_the_directory(short_dir: Path) -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "custody", "demo"],
        env=_environment(short_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(120, demo.kill)
    watchdog.start()
    try:
        assert demo.stdout is not None
        seen = []
        for line in demo.stdout:
            seen.append(line)
            if line.startswith("   signer  pid"):  # the service is up; the chain is starting
                break
        demo.send_signal(signal.SIGINT)
        rest, errors = demo.communicate(timeout=60)
    finally:
        watchdog.cancel()
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
    output = "".join(seen) + rest
    assert demo.returncode == 130, output + errors
    assert "interrupted: the service was stopped and its data removed" in errors
    assert list(short_dir.iterdir()) == []
    pids = _pids(output)
    assert len(pids) == 2
    assert not any(_alive(pid) for pid in pids)


def test_demo_without_the_devchain_extra_names_the_extra_and_starts_nothing(
    monkeypatch: pytest.MonkeyPatch, short_dir: Path
) -> None:
    monkeypatch.setitem(sys.modules, "eth_tester", None)  # as if the extra were not installed
    monkeypatch.setenv("TMPDIR", str(short_dir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    result = CliRunner().invoke(cli, ["demo"])
    assert result.exit_code == 2
    assert "error [missing_dependency]: `custody demo` needs the devchain extra (eth_tester" in result.stderr
    assert 'pip install -e ".[server,devchain]"' in result.stderr
    assert result.stdout == ""
    assert list(short_dir.iterdir()) == []
