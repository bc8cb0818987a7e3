"""Known keys go in; they must come out nowhere.

A canary private key is imported through the CLI, an agent pays with it through the agent API
(allowed, denied, every signing method), the signer is driven directly and through its error
paths, the KEK is rotated, the audit log is verified and exported. Then the canary key, both KEK
versions, the wallet's data key and the agent's and operator's credentials are searched, in
every encoding tests/canary.py knows (hex in any case with or without 0x, base64 standard and
URL-safe with or without padding at any alignment, decimal, raw bytes and their Python repr), in:

- the database: the SQLite file, WAL and shared memory, or on PostgreSQL a ``pg_dump``, the
  database's own files and the WAL written during the test; every other file in the data
  directory except the KEK files themselves;
- Redis: every key under the service's prefix with its value, and every message it published;
- the logs (the records, and the same records as JSON lines), stdout and stderr;
- every response body and header, every SDK result and exception, the CLI's output;
- the audit export.

The second test proves the search finds a planted key in each encoding, in Redis keys, values
and messages, so the first cannot pass by searching badly.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import secrets
import shutil
import stat
import time
from pathlib import Path

import asyncpg
import httpx
import pytest
import redis
from typer.testing import CliRunner, Result

from custody.audit import AuditLog
from custody.cli import app as cli
from custody.client import AsyncCustodyClient
from custody.client import CustodyError as SdkError
from custody.errors import CustodyError
from custody.keys.envelope import SECP256K1_N, _dek_context
from custody.keys.kek import FileKekSource
from custody.observability.logging import JsonFormatter
from custody.settings import Settings
from tests.canary import RedisTap, find, forms, scan_redis
from tests.conftest import IN_CI, REDIS_URL
from tests.payments.helpers import agent_key, native_policy, set_policy, transfer
from tests.signer.test_signing import MAIL

CHAIN = 8453
PAYEE = "0x09616C3d61b3331fc4109a9E41a8BDB7d9776609"


def _canary_key() -> bytes:
    """A fresh key each run, so no other test (or an earlier run) can have put it anywhere."""
    while True:
        key = secrets.token_bytes(32)
        if 0 < int.from_bytes(key, "big") < SECP256K1_N:
            return key


@pytest.fixture
def settings(settings: Settings, redis_prefix: str) -> Settings:
    """The shared settings, with Redis under a private prefix: rate limits and wake-ups go there."""
    return settings.model_copy(update={"redis_url": REDIS_URL, "redis_prefix": redis_prefix})


async def _postgres_files(url: str, since: float) -> dict[str, bytes]:
    """The test database's files and the WAL segments written since ``since`` (needs the server's disk)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CHECKPOINT")  # what sits in shared buffers reaches the files
        data_dir = Path(await conn.fetchval("SHOW data_directory"))
        oid = await conn.fetchval("SELECT oid FROM pg_database WHERE datname = current_database()")
    finally:
        await conn.close()
    try:
        paths = [p for p in (data_dir / "base" / str(oid)).iterdir() if p.is_file()]
        paths += [p for p in (data_dir / "pg_wal").iterdir() if p.is_file() and p.stat().st_mtime >= since]
        return {f"postgres {p.parent.name}/{p.name}": p.read_bytes() for p in paths}
    except OSError:
        if IN_CI:
            raise
        return {}  # a developer's server in a container or as another user: the pg_dump still covers it


def _data_dir_files(settings: Settings) -> dict[str, bytes]:
    """Every regular file the service wrote in its data directory, except the KEK files."""
    out = {}
    kek_dir = settings.kek_directory.resolve()
    for path in settings.data_dir.rglob("*"):
        if path.is_symlink() or not stat.S_ISREG(path.lstat().st_mode) or kek_dir in path.resolve().parents:
            continue
        out[f"data dir {path.relative_to(settings.data_dir)}"] = path.read_bytes()
    return out


