"""The running service's dependencies, built from settings and passed explicitly."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from custody.audit.log import AuditLog
from custody.observability.metrics import Metrics
from custody.services.shared import Shared
from custody.settings import Settings, ensure_private_dir
from custody.signer.client import SignerClient
from custody.storage.db import create_engine, migrate
from custody.storage.sql import SqlOperatorStore, SqlWalletStore


def _private_sqlite_file(settings: Settings) -> None:
    """Create the embedded database owner-only; SQLite gives its WAL the same mode."""
    path = settings.sqlalchemy_url.partition(":///")[2]
    if path and path != ":memory:":
        db = Path(path)
        ensure_private_dir(db.parent)
        if not db.exists():
            os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o600))


@dataclass
class Context:
    settings: Settings
    engine: AsyncEngine
    wallets: SqlWalletStore
    operators: SqlOperatorStore
    signer: SignerClient
    audit: AuditLog
    # Set by the API: wakes the webhook dispatcher after a commit that queued deliveries.
    outbox_wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Rate limits, wake-ups and short locks shared by replicas (Redis, or this process).
    shared: Shared = field(default_factory=Shared)
    # Prometheus metrics; the API replaces this with the one its /metrics endpoint exposes.
    metrics: Metrics = field(default_factory=Metrics)

    @classmethod
    async def open(cls, settings: Settings, *, run_migrations: bool = True) -> Context:
        if settings.uses_sqlite:
            _private_sqlite_file(settings)
        engine = create_engine(settings.sqlalchemy_url, timeout=settings.database_timeout_seconds)
        if run_migrations:
            await migrate(engine)
        return cls(
            settings=settings,
            engine=engine,
            wallets=SqlWalletStore(engine),
            operators=SqlOperatorStore(engine),
            signer=SignerClient(settings.socket_path, timeout=settings.signer_timeout_seconds),
            audit=AuditLog(engine),
            shared=Shared(settings.redis_url, settings.redis_prefix),
        )

    async def close(self) -> None:
        await self.shared.close()
        await self.signer.close()
        await self.engine.dispose()
