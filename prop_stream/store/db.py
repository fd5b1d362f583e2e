"""Open the store (a DuckDB file or a PostgreSQL database) and run transactions.

``--db`` is a DuckDB path or a ``postgresql://`` URL (:func:`connect`). Store
functions take either backend's :data:`Connection`: DuckDB's own connection, or a
:class:`~prop_stream.store.pg.PgConnection` that speaks the same calling
conventions over psycopg. A statement whose SQL differs between the dialects
branches on :func:`is_postgres` in its resource's module (``docs/store.md``).

DuckDB lets one process open a file for writing, and while it does no other
process can open it at all (not even read-only). The service owns the file; within
the service, threads share one database instance through cursors
(:func:`cursor`), each of which is its own connection. PostgreSQL sessions are
opened per thread the same way (:func:`cursor`), by any number of processes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final, TypeVar

import duckdb
import polars as pl
import psycopg

from prop_stream.dburl import is_url, redact
from prop_stream.store.exceptions import DatabaseLockedError, StoreError
from prop_stream.store.pg import PgConnection, connect_url

#: A store connection of either backend.
Connection = duckdb.DuckDBPyConnection | PgConnection

#: Errors of either backend's driver.
DatabaseError = (duckdb.Error, psycopg.Error)

T = TypeVar("T")

#: How many times :func:`run_in_transaction` tries a transaction that conflicts.
DEFAULT_ATTEMPTS = 50


def is_postgres(conn: Connection) -> bool:
    """Whether a connection is PostgreSQL's (else DuckDB's)."""
    return isinstance(conn, PgConnection)


def connect(path: str | Path, *, read_only: bool = False) -> Connection:
    """Open the store with the session settings it relies on.

    Timestamps are read and written in UTC whatever the machine's zone.

    Args:
        path: The DuckDB file (``:memory:`` for a throwaway database), or a
            ``postgresql://`` URL.
        read_only: DuckDB: open without the write lock (fails if a writer holds
            the file). PostgreSQL: ignored (the role's grants decide).

    Returns:
        A connection; close it when done.

    Raises:
        DatabaseLockedError: Another process has the file open for writing.
        StoreError: The file can't be opened as a DuckDB database (a directory,
            another kind of file, no permission, a read-only file system); the
            PostgreSQL server can't be reached or refuses the login.
    """
    if is_url(path):
        assert isinstance(path, str)  # noqa: S101 - is_url checked it
        try:
            return connect_url(path)
        except psycopg.Error as exc:
            raise StoreError(
                f"{redact(path)}: can't connect: {_first_line(exc)}"
            ) from exc
    try:
        conn = duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise DatabaseLockedError(
                str(path), f"{path} is in use by another process: {exc}"
            ) from exc
        raise StoreError(
            f"{path}: can't open the database: {_first_line(exc)}"
        ) from exc
    except (duckdb.Error, OSError) as exc:
        raise StoreError(
            f"{path}: can't open the database: {_first_line(exc)}"
        ) from exc
    configure(conn)
    return conn


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def configure(conn: Connection) -> None:
    """Apply the store's session settings to a connection or cursor."""
    conn.execute("SET TimeZone = 'UTC'")


def cursor(conn: Connection) -> Connection:
    """A new connection to the same database, for another thread.

    Args:
        conn: A connection from :func:`connect`.

    Returns:
        A cursor with the store's session settings (PostgreSQL: a new session).
    """
    if isinstance(conn, PgConnection):
        return conn.cursor()
    cur = conn.cursor()
    configure(cur)
    return cur


