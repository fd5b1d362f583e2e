"""The tick archive: every tick the service judged, as day-partitioned Parquet.

``DB.archive/ticks/day=YYYY-MM-DD/part-<first>-<last>.parquet`` beside the
database (zstd, the backtest input format: ``account_id`` int64, ``ts`` timestamp
UTC µs, ``equity`` and ``balance`` float64), partitioned by the UTC day of
``ts``. ``prop-stream backtest --ticks DB.archive/ticks`` reads it as it is;
polars and DuckDB read it with a glob (``docs/store.md``, "The tick archive").

**Two steps, each safe to cut short.**

1. The evaluator's sink stages each batch's ticks in ``tick_archive_staging`` in
   the batch's own transaction, numbered by ``seq`` in commit order (a crash
   keeps the batch and its ticks, or neither; a replay stages only the ticks the
   store had not committed, see :meth:`TickSource.unseen
   <prop_stream.evaluator.sources.TickSource.unseen>`).
2. The :class:`TickArchiver` (a supervised component of ``serve``) moves the
   staged rows ``first..last`` (every row staged when it looks) to one file per
   day they touch, named ``part-<first>-<last>.parquet``: each file is written
   under a hidden temporary name and renamed into place, then the rows are
   deleted from staging in one transaction. A crash before the delete leaves
   the rows staged and some files written; the next run finds a file named for
   the same ``first`` and moves exactly that range again, skipping the days whose
   file is there. So each tick lands in exactly one file.

Retention: with ``retention_days`` > 0, the day folders older than that many days
before today (UTC) are removed after each run.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Final

import duckdb
import polars as pl

from prop_stream.store.db import Connection, query_frame, transaction
from prop_stream.store.exceptions import StoreError
from prop_stream.store.export import FILE_MODE, make_dir, partition_name

log = logging.getLogger(__name__)

#: The archive's table of ticks (a directory under the archive root).
TICKS_DIR: Final = "ticks"
#: Parquet compression of the archive's files.
COMPRESSION: Final = "zstd"
#: Digits of the sequence numbers in file names (so names sort in commit order).
_SEQ_DIGITS: Final = 20
_PART_RE: Final = re.compile(r"^part-(\d{20})-(\d{20})\.parquet$")
_DAY_RE: Final = re.compile(r"^day=(\d{4}-\d{2}-\d{2})$")


class ArchiveError(StoreError):
    """The service's database has no staging table (not migrated)."""


@dataclass(frozen=True, slots=True)
class ArchiveStats:
    """What one archiver run did.

    Attributes:
        first_seq: First staged row moved (None: nothing was staged).
        last_seq: Last staged row moved.
        rows: Rows moved out of staging.
        files_written: Parquet files written now.
        files_found: Files of the range a cut-short run had written already.
        days_removed: Day folders removed by retention.
        seconds: How long it took.
    """

    first_seq: int | None
    last_seq: int | None
    rows: int
    files_written: int
    files_found: int
    days_removed: int
    seconds: float


def archive_dir(db: str | Path) -> Path:
    """The archive's directory of a database file: ``DB.archive`` beside it.

    Args:
        db: The service's database file.

    Returns:
        The directory (absolute).
    """
    path = Path(db).resolve()
    return path.with_name(f"{path.name}.archive")


def part_name(first: int, last: int) -> str:
    """The file name of staged rows ``first..last`` within one day."""
    return f"part-{first:0{_SEQ_DIGITS}d}-{last:0{_SEQ_DIGITS}d}.parquet"


