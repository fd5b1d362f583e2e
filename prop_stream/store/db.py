"""Open the service's DuckDB file and run transactions on it.

DuckDB lets one process open a file for writing, and while it does no other
process can open it at all (not even read-only). The service owns the file; within
the service, threads share one database instance through cursors
(:func:`cursor`), each of which is its own connection. See ``docs/store.md``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import duckdb
import polars as pl

from prop_stream.store.exceptions import DatabaseLockedError

Connection = duckdb.DuckDBPyConnection


def connect(path: str | Path, *, read_only: bool = False) -> Connection:
    """Open a DuckDB file with the session settings the store relies on.

    Timestamps are read and written in UTC whatever the machine's zone.

    Args:
        path: The database file (``:memory:`` for a throwaway database).
        read_only: Open without the write lock (fails if a writer holds the file).

    Returns:
        A connection; close it when done.

    Raises:
        DatabaseLockedError: Another process has the file open for writing.
    """
    try:
        conn = duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise DatabaseLockedError(
                str(path), f"{path} is in use by another process: {exc}"
            ) from exc
        raise
    configure(conn)
    return conn


def configure(conn: Connection) -> None:
    """Apply the store's session settings to a connection or cursor."""
    conn.execute("SET TimeZone = 'UTC'")


def cursor(conn: Connection) -> Connection:
    """A new connection to the same database, for another thread.

    Args:
        conn: A connection from :func:`connect`.

    Returns:
        A cursor with the store's session settings.
    """
    cur = conn.cursor()
    configure(cur)
    return cur


@contextmanager
def transaction(conn: Connection) -> Iterator[Connection]:
    """Run a block in one transaction: commit at the end, roll back on error.

    Args:
        conn: The connection (or cursor) to use; it must not be in a transaction.

    Yields:
        The same connection.
    """
    conn.execute("BEGIN TRANSACTION")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


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
    relation = conn.sql(query, params=list(params) if params is not None else None)
    frame = pl.from_arrow(relation.to_arrow_table())
    assert isinstance(frame, pl.DataFrame)  # noqa: S101 - from_arrow of a Table
    return frame
