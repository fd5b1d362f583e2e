"""Operator commands on a database, whether or not the service is running.

With a DuckDB file, each asks the running service that holds the file, through
its admin route (:mod:`prop_stream.admin`), when the file ``PATH.admin.json`` says
one runs, and otherwise opens the file itself. A PostgreSQL database is shared:
the command opens it directly, whatever runs.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from prop_stream.admin import DEFAULT_TIMEOUT_S, ServiceGoneError, call, read_endpoint
from prop_stream.dburl import is_url
from prop_stream.store.db import Connection, connect, transaction
from prop_stream.store.exceptions import DatabaseLockedError, StoreError
from prop_stream.store.export import ExportResult, export_parquet
from prop_stream.store.sessions import DEFAULT_SESSION_TTL, create_session


def export_database(
    db_path: str | Path,
    out_dir: str | Path,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ExportResult:
    """Export a database's metric history, breaches and daily snapshots to Parquet.

    Args:
        db_path: The DuckDB file or a ``postgresql://`` URL.
        out_dir: The export's root directory.
        timeout_s: How long to wait for a running service to do it.

    Returns:
        What was exported.

    Raises:
        StoreError: The file does not exist, or the service holding it did not
            answer in time or failed.
    """
    if is_url(db_path):
        conn = connect(db_path)
        try:
            return export_parquet(conn, out_dir)
        finally:
            conn.close()
    db = _existing(db_path)
    answer = _ask_service(
        db, "export", {"out": str(Path(out_dir).resolve())}, timeout_s
    )
    if answer is not None:
        rows = {str(k): int(v) for k, v in answer["rows"].items()}
        return ExportResult(Path(answer["out"]), rows, via_service=True)
    conn = _open(db, read_only=True)
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
        db_path: The DuckDB file or a ``postgresql://`` URL.
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
    if is_url(db_path):
        conn = connect(db_path)
        try:
            with transaction(conn):
                return create_session(conn, email=email, ttl=ttl)
        finally:
            conn.close()
    db = _existing(db_path)
    answer = _ask_service(
        db, "session", {"email": email, "ttl_s": ttl.total_seconds()}, timeout_s
    )
    if answer is not None:
        return str(answer["token"])
    conn = _open(db, read_only=False)
    try:
        with transaction(conn):
            return create_session(conn, email=email, ttl=ttl)
    finally:
        conn.close()


def _ask_service(
    db: Path, action: str, payload: dict[str, object], timeout_s: float
) -> dict[str, Any] | None:
    """The running service's answer, or None when no service holds ``db``."""
    endpoint = read_endpoint(db)
    if endpoint is None:
        return None
    try:
        return call(endpoint, action, dict(payload), timeout_s=timeout_s)
    except ServiceGoneError:
        # A stale file of a service that died: the database is ours to open.
        return None


def _open(db: Path, *, read_only: bool) -> Connection:
    try:
        return connect(db, read_only=read_only)
    except DatabaseLockedError as exc:
        raise StoreError(
            f"{db} is held by another process that offers no admin route "
            "(no running prop-stream serve wrote "
            f"{db.name}.admin.json); stop it or ask its owner"
        ) from exc


def _existing(db_path: str | Path) -> Path:
    db = Path(db_path)
    if not db.is_file():
        raise StoreError(f"database not found: {db} (create it with prop-stream init)")
    return db
