"""Customer sessions: random bearer tokens stored only as their SHA-256 hash."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta
from typing import Final

from prop_stream.store.catalog import customer_id_by_email
from prop_stream.store.db import Connection

#: How long a new session lasts unless told otherwise.
DEFAULT_SESSION_TTL: Final = timedelta(days=7)
#: Random bytes in a token (256 bits; the API requires at least 128).
TOKEN_BYTES: Final = 32


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, the only form the database keeps.

    Args:
        token: The bearer token.

    Returns:
        64 hex digits.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_session(
    conn: Connection,
    *,
    email: str,
    ttl: timedelta = DEFAULT_SESSION_TTL,
    now: datetime | None = None,
) -> str:
    """Issue a session token for a customer.

    Args:
        conn: The connection.
        email: The customer's e-mail address.
        ttl: How long the session lasts.
        now: The current time (tests pass one).

    Returns:
        The token (URL-safe base64); it is not stored, only its hash.

    Raises:
        NotFoundError: No customer has that address.
        ValueError: ``ttl`` is not positive.
    """
    if ttl <= timedelta(0):
        raise ValueError(f"ttl must be positive, got {ttl}")
    customer_id = customer_id_by_email(conn, email=email)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    created = now or datetime.now(UTC)
    conn.execute(
        "INSERT INTO sessions (token_hash, customer_id, created_at, expires_at) "
        "VALUES (?, ?, ?, ?)",
        [hash_token(token), customer_id, created, created + ttl],
    )
    return token


def session_customer(
    conn: Connection, *, token: str, now: datetime | None = None
) -> int | None:
    """The customer a token belongs to, if the session exists and hasn't expired.

    Args:
        conn: The connection.
        token: The bearer token.
        now: The current time (tests pass one).

    Returns:
        The customer's id, or None.
    """
    row = conn.execute(
        "SELECT customer_id FROM sessions WHERE token_hash = ? AND expires_at > ?",
        [hash_token(token), now or datetime.now(UTC)],
    ).fetchone()
    return None if row is None else int(row[0])
