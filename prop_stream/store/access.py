"""Operator commands on a database file, whether or not the service is running.

Each opens the file itself when it can, and otherwise hands the job to the running
service that holds it (:mod:`prop_stream.store.requests`).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from prop_stream.store.db import connect, transaction
from prop_stream.store.exceptions import DatabaseLockedError, StoreError
from prop_stream.store.export import ExportResult, export_parquet
from prop_stream.store.requests import DEFAULT_TIMEOUT_S, submit
from prop_stream.store.sessions import DEFAULT_SESSION_TTL, create_session


def export_database(
    db_path: str | Path,
    out_dir: str | Path,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ExportResult:
    """Export a database's metric history, breaches and daily snapshots to Parquet.

    Args:
        db_path: The DuckDB file.
        out_dir: The export's root directory.
        timeout_s: How long to wait for a running service to do it.

    Returns:
        What was exported.

    Raises:
        StoreError: The file does not exist, or the service holding it did not
            answer in time or failed.
    """
    db = _existing(db_path)
    try:
        conn = connect(db, read_only=True)
    except DatabaseLockedError:
        answer = submit(
            db, "export", {"out": str(Path(out_dir).resolve())}, timeout_s=timeout_s
        )
        rows = {str(k): int(v) for k, v in answer["rows"].items()}
        return ExportResult(Path(answer["out"]), rows, via_service=True)
    try:
        return export_parquet(conn, out_dir)
    finally:
        conn.close()


def issue_session(
    db_path: str | Path,
    email: str,
    *,
    ttl: timedelta = DEFAULT_SESSION_TTL,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> str:
    """Issue a session token for a customer of a database.

    Args:
        db_path: The DuckDB file.
        email: The customer's e-mail address.
        ttl: How long the session lasts.
        timeout_s: How long to wait for a running service to do it.

    Returns:
        The token.

    Raises:
        NotFoundError: No customer has that address (the database is free).
        StoreError: The file does not exist; or the service holding it did not
            answer in time or refused (e.g. no such customer).
    """
    db = _existing(db_path)
    try:
        conn = connect(db)
    except DatabaseLockedError:
        answer = submit(
            db,
            "session",
            {"email": email, "ttl_s": ttl.total_seconds()},
            timeout_s=timeout_s,
        )
        return str(answer["token"])
    try:
        with transaction(conn):
            return create_session(conn, email=email, ttl=ttl)
    finally:
        conn.close()


def _existing(db_path: str | Path) -> Path:
    db = Path(db_path)
    if not db.is_file():
        raise StoreError(f"database not found: {db} (create it with prop-stream init)")
    return db
