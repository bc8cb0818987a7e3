"""Prepared statements: what SQLAlchemy would give, in the caller's transaction, with SQLAlchemy's errors."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    bindparam,
    event,
    func,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ResourceClosedError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine

from custody.settings import Settings
from custody.storage.db import create_engine, is_database_outage, reading, write_transaction
from custody.storage.prepared import Prepared
from custody.storage.types import BigInt

metadata = MetaData()
things = Table(
    "things",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(40), unique=True, nullable=False),
    Column("amount", BigInt, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("blob", LargeBinary, nullable=True),
)
INSERT = Prepared.insert(things, "name", "amount", "at", "blob")
BY_NAME = Prepared(
    select(things.c.name, things.c.amount, things.c.at, things.c.blob).where(things.c.name == bindparam("n"))
)
ALL = Prepared(select(things.c.name, things.c.amount).order_by(things.c.id))
HUGE = 10**30  # beyond 64 bits: money in wei
AT = datetime(2026, 11, 28, 4, 30, tzinfo=UTC)


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(settings.sqlalchemy_url, timeout=1)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    try:
        yield engine
    finally:
        await engine.dispose()


def _count_sqlalchemy_statements(engine: AsyncEngine) -> list[str]:
    seen: list[str] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        seen.append(statement)

    return seen


async def test_rows_and_values_are_what_sqlalchemy_gives(engine: AsyncEngine) -> None:
    async with write_transaction(engine) as conn:
        await INSERT.run(conn, {"name": "a", "amount": HUGE, "at": AT, "blob": b"\x00\x01"})
        await INSERT.run(
            conn,
            [{"name": "b", "amount": 1, "at": AT, "blob": None}, {"name": "c", "amount": 2, "at": AT, "blob": None}],
        )
    async with reading(engine) as conn:
        row = await BY_NAME.first(conn, {"n": "a"})
        expected = (await conn.execute(BY_NAME.statement, {"n": "a"})).first()
        missing = await BY_NAME.first(conn, {"n": "nobody"})
        every = await ALL.rows(conn)
    assert row is not None
    assert expected is not None
    assert tuple(row) == tuple(expected)
    assert row.amount == HUGE
    assert type(row.amount) is int  # never a Decimal or text
    assert row.at.replace(tzinfo=row.at.tzinfo or UTC) == AT
    assert bytes(row.blob) == b"\x00\x01"
    assert missing is None
    assert [(r.name, r.amount) for r in every] == [("a", HUGE), ("b", 1), ("c", 2)]


async def test_only_what_begins_a_transaction_goes_through_sqlalchemy(engine: AsyncEngine, backend: str) -> None:
    seen = _count_sqlalchemy_statements(engine)
    async with write_transaction(engine) as conn:
        await INSERT.run(conn, {"name": "first", "amount": 1, "at": AT, "blob": None})
        await INSERT.run(conn, {"name": "second", "amount": 2, "at": AT, "blob": None})
        assert await BY_NAME.first(conn, {"n": "first"}) is not None
    # PostgreSQL: the first statement begins SQLAlchemy's transaction; SQLite: BEGIN did, when it began.
    direct_from_the_start = backend == "sqlite"
    assert len([s for s in seen if "things" in s]) == (0 if direct_from_the_start else 1)
    async with reading(engine) as conn:  # a read outside a transaction is its own
        assert await BY_NAME.first(conn, {"n": "second"}) is not None
    assert len([s for s in seen if "things" in s]) == (0 if direct_from_the_start else 1)


async def test_a_write_outside_a_transaction_is_never_committed_behind_sqlalchemys_back(engine: AsyncEngine) -> None:
    raw_write = Prepared(text("INSERT INTO things (name, amount, at) VALUES ('raw', '1', '2026-01-01 00:00:00')"))
    async with engine.connect() as conn:  # no transaction begun, none committed
        await INSERT.run(conn, {"name": "uncommitted", "amount": 1, "at": AT, "blob": None})
    async with engine.connect() as conn:
        # Not a SELECT, so a write whichever method runs it: through SQLAlchemy, which says it returns no rows.
        with pytest.raises(ResourceClosedError):
            await raw_write.first(conn)
    async with reading(engine) as conn:
        assert await BY_NAME.first(conn, {"n": "uncommitted"}) is None
        assert await BY_NAME.first(conn, {"n": "raw"}) is None


def test_a_statement_whose_columns_share_a_name_is_refused() -> None:
    from sqlalchemy.dialects import postgresql

    other = Table("other", MetaData(), Column("name", String(40)))
    statement = Prepared(select(things.c.name, other.c.name))
    with pytest.raises(ValueError, match="distinct"):
        statement._compile(postgresql.asyncpg.dialect())


async def test_a_failed_transaction_leaves_nothing_of_its_prepared_writes(engine: AsyncEngine) -> None:
    async def gives_up() -> None:
        async with write_transaction(engine) as conn:
            await INSERT.run(conn, {"name": "x", "amount": 1, "at": AT, "blob": None})
            await INSERT.run(conn, [{"name": "y", "amount": 2, "at": AT, "blob": None}])
            raise RuntimeError("the caller gives up before the commit")

    with pytest.raises(RuntimeError):
        await gives_up()
    async with reading(engine) as conn:
        assert await ALL.rows(conn) == []


async def _insert_after_a_read(engine: AsyncEngine, values: dict[str, object]) -> None:
    async with write_transaction(engine) as conn:
        await BY_NAME.first(conn, {"n": "a"})  # begins the transaction: on PostgreSQL the insert runs on asyncpg
        await INSERT.run(conn, values)


async def test_a_duplicate_is_sqlalchemys_integrity_error(engine: AsyncEngine) -> None:
    async with write_transaction(engine) as conn:
        await INSERT.run(conn, {"name": "dup", "amount": 1, "at": AT, "blob": None})
    with pytest.raises(IntegrityError):
        await _insert_after_a_read(engine, {"name": "dup", "amount": 2, "at": AT, "blob": None})


async def test_money_must_be_an_integer_on_every_path(engine: AsyncEngine) -> None:
    with pytest.raises(StatementError) as caught:
        await _insert_after_a_read(engine, {"name": "f", "amount": 1.5, "at": AT, "blob": None})
    assert isinstance(caught.value.orig, TypeError)  # "money is an integer in base units"


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
async def test_a_statement_that_outlives_the_timeout_is_an_outage_and_its_connection_is_dropped(
    engine: AsyncEngine,
) -> None:
    sleep = Prepared(select(func.pg_sleep(bindparam("seconds"))))

    async def sleeps() -> None:
        async with write_transaction(engine) as conn:
            await BY_NAME.first(conn, {"n": "a"})  # begins the transaction: the sleep runs on asyncpg
            await sleep.first(conn, {"seconds": 3})  # the engine's timeout is 1 s

    with pytest.raises(OperationalError) as caught:
        await sleeps()
    assert caught.value.connection_invalidated
    assert is_database_outage(caught.value)  # answered 503 database_unavailable
    async with write_transaction(engine) as conn:  # the next transaction gets a working connection
        await INSERT.run(conn, {"name": "after", "amount": 1, "at": AT, "blob": None})
        assert await BY_NAME.first(conn, {"n": "after"}) is not None


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
async def test_a_lost_connection_is_an_outage_and_is_never_handed_out_again(
    engine: AsyncEngine, settings: Settings
) -> None:
    assert settings.database_url is not None
    async with reading(engine) as conn:
        assert await BY_NAME.first(conn, {"n": "a"}) is None
        pid = (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()
        admin = await asyncpg.connect(settings.database_url)
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        # asyncpg may already know (then SQLAlchemy runs it and fails), or learn it now.
        with pytest.raises(DBAPIError) as caught:
            await BY_NAME.first(conn, {"n": "a"})
    assert caught.value.connection_invalidated
    assert is_database_outage(caught.value)
    async with reading(engine) as conn:  # the pool did not keep the dead connection
        assert await BY_NAME.first(conn, {"n": "a"}) is None


def test_a_statement_that_expands_a_list_at_execution_is_refused() -> None:
    from sqlalchemy.dialects import postgresql

    statement = Prepared(select(things.c.id).where(things.c.name.in_(["a", "b"])))
    with pytest.raises(ValueError, match="expand"):
        statement._compile(postgresql.asyncpg.dialect())  # type: ignore[attr-defined]


def test_a_column_filled_in_by_python_at_execution_is_refused() -> None:
    from sqlalchemy.dialects import postgresql

    with_default = Table(
        "with_default", MetaData(), Column("id", Integer, primary_key=True), Column("n", Integer, default=5)
    )
    statement = Prepared.insert(with_default, "id")  # n would be filled in by SQLAlchemy, not by the server
    with pytest.raises(ValueError, match="default"):
        statement._compile(postgresql.asyncpg.dialect())


class _Proxy:
    """A TCP proxy to PostgreSQL whose connections can be made silently dead (reset on their next write)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.dead = False
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers += [writer, up_writer]
        born_dead = self.dead

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, upstream: bool) -> None:
            with contextlib.suppress(Exception):
                while data := await source.read(65536):
                    if upstream and self.dead and not born_dead:
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        writer.close()
                        up_writer.close()
                        return
                    sink.write(data)
                    await sink.drain()

        self.tasks += [
            asyncio.create_task(pump(reader, up_writer, True)),
            asyncio.create_task(pump(up_reader, writer, False)),
        ]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
