"""Export the engine's outputs to Parquet, partitioned by day (hive style).

``OUT/metric_history/day=2026-01-05/part-0.parquet``, likewise ``breaches`` (by the
UTC day of ``ts``) and ``prop_daily_snapshots`` (by ``day``). Every table is read in
one transaction, so the export is one consistent snapshot. Each day's files are
written aside and renamed over the old ones one file at a time (one file per day),
so a reader sees a day's old file or its new one, never a missing or half-written
day. Files are created ``0600`` and directories ``0700``.

:func:`write_days` is the one place that writes day partitions: the full export and
the risk team's mirror (:mod:`prop_stream.store.mirror`, which rewrites only the
days that changed) both go through it.

While the service runs it holds the file, and the export goes through it
(:func:`prop_stream.store.access.export_database`). From PostgreSQL the rows are
read in one transaction and written by an in-memory DuckDB (the same ``COPY ...
PARTITION_BY``), so both backends write the same files.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Final

import duckdb

from prop_stream.store.db import Connection, is_postgres, query_frame, transaction

#: Table name to the query exported; each has a ``day`` column to partition by.
EXPORT_QUERIES: Final = {
    "metric_history": "SELECT * FROM metric_history",
    "breaches": "SELECT *, CAST(ts AS DATE) AS day FROM breaches",
    "prop_daily_snapshots": "SELECT * FROM prop_daily_snapshots",
}

#: Modes of what an export creates: its data is the firm's risk data.
FILE_MODE: Final = 0o600
DIR_MODE: Final = 0o700


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
    make_dir(out)
    rows: dict[str, int] = {}
    with transaction(conn):
        for table in EXPORT_QUERIES:
            rows[table] = sum(write_days(conn, table, out).values())
    return ExportResult(out, rows)


def write_days(
    conn: Connection,
    table: str,
    out_dir: Path,
    days: Collection[date] | None = None,
) -> dict[date, int]:
    """Write a table's day partitions under ``out_dir/table/day=YYYY-MM-DD/``.

    One ``COPY`` writes the partitions aside (under ``out_dir/.staging-*``); then
    each day's file is renamed over the old one, and whatever else was in that
    day's directory is removed. A day asked for that has no rows any more is
    removed whole. Days not asked for are left alone.

    Args:
        conn: A store connection; run it inside the caller's transaction to read
            several tables from one snapshot.
        table: A key of :data:`EXPORT_QUERIES`.
        out_dir: The export's root directory (absolute, existing).
        days: Only these days (None: every day of the table).

    Returns:
        Rows written per day; a day asked for without rows maps to 0.
    """
    query = EXPORT_QUERIES[table]
    final = out_dir / table
    make_dir(final)
    if days is not None:
        if not days:
            return {}
        # date objects only, so their ISO form is a safe literal; a literal list
        # lets DuckDB skip the row groups of other days.
        listed = ", ".join(f"DATE '{day.isoformat()}'" for day in sorted(days))
        query = f"SELECT * FROM ({query}) AS t WHERE day IN ({listed})"  # noqa: S608
    staging = out_dir / f".staging-{uuid.uuid4().hex}"
    written: dict[date, int] = dict.fromkeys(days or (), 0)
    writer: Connection = conn
    if is_postgres(conn):
        # PostgreSQL reads (in the caller's snapshot); DuckDB writes the Parquet.
        rows = query_frame(conn, query)
        writer = duckdb.connect()
        writer.execute("SET TimeZone = 'UTC'")
        writer.register("_export_rows", rows.to_arrow())
        query = "SELECT * FROM _export_rows"
    try:
        make_dir(staging)
        target = staging / table
        result = writer.execute(
            f"COPY ({query}) TO {sql_literal(target)} "
            "(FORMAT parquet, PARTITION_BY (day), "
            "FILENAME_PATTERN 'part-{i}', RETURN_STATS true)"
        )
        column = {d[0]: i for i, d in enumerate(result.description or ())}
        staged: dict[date, list[Path]] = {}
        for row in result.fetchall():
            # One row per file written; its partition's day as ISO text.
            path = Path(str(row[column["filename"]]))
            count = int(row[column["count"]])
            day = date.fromisoformat(str(row[column["partition_keys"]]["day"]))
            staged.setdefault(day, []).append(path)
            written[day] = written.get(day, 0) + count
        for day, paths in staged.items():
            _swap_day(paths, final / partition_name(day))
        for day, count in written.items():
            if count == 0 and day not in staged:
                remove_day(final, day)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if writer is not conn:
            writer.close()
    return written


def partition_name(day: date) -> str:
    """The directory name of a day's partition: ``day=2026-01-05``."""
    return f"day={day.isoformat()}"


def remove_day(table_dir: Path, day: date) -> None:
    """Remove a day's partition directory, if it is there."""
    shutil.rmtree(table_dir / partition_name(day), ignore_errors=True)


def make_dir(path: Path) -> None:
    """Create a directory (and its parents) private to the owner, if missing."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        path.chmod(DIR_MODE)  # mkdir's mode is masked by the umask


def sql_literal(path: Path) -> str:
    """A path as a quoted SQL string literal (``'...'``, quotes doubled)."""
    return "'" + str(path).replace("'", "''") + "'"


def _swap_day(staged: list[Path], final: Path) -> None:
    make_dir(final)
    names = set()
    for path in staged:
        path.chmod(FILE_MODE)
        # rename(2) replaces a file atomically: a reader opens the old or the new.
        os.replace(path, final / path.name)
        names.add(path.name)
    for old in final.iterdir():
        if old.name not in names:
            old.unlink(missing_ok=True)
