"""Customer sessions: bearer tokens checked against the store's ``sessions`` table.

A token is looked up by its SHA-256 (:func:`prop_stream.store.hash_token`); the
database keeps nothing else. :class:`SessionCache` keeps the answers in memory so a
request costs one hash and one dict lookup:

- a known session is trusted for ``ttl_s`` seconds, and never past its
  ``expires_at``: an expired session is refused at once, from memory;
- an unknown token is remembered as unknown for ``negative_ttl_s`` seconds, so a
  flood of bad tokens can't turn into a flood of queries;
- a session deleted from the database keeps working for at most ``ttl_s``
  seconds on a running server; call :meth:`SessionCache.invalidate` (or
  :meth:`SessionCache.clear`) where a session is revoked to end it at once.
  A session created after the server started is found by its first request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from prop_stream.store import Connection, hash_token

#: Scheme of the ``Authorization`` header.
BEARER: Final = "bearer"


@dataclass(frozen=True, slots=True)
class SessionEntry:
    """What the cache knows about one token hash.

    Attributes:
        customer_id: The session's customer, or None for an unknown token.
        valid_until: Epoch seconds until which this answer may be used.
    """

    customer_id: int | None
    valid_until: float


def lookup_session(conn: Connection, *, token_hash: str) -> tuple[int, float] | None:
    """Read a session by its token hash, expired or not.

    Args:
        conn: A store cursor.
        token_hash: :func:`prop_stream.store.hash_token` of the token.

    Returns:
        The customer id and the expiry as epoch seconds, or None if no such session.
    """
    # The timestamp itself (both backends return an aware datetime): DuckDB's
    # epoch_us() does not exist in PostgreSQL.
    row = conn.execute(
        "SELECT customer_id, expires_at FROM sessions WHERE token_hash = ?",
        [token_hash],
    ).fetchone()
    if row is None:
        return None
    return int(row[0]), float(row[1].timestamp())


class SessionCache:
    """Token hash to customer, with expiry; thread-safe.

    Args:
        ttl_s: How long a known session is trusted from memory.
        negative_ttl_s: How long an unknown token is remembered.
        max_size: Most entries; the oldest are dropped beyond it.
        clock: Epoch seconds now (tests pass their own).
    """

    def __init__(
        self,
        *,
        ttl_s: float = 60.0,
        negative_ttl_s: float = 5.0,
        max_size: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ttl = ttl_s
        self._negative_ttl = negative_ttl_s
        self._max_size = max_size
        self._clock = clock
        self._entries: dict[str, SessionEntry] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def customer(
        self, token: str, *, lookup: Callable[[str], tuple[int, float] | None]
    ) -> int | None:
        """The customer of a token, if its session exists and has not expired.

        Args:
            token: The bearer token.
            lookup: Reads a token hash from the database (see
                :func:`lookup_session`); called only when memory has no answer.

        Returns:
            The customer's id, or None (unknown or expired session).
        """
        token_hash = hash_token(token)
        now = self._clock()
        entry = self._entries.get(token_hash)
        if entry is None or entry.valid_until <= now:
            entry = self._load(token_hash, now, lookup)
            if entry.valid_until <= now:  # expired in the database already
                return None
        return entry.customer_id

    def cached_customer(self, token: str) -> int | None:
        """The customer of a token when memory alone can say so, else None.

        Never reads the database: None means "unknown, expired or not in memory";
        ask :meth:`customer` then.

        Args:
            token: The bearer token.

        Returns:
            The customer's id, or None.
        """
        entry = self._entries.get(hash_token(token))
        if entry is None or entry.valid_until <= self._clock():
            return None
        return entry.customer_id

    def _load(
        self,
        token_hash: str,
        now: float,
        lookup: Callable[[str], tuple[int, float] | None],
    ) -> SessionEntry:
        found = lookup(token_hash)
        if found is None:
            entry = SessionEntry(None, now + self._negative_ttl)
        else:
            customer_id, expires_at = found
            if expires_at <= now:
                # Expired: nothing to remember, refuse without caching.
                return SessionEntry(None, expires_at)
            entry = SessionEntry(customer_id, min(expires_at, now + self._ttl))
        with self._lock:
            if len(self._entries) >= self._max_size:
                # Dicts keep insertion order: drop the oldest tenth.
                for key in list(self._entries)[: max(1, self._max_size // 10)]:
                    del self._entries[key]
            self._entries[token_hash] = entry
        return entry

    def invalidate(self, token: str) -> None:
        """Forget a token (its session was revoked).

        Args:
            token: The bearer token.
        """
        with self._lock:
            self._entries.pop(hash_token(token), None)

    def clear(self) -> None:
        """Forget every token."""
        with self._lock:
            self._entries.clear()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header.

    Args:
        authorization: The header's value, if any.

    Returns:
        The token, or None when the header is missing or not a bearer token.
    """
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != BEARER or not token or " " in token:
        return None
    return token