@contextmanager
def transaction(conn: Connection, *, snapshot: bool = False) -> Iterator[Connection]:
    """Run a block in one transaction: commit at the end, roll back on error.

    Args:
        conn: The connection (or cursor) to use; it must not be in a transaction.
        snapshot: A read-only block whose statements all see one snapshot
            (PostgreSQL's ``REPEATABLE READ READ ONLY``; a DuckDB transaction
            always reads one snapshot).

    Yields:
        The same connection.
    """
    conn.execute(
        "BEGIN TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"
        if snapshot and is_postgres(conn)
        else "BEGIN TRANSACTION"
    )
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def is_conflict(exc: BaseException) -> bool:
    """Whether an error is the store refusing a concurrent write (worth retrying).

    DuckDB's concurrency is optimistic: a second transaction that writes a row
    another open transaction wrote is refused ("Conflict on update"); a commit
    that would duplicate a key another transaction committed fails too.
    PostgreSQL refuses a serialization failure or breaks a deadlock; a unique
    key another transaction committed is not retried (the caller reads the row).
    """
    if isinstance(
        exc, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected
    ):
        return True
    return isinstance(exc, duckdb.TransactionException) and (
        "conflict" in str(exc).lower()
    )


def run_in_transaction(
    conn: Connection,
    work: Callable[[Connection], T],
    *,
    attempts: int = DEFAULT_ATTEMPTS,
) -> T:
    """Run ``work(conn)`` in a transaction; retry it when DuckDB reports a conflict.

    ``work`` must be safe to run again (everything it wrote was rolled back).

    Args:
        conn: The connection, not in a transaction.
        work: The transaction's body.
        attempts: How many times to try.

    Returns:
        What ``work`` returned in the attempt that committed.
    """
    for attempt in range(1, attempts + 1):
        try:
            with transaction(conn):
                return work(conn)
        except (duckdb.TransactionException, psycopg.errors.OperationalError) as exc:
            if not is_conflict(exc) or attempt == attempts:
                raise
            # Back off a little, with jitter, so the contenders don't meet again.
            time.sleep(min(0.05, 0.001 * attempt) * (1 + random.random()))  # noqa: S311 - jitter, not crypto
    raise AssertionError("unreachable")  # pragma: no cover


def query_frame(
    conn: Connection, query: str, params: Sequence[object] | None = None
) -> pl.DataFrame:
    """Run a query and return its rows as a polars frame (through Arrow).

    Args:
        conn: The connection.
        query: One SQL statement.
        params: Values of its ``?`` placeholders.

    Returns:
        The rows; ``TIMESTAMPTZ`` columns are UTC datetimes.
    """
    if isinstance(conn, PgConnection):
        conn.execute(query, params)
        names = [d.name for d in conn.description or ()]
        rows = conn.fetchall()
        return pl.DataFrame(rows, schema=names, orient="row", infer_schema_length=None)
    relation = conn.sql(query, params=list(params) if params is not None else None)
    frame = pl.from_arrow(relation.to_arrow_table())
    assert isinstance(frame, pl.DataFrame)  # noqa: S101 - from_arrow of a Table
    return frame


# PostgreSQL type OIDs (pg_type.oid) that :func:`bulk_frame` reads through
# ``COPY``: how each is spelled in the CSV and read back. The text of a
# timestamptz or a date depends on the session's DateStyle, so both travel as
# integers (microseconds and days since 1970), which are exact.
_COPY_INT: Final = frozenset({20, 21, 23})  # int8, int2, int4
_COPY_FLOAT: Final = frozenset({700, 701})  # float4, float8
_COPY_TEXT: Final = frozenset({25, 1043})  # text, varchar
_COPY_BOOL: Final = 16
_COPY_DATE: Final = 1082
_COPY_TIMESTAMPTZ: Final = 1184


