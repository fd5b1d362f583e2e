"""Which faults of the service's components are transient (retried) and which are not.

:func:`transient_reason` is the :class:`~prop_stream.supervisor.Supervisor`'s
classifier. A fault is transient when the component can be expected to work again
without a code or configuration change once the world outside it recovers:

- the disk is full (or a write quota is exceeded) — DuckDB refuses the commit and
  rolls it back; the evaluator rebuilds from its checkpoint and replays;
- the database is locked or busy (another process, a write conflict);
- the Kafka broker is away, times out, or a topic is missing;
- a connection to the database or the broker was lost, or PostgreSQL ended a
  transaction that stalled (``idle_in_transaction_session_timeout``).

Everything else — a bug, a corrupt or invalidated database, a schema the code does
not know — is fatal: the process exits non-zero and its manager restarts it.
"""

from __future__ import annotations

import errno
from typing import Final

import duckdb
import psycopg
from kafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from prop_stream.kafka.exceptions import KafkaSourceError
from prop_stream.store.exceptions import DatabaseLockedError

_DISK_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
_NETWORK_ERRNOS: Final = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ETIMEDOUT,
        errno.EPIPE,
    }
)
_DISK_TEXT: Final = ("no space left on device", "disk quota exceeded", "disk is full")
#: DuckDB says this once a fatal error has made the instance unusable.
_INVALIDATED: Final = "database has been invalidated"


def transient_reason(exc: BaseException) -> str | None:
    """A short reason when ``exc`` is worth a retry, None when it is fatal.

    Args:
        exc: What a component raised (its causes are looked at too).

    Returns:
        ``"disk full: ..."``, ``"database locked: ..."``, ``"kafka: ..."``, ... or
        None.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        reason = _own_reason(current)
        if reason is not None:
            return reason
        current = current.__cause__ or current.__context__
    return None


def _own_reason(exc: BaseException) -> str | None:
    text = " ".join(str(exc).split())[:200]
    lowered = text.lower()
    if _INVALIDATED in lowered:
        return None
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return f"disk full: {text}"
    if any(marker in lowered for marker in _DISK_TEXT) and isinstance(
        exc, OSError | duckdb.Error
    ):
        return f"disk full: {text}"
    if isinstance(exc, DatabaseLockedError):
        return f"database locked: {text}"
    if isinstance(exc, duckdb.TransactionException) and "conflict" in lowered:
        return f"database busy: {text}"
    if isinstance(exc, duckdb.IOException) and "lock" in lowered:
        return f"database locked: {text}"
    # PostgreSQL: a lost or refused connection, a server shutting down, a full
    # disk or a concurrent writer are all worth a retry with a new session.
    if isinstance(exc, psycopg.errors.DiskFull):
        return f"disk full: {text}"
    if isinstance(
        exc, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected
    ):
        return f"database busy: {text}"
    if isinstance(exc, psycopg.errors.IdleInTransactionSessionTimeout):
        # The group loop's batch stalled (the process was stopped mid-batch):
        # the server freed its locks; a new loop on a new session carries on.
        return f"database ended a stalled transaction: {text}"
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return f"database unavailable: {text}"
    if isinstance(exc, KafkaConnectionError | KafkaTimeoutError):
        return f"kafka: {type(exc).__name__}: {text}"
    if isinstance(exc, KafkaError) and getattr(exc, "retriable", False):
        return f"kafka: {type(exc).__name__}: {text}"
    if isinstance(exc, KafkaSourceError) and "does not exist" in lowered:
        return f"topic: {text}"
    if isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS:
        return f"connection lost: {text}"
    return None
