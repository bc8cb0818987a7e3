"""Every command the containers run, run here the way docker/compose.yaml runs them.

The commands, users, environments, volumes and secrets are read from docker/compose.yaml and
docker/Dockerfile, not repeated here: ``custody …`` runs as ``python -m custody …`` from this
checkout, ``python`` as this interpreter. What only exists inside compose is replaced by a
local stand-in: the ``postgres`` host by a private database on the test server, the ``redis``
host by the shared Redis with a private key prefix, each named volume and each image
directory by a temporary directory with the owner and mode the image gives it, the KEK
secret by a file made as docs/deploy.md says. As root, each process runs as the compose
service's uid:gid, and a volume mounted ``:ro`` is mounted read-only in a private mount
namespace. (The processes keep CAP_DAC_READ_SEARCH, only because this interpreter lives under
a directory those uids cannot enter; it bypasses no write check, so the socket's mode and
group still decide who may connect.)

Then the documented operations run against it: the first admin token, a signature, a KEK
rotation and a backup restored into a new database.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
import redis
from eth_account import Account
from eth_account.messages import encode_defunct

from custody.errors import SignerUnavailable
from custody.signer.client import SignerClient
from tests.conftest import IN_CI, PG_ADMIN_DSN, _pg, _pg_unavailable
from tests.deploy.files import (
    Stage,
    custody_services,
    image_dirs,
    image_environment,
    load_compose,
    runtime_stage,
    service_argv,
    service_healthcheck,
    service_secrets,
    service_user,
    service_volumes,
)

# As root (CI), each process runs as its service's user; elsewhere all run as the current user.
AS_SERVICE_USERS = os.geteuid() == 0 and bool(shutil.which("setpriv")) and bool(shutil.which("unshare"))
REDIS_SERVER = "127.0.0.1:6379"
# Mount each directory given before "--" read-only onto itself, then run what follows.
_READ_ONLY = (
    'while [ "$1" != -- ]; do mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" || exit 97; shift; done; '
    'shift; exec "$@"'
)
MESSAGE_POLICY = {
    "schema_version": 1,
    "id": "sign-in",
    "rules": [{"id": "sign-in", "type": "allow_dangerous", "operations": ["message_signing"]}],
}


def _need_root(what: str) -> None:
    if AS_SERVICE_USERS:
        return
    reason = f"{what} needs root with setpriv and unshare"
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _new_database() -> str:
    name = "custody_test_" + secrets.token_hex(6)
    try:
        asyncio.run(_pg(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        _pg_unavailable(str(exc))
    return name


def _drop_database(name: str) -> None:
    asyncio.run(_pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _database_url(name: str) -> str:
    return PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + name


class Stack:
    """The compose services as local processes."""

    def __init__(self, base: Path, database_url: str) -> None:
        self.base = base
        self.database_url = database_url
        self.redis_prefix = f"custody-deploy-test-{secrets.token_hex(4)}:"
        self.compose = load_compose({"CUSTODY_DB_PASSWORD": "p" * 32, "CUSTODY_REDIS_PASSWORD": "r" * 32})
        self.stage: Stage = runtime_stage()
        self.services = custody_services(self.compose)
        self.image_dirs = image_dirs(self.stage)
        self.port = _free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.ran: dict[str, list[list[str]]] = {}
        self._volumes: dict[str, Path] = {}
        self._secrets: dict[str, Path] = {}
        self.admin_token = ""

    # Stand-ins for what compose provides --------------------------------------------
    def _directory(self, path: Path, container_path: str) -> Path:
        spec = self.image_dirs.get(container_path)
        assert spec is not None, f"{container_path} is not created by the image: a volume there would be root's"
        path.mkdir(mode=0o700)
        if AS_SERVICE_USERS:
            os.chown(path, spec.uid, spec.gid)
        os.chmod(path, spec.mode)
        return path

    def volume(self, name: str, container_path: str) -> Path:
        # A new named volume takes the owner and mode of the image directory it is first mounted on.
        if name not in self._volumes:
            self._volumes[name] = self._directory(self.base / f"volume-{name}", container_path)
        return self._volumes[name]

    def secret(self, name: str, owner: tuple[int, int]) -> Path:
        if name not in self._secrets:
            # docs/deploy.md: one `v1:BASE64` line, owned by the signer's uid, mode 0400.
            path = self.base / f"secret-{name}"
            path.write_text(f"v1:{base64.b64encode(os.urandom(32)).decode()}\n")
            if AS_SERVICE_USERS:
                os.chown(path, *owner)
            os.chmod(path, 0o400)
            self._secrets[name] = path
        return self._secrets[name]

    def _paths(self, service: str) -> dict[str, Path]:
        """Container path -> host stand-in, for one service."""
        svc = self.services[service]
        paths: dict[str, Path] = {}
        for mount in service_volumes(svc):
            paths[mount.target] = self.volume(mount.source, mount.target)
        for name, target in service_secrets(svc).items():
            paths[target] = self.secret(name, service_user(svc))
        for container_path in self.image_dirs:
            if container_path not in paths:
                private = self.base / f"image-{service}{container_path.replace('/', '-')}"
                paths[container_path] = private if private.exists() else self._directory(private, container_path)
        return paths

    def env(self, service: str) -> dict[str, str]:
        svc = self.services[service]
        declared = {k: v for k, v in image_environment(self.stage).items() if k != "PATH"}
        declared |= {k: str(v) for k, v in svc["environment"].items()}
        paths = self._paths(service)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODY_")}
        env |= {"HOME": "/nonexistent", "CUSTODY_REDIS_PREFIX": self.redis_prefix}
        for key, value in declared.items():
            if key == "CUSTODY_DATABASE_URL":
                assert urlsplit(value).hostname == "postgres", value
                value = self.database_url
            elif key == "CUSTODY_REDIS_URL":
                parts = urlsplit(value)
                assert parts.hostname == "redis", key
                value = f"redis://{REDIS_SERVER}{parts.path or '/0'}"
            elif key == "CUSTODY_HOST":
                value = "127.0.0.1"
            elif key == "CUSTODY_PORT":
                value = str(self.port)
            elif value.startswith("/"):
                prefix = max((p for p in paths if value == p or value.startswith(p + "/")), key=len, default=None)
                assert prefix is not None, f"{service}: {key}={value} is in no volume, secret or image directory"
                value = str(paths[prefix]) + value[len(prefix) :]
            env[key] = value
        return env

    def argv(self, service: str, command: list[str]) -> list[str]:
        """The container's command as a local process, as the service's user."""
        if command[0] == "custody":
            local = [sys.executable, "-m", "custody", *command[1:]]
        elif command[0] == "python":
            local = [sys.executable, *command[1:]]
        else:
            raise AssertionError(f"{service} runs {command[0]!r}, which this test does not know")
        if not AS_SERVICE_USERS:
            return local
        uid, gid = service_user(self.services[service])
        paths = self._paths(service)
        read_only = [str(paths[m.target]) for m in service_volumes(self.services[service]) if m.read_only]
        local = self.as_user(uid, gid, local)
        if read_only:
            mount = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _READ_ONLY, "sh"]
            local = [*mount, *read_only, "--", *local]
        return local

    @staticmethod
    def as_user(uid: int, gid: int, command: list[str]) -> list[str]:
        return [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            "--clear-groups",
            "--inh-caps=+dac_read_search",
            "--ambient-caps=+dac_read_search",
            "--",
            *command,
        ]

    # Running ----------------------------------------------------------------------------
    def spawn(self, service: str, command: list[str], **env: str) -> subprocess.Popen[str]:
        """Start one command in the service's context (as `docker compose run/exec` would)."""
        self.ran.setdefault(service, []).append(command)
        return subprocess.Popen(
            self.argv(service, command),
            env=self.env(service) | env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @staticmethod
    def finish(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def run(self, service: str, command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
        return self.finish(self.spawn(service, command, **env))

    def start(self, service: str) -> None:
        command = service_argv(self.services[service], self.stage)
        self.ran.setdefault(service, []).append(command)
        log = (self.base / f"{service}.log").open("ab")
        with log:
            self.processes[service] = subprocess.Popen(
                self.argv(service, command), env=self.env(service), stdout=log, stderr=log
            )

    def stop(self, service: str) -> None:
        process = self.processes.pop(service, None)
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    def log(self, service: str) -> str:
        path = self.base / f"{service}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def healthcheck(self, service: str) -> subprocess.Popen[str]:
        command = service_healthcheck(self.services[service], self.stage)
        assert command is not None, f"{service} has no health check"
        return self.spawn(service, command)

    def _alive(self, service: str) -> None:
        process = self.processes[service]
        assert process.poll() is None, f"{service} exited with {process.returncode}:\n{self.log(service)}"

    def wait_healthy(self, service: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        """Until the service's own health check passes (the signer's only once its socket exists)."""
        deadline = time.monotonic() + timeout
        socket_path = Path(self.env("signer")["CUSTODY_SIGNER_SOCKET"])
        while True:
            self._alive(service)
            if service != "signer" or socket_path.exists():
                result = self.finish(self.healthcheck(service))
                if result.returncode == 0:
                    return result
            assert time.monotonic() < deadline, f"{service} not healthy in {timeout} s:\n{self.log(service)}"
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    database = _new_database()
    base = Path(tempfile.mkdtemp(prefix="cst-dep-"))
    os.chmod(base, 0o755)  # noqa: S103 - the services' users must reach their own directories inside
    stack = Stack(base, _database_url(database))
    try:
        # As compose: the migrations and the signer start together; the API waits for both.
        stack.start("signer")
        migrated = stack.finish(stack.spawn("migrate", service_argv(stack.services["migrate"], stack.stage)))
        assert migrated.returncode == 0, migrated.stderr
        # docs/deploy.md, first start: `docker compose run --rm api init` prints the first admin token.
        init_process = stack.spawn("api", ["custody", "init"])
        stack.wait_healthy("signer")
        init = stack.finish(init_process)
        assert init.returncode == 0, re.sub(r"cop\.\S+", "cop.<redacted>", init.stdout + init.stderr)
        token = re.search(r"CUSTODY_ADMIN_TOKEN=(\S+)", init.stderr)
        assert token is not None, "custody init printed no admin token"
        stack.admin_token = token.group(1)
        stack.start("api")
        stack.wait_healthy("api")
        yield stack
    finally:
        for service in list(stack.processes):
            stack.stop(service)
        _drop_database(database)
        client = redis.Redis.from_url(f"redis://{REDIS_SERVER}/0")
        try:
            for key in client.scan_iter(f"{stack.redis_prefix}*"):
                client.delete(key)
        finally:
            client.close()
        shutil.rmtree(base, ignore_errors=True)


def _admin(stack: Stack) -> httpx.Client:
    headers = {"Authorization": f"Bearer {stack.admin_token}"}
    return httpx.Client(base_url=stack.url, headers=headers, timeout=30)


def _signing_agent(stack: Stack, name: str) -> tuple[dict[str, Any], str]:
    """A wallet whose policy allows message signing, and an agent key for it."""
    with _admin(stack) as admin:
        created = admin.post("/admin/v1/wallets", json={"name": name})
        assert created.status_code == 201, created.text
        wallet = created.json()
        agent = admin.post("/admin/v1/agents", json={"name": f"{name}-agent"})
        assert agent.status_code == 201, agent.text
        issued = admin.post(f"/admin/v1/agents/{agent.json()['id']}/keys", json={"wallet_ids": [wallet["id"]]})
        assert issued.status_code == 201, issued.text
        policy = admin.put(f"/admin/v1/wallets/{wallet['id']}/policy", json={"document": MESSAGE_POLICY})
        assert policy.status_code == 200, policy.text
    return wallet, issued.json()["api_key"]


def _sign_and_check(stack: Stack, wallet: dict[str, Any], agent_key: str, text: str) -> None:
    response = httpx.post(
        f"{stack.url}/v1/wallets/{wallet['id']}/sign/message",
        json={"message": text},
        headers={"Authorization": f"Bearer {agent_key}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    signature = response.json()["result"]["signature"]
    assert Account.recover_message(encode_defunct(text=text), signature=signature) == wallet["address"]


def _signer_status(stack: Stack, timeout: float = 90) -> dict[str, Any]:
    """The signer's status over its socket, from this process, once it answers."""
    path = Path(stack.env("signer")["CUSTODY_SIGNER_SOCKET"])
    deadline = time.monotonic() + timeout

    async def status() -> dict[str, Any]:
        client = SignerClient(path)
        try:
            return await client.status()
        finally:
            await client.close()

    while True:
        stack._alive("signer")
        try:
            return asyncio.run(status())
        except SignerUnavailable:
            assert time.monotonic() < deadline, f"the signer did not answer in {timeout} s:\n{stack.log('signer')}"
            time.sleep(0.1)


@contextlib.contextmanager
def _writable(path: Path) -> Iterator[None]:
    """What `sudo` does for the operator: the secret file is read-only (0400) to its owner too."""
    os.chmod(path, 0o600)
    try:
        yield
    finally:
        os.chmod(path, 0o400)


def _status(process_id: int) -> dict[str, str]:
    lines = Path(f"/proc/{process_id}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_every_command_the_containers_run_succeeds_here(stack: Stack) -> None:
    """migrate, then the signer, then the API, each with its health check, as compose orders them."""
    expected: dict[str, list[list[str]]] = {}
    for name, service in stack.services.items():
        expected[name] = [service_argv(service, stack.stage)]
        check = service_healthcheck(service, stack.stage)
        if check is not None:
            expected[name].append(check)
    for name, commands in expected.items():
        for command in commands:
            assert command in stack.ran.get(name, []), f"{name}: {command} was not run"
    ready = httpx.get(stack.url + "/readyz", timeout=10)
    assert ready.status_code == 200
    body = ready.json()
    assert body.pop("status") == "ready"
    assert set(body.values()) == {"ok"}, body
    assert {"database", "signer"} <= set(body)
    assert "CUSTODY_ADMIN_TOKEN" not in stack.log("api"), "after `init`, serve prints no credential"


def test_the_signer_and_the_api_run_as_their_compose_users_and_share_only_the_socket(stack: Stack) -> None:
    _need_root("running the services as their users")
    for name in ("signer", "api"):
        uid, gid = service_user(stack.services[name])
        status = _status(stack.processes[name].pid)
        assert status["Uid"].split()[0] == str(uid), name
        assert status["Gid"].split()[0] == str(gid), name
    socket_path = Path(stack.env("signer")["CUSTODY_SIGNER_SOCKET"])
    info = socket_path.stat()
    assert (info.st_uid, info.st_gid) == service_user(stack.services["signer"])
    assert info.st_mode & 0o777 == 0o660


def test_a_user_outside_the_shared_group_cannot_open_the_signer_socket(stack: Stack) -> None:
    _need_root("running a process as another user")
    socket_path = stack.env("signer")["CUSTODY_SIGNER_SOCKET"]
    connect = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1]); print('connected')"

    def connect_as(uid: int, gid: int) -> subprocess.CompletedProcess[str]:
        command = Stack.as_user(uid, gid, [sys.executable, "-c", connect, socket_path])
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    outsider = connect_as(10003, 10003)
    assert outsider.returncode == 1
    assert "PermissionError" in outsider.stderr
    insider = connect_as(*service_user(stack.services["api"]))
    assert insider.stdout.strip() == "connected", insider.stderr


def test_the_first_admin_creates_a_wallet_and_an_agent_gets_a_message_signed(stack: Stack) -> None:
    wallet, agent_key = _signing_agent(stack, "deploy-first")
    assert wallet["address"].startswith("0x")
    _sign_and_check(stack, wallet, agent_key, "hello from the compose layout")


def test_kek_rotation_as_documented_keeps_every_wallet_signing(stack: Stack) -> None:
    wallet, agent_key = _signing_agent(stack, "deploy-rotation")
    secret = stack.secret("custody_kek", service_user(stack.services["signer"]))
    first_line = secret.read_text()
    assert first_line.startswith("v1:")
    # 1. Append the new version: the file stays the same file, so the running signer sees it.
    inode = secret.stat().st_ino
    with _writable(secret), secret.open("a") as out:
        out.write(f"v2:{base64.b64encode(os.urandom(32)).decode()}\n")
    assert secret.stat().st_ino == inode
    # 2. Rotate from the API's container.
    rotated = stack.run("api", ["custody", "keys", "rotate-kek", "--json"])
    assert rotated.returncode == 0, rotated.stderr
    result = json.loads(rotated.stdout)
    with _admin(stack) as admin:
        wallets = admin.get("/admin/v1/wallets").json()["wallets"]
    assert result == {"previous_kek_version": 1, "kek_version": 2, "rewrapped": len(wallets), "skipped": 0}
    _sign_and_check(stack, wallet, agent_key, "after the rotation")
    # 3. Drop v1 from the secret and recreate the signer: every key now opens with v2 alone.
    with _writable(secret):
        secret.write_text(secret.read_text().replace(first_line, ""))
    stack.stop("signer")
    stack.start("signer")
    assert _signer_status(stack)["kek_versions"] == [2]
    _sign_and_check(stack, wallet, agent_key, "with v1 gone")


def test_a_database_dump_restored_into_a_new_database_passes_the_audit_check(stack: Stack) -> None:
    tools = [shutil.which("pg_dump"), shutil.which("pg_restore")]
    if None in tools:
        reason = "pg_dump and pg_restore are not installed"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    _signing_agent(stack, "deploy-backup")
    with _admin(stack) as admin:
        verified = admin.get("/admin/v1/audit/verify")
    assert verified.status_code == 200, verified.text
    head = verified.json()
    assert head["ok"] is True
    dump = stack.base / "custody.dump"
    subprocess.run(["pg_dump", "-Fc", "-f", str(dump), stack.database_url], check=True, timeout=60)
    restored = _new_database()
    try:
        subprocess.run(
            ["pg_restore", "--clean", "--if-exists", "--no-owner", "-d", _database_url(restored), str(dump)],
            check=True,
            timeout=60,
        )
        anchor = f"{head['head_seq']}:{head['head_hash']}"
        check = stack.run(
            "api",
            ["custody", "audit", "verify", "--expect", anchor, "--json"],
            CUSTODY_DATABASE_URL=_database_url(restored),
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert json.loads(check.stdout)["count"] == head["count"]
    finally:
        _drop_database(restored)
