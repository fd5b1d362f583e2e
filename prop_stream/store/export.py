"""Export the engine's outputs to Parquet, partitioned by day (hive style).

``OUT/metric_history/day=2026-01-05/*.parquet``, likewise ``breaches`` (by the UTC
day of ``ts``) and ``prop_daily_snapshots`` (by ``day``). Every table is read in one
transaction, so the export is one consistent snapshot, and each day's directory is
written aside and then renamed into place, so a reader sees a day's old files or
its new ones.

While the service runs it holds the file, and the export goes through it
(:func:`prop_stream.store.access.export_database`).
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from prop_stream.store.db import Connection, transaction

#: Table name to the query exported; each has a ``day`` column to partition by.
EXPORT_QUERIES: Final = {
    "metric_history": "SELECT * FROM metric_history",
    "breaches": "SELECT *, CAST(ts AS DATE) AS day FROM breaches",
    "prop_daily_snapshots": "SELECT * FROM prop_daily_snapshots",
}


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What an export wrote.

    Attributes:
        out_dir: The export's root directory.
        rows: Table name to rows exported.
        via_service: Whether a running service did it.
    """

    out_dir: Path
    rows: dict[str, int]
    via_service: bool = False


def export_parquet(conn: Connection, out_dir: str | Path) -> ExportResult:
    """Export the tables of :data:`EXPORT_QUERIES` from an open connection.

    Args:
        conn: A store connection (read-only is enough), not in a transaction.
        out_dir: The root directory (created if missing).

    Returns:
        Rows per table.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".staging-{uuid.uuid4().hex}"
    rows: dict[str, int] = {}
    try:
        with transaction(conn):
            for table, query in EXPORT_QUERIES.items():
                count = conn.execute(
                    f"SELECT count(*) FROM ({query})"  # noqa: S608 - constant query
                ).fetchone()
                rows[table] = int(count[0]) if count else 0
                target = staging / table
                target.mkdir(parents=True)
                if rows[table]:
                    conn.execute(
                        f"COPY ({query}) TO '{_sql_path(target)}' "
                        "(FORMAT parquet, PARTITION_BY (day), "
                        "FILENAME_PATTERN 'part-{i}')"
                    )
        for table in EXPORT_QUERIES:
            _swap_partitions(staging / table, out / table)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out, rows)


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


def _swap_partitions(staged: Path, final: Path) -> None:
    final.mkdir(parents=True, exist_ok=True)
    for part in sorted(staged.iterdir()):
        target = final / part.name
        if target.exists():
            old = final / f".old-{uuid.uuid4().hex}"
            target.rename(old)
            part.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            part.rename(target)