def bulk_frame(conn: Connection, query: str) -> pl.DataFrame:
    """:func:`query_frame` for reads of many rows without placeholders.

    The same frame as :func:`query_frame`, but PostgreSQL sends the rows as one
    ``COPY`` of CSV that polars parses, instead of one Python tuple per row (2,000
    ``metrics_latest`` rows: ~3 ms of CPU instead of ~18 ms, most of it holding
    the GIL, which an API process's requests wait for; docs/benchmarks.md). A
    result with a column of another type (``NUMERIC``, say) is read by
    :func:`query_frame`. Columns are typed by the database even when every value
    is NULL.

    Args:
        conn: The connection.
        query: One ``SELECT`` statement without placeholders.

    Returns:
        The rows; ``TIMESTAMPTZ`` columns are UTC datetimes.
    """
    if not isinstance(conn, PgConnection):
        return query_frame(conn, query)
    conn.execute(f"SELECT * FROM ({query}) AS q LIMIT 0")  # noqa: S608 - callers' constants
    columns = [(d.name, d.type_code) for d in conn.description or ()]
    selects: list[str] = []
    schema: dict[str, pl.DataType] = {}
    finish: list[pl.Expr] = []
    for name, oid in columns:
        ident = '"' + name.replace('"', '""') + '"'
        if oid in _COPY_INT:
            selects.append(ident)
            schema[name] = pl.Int64()
        elif oid in _COPY_FLOAT:
            selects.append(ident)
            schema[name] = pl.Float64()
        elif oid in _COPY_TEXT:
            selects.append(ident)
            schema[name] = pl.String()
        elif oid == _COPY_BOOL:
            selects.append(f"{ident}::int")
            schema[name] = pl.Int8()
            finish.append(pl.col(name).cast(pl.Boolean))
        elif oid == _COPY_DATE:
            selects.append(f"{ident} - DATE '1970-01-01'")
            schema[name] = pl.Int32()
            finish.append(pl.col(name).cast(pl.Date))
        elif oid == _COPY_TIMESTAMPTZ:
            # extract answers NUMERIC (exact) since PostgreSQL 14.
            selects.append(f"CAST(extract(epoch FROM {ident}) * 1000000 AS BIGINT)")
            schema[name] = pl.Int64()
            finish.append(
                pl.col(name).cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
            )
        else:
            return query_frame(conn, query)
    data = conn.copy_out_csv(
        f"SELECT {', '.join(selects)} FROM ({query}) AS q"  # noqa: S608 - as above
    )
    if not data:
        return pl.DataFrame(schema=schema).with_columns(finish)
    frame = pl.read_csv(
        data,
        has_header=False,
        schema=schema,
    )
    return frame.with_columns(finish)


_PG_TYPES: Final = {
    pl.Int8: "SMALLINT",
    pl.Int16: "SMALLINT",
    pl.Int32: "INTEGER",
    pl.Int64: "BIGINT",
    pl.UInt8: "SMALLINT",
    pl.UInt16: "INTEGER",
    pl.UInt32: "BIGINT",
    pl.UInt64: "NUMERIC(20)",
    pl.Float32: "REAL",
    pl.Float64: "DOUBLE PRECISION",
    pl.Boolean: "BOOLEAN",
    pl.String: "TEXT",
    pl.Date: "DATE",
}


def _pg_type(dtype: pl.DataType) -> str:
    if isinstance(dtype, pl.Datetime):
        return "TIMESTAMPTZ" if dtype.time_zone else "TIMESTAMP"
    if isinstance(dtype, pl.Decimal):
        return "NUMERIC"
    name = _PG_TYPES.get(dtype.base_type())
    if name is None:
        raise StoreError(f"no PostgreSQL type for a column of {dtype}")
    return str(name)


@contextmanager
def frame_table(conn: Connection, name: str, frame: pl.DataFrame) -> Iterator[str]:
    """Make a polars frame queryable as the table ``name`` for a block.

    DuckDB scans the frame's Arrow data in place (``register``). PostgreSQL gets
    a temporary table of the session, created once, loaded with ``COPY`` (CSV:
    the fastest of the ways measured in ``docs/store.md``) and emptied when the
    transaction ends (``ON COMMIT DELETE ROWS``, cheaper than a ``TRUNCATE``).
    Use it inside the caller's transaction.

    Args:
        conn: The connection.
        name: The table's name (this package's constants, never input).
        frame: The rows.

    Yields:
        ``name``.
    """
    if not isinstance(conn, PgConnection):
        conn.register(name, frame.to_arrow())
        try:
            yield name
        finally:
            conn.unregister(name)
        return
    if not conn.in_transaction:
        raise StoreError(f"frame_table({name}) needs a transaction")
    columns = ", ".join(f"{col} {_pg_type(dt)}" for col, dt in frame.schema.items())
    conn.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {name} ({columns}) ON COMMIT DELETE ROWS"
    )
    conn.copy_text(name, frame.columns, frame.write_csv(include_header=False).encode())
    yield name
