"""Create or migrate a database: the ``prop-stream init`` command's work."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from prop_stream.store.db import connect, transaction
from prop_stream.store.demo import seed_demo
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
    path: str | Path, *, demo: bool = False, now: datetime | None = None
) -> InitResult:
    """Create or migrate a database file, and optionally add the demo data.

    Running it again is a no-op: migrations already applied are skipped, and the
    demo data is added only once.

    Args:
        path: The DuckDB file (created with its parent directory if missing).
        demo: Add the demo reference data (:mod:`prop_stream.store.demo`).
        now: When demo challenges start (default: now).

    Returns:
        What was done.

    Raises:
        DatabaseLockedError: A running service holds the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path)
    try:
        applied = migrate(conn)
        seeded = False
        if demo:
            with transaction(conn):
                seeded = seed_demo(conn, now=now)
        version = current_version(conn)
    finally:
        conn.close()
    return InitResult(path, tuple(applied), version, seeded)