class TickArchiver:
    """Moves staged ticks from the store to ``DB.archive/ticks/``.

    Use it from one thread: :meth:`run` in a thread of the service, or
    :meth:`archive_once` directly.

    Args:
        conn: A cursor of the service's database, used only by the archiver.
        db: The service's database file (the archive goes to ``DB.archive/``).
        retention_days: Keep this many days before today (UTC); 0 keeps all.
        root: Another directory for the archive (tests).
        today: The UTC day now (tests set it).
        after_write: Called after the files of a run are in place and before
            the rows leave staging (tests cut a run short there).
    """

    def __init__(
        self,
        conn: Connection,
        db: str | Path,
        *,
        retention_days: int = 0,
        root: Path | None = None,
        today: Callable[[], date] | None = None,
        after_write: Callable[[], object] | None = None,
    ) -> None:
        if retention_days < 0:
            raise ValueError(f"retention_days must be 0 or more, got {retention_days}")
        self._conn = conn
        self._root = (root or archive_dir(db)).resolve()
        self._retention = retention_days
        self._today = today or (lambda: datetime.now(UTC).date())
        self._after_write = after_write
        self._last: ArchiveStats | None = None

    @property
    def root(self) -> Path:
        """The archive's directory."""
        return self._root

    @property
    def ticks_dir(self) -> Path:
        """``ROOT/ticks``: what ``prop-stream backtest --ticks`` reads."""
        return self._root / TICKS_DIR

    @property
    def last(self) -> ArchiveStats | None:
        """The last run that finished (None before the first)."""
        return self._last

    def run(self, stop: threading.Event, interval_s: float = 60.0) -> None:
        """Archive now and then every ``interval_s`` seconds until ``stop`` is set.

        A run that fails (a full disk, say) raises to the caller; the next run
        redoes what was not finished. What a stop leaves staged stays in the
        database until the first run of the next start.

        Args:
            stop: Set it to end the loop (after the run under way).
            interval_s: Seconds between the end of a run and the next one.

        Raises:
            ValueError: ``interval_s`` is not positive.
        """
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        while True:
            stats = self.archive_once()
            if stats.rows or stats.days_removed:
                log.info(
                    "tick archive: %d ticks (seq %s..%s) in %d files, %d days "
                    "removed, %.3f s",
                    stats.rows,
                    stats.first_seq,
                    stats.last_seq,
                    stats.files_written,
                    stats.days_removed,
                    stats.seconds,
                )
            if stop.wait(interval_s):
                return

    def archive_once(self) -> ArchiveStats:
        """Move every staged tick to the archive, then apply retention.

        Returns:
            What it did.

        Raises:
            ArchiveError: The database is not migrated.
            duckdb.Error, OSError: Reading or writing failed (nothing is lost: the
                rows stay staged until their files are in place).
        """
        started = time.monotonic()
        ticks = self.ticks_dir
        make_dir(ticks)
        _remove_leftovers(ticks)
        first, last = self._range()
        rows = written = found = 0
        if first is not None and last is not None:
            rows, written, found = self._move(first, last)
        removed = self._apply_retention()
        self._last = ArchiveStats(
            first_seq=first,
            last_seq=last,
            rows=rows,
            files_written=written,
            files_found=found,
            days_removed=removed,
            seconds=time.monotonic() - started,
        )
        return self._last

    def _range(self) -> tuple[int | None, int | None]:
        """The staged rows to move: a cut-short run's range, else all of them."""
        try:
            rows = self._conn.execute(
                "SELECT min(seq), max(seq) FROM tick_archive_staging"
            ).fetchall()
        except duckdb.CatalogException as exc:
            raise ArchiveError(
                "the database has no tick_archive_staging table: "
                "run prop-stream init --db PATH"
            ) from exc
        if not rows or rows[0][0] is None:
            return None, None
        first, last = int(rows[0][0]), int(rows[0][1])
        # Rows are deleted a whole range at a time, so a file whose range starts
        # at the first staged row is from a run cut short before its delete:
        # redo that very range (later rows go to the next run).
        for path in self.ticks_dir.glob(f"day=*/part-{first:0{_SEQ_DIGITS}d}-*"):
            match = _PART_RE.match(path.name)
            if match:
                return first, int(match.group(2))
        return first, last

    def _move(self, first: int, last: int) -> tuple[int, int, int]:
        frame = query_frame(
            self._conn,
            "SELECT account_id, ts, equity, balance FROM tick_archive_staging "
            "WHERE seq BETWEEN ? AND ? ORDER BY seq",
            [first, last],
        )
        frame = frame.with_columns(
            pl.col("account_id").cast(pl.Int64),
            pl.col("ts").dt.convert_time_zone("UTC").dt.cast_time_unit("us"),
            pl.col("equity").cast(pl.Float64),
            pl.col("balance").cast(pl.Float64),
        )
        name = part_name(first, last)
        written = found = 0
        by_day = frame.with_columns(pl.col("ts").dt.date().alias("_day")).partition_by(
            "_day", as_dict=True, maintain_order=True, include_key=False
        )
        for (day,), part in by_day.items():
            if not isinstance(day, date):
                raise ArchiveError(f"a staged tick has no day: {day!r}")
            folder = self.ticks_dir / partition_name(day)
            final = folder / name
            if final.exists():
                found += 1  # written by a run cut short before its delete
                continue
            make_dir(folder)
            staged = folder / f".{name}.{uuid.uuid4().hex}.tmp"
            try:
                part.write_parquet(staged, compression=COMPRESSION, statistics=True)
                staged.chmod(FILE_MODE)
                with staged.open("rb") as handle:
                    os.fsync(handle.fileno())  # on disk before the rows go
                os.replace(staged, final)
            finally:
                staged.unlink(missing_ok=True)
            _fsync_dir(folder)  # the rename on disk before the rows go
            written += 1
        if self._after_write is not None:
            self._after_write()
        with transaction(self._conn):
            self._conn.execute(
                "DELETE FROM tick_archive_staging WHERE seq BETWEEN ? AND ?",
                [first, last],
            )
        return frame.height, written, found

    def _apply_retention(self) -> int:
        if not self._retention:
            return 0
        oldest = self._today() - timedelta(days=self._retention)
        removed = 0
        for folder in self.ticks_dir.glob("day=*"):
            match = _DAY_RE.match(folder.name)
            if match is None:
                continue
            if date.fromisoformat(match.group(1)) < oldest:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed


def staged_rows(conn: Connection) -> int:
    """Ticks staged and not archived yet (``/metrics``, tests)."""
    rows = conn.execute("SELECT count(*) FROM tick_archive_staging").fetchall()
    return int(rows[0][0])


def _remove_leftovers(ticks: Path) -> None:
    """Temporary files of runs that never finished."""
    for path in ticks.glob("day=*/.*.tmp"):
        path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "COMPRESSION",
    "TICKS_DIR",
    "ArchiveError",
    "ArchiveStats",
    "TickArchiver",
    "archive_dir",
    "part_name",
    "staged_rows",
]
