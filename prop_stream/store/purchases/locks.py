"""Serializing purchases on one payer account: where the two backends differ.

Purchases (and retries, and cancels) on one payer account must run one after the
other, so each sees the fees the others reserved (pending withdrawals count
against the balance). DuckDB has one writing process, the service: the
in-process :func:`payer_lock` does it. On PostgreSQL many processes buy at once:
the transaction also locks the payer's row first (:func:`lock_payer`, ``SELECT ...
FOR UPDATE``). The purchase code branches on the backend here and nowhere else
(the worker's claim of a job is :func:`prop_stream.store.jobs.get_job`'s).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from prop_stream.store.db import Connection, is_postgres

_locks_guard = threading.Lock()
_payer_locks: dict[int, threading.Lock] = {}


@contextlib.contextmanager
def payer_lock(account_id: int) -> Iterator[None]:
    """Serialize purchases (and retries) on one payer account in this process.

    Hold it around the whole transaction, so the next purchase's snapshot sees
    the fee this one reserved.
    """
    with _locks_guard:
        lock = _payer_locks.setdefault(account_id, threading.Lock())
    with lock:
        yield


def lock_payer(conn: Connection, account_id: int) -> None:
    """Serialize purchases on one payer across processes (PostgreSQL only).

    Call first in the purchase's transaction: the row lock is held until it
    commits, so the next purchase on the payer waits and then sees the fee
    this one reserved. DuckDB has one writing process: :func:`payer_lock` does.
    """
    if is_postgres(conn):
        conn.execute(
            "SELECT 1 FROM trading_accounts WHERE account_id = ? FOR UPDATE",
            [account_id],
        )


__all__ = ["lock_payer", "payer_lock"]
