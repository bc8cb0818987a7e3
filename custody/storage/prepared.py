"""Statements of the payment path, run on the database driver itself where that is safe.

A payment runs about a dozen statements. Through SQLAlchemy each costs about 0.14 ms of the
API's CPU on PostgreSQL and 0.40 ms on SQLite; asyncpg alone takes about 0.06 ms for the same
statement, aiosqlite about 0.08 ms (measured here, docs/performance.md). A :class:`Prepared`
is a Core statement, still written once with SQLAlchemy and compiled once per dialect, that
runs on the driver connection under the caller's :class:`AsyncConnection`:

- inside the transaction SQLAlchemy has begun, and only then: on PostgreSQL SQLAlchemy begins
  it lazily, with its first statement (until then a statement goes through SQLAlchemy, which
  begins it); on SQLite ``BEGIN`` is sent when SQLAlchemy's transaction begins;
- or outside any transaction, where a statement is its own: on PostgreSQL on a connection in
  autocommit, on SQLite for a read;
- with the statement's bind and result processors applied, so values look as they would
  through SQLAlchemy (an amount is an ``int``, a timestamp a ``datetime``);
- with the driver's errors raised as SQLAlchemy's (``IntegrityError``, ``OperationalError``,
  ``DBAPIError``), so callers handle one kind; a PostgreSQL connection in doubt is invalidated,
  and after a lost one every older pooled connection too, as SQLAlchemy does.

Anywhere else it is an ordinary ``conn.execute``. Statements with parameters that SQLAlchemy
expands or fills in at execution (``IN`` over a list, Python-side column defaults) cannot be
compiled once and are refused.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import sqlalchemy.exc as sa_exc
from sqlalchemy import Table, bindparam, insert
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Executable
from sqlalchemy.types import TypeDecorator

Params = Mapping[str, Any]
Processor = Callable[[Any], Any]


class _Compiled(NamedTuple):
    sql: str
    names: tuple[str, ...]  # the parameters' names, in their positional order
    defaults: dict[str, Any]  # values bound into the statement itself
    binds: tuple[Processor | None, ...]  # per position
    results: tuple[Processor | None, ...]  # per result column
    row: Any  # the named tuple class of a result row
    writes: bool


class Prepared:
    """A Core statement of the hot path; see the module's docstring."""

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        self._compiled: dict[str, _Compiled] = {}

    @classmethod
    def insert(cls, table: Table, *columns: str) -> Prepared:
        """An INSERT of these columns, each bound by its name (the others take their server-side defaults).

        Inline: nothing is returned (no ``RETURNING`` of generated keys).
        """
        return cls(insert(table).inline().values({name: bindparam(name) for name in columns}))

    def _compile(self, dialect: Dialect) -> _Compiled:
        compiled = self._compiled.get(dialect.name)
        if compiled is not None:
            return compiled
        form = self.statement.compile(dialect=dialect)  # type: ignore[attr-defined]
        sql = str(form)
        if "POSTCOMPILE" in sql:
            raise ValueError("a prepared statement cannot expand parameters at execution (IN over a list)")
        if getattr(form, "insert_prefetch", None) or getattr(form, "update_prefetch", None):
            # SQLAlchemy computes those in Python at execution; bind them explicitly instead.
            raise ValueError("a prepared statement cannot fill in a column's Python-side default")
        names = tuple(form.positiontup or ())
        defaults = {name: bind.value for name, bind in form.binds.items() if not bind.required}
        columns = tuple(getattr(self.statement, "selected_columns", ()))
        if dialect.name == "postgresql":
            binds = tuple(_decorator_bind(form.binds[name].type, dialect) for name in names)
            results = tuple(_decorator_result(column.type, dialect) for column in columns)
        else:
            binds = tuple(form.binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names)
            results = tuple(column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns)
        keys = [column.key or f"c{n}" for n, column in enumerate(columns)]
        if len(set(keys)) != len(keys) or not all(key.isidentifier() and not key.startswith("_") for key in keys):
            # A silently renamed column would hand a caller another column's value under its name.
            raise ValueError(f"a prepared statement's columns need distinct plain names: {keys}")
        row = collections.namedtuple("Row", keys)  # type: ignore[misc]
        # Only a SELECT may run outside a transaction; anything else (text() included) is a write.
        writes = not getattr(self.statement, "is_select", False)
        compiled = _Compiled(sql, names, defaults, binds, results, row, writes)
        self._compiled[dialect.name] = compiled
        return compiled

    def _args(self, compiled: _Compiled, params: Params) -> list[Any]:
        args = []
        for name, bind in zip(compiled.names, compiled.binds, strict=True):
            value = params[name] if name in params else compiled.defaults[name]
            if bind is not None:
                try:
                    value = bind(value)
                except Exception as error:  # as SQLAlchemy reports a value its type refuses
                    raise sa_exc.StatementError(str(error), compiled.sql, None, error) from error
            args.append(value)
        return args

    def _row(self, compiled: _Compiled, values: Sequence[Any]) -> Any:
        if any(compiled.results):
            values = [
                value if value is None or result is None else result(value)
                for result, value in zip(compiled.results, values, strict=True)
            ]
        return compiled.row._make(values)

    # Execution ----------------------------------------------------------------------------

    async def rows(self, conn: AsyncConnection, params: Params | None = None) -> list[Any]:
        """Every row of a query, each a named tuple (``row.column`` and ``row[i]``)."""
        params = params or {}
        compiled = self._compile(conn.dialect)
        direct = _direct(conn, writes=compiled.writes)
        if direct is None:
            return list((await conn.execute(self.statement, params)).all())
        found = await _run(conn, compiled, direct.rows, self._args(compiled, params))
        return [self._row(compiled, values) for values in found]

    async def first(self, conn: AsyncConnection, params: Params | None = None) -> Any | None:
        """The first row of a query, or None."""
        params = params or {}
        compiled = self._compile(conn.dialect)
        direct = _direct(conn, writes=compiled.writes)
        if direct is None:
            return (await conn.execute(self.statement, params)).first()
        found = await _run(conn, compiled, direct.rows, self._args(compiled, params))
        return self._row(compiled, found[0]) if found else None

    async def run(self, conn: AsyncConnection, params: Params | Sequence[Params] | None = None) -> int:
        """A write with one set of parameters (returns the rows it touched) or many (returns 0)."""
        params = params if params is not None else {}
        compiled = self._compile(conn.dialect)
        direct = _direct(conn, writes=True)
        if isinstance(params, Mapping):
            if direct is None:
                return int((await conn.execute(self.statement, params)).rowcount)
            return int(await _run(conn, compiled, direct.run, self._args(compiled, params)))
        if not params:
            return 0
        if direct is None:
            await conn.execute(self.statement, list(params))
            return 0
        await _run(conn, compiled, direct.many, [self._args(compiled, p) for p in params])
        return 0