async def test_after_a_lost_connection_no_older_pooled_connection_is_handed_out(settings: Settings) -> None:
    assert settings.database_url is not None
    proxy = _Proxy(int(settings.database_url.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1]))
    port = await proxy.start()
    url = settings.sqlalchemy_url.replace("127.0.0.1:5432", f"127.0.0.1:{port}")
    engine = create_engine(url, timeout=0.5)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        opened = [await engine.connect() for _ in range(4)]
        for conn in opened:
            await conn.exec_driver_sql("SELECT 1")
        for conn in opened:
            await conn.close()  # four connections in the pool
        proxy.dead = True  # all four die silently (a failover, a NAT that forgot them); asyncpg cannot tell
        outcomes = []
        for _ in range(6):
            try:
                async with reading(engine) as conn:
                    await BY_NAME.first(conn, {"n": "a"})  # autocommit: runs on asyncpg
                outcomes.append("ok")
            except OperationalError as error:
                outcomes.append("outage" if error.connection_invalidated else "error")
        assert outcomes == ["outage"] + ["ok"] * 5  # one request answered 503, not one per dead connection
    finally:
        await engine.dispose()
        await proxy.close()


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
async def test_a_transaction_sqlalchemy_did_not_begin_is_never_written_to_directly(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.begin()
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        await driver.execute("BEGIN")  # not SQLAlchemy's: it would neither commit nor roll this back
        with pytest.raises(DBAPIError):  # through SQLAlchemy, which refuses; never silently lost
            await INSERT.run(conn, {"name": "lost", "amount": 1, "at": AT, "blob": None})
        await driver.execute("ROLLBACK")


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
async def test_a_statement_cancelled_midway_drops_its_connection(engine: AsyncEngine) -> None:
    sleep = Prepared(select(func.pg_sleep(bindparam("seconds"))))
    pids: list[int] = []

    async def sleeps() -> None:
        async with write_transaction(engine) as conn:
            pids.append((await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one())
            await sleep.first(conn, {"seconds": 0.8})  # on asyncpg: the transaction has begun

    task = asyncio.create_task(sleeps())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with reading(engine) as conn:
        pid = (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()
    assert pids
    assert pid != pids[0]  # the cancelled statement's connection was not put back in the pool
