"""Statements of the payment path, run on the database driver itself where that is safe.

A payment runs about a dozen statements. Through SQLAlchemy each costs about 0.14 ms of the
API's CPU on PostgreSQL; asyncpg alone takes about 0.06 ms for the same statement (measured
here, docs/performance.md). A :class:`Prepared` is a Core statement, still written once with
SQLAlchemy, compiled once per dialect. On PostgreSQL it runs on the asyncpg connection under
the caller's :class:`AsyncConnection`, inside the same transaction:

- only once that transaction has begun (SQLAlchemy begins it lazily, with its first
  statement; until then the statement goes through SQLAlchemy, which begins it), or on a
  connection in autocommit;
- with the statement's bind and result processors applied, so values look as they would
  through SQLAlchemy (an amount is an ``int``, never a ``Decimal``);
- with the driver's errors raised as SQLAlchemy's (``IntegrityError``, ``OperationalError``,
  ``DBAPIError``), so callers handle one kind; a connection that failed is invalidated, as
  SQLAlchemy would, so the pool never hands it out again.

On SQLite, and wherever the driver connection is not usable, it is an ordinary
``conn.execute``. Statements with parameters that SQLAlchemy expands at execution (``IN``
over a list) cannot be compiled once and are refused when built.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import sqlalchemy.exc as sa_exc
from sqlalchemy import Table, bindparam, insert
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Executable
from sqlalchemy.types import TypeDecorator

Params = Mapping[str, Any]


class _Compiled(NamedTuple):
    sql: str
    names: tuple[str, ...]  # the parameters' names, in their positional order
    defaults: dict[str, Any]  # values bound into the statement itself
    binds: tuple[Callable[[Any], Any] | None, ...]  # per position
    results: tuple[Callable[[Any], Any] | None, ...]  # per result column


class Prepared:
    """A Core statement of the hot path; see the module's docstring."""

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        self._compiled: dict[str, _Compiled] = {}
        self._rows: dict[tuple[str, ...], Any] = {}

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
        binds = tuple(_bind(form.binds[name].type, dialect) for name in names)
        results = tuple(_result(column.type, dialect) for column in getattr(self.statement, "selected_columns", ()))
        compiled = self._compiled[dialect.name] = _Compiled(sql, names, defaults, binds, results)
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

    # Execution ----------------------------------------------------------------------------

    async def rows(self, conn: AsyncConnection, params: Params | None = None) -> list[Any]:
        """Every row of a query, each a named tuple (``row.column`` and ``row[i]``)."""
        params = params or {}
        driver = _driver(conn)
        if driver is None:
            return list((await conn.execute(self.statement, params)).all())
        compiled = self._compile(conn.dialect)
        records = await _run(conn, compiled, driver.fetch, *self._args(compiled, params))
        return [self._row(compiled, record) for record in records]

    async def first(self, conn: AsyncConnection, params: Params | None = None) -> Any | None:
        """The first row of a query, or None."""
        params = params or {}
        driver = _driver(conn)
        if driver is None:
            return (await conn.execute(self.statement, params)).first()
        compiled = self._compile(conn.dialect)
        record = await _run(conn, compiled, driver.fetchrow, *self._args(compiled, params))
        return None if record is None else self._row(compiled, record)

    async def run(self, conn: AsyncConnection, params: Params | Sequence[Params] | None = None) -> int:
        """A write with one set of parameters (returns the rows it touched) or many (returns 0)."""
        params = params if params is not None else {}
        driver = _driver(conn)
        if isinstance(params, Mapping):
            if driver is None:
                return int((await conn.execute(self.statement, params)).rowcount)
            compiled = self._compile(conn.dialect)
            status = await _run(conn, compiled, driver.execute, *self._args(compiled, params))
            last = str(status).rsplit(" ", 1)[-1]
            return int(last) if last.isdigit() else 0
        if not params:
            return 0
        if driver is None:
            await conn.execute(self.statement, list(params))
            return 0
        compiled = self._compile(conn.dialect)
        await _run(conn, compiled, driver.executemany, [self._args(compiled, p) for p in params])
        return 0

    def _row(self, compiled: _Compiled, record: Any) -> Any:
        keys = tuple(record.keys())
        cls: Any = self._rows.get(keys)
        if cls is None:
            cls = self._rows[keys] = collections.namedtuple("Row", keys, rename=True)
        values = tuple(record.values())
        if any(compiled.results):
            values = tuple(
                value if value is None or result is None else result(value)
                for result, value in zip(compiled.results, values, strict=True)
            )
        return cls._make(values)


# asyncpg takes and gives the Python values SQLAlchemy's plain types stand for (str, int, bool,
# bytes, aware datetimes); what a column type of ours adds (TypeDecorator) is applied here.
def _bind(kind: Any, dialect: Dialect) -> Callable[[Any], Any] | None:
    if not isinstance(kind, TypeDecorator) or type(kind).process_bind_param is TypeDecorator.process_bind_param:
        return None
    return functools.partial(_bound, kind, dialect)


def _bound(kind: TypeDecorator[Any], dialect: Dialect, value: Any) -> Any:
    return kind.process_bind_param(value, dialect)


def _result(kind: Any, dialect: Dialect) -> Callable[[Any], Any] | None:
    if not isinstance(kind, TypeDecorator) or type(kind).process_result_value is TypeDecorator.process_result_value:
        return None
    return functools.partial(_loaded, kind, dialect)


def _loaded(kind: TypeDecorator[Any], dialect: Dialect, value: Any) -> Any:
    return kind.process_result_value(value, dialect)


def _driver(conn: AsyncConnection) -> Any | None:
    """The asyncpg connection under ``conn`` when a statement may run on it directly, else None.

    Inside a transaction only when SQLAlchemy's asyncpg adapter holds it (then SQLAlchemy
    commits or rolls it back); should that private attribute ever go, every statement simply
    goes through SQLAlchemy again.
    """
    if conn.dialect.name != "postgresql" or conn.dialect.driver != "asyncpg":
        return None
    sync = conn.sync_connection
    if sync is None or sync.invalidated or sync.closed:
        return None
    adapter = sync.connection.dbapi_connection
    driver = sync.connection.driver_connection
    if driver is None or driver.is_closed():
        return None
    if driver.is_in_transaction():
        began = getattr(adapter, "_transaction", None) is not None
        return driver if began and conn.in_transaction() else None
    if sync.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return driver
    return None  # SQLAlchemy has not begun the transaction yet: its execute begins it


async def _run(conn: AsyncConnection, compiled: _Compiled, call: Callable[..., Any], *args: Any) -> Any:
    try:
        return await call(compiled.sql, *args)
    except asyncio.CancelledError:
        # As SQLAlchemy does: a statement cut off midway leaves its connection in doubt.
        with contextlib.suppress(Exception):
            await _drop(conn, None, pool_wide=False)
        raise
    except Exception as error:
        translated = await _translated(conn, compiled.sql, error)
        if translated is error:
            raise
        raise translated from error


@functools.cache
def _driver_errors() -> tuple[type[Exception], ...]:
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
    integrity, lost, refused, interface, internal = _driver_errors()
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
