"""Wire format between the API process and the signer.

Frames are a 4-byte big-endian length followed by a UTF-8 JSON object. A request is
``{"op": NAME, ...params}``; a reply is ``{"ok": true, "result": {...}}`` or
``{"ok": false, "error": {"code": ..., "detail": ...}}``. Bytes travel as base64.

The operations are deliberately few: ``status``, ``create_key``, ``import_key``,
``public_key``, ``sign_transaction``, ``sign_typed_data``, ``sign_message``, and for
operators ``rewrap``, ``rotate_kek`` and ``unseal``. There is no operation that returns
a private key or the KEK.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from typing import Any

from custody.keys.envelope import KeyEnvelope

MAX_FRAME = 1 << 20
OPERATIONS = frozenset(
    {
        "status",
        "create_key",
        "import_key",
        "public_key",
        "sign_transaction",
        "sign_typed_data",
        "sign_message",
        "rewrap",
        "rotate_kek",
        "unseal",
    }
)
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    pass


def encode_frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError("frame too large")
    return _HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at a clean end of stream."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("truncated frame header") from None
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError("frame too large")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolError("truncated frame") from None
    try:
        message = json.loads(body)
    except ValueError:
        raise ProtocolError("frame is not JSON") from None
    except RecursionError:
        raise ProtocolError("frame is nested too deeply") from None
    if not isinstance(message, dict):
        raise ProtocolError("frame is not a JSON object")
    return message


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError("expected a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ProtocolError("invalid base64") from None


def envelope_to_wire(envelope: KeyEnvelope) -> dict[str, Any]:
    return {
        "wallet_id": envelope.wallet_id,
        "key_version": envelope.key_version,
        "kek_version": envelope.kek_version,
        "wrapped_dek": b64(envelope.wrapped_dek),
        "ciphertext": b64(envelope.ciphertext),
    }


def envelope_from_wire(data: object) -> KeyEnvelope:
    if not isinstance(data, dict):
        raise ProtocolError("envelope must be an object")
    try:
        wallet_id = data["wallet_id"]
        key_version = data["key_version"]
        kek_version = data["kek_version"]
    except KeyError as exc:
        raise ProtocolError(f"envelope lacks {exc.args[0]}") from None
    if not isinstance(wallet_id, str) or not isinstance(key_version, int) or not isinstance(kek_version, int):
        raise ProtocolError("envelope fields have the wrong types")
    return KeyEnvelope(
        wallet_id, key_version, kek_version, unb64(data.get("wrapped_dek")), unb64(data.get("ciphertext"))
    )