# Type conversions -------------------------------------------------------------------------
# On PostgreSQL, asyncpg takes and gives the Python values SQLAlchemy's plain types stand for
# (str, int, bool, bytes, aware datetimes), so only what a column type of ours adds
# (TypeDecorator) is applied. On SQLite SQLAlchemy's own processors are (timestamps as text).


def _decorator_bind(kind: Any, dialect: Dialect) -> Processor | None:
    if not isinstance(kind, TypeDecorator) or type(kind).process_bind_param is TypeDecorator.process_bind_param:
        return None
    return functools.partial(kind.process_bind_param, dialect=dialect)


def _decorator_result(kind: Any, dialect: Dialect) -> Processor | None:
    if not isinstance(kind, TypeDecorator) or type(kind).process_result_value is TypeDecorator.process_result_value:
        return None
    return functools.partial(kind.process_result_value, dialect=dialect)


# The drivers ------------------------------------------------------------------------------


class _Asyncpg:
    def __init__(self, driver: Any) -> None:
        self.driver = driver

    async def rows(self, sql: str, args: list[Any]) -> list[Any]:
        return list(await self.driver.fetch(sql, *args))

    async def run(self, sql: str, args: list[Any]) -> int:
        status = str(await self.driver.execute(sql, *args))
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def many(self, sql: str, args: list[list[Any]]) -> None:
        await self.driver.executemany(sql, args)


class _Aiosqlite:
    def __init__(self, driver: Any) -> None:
        self.driver = driver

    async def rows(self, sql: str, args: list[Any]) -> list[Any]:
        return list(await self.driver.execute_fetchall(sql, args))

    async def run(self, sql: str, args: list[Any]) -> int:
        cursor = await self.driver.execute(sql, args)
        return int(cursor.rowcount)

    async def many(self, sql: str, args: list[list[Any]]) -> None:
        await self.driver.executemany(sql, args)


