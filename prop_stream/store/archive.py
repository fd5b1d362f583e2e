"""The archive: every tick and deal the service judged, as day-partitioned Parquet.

``ROOT/ticks/day=YYYY-MM-DD/part-[<stream>-]<first>-<last>.parquet`` and
``ROOT/deals/day=.../...`` (zstd), in the backtest's input formats: ticks
``account_id`` int64, ``ts`` timestamp UTC µs, ``equity`` and ``balance``
float64; deals the deal columns of ``rules.md`` (``--deals``). Partitioned by
the UTC day of ``ts``. ``ROOT`` is ``DB.archive`` beside a DuckDB file, or the
directory ``archive_dir`` names (PostgreSQL: a directory every process of the
deployment shares, ``docs/scale-out.md``). ``prop-stream backtest --ticks
ROOT/ticks --deals ROOT/deals`` reads it as it is; polars and DuckDB read it
with a glob (``docs/store.md``, "The archive").

**Streams.** Each sink stages its rows in its own *stream*: '' for the single
evaluator, the partition key (``topic:N``) for a consumer-group member's
partition. A stream numbers its rows (``seq``) in its own ``archive_streams``
row, and its files carry its name (``:`` written ``_``; none for ''), so group
members never update one shared row and two evaluators never write one file.

**Two steps, each safe to cut short.**

1. The evaluator's sink stages each batch's ticks and deals in
   ``tick_archive_staging`` and ``deal_archive_staging`` in the batch's own
   transaction, numbered by ``seq`` in commit order per stream (a crash keeps
   the batch and its rows, or neither; a replay stages only the rows the store
   had not committed, see :meth:`TickSource.unseen
   <prop_stream.evaluator.sources.TickSource.unseen>`).
2. The :class:`TickArchiver` (a supervised component of ``serve``) moves, per
   table and stream, the staged rows ``first..last`` (every row staged when it
   looks) to one file per day they touch, named ``part-[<stream>-]<first>-<last>
   .parquet``: each file is written under a hidden temporary name and renamed
   into place, then the rows are deleted from staging in one transaction. A
   crash before the delete leaves the rows staged and some files written; the
   next run finds a file named for the same stream and ``first`` and moves
   exactly that range again, skipping the days whose file is there. So each
   row lands in exactly one file. On PostgreSQL, where several processes run an
   archiver, a stream is moved under a session advisory lock of its own; an
   archiver that can't take it leaves the stream to the one that holds it.

Retention: with ``retention_days`` > 0, the day folders (of both tables) older
than that many days before today (UTC) are removed after each run.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Final

import duckdb
import polars as pl

from prop_stream.rules import DEAL_COLUMNS
from prop_stream.store.db import Connection, is_postgres, query_frame, transaction
from prop_stream.store.exceptions import StoreError
from prop_stream.store.export import FILE_MODE, make_dir, partition_name

log = logging.getLogger(__name__)

#: The archive's table of ticks (a directory under the archive root).
TICKS_DIR: Final = "ticks"
#: The archive's table of deals (a directory under the archive root).
DEALS_DIR: Final = "deals"
#: The stream of the single (embedded) evaluator; its files carry no name.
DEFAULT_STREAM: Final = ""
#: Parquet compression of the archive's files.
COMPRESSION: Final = "zstd"
#: Digits of the sequence numbers in file names (so names sort in commit order).
_SEQ_DIGITS: Final = 20
_PART_RE: Final = re.compile(
    r"^part-(?:(?P<stream>[A-Za-z0-9._-]+_\d+)-)?(?P<first>\d{20})-(?P<last>\d{20})"
    r"\.parquet$"
)
#: A group member's stream: a Kafka partition key (topic names have no ``:``).
_STREAM_RE: Final = re.compile(r"^[A-Za-z0-9._-]+:\d+$")
_DAY_RE: Final = re.compile(r"^day=(\d{4}-\d{2}-\d{2})$")


class ArchiveError(StoreError):
    """The database has no staging tables (not migrated), or a bad stream name."""


@dataclass(frozen=True, slots=True)
class _Table:
    """One archived table: its directory, staging table and columns."""

    dir: str
    staging: str
    columns: tuple[str, ...]
    casts: tuple[pl.Expr, ...]


_TICKS: Final = _Table(
    TICKS_DIR,
    "tick_archive_staging",
    ("account_id", "ts", "equity", "balance"),
    (pl.col("equity").cast(pl.Float64), pl.col("balance").cast(pl.Float64)),
)
_DEALS: Final = _Table(
    DEALS_DIR,
    "deal_archive_staging",
    DEAL_COLUMNS,
    (
        pl.col("deal_id").cast(pl.Int64),
        pl.col("position_id").cast(pl.Int64),
        pl.col("volume").cast(pl.Float64),
        pl.col("price").cast(pl.Float64),
    ),
)


@dataclass(frozen=True, slots=True)
class ArchiveStats:
    """What one archiver run did.

    Attributes:
        first_seq: First staged tick moved of the first stream moved (None:
            no tick was staged); with one stream, the range of the run.
        last_seq: Last staged tick moved of that stream.
        rows: Ticks moved out of staging (every stream).
        files_written: Parquet files written now (ticks and deals).
        files_found: Files of a range a cut-short run had written already.
        days_removed: Day folders removed by retention (ticks and deals).
        seconds: How long it took.
        deal_rows: Deals moved out of staging (every stream).
        streams_skipped: Streams left to another process's archiver
            (PostgreSQL: it held the stream's lock).
    """

    first_seq: int | None
    last_seq: int | None
    rows: int
    files_written: int
    files_found: int
    days_removed: int
    seconds: float
    deal_rows: int = 0
    streams_skipped: int = 0


def archive_dir(db: str | Path) -> Path:
    """The archive's directory of a database file: ``DB.archive`` beside it.

    Args:
        db: The service's database file.

    Returns:
        The directory (absolute).
    """
    path = Path(db).resolve()
    return path.with_name(f"{path.name}.archive")


def archive_root(db: str | Path, archive_dir_setting: Path | None) -> Path | None:
    """Where a service's archive goes, if anywhere.

    Args:
        db: The service's database: a DuckDB file or a PostgreSQL URL.
        archive_dir_setting: The ``archive_dir`` setting (None: not set).

    Returns:
        ``archive_dir_setting`` when set; else ``DB.archive`` beside a DuckDB
        file; None for PostgreSQL without ``archive_dir`` (no archive).
    """
    if archive_dir_setting is not None:
        return Path(archive_dir_setting).resolve()
    if isinstance(db, str) and "://" in db:
        return None
    return archive_dir(db)


def stream_slug(stream: str) -> str:
    """A stream's part of file names: '' for the default, ``topic_N`` else.

    Args:
        stream: '' or a Kafka partition key ``topic:N``.

    Returns:
        The name part (injective: topic names have no ``:``, ``N`` is digits).

    Raises:
        ArchiveError: ``stream`` is neither.
    """
    if stream == DEFAULT_STREAM:
        return ""
    if not _STREAM_RE.match(stream):
        raise ArchiveError(f"archive stream {stream!r}: expected '' or TOPIC:N")
    return stream.replace(":", "_")


def part_name(first: int, last: int, stream: str = DEFAULT_STREAM) -> str:
    """The file name of a stream's staged rows ``first..last`` within one day."""
    slug = stream_slug(stream)
    prefix = f"part-{slug}-" if slug else "part-"
    return f"{prefix}{first:0{_SEQ_DIGITS}d}-{last:0{_SEQ_DIGITS}d}.parquet"


class TickArchiver:
    """Moves staged ticks and deals from the store to ``ROOT/ticks`` and ``ROOT/deals``.

    Use it from one thread: :meth:`run` in a thread of the service, or
    :meth:`archive_once` directly. Several archivers (processes) may share one
    PostgreSQL database and root: each stream is moved by one at a time.

    Args:
        conn: A cursor of the service's database, used only by the archiver.
        db: The service's database file (the archive goes to ``DB.archive/``);
            None with ``root`` (PostgreSQL).
        retention_days: Keep this many days before today (UTC); 0 keeps all.
        root: The archive's directory (``archive_dir``; default ``DB.archive``).
        today: The UTC day now (tests set it).
        after_write: Called after the files of a range are in place and before
            its rows leave staging (tests cut a run short there).

    Raises:
        ValueError: ``retention_days`` is negative, or there is no root: no
            ``root`` and ``db`` is None or a PostgreSQL URL.
    """

    def __init__(
        self,
        conn: Connection,
        db: str | Path | None,
        *,
        retention_days: int = 0,
        root: Path | None = None,
        today: Callable[[], date] | None = None,
        after_write: Callable[[], object] | None = None,
    ) -> None:
        if retention_days < 0:
            raise ValueError(f"retention_days must be 0 or more, got {retention_days}")
        where = root if root is not None else None
        if where is None and db is not None:
            where = archive_root(db, None)  # None for a PostgreSQL URL
        if where is None:
            raise ValueError(
                "the archive needs a database file or a root directory "
                "(archive_dir on PostgreSQL)"
            )
        self._conn = conn
        self._root = where.resolve()
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
    def deals_dir(self) -> Path:
        """``ROOT/deals``: what ``prop-stream backtest --deals`` reads."""
        return self._root / DEALS_DIR

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
            if stats.rows or stats.deal_rows or stats.days_removed:
                log.info(
                    "archive: %d ticks and %d deals in %d files, %d days "
                    "removed, %.3f s",
                    stats.rows,
                    stats.deal_rows,
                    stats.files_written,
                    stats.days_removed,
                    stats.seconds,
                )
            if stop.wait(interval_s):
                return

    def archive_once(self) -> ArchiveStats:
        """Move every staged tick and deal to the archive, then apply retention.

        Returns:
            What it did.

        Raises:
            ArchiveError: The database is not migrated.
            duckdb.Error, OSError: Reading or writing failed (nothing is lost: the
                rows stay staged until their files are in place).
        """
        started = time.monotonic()
        first: int | None = None
        last: int | None = None
        moved = {TICKS_DIR: 0, DEALS_DIR: 0}
        written = found = skipped = 0
        for table in (_TICKS, _DEALS):
            folder = self._root / table.dir
            make_dir(folder)
            _remove_leftovers(folder)
            for stream in self._streams(table):
                with self._stream_lock(table, stream) as held:
                    if not held:
                        skipped += 1
                        continue
                    lo, hi = self._range(table, stream)
                    if lo is None or hi is None:
                        continue
                    rows, w, f = self._move(table, stream, lo, hi)
                moved[table.dir] += rows
                written += w
                found += f
                if table is _TICKS and first is None:
                    first, last = lo, hi
        removed = self._apply_retention()
        self._last = ArchiveStats(
            first_seq=first,
            last_seq=last,
            rows=moved[TICKS_DIR],
            files_written=written,
            files_found=found,
            days_removed=removed,
            seconds=time.monotonic() - started,
            deal_rows=moved[DEALS_DIR],
            streams_skipped=skipped,
        )
        return self._last

    def _streams(self, table: _Table) -> list[str]:
        try:
            rows = self._conn.execute(
                # The table name is this module's constant, never input.
                f"SELECT DISTINCT stream FROM {table.staging}"  # noqa: S608
            ).fetchall()
        except duckdb.CatalogException as exc:
            raise ArchiveError(
                f"the database has no {table.staging} table: "
                "run prop-stream init --db PATH"
            ) from exc
        # '' (the single evaluator) first, then the partitions in name order.
        return sorted(str(row[0] or "") for row in rows)

    @contextmanager
    def _stream_lock(self, table: _Table, stream: str) -> Iterator[bool]:
        """Hold a stream's move lock (PostgreSQL; DuckDB has one process)."""
        if not is_postgres(self._conn):
            yield True
            return
        key = f"prop-stream archive {table.dir} {stream}"
        rows = self._conn.execute(
            "SELECT pg_try_advisory_lock(hashtext(?))", [key]
        ).fetchall()
        held = bool(rows and rows[0][0])
        try:
            yield held
        finally:
            if held:
                self._conn.execute("SELECT pg_advisory_unlock(hashtext(?))", [key])

    def _range(self, table: _Table, stream: str) -> tuple[int | None, int | None]:
        """A stream's staged rows to move: a cut-short run's range, else all."""
        rows = self._conn.execute(
            f"SELECT min(seq), max(seq) FROM {table.staging} "  # noqa: S608
            "WHERE coalesce(stream, '') = ?",
            [stream],
        ).fetchall()
        if not rows or rows[0][0] is None:
            return None, None
        first, last = int(rows[0][0]), int(rows[0][1])
        # Rows are deleted a whole range at a time, so a file of the stream whose
        # range starts at the first staged row is from a run cut short before
        # its delete: redo that very range (later rows go to the next run).
        slug = stream_slug(stream)
        prefix = f"part-{slug}-" if slug else "part-"
        for path in (self._root / table.dir).glob(
            f"day=*/{prefix}{first:0{_SEQ_DIGITS}d}-*"
        ):
            match = _PART_RE.match(path.name)
            if match and (match.group("stream") or "") == slug:
                return first, int(match.group("last"))
        return first, last

    def _move(
        self, table: _Table, stream: str, first: int, last: int
    ) -> tuple[int, int, int]:
        frame = query_frame(
            self._conn,
            f"SELECT {', '.join(table.columns)} FROM {table.staging} "  # noqa: S608
            "WHERE coalesce(stream, '') = ? AND seq BETWEEN ? AND ? ORDER BY seq",
            [stream, first, last],
        )
        frame = frame.with_columns(
            pl.col("account_id").cast(pl.Int64),
            pl.col("ts").dt.convert_time_zone("UTC").dt.cast_time_unit("us"),
            *table.casts,
        )
        name = part_name(first, last, stream)
        written = found = 0
        by_day = frame.with_columns(pl.col("ts").dt.date().alias("_day")).partition_by(
            "_day", as_dict=True, maintain_order=True, include_key=False
        )
        for (day,), part in by_day.items():
            if not isinstance(day, date):
                raise ArchiveError(f"a staged row has no day: {day!r}")
            folder = self._root / table.dir / partition_name(day)
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
                f"DELETE FROM {table.staging} "  # noqa: S608
                "WHERE coalesce(stream, '') = ? AND seq BETWEEN ? AND ?",
                [stream, first, last],
            )
        return frame.height, written, found

    def _apply_retention(self) -> int:
        if not self._retention:
            return 0
        oldest = self._today() - timedelta(days=self._retention)
        removed = 0
        for table in (_TICKS, _DEALS):
            for folder in (self._root / table.dir).glob("day=*"):
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


def staged_deals(conn: Connection) -> int:
    """Deals staged and not archived yet (``/metrics``, tests)."""
    rows = conn.execute("SELECT count(*) FROM deal_archive_staging").fetchall()
    return int(rows[0][0])


def _remove_leftovers(folder: Path) -> None:
    """Temporary files of runs that never finished."""
    for path in folder.glob("day=*/.*.tmp"):
        path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "COMPRESSION",
    "DEALS_DIR",
    "DEFAULT_STREAM",
    "TICKS_DIR",
    "ArchiveError",
    "ArchiveStats",
    "TickArchiver",
    "archive_dir",
    "archive_root",
    "part_name",
    "staged_deals",
    "staged_rows",
    "stream_slug",
]
