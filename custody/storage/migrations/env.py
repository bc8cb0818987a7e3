"""Alembic environment: run on the connection that custody.storage.db.migrate passes in."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import custody.storage.models  # noqa: F401  (registers the tables on SQLModel.metadata)

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only through custody.storage.db.migrate
    raise RuntimeError("run migrations with `custody db upgrade` (custody.storage.db.migrate)")
context.configure(connection=connection, target_metadata=SQLModel.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
