"""Create or migrate a database: the ``prop-stream init`` command's work."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from prop_stream.dburl import is_url, redact
from prop_stream.store.db import Connection, connect, transaction
from prop_stream.store.demo import seed_demo
from prop_stream.store.exceptions import StoreError
from prop_stream.store.migrations import current_version, migrate, schema_lock
from prop_stream.store.pg import PgConnection
from prop_stream.store.roles import grant_risk_role


@dataclass(frozen=True, slots=True)
class InitResult:
    """What :func:`init_database` did.

    Attributes:
        path: The database file, or the PostgreSQL URL.
        applied: Migrations applied now (empty when it was up to date).
        version: The schema version after the call.
        seeded: Whether demo data was added now.
        risk_role: PostgreSQL: the read-only role granted the ``risk_*`` views.
    """

    path: Path | str
    applied: tuple[int, ...]
    version: int
    seeded: bool
    risk_role: str | None = None


def init_database(
    path: str | Path,
    *,
    demo: bool = False,
    now: datetime | None = None,
    create: bool = True,
) -> InitResult:
    """Create or migrate a database, and optionally add the demo data.

    Running it again is a no-op: migrations already applied are skipped, and the
    demo data is added only once. On PostgreSQL the database must exist (it is
    migrated), and the risk team's read-only role is granted the ``risk_*`` views
    (:mod:`prop_stream.store.roles`).

    Args:
        path: The DuckDB file (with ``create``, made with its parent directory,
            mode 0700, if missing), or a ``postgresql://`` URL.
        demo: Add the demo reference data (:mod:`prop_stream.store.demo`).
        now: When demo challenges start (default: now).
        create: Make a missing database. ``serve`` passes False: a database
            that does not exist, is not a DuckDB file or was never initialised
            is refused (a typo in ``--db`` must not serve an empty database).

    Returns:
        What was done.

    Raises:
        DatabaseLockedError: A running service holds the file.
        StoreError: ``create`` is False and the file is not an initialised
            database; or the file can't be opened.
    """
    if is_url(path):
        assert isinstance(path, str)  # noqa: S101 - is_url checked it
        target: Path | str = path
        name = redact(path)
    else:
        path = Path(path)
        target = name = str(path)
        if create:
            if path.exists() and not path.is_file():
                raise StoreError(f"{path} is not a file")
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        else:
            _require_file(path)
        target = path
    conn = connect(target)
    try:
        if not create and current_version(conn) == 0:
            raise StoreError(
                f"{name} is not a prop-stream database (never initialised: "
                f"run prop-stream init --db {name})"
            )
        with schema_lock(conn):  # the grants and the demo data too
            applied = migrate(conn)
            seeded = False
            if demo:
                with transaction(conn):
                    seeded = seed_demo(conn, now=now)
            version = current_version(conn)
            role = _risk_role(conn) if create else None
    finally:
        conn.close()
    return InitResult(target, tuple(applied), version, seeded, role)


def _risk_role(conn: Connection) -> str | None:
    if not isinstance(conn, PgConnection):
        return None
    return grant_risk_role(conn)


def _require_file(path: Path) -> None:
    if not path.exists():
        raise StoreError(
            f"database not found: {path} (create it with prop-stream init --db {path})"
        )
    if not path.is_file():
        raise StoreError(f"{path} is not a database file")
