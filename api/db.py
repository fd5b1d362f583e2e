"""The API's handle on the store: a pool of cursors over one database.

DuckDB lets one process hold a database file, and a connection object must not be
used by two threads at once. The service owns one connection; every request that
reads the database borrows a cursor (a connection to the same database instance)
from this pool and gives it back, so requests in the thread pool never share one.
On PostgreSQL a request borrows a session from a bounded
:class:`~prop_stream.store.pg.SessionPool` (psycopg-pool) instead.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from contextlib import contextmanager

from prop_stream.store import Connection, cursor
from prop_stream.store.changes import ChallengeListener
from prop_stream.store.pg import PgConnection, SessionPool


class Database:
    """A pool of cursors of one store connection.

    Args:
        conn: The store connection (from :func:`prop_stream.store.connect`).
        owned: Close ``conn`` in :meth:`close` (the API opened it itself).
    """

    def __init__(self, conn: Connection, *, owned: bool = False) -> None:
        self._conn = conn
        self._owned = owned
        self._idle: queue.SimpleQueue[Connection] = queue.SimpleQueue()
        self._closed = False
        self._pool = SessionPool(conn.url) if isinstance(conn, PgConnection) else None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @contextmanager
    def cursor(self) -> Iterator[Connection]:
        """Borrow a cursor for one request.

        Yields:
            A cursor with the store's session settings (UTC); don't keep it.
        """
        if self._pool is not None:
            with self._pool.session() as session:
                yield session
            return
        try:
            cur = self._idle.get_nowait()
        except queue.Empty:
            cur = cursor(self._conn)
        try:
            yield cur
        except BaseException:
            # A cursor left in a failed transaction must not serve another request.
            cur.close()
            raise
        self._idle.put(cur)

    def challenge_listener(self) -> ChallengeListener:
        """A listener of the store's challenge changes (inert on DuckDB).

        Returns:
            A :class:`~prop_stream.store.changes.ChallengeListener`, not started.
        """
        return ChallengeListener.of(self._conn)

    def ping(self) -> bool:
        """Whether the database answers a trivial query.

        Returns:
            True when it does.
        """
        if self._closed:
            return False
        try:
            with self.cursor() as cur:
                cur.execute("SELECT 1").fetchone()
        except Exception:  # any failure means "not ready"
            return False
        return True

    def close(self) -> None:
        """Close the pooled cursors (and the connection when the API owns it)."""
        self._closed = True
        if self._pool is not None:
            self._pool.close()
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break
        if self._owned:
            self._conn.close()