def _direct(conn: AsyncConnection, writes: bool) -> _Asyncpg | _Aiosqlite | None:
    """The driver connection under ``conn`` when this statement may run on it directly, else None."""
    sync = conn.sync_connection
    if sync is None or sync.invalidated or sync.closed:
        return None
    driver = sync.connection.driver_connection
    if driver is None:
        return None
    dialect = conn.dialect
    if dialect.name == "sqlite" and dialect.driver == "aiosqlite":
        try:
            open_transaction = driver.in_transaction
        except ValueError:  # aiosqlite's "no active connection": let SQLAlchemy meet it and drop it
            return None
        if open_transaction:
            # BEGIN was sent when SQLAlchemy's transaction began; SQLAlchemy commits or rolls back.
            return _Aiosqlite(driver) if conn.in_transaction() else None
        # No transaction: a read is its own (sqlite3 is in autocommit here, see storage.db).
        return _Aiosqlite(driver) if not writes and not conn.in_transaction() else None
    if dialect.name != "postgresql" or dialect.driver != "asyncpg" or driver.is_closed():
        return None
    if driver.is_in_transaction():
        # Only the transaction SQLAlchemy's adapter holds (it commits or rolls it back). Should
        # that private attribute ever go, every statement simply goes through SQLAlchemy again.
        adapter = sync.connection.dbapi_connection
        began = getattr(adapter, "_transaction", None) is not None
        return _Asyncpg(driver) if began and conn.in_transaction() else None
    if sync.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return _Asyncpg(driver)
    return None  # SQLAlchemy has not begun the transaction yet: its execute begins it


async def _run(conn: AsyncConnection, compiled: _Compiled, call: Callable[[str, Any], Any], args: Any) -> Any:
    try:
        return await call(compiled.sql, args)
    except asyncio.CancelledError:
        # As SQLAlchemy does: a statement cut off midway leaves its connection in doubt (on
        # SQLite it may still be running in aiosqlite's thread, inside the transaction).
        with contextlib.suppress(Exception):
            await _drop(conn, None, pool_wide=False)
        raise
    except Exception as error:
        translated = await _translated(conn, compiled.sql, error)
        if translated is error:
            raise
        raise translated from error


@functools.cache
def _asyncpg_errors() -> tuple[type[Exception], ...]:
    import asyncpg  # type: ignore[import-untyped]

    return (
        asyncpg.exceptions.IntegrityConstraintViolationError,
        asyncpg.PostgresConnectionError,
        asyncpg.PostgresError,  # the server refused the statement: the connection is fine
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
    )


async def _translated(conn: AsyncConnection, sql: str, error: Exception) -> Exception:
    """The driver's error as SQLAlchemy would raise it; a connection in doubt is invalidated first."""
    if isinstance(error, sqlite3.Error):
        # The class SQLAlchemy would pick (IntegrityError, OperationalError, ProgrammingError, ...).
        return sa_exc.DBAPIError.instance(sql, None, error, sqlite3.Error, dialect=conn.dialect)
    if conn.dialect.name == "sqlite" and isinstance(error, ValueError):
        # aiosqlite's "no active connection": closed under SQLAlchemy's feet.
        await _drop(conn, error, pool_wide=False)
        return sa_exc.OperationalError(sql, None, error, connection_invalidated=True)
    if conn.dialect.name != "postgresql":
        return error
    integrity, lost, refused, interface, internal = _asyncpg_errors()
    driver = conn.sync_connection.connection.driver_connection if conn.sync_connection is not None else None
    closed = driver is None or driver.is_closed()
    if isinstance(error, integrity):
        return sa_exc.IntegrityError(sql, None, error)
    if isinstance(error, interface) and isinstance(error, ValueError) and not closed:
        return sa_exc.DBAPIError(sql, None, error)  # a value the driver cannot send: the connection is fine
    if isinstance(error, refused) and not isinstance(error, lost) and not closed:
        return sa_exc.DBAPIError(sql, None, error)
    if isinstance(error, (refused, interface, internal, OSError, TimeoutError)):
        # Lost, timed out or confused: never hand this connection out again, nor any older one
        # (a restarted server or a dropped network left them all dead; the pool has no pre-ping).
        await _drop(conn, error, pool_wide=isinstance(error, (lost, interface, OSError)) or closed)
        return sa_exc.OperationalError(sql, None, error, connection_invalidated=True)
    return error


async def _drop(conn: AsyncConnection, error: Exception | None, *, pool_wide: bool) -> None:
    """Invalidate ``conn``; with ``pool_wide`` also every pooled connection opened before it.

    That is what SQLAlchemy does on a disconnect.
    """
    sync = conn.sync_connection
    if pool_wide and sync is not None and not sync.invalidated:
        # SQLAlchemy's own step on a disconnect (Connection._handle_dbapi_exception); not public.
        invalidate_older = getattr(sync.engine.pool, "_invalidate", None)
        if invalidate_older is not None:
            invalidate_older(sync.connection, error, _checkin=False)
    await conn.invalidate(error)
