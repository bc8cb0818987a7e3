"""Engines and migrations.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL`` and a busy
timeout; PostgreSQL through asyncpg. :func:`migrate` applies the Alembic migrations
shipped in this package; on PostgreSQL an advisory lock keeps concurrent replicas
from migrating at the same time.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 0x637573746F6479  # arbitrary, constant across replicas


_writers: weakref.WeakKeyDictionary[Any, dict[asyncio.AbstractEventLoop, asyncio.Lock]] = weakref.WeakKeyDictionary()
# How long a SQLite writer waits for the process's write lock (the engine's ``timeout``).
_writer_waits: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def _writer_lock(engine: AsyncEngine) -> asyncio.Lock:
    locks = _writers.setdefault(engine.sync_engine, {})
    loop = asyncio.get_running_loop()
    lock = locks.get(loop)
    if lock is None:
        for old in [known for known in locks if known.is_closed()]:
            del locks[old]
        lock = locks[loop] = asyncio.Lock()
    return lock


@asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction that takes SQLite's write lock up front (``BEGIN IMMEDIATE``).

    Without it, a SQLite transaction that reads and then writes can fail with "database is
    locked" when another writer got there first. On SQLite the process's writers also queue
    on an asyncio lock first: a writer that finds the database locked sleeps in SQLite's busy
    handler (in steps of up to 100 ms) while the event loop could have run the next one, so
    under load they would wait seconds for what takes milliseconds. (Other processes sharing
    the file still meet the busy handler.) PostgreSQL ignores both; its row locks do the work.
    A writer that waits longer than the engine's ``timeout`` for the asyncio lock gets a
    timeout error (503 ``database_unavailable``), never an endless queue: a payment holds the
    lock while the signer signs, so a stalled signer would otherwise stall every writer.
    """
    if engine.dialect.name != "sqlite":
        async with engine.connect() as conn, conn.begin():
            yield conn
        return
    lock = _writer_lock(engine)
    wait = _writer_waits.get(engine.sync_engine, 10.0)
    try:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation that
        # arrives as the lock is granted, and a stopping task would then never stop.
        async with asyncio.timeout(wait):
            await lock.acquire()
    except TimeoutError:
        # A writer ahead holds it for too long (a payment waits for a stalled signer): an outage, not a hang.
        raise SATimeoutError(f"waited {wait:g} s for the database's write lock") from None
    try:
        async with engine.connect() as conn:
            conn = await conn.execution_options(sqlite_immediate=True)
            async with conn.begin():
                yield conn
    finally:
        lock.release()


@asynccontextmanager
async def reading(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection for reads that need no transaction of their own.

    On PostgreSQL each statement runs on its own (autocommit), which saves the ``BEGIN`` and
    ``ROLLBACK`` round trips a read transaction costs; at read committed a transaction gives
    several reads no common snapshot anyway. Never take row locks or write through it.
    On SQLite a prepared read (custody.storage.prepared) runs as its own statement, and one
    through SQLAlchemy begins a local transaction as usual: do not rely on a common snapshot
    there either.
    """
    async with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        yield conn


_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})


def is_database_outage(exc: BaseException) -> bool:
    """True for errors that mean "the database cannot be reached", not "the query is wrong"."""
    if isinstance(exc, (OperationalError, InterfaceError, SATimeoutError, OSError)):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    # A deadlock or serialization failure aborted this transaction: transient, safe to retry.
    sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return exc.connection_invalidated or sqlstate in _TRANSIENT_SQLSTATES


def create_engine(url: str, *, timeout: float = 10.0) -> AsyncEngine:
    """An engine whose every wait is bounded by ``timeout`` seconds (a stalled database is an outage, not a hang)."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})
        _writer_waits[engine.sync_engine] = timeout

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()
            _register_sum(dbapi_connection)
            # Transactions are begun explicitly (see _begin) so a decision can take the write lock up front.
            dbapi_connection.isolation_level = None

        @event.listens_for(engine.sync_engine, "begin")
        def _begin(connection: Connection) -> None:
            immediate = connection.get_execution_options().get("sqlite_immediate", False)
            connection.connection.info["custody_begin"] = "BEGIN IMMEDIATE" if immediate else "BEGIN"

        def _do_begin(dbapi_connection: Any) -> None:
            # Sent here, not from the listener: SQLAlchemy handles what do_begin raises (a database
            # locked by another process past the busy timeout is its OperationalError, a 503) and
            # keeps its own state right; a listener runs outside that. And on aiosqlite itself:
            # through exec_driver_sql this one statement cost about 0.3 ms of CPU more.
            from sqlalchemy.util import await_

            statement = dbapi_connection.info.pop("custody_begin", "BEGIN")
            await_(dbapi_connection.driver_connection.execute(statement))

        setattr(engine.sync_engine.dialect, "do_begin", _do_begin)  # noqa: B010 (this engine's dialect only)
        return engine
    return create_async_engine(
        url,
        pool_size=10,
        max_overflow=10,
        # No ping before every checkout (three round trips each): a connection the server dropped
        # fails its first statement instead, that request gets 503 database_unavailable, and the
        # pool discards every connection older than the failure.
        pool_pre_ping=False,
        pool_timeout=timeout,
        connect_args={"timeout": timeout, "command_timeout": timeout},
    )


def _register_sum(dbapi_connection: Any) -> None:
    """Register ``custody_sum`` (exact big-integer SUM) on the sqlite3 connection.

    aiosqlite owns the sqlite3 connection on its own thread; the registration runs there.
    """
    from sqlalchemy.util import await_

    from custody.storage.types import ExactSum, exact_add

    aio = dbapi_connection._connection
    await_(aio._execute(aio._conn.create_aggregate, "custody_sum", 1, ExactSum))
    await_(aio._execute(aio._conn.create_function, "custody_add", 2, exact_add, deterministic=True))


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
    command.upgrade(_alembic_config(connection), "head")


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest migration."""
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade)
