"""Keys at rest on both backends: tampering in the database, and KEK rotation while signing."""

from __future__ import annotations

import asyncio

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from pydantic import SecretStr
from sqlalchemy import select, update

from custody.errors import KeyDecryptionError
from custody.services import wallets as wallet_service
from custody.services.context import Context
from custody.settings import Settings
from custody.signer.client import SignerClient
from custody.storage.sql import wallet_keys
from tests.conftest import SignerThread


async def _flip_byte(ctx: Context, wallet_id: str, column: str, index: int) -> None:
    async with ctx.engine.begin() as conn:
        value = (
            await conn.execute(select(wallet_keys.c[column]).where(wallet_keys.c.wallet_id == wallet_id))
        ).scalar_one()
        tampered = bytearray(value)
        tampered[index] ^= 0x80
        await conn.execute(
            update(wallet_keys).where(wallet_keys.c.wallet_id == wallet_id).values({column: bytes(tampered)})
        )


@pytest.mark.parametrize(("column", "index"), [("wrapped_dek", 0), ("wrapped_dek", -1), ("ciphertext", 20)])
async def test_a_tampered_key_row_signs_nothing_and_fails_uniformly(ctx: Context, column: str, index: int) -> None:
    wallet = await wallet_service.create_wallet(ctx, "victim")
    envelope = await ctx.wallets.envelope(wallet.id)
    assert envelope is not None
    await ctx.signer.sign_message(envelope, "before tampering")  # the key is now cached in the signer
    await _flip_byte(ctx, wallet.id, column, index)
    tampered = await ctx.wallets.envelope(wallet.id)
    assert tampered is not None
    with pytest.raises(KeyDecryptionError) as caught:
        await ctx.signer.sign_message(tampered, "after tampering")
    assert str(caught.value) == "Stored key material could not be decrypted"


async def test_a_key_row_copied_to_another_wallet_does_not_decrypt(ctx: Context) -> None:
    a = await wallet_service.create_wallet(ctx, "a")
    b = await wallet_service.create_wallet(ctx, "b")
    async with ctx.engine.begin() as conn:
        row = (await conn.execute(select(wallet_keys).where(wallet_keys.c.wallet_id == a.id))).one()
        await conn.execute(
            update(wallet_keys)
            .where(wallet_keys.c.wallet_id == b.id)
            .values(wrapped_dek=row.wrapped_dek, ciphertext=row.ciphertext, kek_version=row.kek_version)
        )
    envelope = await ctx.wallets.envelope(b.id)
    assert envelope is not None
    with pytest.raises(KeyDecryptionError):
        await ctx.signer.sign_message(envelope, "with a stolen row")


async def test_kek_rotation_rewraps_every_key_while_signing_keeps_working(
    ctx: Context, settings: Settings, signer: SignerThread
) -> None:
    wallets = [await wallet_service.create_wallet(ctx, f"w{n}") for n in range(12)]
    stop = asyncio.Event()
    signatures: list[tuple[str, str, str]] = []
    failures: list[BaseException] = []

    async def keep_signing(index: int) -> None:
        client = SignerClient(settings.socket_path)
        try:
            while not stop.is_set():
                wallet = wallets[index % len(wallets)]
                envelope = await ctx.wallets.envelope(wallet.id)
                assert envelope is not None
                text = f"payment {len(signatures)}"
                try:
                    result = await client.sign_message(envelope, text)
                except Exception as exc:
                    failures.append(exc)
                    continue
                signatures.append((wallet.address, text, result["signature"]))
                index += 1
        finally:
            await client.close()

    signers = [asyncio.create_task(keep_signing(n)) for n in range(4)]
    await asyncio.sleep(0.05)
    result = await wallet_service.rotate_kek(ctx)
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*signers)

    assert failures == []
    assert result.kek_version == 2
    assert result.rewrapped + result.skipped == len(wallets)
    assert await ctx.wallets.count_envelopes(below_kek_version=2) == 0
    assert len(signatures) > len(wallets)
    for address, text, signature in signatures:
        assert Account.recover_message(encode_defunct(text=text), signature=signature) == address

    # The old KEK version can now be retired: a signer holding only v2 still signs.
    signer.stop()
    (settings.kek_directory / "v1.key").unlink()
    fresh = SignerThread(settings).start()
    try:
        envelope = await ctx.wallets.envelope(wallets[0].id)
        assert envelope is not None
        await ctx.signer.close()
        signed = await ctx.signer.sign_message(envelope, "after retirement")
        assert Account.recover_message(encode_defunct(text="after retirement"), signature=signed["signature"]) == (
            wallets[0].address
        )
    finally:
        fresh.stop()


async def test_each_rotation_adds_a_kek_version_and_rewraps_to_it(ctx: Context) -> None:
    await wallet_service.create_wallet(ctx, "only")
    first = await wallet_service.rotate_kek(ctx)
    second = await wallet_service.rotate_kek(ctx)
    assert (first.rewrapped, second.rewrapped) == (1, 1)
    assert second.kek_version == first.kek_version + 1


async def test_rotation_without_a_newer_secret_version_is_refused_and_changes_nothing(
    settings: Settings, signer: SignerThread
) -> None:
    import base64

    from custody.errors import KekVersionUnchanged

    signer.stop()
    secret_settings = settings.model_copy(
        update={"kek_source": "secret", "kek_secret": SecretStr(base64.b64encode(b"\x05" * 32).decode())}
    )
    running = SignerThread(secret_settings).start()
    ctx = await Context.open(secret_settings)
    try:
        wallet = await wallet_service.create_wallet(ctx, "kept")
        before = await ctx.wallets.envelope(wallet.id)
        with pytest.raises(KekVersionUnchanged, match="add version v2"):
            await wallet_service.rotate_kek(ctx)
        assert await ctx.wallets.envelope(wallet.id) == before
    finally:
        await ctx.close()
        running.stop()
