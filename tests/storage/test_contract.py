"""The storage contract, run against SQLite and PostgreSQL alike."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from custody.errors import Conflict
from custody.keys.envelope import KeyEnvelope
from custody.services.context import Context
from custody.settings import Settings
from custody.storage.db import migrate
from custody.storage.interfaces import Wallet


def _wallet(n: int) -> tuple[Wallet, KeyEnvelope]:
    wallet_id = f"wal_{n:020d}"
    wallet = Wallet(wallet_id, f"w{n}", "0x" + f"{n:040x}", "0x04" + "ab" * 64, 1, datetime.now(UTC))
    return wallet, KeyEnvelope(wallet_id, 1, 1, bytes([n % 256]) * 60, b"\x00\xff" * 30)


@pytest.fixture
async def store_ctx(settings: Settings) -> Context:
    ctx = await Context.open(settings)
    yield ctx  # type: ignore[misc]
    await ctx.close()


async def test_migrations_apply_and_are_idempotent(store_ctx: Context) -> None:
    await migrate(store_ctx.engine)
    assert await store_ctx.wallets.list() == []


async def test_wallet_and_envelope_round_trip_byte_for_byte(store_ctx: Context) -> None:
    wallet, envelope = _wallet(1)
    await store_ctx.wallets.add(wallet, envelope)
    assert await store_ctx.wallets.get(wallet.id) == wallet
    assert await store_ctx.wallets.get_by_name("w1") == wallet
    assert await store_ctx.wallets.envelope(wallet.id) == envelope
    assert await store_ctx.wallets.get("wal_missing") is None
    assert await store_ctx.wallets.envelope("wal_missing") is None


async def test_duplicate_name_or_address_is_a_conflict_and_stores_nothing(store_ctx: Context) -> None:
    wallet, envelope = _wallet(1)
    await store_ctx.wallets.add(wallet, envelope)
    other, other_envelope = _wallet(2)
    for clash in (replace(other, name=wallet.name), replace(other, address=wallet.address)):
        with pytest.raises(Conflict):
            await store_ctx.wallets.add(clash, other_envelope)
    assert [w.id for w in await store_ctx.wallets.list()] == [wallet.id]
    assert await store_ctx.wallets.envelope(other.id) is None


async def test_replace_wrapped_only_swaps_an_unchanged_row(store_ctx: Context) -> None:
    wallet, envelope = _wallet(1)
    await store_ctx.wallets.add(wallet, envelope)
    fresh = replace(envelope, kek_version=2, wrapped_dek=b"\x07" * 60)
    assert await store_ctx.wallets.replace_wrapped(envelope, fresh) is True
    assert await store_ctx.wallets.replace_wrapped(envelope, replace(fresh, wrapped_dek=b"\x08" * 60)) is False
    assert await store_ctx.wallets.envelope(wallet.id) == fresh


async def test_envelopes_are_paged_and_filtered_by_kek_version(store_ctx: Context) -> None:
    for n in range(1, 1102):
        wallet, envelope = _wallet(n)
        await store_ctx.wallets.add(wallet, replace(envelope, kek_version=1 + (n % 2)))
    seen = [e.wallet_id async for e in store_ctx.wallets.envelopes()]
    assert len(seen) == len(set(seen)) == 1101
    old = [e async for e in store_ctx.wallets.envelopes(below_kek_version=2)]
    assert {e.kek_version for e in old} == {1}
    assert len(old) == await store_ctx.wallets.count_envelopes(below_kek_version=2) == 550
