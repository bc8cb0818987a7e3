"""The signer process: owns the KEK, opens key envelopes, signs.

:class:`SignerCore` is the logic (sealed state, key cache, operations) and can be
driven in-process by tests; :func:`serve` exposes it on a Unix socket created with
owner-only permissions from the first instant (umask), optionally handed to the API's
user with ``CUSTODY_SIGNER_SOCKET_OWNER``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from custody import failpoints
from custody.errors import CustodyError, InvalidRequest, SignerSealed
from custody.keys import envelope as env
from custody.keys.kek import (
    FileKekSource,
    KekSource,
    KekUnavailable,
    KeyEncryptionKey,
    PassphraseKekSource,
    SecretKekSource,
)
from custody.runtime import restore_recursion_limit
from custody.settings import Settings
from custody.signer import evm
from custody.signer.protocol import (
    MAX_FRAME,
    OPERATIONS,
    ProtocolError,
    encode_frame,
    envelope_from_wire,
    envelope_to_wire,
    read_frame,
    unb64,
)

log = logging.getLogger("custody.signer")
CACHE_SIZE = 10_000


def kek_source_from_settings(settings: Settings) -> KekSource:
    kind = settings.effective_kek_source
    if kind == "file":
        # Development creates the first key on first run; production expects it to exist.
        return FileKekSource(settings.kek_directory, create=not settings.is_production)
    if kind == "secret":
        secret = settings.kek_secret.get_secret_value() if settings.kek_secret else None
        return SecretKekSource(secret, settings.kek_secret_file)
    if kind == "passphrase":
        passphrase = settings.kek_passphrase.get_secret_value() if settings.kek_passphrase else None
        return PassphraseKekSource(
            passphrase, settings.kek_directory, path=settings.kek_passphrase_file, n=settings.kek_scrypt_n
        )
    raise KekUnavailable("no key-encryption key source is configured (CUSTODY_KEK_SOURCE)")


class _NoSource:
    name = "none"

    def open(self) -> KeyEncryptionKey:
        raise KekUnavailable("no key-encryption key source is configured (CUSTODY_KEK_SOURCE)")

    def add_version(self) -> KeyEncryptionKey:
        return self.open()


class SignerCore:
    """Everything the signer does, without the socket."""

    def __init__(self, source: KekSource) -> None:
        self.source = source
        self._kek: KeyEncryptionKey | None = None
        self.sealed_reason: str | None = None
        self._accounts: OrderedDict[tuple[str, int, bytes], evm.EvmKey] = OrderedDict()
        self._ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "status": self.status,
            "create_key": self.create_key,
            "import_key": self.import_key,
            "public_key": self.public_key,
            "sign_transaction": self.sign_transaction,
            "sign_typed_data": self.sign_typed_data,
            "sign_message": self.sign_message,
            "rewrap": self.rewrap,
            "rotate_kek": self.rotate_kek,
            "unseal": self.unseal,
        }
        assert set(self._ops) == OPERATIONS
        self.try_unseal()

    @classmethod
    def from_settings(cls, settings: Settings) -> SignerCore:
        try:
            source = kek_source_from_settings(settings)
        except KekUnavailable:
            return cls(_NoSource())
        return cls(source)

    # State ----------------------------------------------------------------------
    def try_unseal(self) -> None:
        try:
            self._kek = self.source.open()
            self.sealed_reason = None
        except KekUnavailable as exc:
            self._kek = None
            self.sealed_reason = str(exc)
        except OSError as exc:
            self._kek = None
            self.sealed_reason = f"key-encryption key unreadable: {exc.strerror}"

    @property
    def sealed(self) -> bool:
        return self._kek is None

    def _require_kek(self) -> KeyEncryptionKey:
        if self._kek is None:
            raise SignerSealed(f"the signer is sealed: {self.sealed_reason}")
        return self._kek

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        handler = self._ops.get(op) if isinstance(op, str) else None
        if handler is None:
            raise InvalidRequest("unknown signer operation")
        return handler(request)

    # Operations -----------------------------------------------------------------
    def status(self, _: dict[str, Any]) -> dict[str, Any]:
        return {
            "sealed": self.sealed,
            "reason": self.sealed_reason,
            "kek_source": self.source.name,
            "kek_version": self._kek.current_version if self._kek else None,
            "kek_versions": list(self._kek.versions) if self._kek else [],
            "pid": os.getpid(),
        }

    def _describe(self, sealed: env.KeyEnvelope, key: evm.EvmKey) -> dict[str, Any]:
        return {
            "address": key.address,
            "public_key": "0x04" + key.public_key.hex(),
            "envelope": envelope_to_wire(sealed),
        }

    def _seal_new(self, request: dict[str, Any], private_key: bytes) -> dict[str, Any]:
        kek = self._require_kek()
        wallet_id = request.get("wallet_id")
        key_version = request.get("key_version", 1)
        if not isinstance(wallet_id, str) or not wallet_id or not isinstance(key_version, int):
            raise InvalidRequest("wallet_id and key_version are required")
        sealed = env.seal(kek, wallet_id, key_version, private_key)
        return self._describe(sealed, evm.EvmKey(private_key))

    def create_key(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._seal_new(request, env.generate_private_key())

    def import_key(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            private_key = unb64(request.get("private_key"))
        except ProtocolError:
            raise InvalidRequest("the imported key is not valid base64") from None
        if not env.is_valid_private_key(private_key):
            raise InvalidRequest("the imported key is not a valid secp256k1 private key")
        return self._seal_new(request, private_key)

    def _account(self, request: dict[str, Any]) -> evm.EvmKey:
        kek = self._require_kek()
        try:
            sealed = envelope_from_wire(request.get("envelope"))
        except ProtocolError as exc:
            raise InvalidRequest(str(exc)) from None
        # The cache key includes a digest of the stored bytes: a changed envelope is
        # opened (and fails) again instead of being served from memory.
        digest = hashlib.sha256(
            sealed.wrapped_dek + b"|" + sealed.ciphertext + b"|" + str(sealed.kek_version).encode()
        ).digest()
        cache_key = (sealed.wallet_id, sealed.key_version, digest)
        account = self._accounts.get(cache_key)
        if account is None:
            account = evm.EvmKey(env.open_envelope(kek, sealed))
            self._accounts[cache_key] = account
            if len(self._accounts) > CACHE_SIZE:
                self._accounts.popitem(last=False)
        else:
            self._accounts.move_to_end(cache_key)
        return account

    def public_key(self, request: dict[str, Any]) -> dict[str, Any]:
        account = self._account(request)
        return {"address": account.address, "public_key": "0x04" + account.public_key.hex()}

    def sign_transaction(self, request: dict[str, Any]) -> dict[str, Any]:
        account = self._account(request)
        signed = evm.sign_transaction(account, request.get("transaction") or {})
        failpoints.hit("signer.after_sign")
        return signed

    def sign_typed_data(self, request: dict[str, Any]) -> dict[str, Any]:
        account = self._account(request)
        return evm.sign_typed_data(account, request.get("typed_data") or {})

    def sign_message(self, request: dict[str, Any]) -> dict[str, Any]:
        account = self._account(request)
        return evm.sign_text_message(account, request.get("text"))

    def rewrap(self, request: dict[str, Any]) -> dict[str, Any]:
        kek = self._require_kek()
        try:
            sealed = envelope_from_wire(request.get("envelope"))
        except ProtocolError as exc:
            raise InvalidRequest(str(exc)) from None
        return {"envelope": envelope_to_wire(env.rewrap(kek, sealed))}

    def rotate_kek(self, _: dict[str, Any]) -> dict[str, Any]:
        kek = self._require_kek()
        before = kek.current_version
        try:
            self._kek = self.source.add_version()
        except KekUnavailable as exc:
            raise InvalidRequest(f"cannot add a key-encryption key version: {exc}") from None
        return {"previous_version": before, "kek_version": self._kek.current_version}

    def unseal(self, request: dict[str, Any]) -> dict[str, Any]:
        """Unseal a sealed signer; an unsealed one refuses, so its KEK cannot be swapped."""
        if not self.sealed:
            raise InvalidRequest("the signer is already unsealed")
        passphrase = request.get("passphrase")
        if passphrase is None:
            self.try_unseal()
            return self.status({})
        if not isinstance(self.source, PassphraseKekSource) or not isinstance(passphrase, str):
            raise InvalidRequest("a passphrase unseals only a signer with CUSTODY_KEK_SOURCE=passphrase")
        candidate = self.source.with_passphrase(passphrase)
        try:
            self._kek = candidate.open()
        except KekUnavailable as exc:
            raise InvalidRequest(f"unseal failed: {exc}") from None
        self.source = candidate
        self.sealed_reason = None
        return self.status({})


async def _serve_connection(core: SignerCore, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                request = await read_frame(reader)
            except ProtocolError as exc:
                writer.write(encode_frame({"ok": False, "error": {"code": "invalid_request", "detail": str(exc)}}))
                break
            if request is None:
                break
            try:
                reply: dict[str, Any] = {"ok": True, "result": core.handle(request)}
            except CustodyError as exc:
                reply = {"ok": False, "error": {"code": exc.code, "detail": exc.detail}}
            except Exception as exc:  # never let a bug kill the signer or leak a trace
                log.error("signer operation failed: %s", type(exc).__name__)
                reply = {"ok": False, "error": {"code": "internal_error", "detail": "signer internal error"}}
            if request.get("op") != "status":
                log.log(
                    logging.DEBUG if reply["ok"] else logging.INFO,
                    "op=%s wallet=%s ok=%s",
                    request.get("op"),
                    (request.get("envelope") or {}).get("wallet_id")
                    if isinstance(request.get("envelope"), dict)
                    else request.get("wallet_id"),
                    reply["ok"],
                )
            writer.write(encode_frame(reply))
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _socket_in_use(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def bind_socket(path: Path, mode: int, owner: str | None) -> socket.socket:
    """A listening Unix socket that is never, even briefly, open to other users."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() or path.is_symlink():
        if _socket_in_use(path):
            raise RuntimeError(f"another signer is already listening on {path}")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    if owner:
        uid_text, _, gid_text = owner.partition(":")
        os.chown(path, int(uid_text), int(gid_text) if gid_text else -1)
    os.chmod(path, mode)
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    ready: Callable[[SignerCore], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or until ``stop`` is set, when given)."""
    restore_recursion_limit()
    core = SignerCore.from_settings(settings)
    if core.sealed:
        log.warning("signer started SEALED: %s", core.sealed_reason)
    path = settings.socket_path
    sock = bind_socket(path, settings.signer_socket_mode, settings.signer_socket_owner)
    loop = asyncio.get_running_loop()
    connections: set[asyncio.Task[None]] = set()
    transports: set[asyncio.Transport] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        try:
            await _serve_connection(core, reader, writer)
        finally:
            connections.discard(task)

    class _Tracked(asyncio.StreamReaderProtocol):
        # Remember every transport, so shutdown closes connections whose handler has not started.
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            if isinstance(transport, asyncio.Transport):
                transports.add(transport)
            super().connection_made(transport)

    def protocol() -> asyncio.StreamReaderProtocol:
        return _Tracked(asyncio.StreamReader(limit=MAX_FRAME + 8), on_connect)

    server = await loop.create_unix_server(protocol, sock=sock)
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    log.info("signer listening on %s (sealed=%s)", path, core.sealed)
    if ready is not None:
        ready(core)
    try:
        await stop.wait()
    finally:
        # Stop accepting first and let connections accepted a moment ago finish being set
        # up: closing the server under them leaves their sockets open (asyncio asserts).
        with contextlib.suppress(NotImplementedError, ValueError):
            loop.remove_reader(sock.fileno())
        await asyncio.sleep(0.02)
        server.close()
        for task in list(connections):
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        for transport in transports:
            transport.abort()
        await server.wait_closed()
        await asyncio.sleep(0)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