async def test_canary_keys_and_credentials_appear_nowhere(
    settings: Settings,
    api: tuple[httpx.AsyncClient, str],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = time.time() - 1
    canary = _canary_key()
    caplog.set_level(logging.DEBUG)
    json_lines = io.StringIO()
    json_handler = logging.StreamHandler(json_lines)
    json_handler.setFormatter(JsonFormatter())
    json_handler.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(json_handler)
    client, admin_token = api
    monkeypatch.setenv("CUSTODY_DATA_DIR", str(settings.data_dir))
    if settings.database_url:
        monkeypatch.setenv("CUSTODY_DATABASE_URL", settings.database_url)
    outputs: list[str] = []
    exceptions: list[str] = []
    results: list[str] = []

    def invoke(args: list[str], stdin: str | None = None) -> Result:
        # The CLI runs its own event loop, so it runs in a thread here.
        return CliRunner().invoke(cli, args, input=stdin)

    assert settings.redis_url is not None
    tap = RedisTap(settings.redis_url, settings.redis_prefix)
    try:
        with tap:
            result = await asyncio.to_thread(invoke, ["wallet", "import", "canary", "--json"], canary.hex() + "\n")
            assert result.exit_code == 0, result.stderr
            outputs += [result.stdout, result.stderr]
            wallet = json.loads(result.stdout)
            result = await asyncio.to_thread(
                invoke, ["wallet", "import", "again", "--json"], "0x" + canary.hex().upper()
            )
            assert result.exit_code == 1  # the same address twice is a conflict
            outputs += [result.stdout, result.stderr]

            responses = [
                await client.get("/healthz"),
                await client.get("/readyz"),
                await client.get("/openapi.json"),
                await client.post("/admin/v1/wallets", json={"name": "other"}),
                await client.post("/admin/v1/wallets", json={"name": canary.hex() + " is not a name"}),
                await client.post("/admin/v1/wallets", json={"private_key": canary.hex()}),
                await client.get("/admin/v1/wallets"),
                await client.get(f"/admin/v1/wallets/{wallet['id']}"),
                await client.get("/admin/v1/wallets/wal_missing"),
                await client.get("/admin/v1/wallets", headers={"Authorization": "Bearer " + canary.hex()}),
            ]

            # An agent pays with the canary wallet: allowed, denied, and every signing method.
            await set_policy(client, wallet["id"], native_policy(CHAIN, [PAYEE], cap_wei=10**16))
            _, api_key = await agent_key(client, [wallet["id"]], name="canary-agent")
            transport = client._transport
            async with AsyncCustodyClient("http://custody.test", api_key, transport=transport) as agent:
                signed = await agent.sign_transaction(wallet["id"], transfer(CHAIN, PAYEE, 10**15), purpose="canary")
                results.append(repr(signed))
                results.append(repr(await agent.payment(signed.payment_id)))
                results.append(repr(await agent.limits(wallet["id"])))
                results.append(repr(await agent.wallets()))
                for call in (
                    agent.sign_transaction(wallet["id"], transfer(CHAIN, PAYEE, 10**17, nonce=1)),  # over the cap
                    agent.sign_typed_data(wallet["id"], MAIL),
                    agent.sign_message(wallet["id"], "hello from the canary wallet"),
                    agent.payment("pay_missing"),
                ):
                    try:
                        results.append(repr(await call))
                    except SdkError as error:
                        exceptions += [str(error), repr(error), json.dumps(error.problem, default=str)]
            as_agent = {"Authorization": f"Bearer {api_key}"}
            sign_url = f"/v1/wallets/{wallet['id']}/sign/transaction"
            responses += [
                await client.post(sign_url, headers=as_agent, json={"transaction": {"type": 4, "chainId": CHAIN}}),
                await client.post(sign_url, headers=as_agent, content=b'{"transaction": '),
                await client.post(sign_url, headers=as_agent, json={"transaction": {"chainId": 0, "to": "bad"}}),
            ]
            async with AsyncCustodyClient("http://custody.test", "cak.x." + canary.hex(), transport=transport) as bad:
                with pytest.raises(SdkError) as refused:
                    await bad.wallets()
                exceptions += [str(refused.value), repr(refused.value)]
            responses.append(await client.get("/admin/v1/audit"))

            # The signer, directly and through its error paths.
            ctx = client._transport.app.state.ctx  # type: ignore[attr-defined]
            envelope = await ctx.wallets.envelope(wallet["id"])
            signed_direct = [
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
            results.append(json.dumps(signed_direct))
            bad_requests = [
                (ctx.signer.sign_transaction, (envelope, {"type": 4, "chainId": 1})),
                (ctx.signer.sign_transaction, (envelope, {"chainId": 1, "gas": "x", "to": "bad"})),
                (ctx.signer.sign_typed_data, (envelope, {"domain": {}})),
                (
                    ctx.signer.sign_message,
                    (
                        envelope.__class__(
                            envelope.wallet_id, 1, 1, envelope.wrapped_dek[:-1] + b"\0", envelope.ciphertext
                        ),
                        "x",
                    ),
                ),
            ]
            for call, args in bad_requests:
                with pytest.raises(CustodyError) as caught:
                    await call(*args)  # type: ignore[operator]
                exceptions += [str(caught.value), repr(caught.value), json.dumps(caught.value.to_problem())]

            for args in (["keys", "rotate-kek", "--json"], ["audit", "verify", "--json"], ["audit", "export"]):
                done = await asyncio.to_thread(invoke, args)
                assert done.exit_code == 0, (args, done.stderr)
                outputs += [done.stdout, done.stderr]
                if args[1] == "verify":
                    assert json.loads(done.stdout)["ok"] is True  # the audit chain survived all of it
            export = io.StringIO()
            assert await AuditLog(ctx.engine).export(export) > 10
            await asyncio.sleep(0.2)  # let the tap receive the last wake-ups
    finally:
        logging.getLogger().removeHandler(json_handler)

    # The secrets: the wallet key, every KEK version, the wallet's data key; the credentials.
    kek_files = sorted(settings.kek_directory.glob("v*.key"))
    assert len(kek_files) == 2  # v1 and the rotated v2
    keks = {f"KEK {p.stem}": base64.b64decode(p.read_bytes().strip()) for p in kek_files}
    envelope = await ctx.wallets.envelope(wallet["id"])
    keyring = FileKekSource(settings.kek_directory, create=False).open()
    dek = keyring.unwrap(envelope.kek_version, envelope.wrapped_dek, _dek_context(envelope.wallet_id, 1))
    secrets_ = {"canary key": canary, **keks, "data key": dek}
    credentials = {
        "agent API key": api_key.rsplit(".", 1)[-1].encode(),
        "admin token": admin_token.rsplit(".", 1)[-1].encode(),
    }

    # Where they could have leaked.
    haystacks: dict[str, bytes | str] = {
        "responses": "\n".join(r.text + str(dict(r.headers)) for r in responses),
        "results": "\n".join(results),
        "exceptions": "\n".join(exceptions),
        "cli": "\n".join(outputs),
        "logs": "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text or ''} {r.__dict__!r}" for r in caplog.records),
        "json logs": json_lines.getvalue(),
        "audit export": export.getvalue(),
        "redis messages": tap.seen(),
        **{f"redis {name}": value for name, value in scan_redis(settings.redis_url, settings.redis_prefix).items()},
        **_data_dir_files(settings),
    }
    captured = capfd.readouterr()
    haystacks["stdout/stderr"] = captured.out + captured.err
    assert any(name.startswith("redis ") and name != "redis messages" for name in haystacks), "nothing in Redis"
    assert json_lines.getvalue().count("\n") > 5
    if settings.uses_sqlite:
        assert "data dir custody.db" in haystacks
    else:
        assert settings.database_url is not None
        pg_dump = shutil.which("pg_dump")
        assert pg_dump, "pg_dump is needed to scan the PostgreSQL database"
        dump = await asyncio.create_subprocess_exec(pg_dump, settings.database_url, stdout=asyncio.subprocess.PIPE)
        dumped, _ = await dump.communicate()
        assert dump.returncode == 0
        assert b"wallet_keys" in dumped
        haystacks["pg_dump"] = dumped
        haystacks.update(await _postgres_files(settings.database_url, started))
        assert not IN_CI or any("pg_wal" in name for name in haystacks)
    leaks = {
        (where, what): hits
        for where, data in haystacks.items()
        for what, secret in (secrets_ | credentials).items()
        if (hits := find(secret, data))
    }
    assert leaks == {}
    assert all(len(secret) >= 16 for secret in (secrets_ | credentials).values())


def _plants(secret: bytes) -> dict[str, bytes]:
    """The secret written in every way the search must recognise, each inside other text."""
    std, url = base64.b64encode(secret), base64.urlsafe_b64encode(secret)
    blob = base64.b64encode(b"prefix:" + secret + b":suffix")  # the secret at another alignment
    wrapped = base64.encodebytes(b"x" * 40 + secret)  # MIME: lines of 76 characters
    return {
        "raw": b"\x00\x01" + secret + b"\xff",
        "bytes repr": f"key={secret!r}".encode(),
        "hex": b"key=" + secret.hex().encode(),
        "hex upper 0x": b'{"k": "0x' + secret.hex().upper().encode() + b'"}',
        "hex mixed case": "".join(c.upper() if i % 3 else c for i, c in enumerate(secret.hex())).encode(),
        "base64": b"k=" + std + b";",
        "base64 unpadded": b"k=" + std.rstrip(b"=") + b";",
        "base64url": b"k=" + url + b";",
        "base64url unpadded": b"k=" + url.rstrip(b"=") + b";",
        "base64 inside a blob": blob,
        "base64url inside a blob": base64.urlsafe_b64encode(b"ab" + secret),
        "base64 wrapped": wrapped,
        "base64 json-escaped": json.dumps({"k": base64.b64encode(b"?" + secret).decode()}).replace("/", "\\/").encode(),
        "decimal": b"n=" + str(int.from_bytes(secret, "big")).encode(),
    }


def test_the_search_finds_a_planted_key_in_every_encoding() -> None:
    secret = _canary_key()
    expected = {
        "raw": "raw",
        "bytes repr": "bytes repr",
        "hex": "hex",
        "hex upper 0x": "hex",
        "hex mixed case": "hex",
        "base64": "base64",
        "base64 unpadded": "base64",
        "base64url": "base64url",
        "base64url unpadded": "base64url",
        "base64 inside a blob": "base64",
        "base64url inside a blob": "base64url",
        "base64 wrapped": "base64",
        "base64 json-escaped": "base64",
        "decimal": "decimal",
    }
    for name, planted in _plants(secret).items():
        assert expected[name] in find(secret, planted), name
        assert expected[name] in find(secret, planted.decode("latin-1")), name
    # Nothing is found where the secret is not, even one bit away from it.
    other = bytes([secret[0] ^ 1]) + secret[1:]
    assert all(find(other, planted) == [] for planted in _plants(secret).values())
    assert find(secret, secrets.token_bytes(1 << 16)) == []
    # Each base64 form is long enough never to match by chance.
    assert min(len(f) for name, fs in forms(secret).items() for f in fs if name.startswith("base64")) >= 42


def test_the_redis_scan_finds_a_planted_key_in_keys_values_and_messages(redis_prefix: str) -> None:
    secret = _canary_key()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert scan_redis(REDIS_URL, redis_prefix) == {}  # a prefix nobody used holds nothing
        plants = _plants(secret)
        client.set(f"{redis_prefix}string", plants["raw"])
        client.hset(f"{redis_prefix}hash", mapping={"field": plants["hex upper 0x"]})
        client.rpush(f"{redis_prefix}list", b"x", plants["base64 inside a blob"])
        client.sadd(f"{redis_prefix}set", plants["base64url unpadded"])
        client.zadd(f"{redis_prefix}zset", {plants["decimal"]: 1.5})
        client.xadd(f"{redis_prefix}stream", {"payload": plants["base64 wrapped"]})
        client.set(f"{redis_prefix}name:{secret.hex()}", b"the key is in the name")
        client.set(f"{redis_prefix}clean", os.urandom(64))
        found = {
            name.removeprefix(redis_prefix): find(secret, value)
            for name, value in scan_redis(REDIS_URL, redis_prefix).items()
        }
        expected = {
            "string": "raw",
            "hash": "hex",
            "list": "base64",
            "set": "base64url",
            "zset": "decimal",
            "stream": "base64",
            f"name:{secret.hex()}": "hex",
        }
        assert set(found) == {*expected, "clean"}
        assert all(encoding in found[name] for name, encoding in expected.items()), found
        assert found["clean"] == []
        with RedisTap(REDIS_URL, redis_prefix) as tap:
            client.publish(f"{redis_prefix}wake:x", b"nothing here")
            client.publish(f"{redis_prefix}wake:y", plants["base64"])
            client.publish("elsewhere", plants["raw"])  # not ours: not recorded
            deadline = time.monotonic() + 5
            while len(tap.messages) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert len(tap.messages) == 2
        assert "base64" in find(secret, tap.seen())
        assert b"nothing here" in tap.seen()
    finally:
        client.close()
