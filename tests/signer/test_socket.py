"""The signer's socket: owner-only from the start, a narrow protocol, clear failure when down."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import stat
import struct
import time
from pathlib import Path

import pytest
from web3 import Web3

from custody.errors import SignerUnavailable, UnsupportedSigningMethod
from custody.settings import Settings
from custody.signer.client import SignerClient
from custody.signer.server import bind_socket
from tests.conftest import SignerThread


async def test_socket_is_owner_only(settings: Settings, signer: SignerThread) -> None:
    mode = settings.socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert mode & 0o777 == 0o600


async def test_client_creates_a_key_and_signs_through_the_socket(signer_client: SignerClient) -> None:
    address, public_key, envelope = await signer_client.create_key("wal_sock")
    assert Web3.is_checksum_address(address)
    assert public_key.startswith("0x04")
    result = await signer_client.sign_message(envelope, "hello")
    assert result["signature"].startswith("0x")
    assert (await signer_client.status())["sealed"] is False


async def test_signer_errors_arrive_as_the_same_typed_errors(signer_client: SignerClient) -> None:
    _, _, envelope = await signer_client.create_key("wal_err")
    with pytest.raises(UnsupportedSigningMethod):
        await signer_client.sign_transaction(envelope, {"type": 4, "chainId": 1, "authorizationList": []})


async def test_unreachable_signer_is_a_clear_unavailable_error(short_dir: Path) -> None:
    client = SignerClient(short_dir / "nobody.sock", timeout=0.5)
    with pytest.raises(SignerUnavailable, match="not reachable"):
        await client.status()


async def test_garbage_on_the_socket_gets_an_error_and_the_signer_keeps_serving(
    settings: Settings, signer_client: SignerClient
) -> None:
    reader, writer = await asyncio.open_unix_connection(str(settings.socket_path))
    writer.write(struct.pack(">I", 5) + b"notjs")
    await writer.drain()
    header = await reader.readexactly(4)
    body = await reader.readexactly(struct.unpack(">I", header)[0])
    assert b"invalid_request" in body
    writer.close()
    assert (await signer_client.status())["sealed"] is False


async def test_oversized_frame_is_refused(settings: Settings, signer_client: SignerClient) -> None:
    reader, writer = await asyncio.open_unix_connection(str(settings.socket_path))
    writer.write(struct.pack(">I", 1 << 30))
    await writer.drain()
    header = await reader.readexactly(4)
    body = await reader.readexactly(struct.unpack(">I", header)[0])
    assert b"too large" in body
    writer.close()
    assert (await signer_client.status())["sealed"] is False


def test_a_second_signer_refuses_a_socket_in_use(settings: Settings, signer: SignerThread) -> None:
    with pytest.raises(RuntimeError, match="already listening"):
        bind_socket(settings.socket_path, 0o600, None)


def test_a_stale_socket_file_is_replaced(short_dir: Path) -> None:
    path = short_dir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    sock = bind_socket(path, 0o600, None)
    try:
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        sock.close()


async def test_client_recovers_after_the_signer_restarts(settings: Settings, signer: SignerThread) -> None:
    client = SignerClient(settings.socket_path)
    try:
        assert (await client.status())["sealed"] is False  # leaves a pooled connection behind
        signer.stop()
        restarted = SignerThread(settings).start()
        try:
            assert (await client.status())["sealed"] is False
        finally:
            restarted.stop()
    finally:
        await client.close()


def test_a_connection_the_signer_closed_is_unavailable_not_a_crash(settings: Settings, signer: SignerThread) -> None:
    """Under uvloop (what the service runs on) writing to a closed transport raises RuntimeError."""
    import uvloop

    async def main() -> None:
        client = SignerClient(settings.socket_path)
        opened = client._open

        async def closed() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await opened()
            writer.close()  # as when the signer dies between connecting and writing
            return reader, writer

        client._open = closed  # type: ignore[method-assign]
        try:
            with pytest.raises(SignerUnavailable):
                await client.call("sign_message", text="hello")
        finally:
            await client.close()

    uvloop.run(main())


async def test_a_deeply_nested_frame_is_refused_and_the_signer_survives(
    settings: Settings, signer_client: SignerClient
) -> None:
    reader, writer = await asyncio.open_unix_connection(str(settings.socket_path))
    body = b"[" * 150_000 + b"]" * 150_000
    writer.write(struct.pack(">I", len(body)) + body)
    await writer.drain()
    header = await reader.readexactly(4)
    reply = await reader.readexactly(struct.unpack(">I", header)[0])
    assert b"nested too deeply" in reply
    writer.close()
    assert (await signer_client.status())["sealed"] is False


async def test_a_request_the_signer_does_not_answer_in_time_is_not_sent_again(short_dir: Path) -> None:
    """A timeout is not a stale connection: the signer may still be signing, so the client gives up once."""
    from custody.signer.protocol import encode_frame, read_frame

    requests: list[dict[str, object]] = []
    connections: list[asyncio.StreamWriter] = []

    async def answers_once_then_stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while (message := await read_frame(reader)) is not None:
            requests.append(message)
            if len(requests) == 1:
                writer.write(encode_frame({"ok": True, "result": {"sealed": False}}))
                await writer.drain()
            # later requests are never answered

    path = short_dir / "stall.sock"
    server = await asyncio.start_unix_server(answers_once_then_stalls, path=str(path))
    client = SignerClient(path, timeout=0.3)
    try:
        await client.status()  # leaves a pooled connection
        started = time.monotonic()
        with pytest.raises(SignerUnavailable, match="in time"):
            await client.status()
        assert time.monotonic() - started < 0.6  # one timeout, not two
        assert len(requests) == 2  # not re-sent on a fresh connection
    finally:
        await client.close()
        for writer in connections:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        server.close()
        await server.wait_closed()
