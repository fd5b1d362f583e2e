"""The PostgreSQL backend's connection: the store's DuckDB-shaped API over psycopg 3.

The store's SQL is written once, for both backends, in the shape DuckDB's Python
API gives it: ``conn.execute(sql, params).fetchone()``, positional parameters,
``BEGIN``/``COMMIT`` statements (:func:`prop_stream.store.db.transaction`). A
:class:`PgConnection` gives PostgreSQL the same shape, so a store function takes
either backend's connection; the few statements whose SQL differs branch on
:func:`prop_stream.store.db.is_postgres` in their resource's module.

What this adapter evens out, once:

- Parameters: ``?`` and ``$1`` placeholders are both accepted (``?`` outside
  quotes is numbered ``$1, $2, ...``); the statement is sent as written
  (psycopg's :class:`~psycopg.RawCursor`, server-side binding), so ``%`` needs no
  escaping.
- Row counts: DuckDB answers an ``INSERT``/``UPDATE``/``DELETE`` without
  ``RETURNING`` with one row holding the count; so does this adapter.
- ``JSON`` columns come back as their text, as DuckDB returns them (psycopg
  would parse them).
- Every session runs in UTC, autocommit on: transactions are the statements the
  store sends.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Final

import psycopg
from psycopg.types.string import TextLoader
from psycopg_pool import ConnectionPool

from prop_stream.dburl import is_url, redact

__all__ = [
    "DEFAULT_POOL_SIZE",
    "PgConnection",
    "SessionPool",
    "connect_url",
    "is_url",
    "numbered",
    "redact",
]

# A '?' placeholder outside string literals, quoted identifiers and comments.
_TOKENS: Final = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|\?")


@lru_cache(maxsize=4096)
def numbered(sql: str) -> str:
    """Number a statement's ``?`` placeholders ``$1, $2, ...`` (``$n`` pass as is).

    Args:
        sql: One statement with ``?`` or ``$n`` placeholders.

    Returns:
        The statement with ``$n`` placeholders only.
    """
    count = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal count
        if match.group(0) != "?":
            return match.group(0)
        count += 1
        return f"${count}"

    return _TOKENS.sub(replace, sql)


class PgConnection:
    """A PostgreSQL session with the DuckDB connection's calling conventions.

    Not thread-safe (neither is a DuckDB cursor): one per thread, made with
    :meth:`cursor`.

    Args:
        url: The ``postgresql://`` URL.
        raw: An open psycopg connection in autocommit mode.
    """

    dialect: Final = "postgres"

    def __init__(self, url: str, raw: psycopg.Connection[Any]) -> None:
        self.url = url
        self.raw = raw
        self._cur: psycopg.RawCursor[Any] = psycopg.RawCursor(raw)
        self._count: int | None = None

    # ------------------------------------------------------------ statements

    def execute(
        self, sql: str, parameters: Sequence[Any] | None = None
    ) -> PgConnection:
        """Run one statement; read its rows with :meth:`fetchone`/:meth:`fetchall`.

        Args:
            sql: The statement (``?`` or ``$n`` placeholders).
            parameters: The placeholders' values.

        Returns:
            This connection (as DuckDB's ``execute`` returns its connection).
        """
        self._cur.execute(numbered(sql), list(parameters) if parameters else None)
        self._count = None if self._cur.description is not None else self._cur.rowcount
        return self

    def fetchone(self) -> tuple[Any, ...] | None:
        """The next row of the last statement (its row count if it had none)."""
        if self._count is not None:
            count, self._count = self._count, None
            return (max(count, 0),)
        row = self._cur.fetchone()
        return None if row is None else tuple(row)

    def fetchall(self) -> list[tuple[Any, ...]]:
        """The remaining rows of the last statement (its row count if it had none)."""
        if self._count is not None:
            count, self._count = self._count, None
            return [(max(count, 0),)]
        return [tuple(r) for r in self._cur.fetchall()]

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open (``BEGIN`` sent, not yet ended)."""
        return self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    @property
    def description(self) -> Any:
        """The last statement's column descriptions (None without rows)."""
        return self._cur.description

    def copy_text(self, table: str, columns: Sequence[str], data: bytes) -> None:
        """Bulk-load CSV text (header-less, empty = NULL) into a table."""
        names = ", ".join(columns)
        with self._cur.copy(
            f"COPY {table} ({names}) FROM STDIN WITH (FORMAT csv)"
        ) as copy:
            copy.write(data)

    def copy_out_csv(self, query: str) -> bytes:
        """The rows of a query as header-less CSV (``COPY (query) TO STDOUT``).

        Args:
            query: One ``SELECT`` without placeholders.

        Returns:
            The CSV text (NULL as an empty unquoted field).
        """
        chunks: list[bytes] = []
        with self._cur.copy(f"COPY ({query}) TO STDOUT WITH (FORMAT csv)") as copy:
            chunks.extend(bytes(chunk) for chunk in copy)
        return b"".join(chunks)

    def notifications(self) -> list[str]:
        """The payloads of the notifications received so far, without waiting.

        The session must have run ``LISTEN`` (outside a transaction). One round
        trip (``SELECT 1``) comes first: reading without it would not notice a
        session the server ended, and the caller would wait for ever.

        Raises:
            psycopg.Error: The session was lost.
        """
        self.raw.execute("SELECT 1")
        return [n.payload for n in self.raw.notifies(timeout=0)]

    # ---------------------------------------------------------------- session

    def cursor(self) -> PgConnection:
        """A new session on the same database, for another thread."""
        return connect_url(self.url)

    def close(self) -> None:
        """Close the session (an open transaction is rolled back)."""
        self.raw.close()

    def __enter__(self) -> PgConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Session(psycopg.Connection[Any]):
    """A psycopg connection that a dropped :class:`PgConnection` closes quietly.

    DuckDB cursors end silently when they are garbage; psycopg warns about an
    open connection. The store (and its callers) drop cursors like DuckDB's.
    """

    def __del__(self, *args: Any) -> None:
        if not self.closed:
            self.close()


#: The session settings every store session gets.
_CONNECT_KWARGS: Final[dict[str, Any]] = {
    "autocommit": True,
    "connect_timeout": 10,
    "options": "-c TimeZone=UTC",
    "application_name": "prop-stream",
}


def _configure(raw: psycopg.Connection[Any]) -> None:
    # JSON columns come back as text, as DuckDB returns them.
    raw.adapters.register_loader("json", TextLoader)
    raw.adapters.register_loader("jsonb", TextLoader)


def connect_url(url: str) -> PgConnection:
    """Open a session on a PostgreSQL database.

    Args:
        url: A ``postgresql://`` URL.

    Returns:
        The session.

    Raises:
        psycopg.OperationalError: The server can't be reached or refuses.
    """
    raw = _Session.connect(url, **_CONNECT_KWARGS)
    _configure(raw)
    return PgConnection(url, raw)


#: Most sessions one :class:`SessionPool` opens (anyio's default thread limit:
#: every request thread of an API process can hold one).
DEFAULT_POOL_SIZE: Final = 40


class SessionPool:
    """A bounded pool of store sessions for request handlers (psycopg-pool).

    An API process borrows a session per request; the pool keeps them open,
    caps how many one process holds (``max_connections`` is the server's), checks
    a connection that came back broken and rolls back one returned mid-transaction.

    Args:
        url: The database.
        max_size: The most sessions open at once.
    """

    def __init__(self, url: str, *, max_size: int = DEFAULT_POOL_SIZE) -> None:
        self.url = url
        self._pool: ConnectionPool[_Session] = ConnectionPool(
            url,
            connection_class=_Session,
            kwargs=dict(_CONNECT_KWARGS),
            configure=_configure,
            min_size=1,
            max_size=max_size,
            name="prop-stream",
            open=True,
        )

    @contextmanager
    def session(self, *, timeout_s: float = 30.0) -> Iterator[PgConnection]:
        """Borrow a session for a block.

        Args:
            timeout_s: How long to wait for a free session.

        Yields:
            The session; it goes back to the pool after the block.
        """
        with self._pool.connection(timeout=timeout_s) as raw:
            yield PgConnection(self.url, raw)

    def close(self) -> None:
        """Close every session of the pool."""
        self._pool.close()
