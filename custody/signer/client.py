"""The API side of the signer socket: a small connection pool and typed calls.

Errors come back as the same :class:`~custody.errors.CustodyError` subclasses the
signer raised (rebuilt from their stable code). A signer that cannot be reached or
does not answer in time is :class:`~custody.errors.SignerUnavailable`; nothing is
signed in that case.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from custody.errors import SignerUnavailable, error_from_code
from custody.keys.envelope import KeyEnvelope
from custody.signer.protocol import (
    ProtocolError,
    b64,
    encode_frame,
    envelope_from_wire,
    envelope_to_wire,
    read_frame,
)

_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# Operations that are safe to send twice: reads, deterministic signatures (RFC 6979), and
# key operations whose result is only stored by the caller. Rotation and unseal are not.
_RETRYABLE = frozenset(
    {
        "status",
        "public_key",
        "sign_transaction",
        "sign_typed_data",
        "sign_message",
        "rewrap",
        "create_key",
        "import_key",
    }
)


class SignerClient:
    def __init__(self, path: Path, *, timeout: float = 5.0, pool_size: int = 16) -> None:
        self.path = path
        self.timeout = timeout
        self.pool_size = pool_size
        self._idle: list[_Connection] = []

    async def _open(self) -> _Connection:
        try:
            async with asyncio.timeout(self.timeout):
                return await asyncio.open_unix_connection(str(self.path))
        except (OSError, TimeoutError):
            raise SignerUnavailable(
                "the signer is not reachable: start it with `custody serve` or `custody signer`"
            ) from None

    def _pooled(self) -> _Connection | None:
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return None

    async def _exchange(self, connection: _Connection, message: dict[str, Any]) -> dict[str, Any] | None:
        reader, writer = connection
        # asyncio.timeout, not wait_for: no task per call, and no cancellation swallowed on Python 3.11.
        async with asyncio.timeout(self.timeout):
            # The signer may have gone away since this connection was pooled (its transport
            # closes between loop iterations); uvloop would raise RuntimeError on the write.
            if writer.is_closing():
                raise ConnectionResetError("the signer closed this connection")
            writer.write(encode_frame(message))
            await writer.drain()  # a stalled signer stops reading: this waits too, so bound it
            return await read_frame(reader)

    async def call(self, op: str, **params: Any) -> dict[str, Any]:
        message = {"op": op, **params}
        reply: dict[str, Any] | None = None
        # A pooled connection may be stale (the signer restarted): then try once more on a
        # fresh one. A request that failed on a stale socket never reached the signer.
        pooled = self._pooled() if op in _RETRYABLE else None
        for connection in ([pooled] if pooled else []) + [None]:
            connection = connection or await self._open()
            try:
                reply = await self._exchange(connection, message)
            except TimeoutError:
                # Before OSError, of which it is a subclass: a signer that did not answer in time
                # may still be working on it, so the request is never sent again.
                connection[1].close()
                raise SignerUnavailable("the signer did not answer in time") from None
            except (OSError, ProtocolError, asyncio.IncompleteReadError):
                connection[1].close()
                if connection is pooled:
                    continue
                raise SignerUnavailable("the signer did not answer") from None
            except BaseException:
                connection[1].close()
                raise
            if reply is None:
                connection[1].close()
                if connection is pooled:
                    continue
                raise SignerUnavailable("the signer closed the connection")
            if len(self._idle) < self.pool_size:
                self._idle.append(connection)
            else:
                connection[1].close()
            break
        assert reply is not None
        if reply.get("ok") is True:
            result = reply.get("result")
            return result if isinstance(result, dict) else {}
        error = reply.get("error") or {}
        raise error_from_code(str(error.get("code", "internal_error")), str(error.get("detail") or "signer error"))

    async def close(self) -> None:
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # Typed operations -------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        return await self.call("status")

    async def create_key(self, wallet_id: str, key_version: int = 1) -> tuple[str, str, KeyEnvelope]:
        result = await self.call("create_key", wallet_id=wallet_id, key_version=key_version)
        return result["address"], result["public_key"], envelope_from_wire(result["envelope"])

    async def import_key(
        self, wallet_id: str, private_key: bytes, key_version: int = 1
    ) -> tuple[str, str, KeyEnvelope]:
        result = await self.call(
            "import_key", wallet_id=wallet_id, key_version=key_version, private_key=b64(private_key)
        )
        return result["address"], result["public_key"], envelope_from_wire(result["envelope"])

    async def public_key(self, envelope: KeyEnvelope) -> dict[str, Any]:
        return await self.call("public_key", envelope=envelope_to_wire(envelope))

    async def sign_transaction(self, envelope: KeyEnvelope, transaction: dict[str, Any]) -> dict[str, Any]:
        return await self.call("sign_transaction", envelope=envelope_to_wire(envelope), transaction=transaction)

    async def sign_typed_data(self, envelope: KeyEnvelope, typed_data: dict[str, Any]) -> dict[str, Any]:
        return await self.call("sign_typed_data", envelope=envelope_to_wire(envelope), typed_data=typed_data)

    async def sign_message(self, envelope: KeyEnvelope, text: str) -> dict[str, Any]:
        return await self.call("sign_message", envelope=envelope_to_wire(envelope), text=text)

    async def rewrap(self, envelope: KeyEnvelope) -> KeyEnvelope:
        result = await self.call("rewrap", envelope=envelope_to_wire(envelope))
        return envelope_from_wire(result["envelope"])

    async def rotate_kek(self) -> dict[str, Any]:
        return await self.call("rotate_kek")

    async def unseal(self, passphrase: str | None = None) -> dict[str, Any]:
        if passphrase is None:
            return await self.call("unseal")
        return await self.call("unseal", passphrase=passphrase)
