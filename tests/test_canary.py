"""A known key goes in through the CLI; it must come out nowhere.

After importing a canary key and exercising every endpoint, every signing operation and
the error paths, the key is searched (hex in any case, with or without 0x, base64, raw
bytes) in the database (SQLite file and WAL, or a pg_dump), the logs, every response
body and header, every exception text, and the CLI's output.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil

import httpx
import pytest
from typer.testing import CliRunner, Result

from custody.cli import app as cli
from custody.errors import CustodyError
from custody.settings import Settings
from tests.canary import find

CANARY = bytes.fromhex("c0ffee00" * 8)


async def test_canary_key_appears_nowhere(
    settings: Settings,
    api: tuple[httpx.AsyncClient, str],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    client, _ = api
    monkeypatch.setenv("CUSTODY_DATA_DIR", str(settings.data_dir))
    if settings.database_url:
        monkeypatch.setenv("CUSTODY_DATABASE_URL", settings.database_url)
    outputs: list[str] = []
    exceptions: list[str] = []

    def invoke(args: list[str], stdin: str | None = None) -> Result:
        # The CLI runs its own event loop, so it runs in a thread here.
        return CliRunner().invoke(cli, args, input=stdin)

    result = await asyncio.to_thread(invoke, ["wallet", "import", "canary", "--json"], CANARY.hex() + "\n")
    assert result.exit_code == 0, result.stderr
    outputs += [result.stdout, result.stderr]
    wallet = json.loads(result.stdout)
    result = await asyncio.to_thread(invoke, ["wallet", "import", "again", "--json"], "0x" + CANARY.hex().upper())
    assert result.exit_code == 1  # the same address twice is a conflict
    outputs += [result.stdout, result.stderr]

    responses = [
        await client.get("/healthz"),
        await client.get("/readyz"),
        await client.get("/openapi.json"),
        await client.post("/admin/v1/wallets", json={"name": "other"}),
        await client.post("/admin/v1/wallets", json={"name": CANARY.hex() + " is not a name"}),
        await client.post("/admin/v1/wallets", json={"private_key": CANARY.hex()}),
        await client.get("/admin/v1/wallets"),
        await client.get(f"/admin/v1/wallets/{wallet['id']}"),
        await client.get("/admin/v1/wallets/wal_missing"),
        await client.get("/admin/v1/wallets", headers={"Authorization": "Bearer " + CANARY.hex()}),
    ]
    ctx = client._transport.app.state.ctx  # type: ignore[attr-defined]
    envelope = await ctx.wallets.envelope(wallet["id"])
    signed = [
        await ctx.signer.sign_transaction(
            envelope,
            {
                "type": 2,
                "chainId": 1,
                "nonce": 0,
                "to": wallet["address"],
                "value": 1,
                "gas": 21000,
                "maxFeePerGas": 2,
                "maxPriorityFeePerGas": 1,
            },
        ),
        await ctx.signer.sign_message(envelope, "canary"),
        await ctx.signer.public_key(envelope),
    ]
    bad_requests = [
        (ctx.signer.sign_transaction, (envelope, {"type": 4, "chainId": 1})),
        (ctx.signer.sign_transaction, (envelope, {"chainId": 1, "gas": "x", "to": "bad"})),
        (ctx.signer.sign_typed_data, (envelope, {"domain": {}})),
        (
            ctx.signer.sign_message,
            (envelope.__class__(envelope.wallet_id, 1, 1, envelope.wrapped_dek[:-1] + b"\0", envelope.ciphertext), "x"),
        ),
    ]
    for call, args in bad_requests:
        with pytest.raises(CustodyError) as caught:
            await call(*args)  # type: ignore[operator]
        exceptions += [str(caught.value), repr(caught.value), json.dumps(caught.value.to_problem())]
    rotated = await asyncio.to_thread(invoke, ["keys", "rotate-kek", "--json"])
    assert rotated.exit_code == 0
    outputs += [rotated.stdout, rotated.stderr]

    # Where the key could have leaked.
    haystacks: dict[str, bytes | str] = {
        "responses": "\n".join(r.text + str(dict(r.headers)) for r in responses),
        "signer results": json.dumps(signed),
        "exceptions": "\n".join(exceptions),
        "cli": "\n".join(outputs),
        "logs": "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records),
    }
    captured = capfd.readouterr()
    haystacks["stdout/stderr"] = captured.out + captured.err
    if settings.uses_sqlite:
        for suffix in ("", "-wal", "-shm"):
            path = settings.data_dir / f"custody.db{suffix}"
            if path.exists():
                haystacks[path.name] = path.read_bytes()
    else:
        assert settings.database_url is not None
        pg_dump = shutil.which("pg_dump")
        assert pg_dump, "pg_dump is needed to scan the PostgreSQL database"
        dump = await asyncio.create_subprocess_exec(pg_dump, settings.database_url, stdout=asyncio.subprocess.PIPE)
        dumped, _ = await dump.communicate()
        assert dump.returncode == 0
        haystacks["pg_dump"] = dumped
        assert b"wallet_keys" in dumped
    assert any(settings.data_dir.glob("custody.db*")) or not settings.uses_sqlite
    leaks = {where: hits for where, data in haystacks.items() if (hits := find(CANARY, data))}
    assert leaks == {}
    # The scan itself works: the same search finds the key where it is.
    assert find(CANARY, "prefix 0x" + CANARY.hex().upper() + " suffix")
