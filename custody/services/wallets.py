"""Wallets: create (the key is generated inside the signer), import, list, rotate the KEK."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from custody.errors import Conflict, InvalidRequest, KekVersionUnchanged, NotFound
from custody.services.context import Context
from custody.storage.interfaces import Wallet

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def new_wallet_id() -> str:
    return "wal_" + secrets.token_hex(10)


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidRequest(
            "a wallet name is 1-100 characters: letters, digits, '.', '_' or '-', starting with a letter or digit",
            field="name",
        )


async def create_wallet(ctx: Context, name: str, actor: str = "operator:local") -> Wallet:
    _check_name(name)
    if await ctx.wallets.get_by_name(name) is not None:
        raise Conflict(f"a wallet named {name!r} already exists")
    wallet_id = new_wallet_id()
    address, public_key, envelope = await ctx.signer.create_key(wallet_id)
    wallet = Wallet(wallet_id, name, address, public_key, envelope.key_version, datetime.now(UTC))
    await ctx.wallets.add(wallet, envelope)
    await ctx.audit.append("wallet.created", actor=actor, subject=wallet.id, data={"name": name, "address": address})
    return wallet


async def import_wallet(ctx: Context, name: str, private_key: bytes, actor: str = "operator:local") -> Wallet:
    """Operator-only (local CLI): the key goes straight to the signer to be sealed."""
    _check_name(name)
    if await ctx.wallets.get_by_name(name) is not None:
        raise Conflict(f"a wallet named {name!r} already exists")
    wallet_id = new_wallet_id()
    address, public_key, envelope = await ctx.signer.import_key(wallet_id, private_key)
    wallet = Wallet(wallet_id, name, address, public_key, envelope.key_version, datetime.now(UTC))
    await ctx.wallets.add(wallet, envelope)
    await ctx.audit.append("wallet.imported", actor=actor, subject=wallet.id, data={"name": name, "address": address})
    return wallet


async def get_wallet(ctx: Context, wallet_id: str) -> Wallet:
    wallet = await ctx.wallets.get(wallet_id)
    if wallet is None:
        raise NotFound("no such wallet")
    return wallet


@dataclass(frozen=True)
class RotationResult:
    previous_version: int
    kek_version: int
    rewrapped: int
    skipped: int


async def rotate_kek(ctx: Context, progress: Callable[[int, int], None] | None = None) -> RotationResult:
    """Make a new KEK version current and rewrap every data key under it.

    Private keys are never decrypted into this process: the signer rewraps each data
    key, and the row is swapped only if nobody changed it in between. Signing keeps
    working throughout, because the signer still holds the older versions. Safe to
    run again after an interruption: rows already under the new version are skipped.
    """
    versions = await ctx.signer.rotate_kek()
    target = int(versions["kek_version"])
    total = await ctx.wallets.count_envelopes(below_kek_version=target)
    if total == 0 and target == int(versions["previous_version"]):
        raise KekVersionUnchanged(
            f"every data key is already under KEK version {target}: add version v{target + 1} to the "
            "KEK secret or passphrase (CUSTODY_KEK_SECRET / CUSTODY_KEK_PASSPHRASE), restart the signer, "
            "then rotate again"
        )
    done = skipped = 0
    if progress:
        progress(0, total)
    async for envelope in ctx.wallets.envelopes(below_kek_version=target):
        fresh = await ctx.signer.rewrap(envelope)
        if await ctx.wallets.replace_wrapped(envelope, fresh):
            done += 1
        else:
            skipped += 1
        if progress:
            progress(done + skipped, total)
    await ctx.audit.append(
        "kek.rotated",
        actor="operator:local",
        data={"previous_version": int(versions["previous_version"]), "kek_version": target, "rewrapped": done},
    )
    return RotationResult(int(versions["previous_version"]), target, done, skipped)
