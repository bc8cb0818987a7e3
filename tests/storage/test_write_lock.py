"""SQLite's writers queue on one lock per process; the wait is bounded, never a hang."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

from custody.storage.db import create_engine, is_database_outage, write_transaction


async def test_a_writer_waits_at_most_the_timeout_for_the_write_lock(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}", timeout=0.3)
    try:
        async with write_transaction(engine) as conn:
            await conn.execute(text("CREATE TABLE t (x INTEGER)"))
        holding, done = asyncio.Event(), asyncio.Event()

        async def slow_writer() -> None:  # as a payment whose signer stalls
            async with write_transaction(engine) as conn:
                await conn.execute(text("INSERT INTO t VALUES (1)"))
                holding.set()
                await done.wait()

        holder = asyncio.create_task(slow_writer())
        await holding.wait()
        started = time.monotonic()
        with pytest.raises(SATimeoutError) as caught:
            async with write_transaction(engine) as conn:
                await conn.execute(text("INSERT INTO t VALUES (2)"))
        assert 0.25 <= time.monotonic() - started < 2.0
        assert is_database_outage(caught.value)  # answered as 503 database_unavailable
        done.set()
        await holder
        # The lock was not lost to the writer that gave up: the next one goes through.
        async with write_transaction(engine) as conn:
            await conn.execute(text("INSERT INTO t VALUES (3)"))
        async with engine.connect() as conn:
            assert [r.x for r in await conn.execute(text("SELECT x FROM t ORDER BY x"))] == [1, 3]
    finally:
        await engine.dispose()


@pytest.fixture
async def locked(tmp_path: Path) -> AsyncIterator[tuple[AsyncEngine, sqlite3.Connection]]:
    """An engine whose pooled connection gives up after 100 ms, and another process's writer holding the file."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}", timeout=0.3)
    holder = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
    try:
        async with write_transaction(engine) as conn:
            await conn.execute(text("CREATE TABLE t (x INTEGER)"))
            await conn.execute(text("PRAGMA busy_timeout=100"))  # this pooled connection gives up quickly
        holder.execute("BEGIN IMMEDIATE")
        yield engine, holder
    finally:
        holder.close()
        await engine.dispose()


async def test_a_database_locked_by_another_process_is_an_outage(
    locked: tuple[AsyncEngine, sqlite3.Connection],
) -> None:
    engine, holder = locked

    async def write() -> None:
        async with write_transaction(engine) as conn:
            await conn.execute(text("INSERT INTO t VALUES (1)"))

    with pytest.raises(OperationalError) as caught:
        await write()
    assert is_database_outage(caught.value)  # 503 database_unavailable, not a 500
    holder.execute("ROLLBACK")
    await write()  # and the connection still works


async def test_after_a_failed_begin_the_next_write_on_that_connection_is_still_transactional(
    locked: tuple[AsyncEngine, sqlite3.Connection],
) -> None:
    engine, holder = locked
    async with engine.connect() as conn:
        immediate = await conn.execution_options(sqlite_immediate=True)
        with pytest.raises(OperationalError):
            await immediate.begin()  # locked by the other writer
        holder.execute("ROLLBACK")
        await conn.execute(text("INSERT INTO t VALUES (1)"))  # begins a transaction of its own
        await conn.rollback()
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one() == 0
