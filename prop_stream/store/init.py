"""Create or migrate a database: the ``prop-stream init`` command's work."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from prop_stream.store.db import connect, transaction
from prop_stream.store.demo import seed_demo
from prop_stream.store.exceptions import StoreError
from prop_stream.store.migrations import current_version, migrate


@dataclass(frozen=True, slots=True)
class InitResult:
    """What :func:`init_database` did.

    Attributes:
        path: The database file.
        applied: Migrations applied now (empty when it was up to date).
        version: The schema version after the call.
        seeded: Whether demo data was added now.
    """

    path: Path
    applied: tuple[int, ...]
    version: int
    seeded: bool


def init_database(
    path: str | Path,
    *,
    demo: bool = False,
    now: datetime | None = None,
    create: bool = True,
) -> InitResult:
    """Create or migrate a database file, and optionally add the demo data.

    Running it again is a no-op: migrations already applied are skipped, and the
    demo data is added only once.

    Args:
        path: The DuckDB file (with ``create``, made with its parent directory,
            mode 0700, if missing).
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
    path = Path(path)
    if create:
        if path.exists() and not path.is_file():
            raise StoreError(f"{path} is not a file")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    else:
        _require_file(path)
    conn = connect(path)
    try:
        if not create and current_version(conn) == 0:
            raise StoreError(
                f"{path} is not a prop-stream database (never initialised: "
                f"run prop-stream init --db {path})"
            )
        applied = migrate(conn)
        seeded = False
        if demo:
            with transaction(conn):
                seeded = seed_demo(conn, now=now)
        version = current_version(conn)
    finally:
        conn.close()
    return InitResult(path, tuple(applied), version, seeded)


def _require_file(path: Path) -> None:
    if not path.exists():
        raise StoreError(
            f"database not found: {path} (create it with prop-stream init --db {path})"
        )
    if not path.is_file():
        raise StoreError(f"{path} is not a database file")
