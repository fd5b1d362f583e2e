"""The risk team's live copy of the store: ``DB.risk/risk.duckdb``.

DuckDB lets one process hold a file for writing, and then no other process can open
it, not even read-only. So while the service runs, :class:`RiskMirror` keeps a copy
beside the database that anyone may open at any time::

    prop.duckdb.risk/
        risk.duckdb                          views only (no data)
        metric_history/day=2026-01-05/part-0.parquet
        breaches/day=.../part-0.parquet      (UTC day of ts)
        prop_daily_snapshots/day=.../part-0.parquet
        challenges/data.parquet              (and the other CURRENT_TABLES)
        .mirror-state.json                   what the mirror wrote, for the next refresh

``risk.duckdb`` holds one view per mirrored table over its Parquet files, with the
service's column names and types, and the service's ``risk_*`` views defined over
those. A refresh writes new files under other names and renames them over the old
ones, so a reader never blocks a refresh and never sees half a file; a reader that
keeps ``risk.duckdb`` open sees new data with each query. ``risk.duckdb`` itself is
rebuilt (as a new file renamed over the old) only when the schema or the set of
empty history tables changes.

A refresh is incremental. The history tables are written day by day
(:func:`prop_stream.store.export.write_days`), and only the days that changed are
rewritten. What changed is found from ``metrics_latest``, which the sink updates in
the transaction of every batch that evaluated an account: the mirror's own copy of
it (``metrics_latest/data.parquet``, written last in each refresh) is the
watermark. An account whose latest row differs from the copy is *changed*; with
``old_ts``/``old_day`` from its copied row (null for a new account):

- ``metric_history``: its rows with ``ts >= old_ts``;
- ``breaches``: its rows with ``ts >= old_ts`` (new) or ``resolved_ts >= old_ts``
  (resolved since: a resolution happens at a later tick of the same account,
  ``docs/rules.md``);
- ``prop_daily_snapshots``: its rows with ``day >= old_day``.

The days of those rows are rewritten. A source that re-batches on replay may add
``metric_history`` samples between existing ones (``docs/store.md``), older than the
watermark: so each refresh also compares every history table's row count with the
rows the mirror holds (``count(*)`` is free in DuckDB), and on a difference counts
rows per day and rewrites the days that differ. The small current-state tables are
rewritten whole when their content hash changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Final

import duckdb
import polars as pl

from prop_stream.store.db import (
    Connection,
    frame_table,
    is_postgres,
    query_frame,
    transaction,
)
from prop_stream.store.exceptions import StoreError
from prop_stream.store.export import (
    EXPORT_QUERIES,
    FILE_MODE,
    make_dir,
    partition_name,
    sql_literal,
    write_days,
)

log = logging.getLogger("prop_stream.store.mirror")

#: The engine's history, mirrored day by day.
HISTORY_TABLES: Final = tuple(EXPORT_QUERIES)
#: Current-state tables, mirrored whole when they change. ``metrics_latest`` is the
#: watermark of the history tables, so it comes last: a refresh that fails before
#: it is redone from the old watermark.
CURRENT_TABLES: Final = (
    "challenges",
    "challenge_phases",
    "purchases",
    "programs",
    "program_phases",
    "challenge_statuses",
    "purchase_statuses",
    # Hedge flags (migration 5): the risk_flags* views read them.
    "flags",
    "metrics_latest",
)
#: The mirror's database, in the mirror's directory.
RISK_DB: Final = "risk.duckdb"
#: The DuckDB storage version ``risk.duckdb`` is written in: DuckDB 1.0 and later
#: read it (it holds views only, so it needs nothing newer).
RISK_DB_STORAGE_VERSION: Final = "v1.0.0"
#: The file of a current-state table, in its directory.
CURRENT_FILE: Final = "data.parquet"

_STATE_FILE: Final = ".mirror-state.json"
# Bump when the layout of the mirror's directory changes: the next refresh is full.
_FORMAT: Final = 1
_CHANGED_VIEW: Final = "_risk_mirror_changed"

#: Per history table, which rows of a changed account (``c``) may differ from the
#: mirror's; ``q`` is the table's export query.
_CHANGED_ROWS: Final = {
    "metric_history": "q.ts >= c.old_ts",
    "breaches": "q.ts >= c.old_ts OR q.resolved_ts >= c.old_ts",
    "prop_daily_snapshots": "q.day >= c.old_day",
}
#: A column that, when every changed account has a watermark, lets DuckDB skip the
#: row groups older than the oldest one (rows are stored roughly in time order).
_PRUNE: Final = {
    "metric_history": ("ts", "old_ts"),
    "prop_daily_snapshots": ("day", "old_day"),
}


class MirrorError(StoreError):
    """The service's database lacks what the mirror copies (not migrated)."""


@dataclass(frozen=True, slots=True)
class MirrorStats:
    """What one refresh did.

    Attributes:
        full: Every table was written (first refresh, or the schema changed).
        changed_accounts: Accounts whose latest metric moved since the last refresh.
        days_written: History table to the day partitions it rewrote (or removed).
        tables_written: Current-state tables rewritten.
        rows_written: Rows in the files written.
        files_written: Parquet files written, plus ``risk.duckdb`` if rebuilt.
        risk_db_rebuilt: ``risk.duckdb`` was (re)built.
        seconds: How long the refresh took.
        snapshot_at: When it read the database: the copy holds every commit
            before then (the copy's age is now minus this).
    """

    full: bool
    changed_accounts: int
    days_written: dict[str, int]
    tables_written: tuple[str, ...]
    rows_written: int
    files_written: int
    risk_db_rebuilt: bool
    seconds: float
    snapshot_at: datetime


def mirror_dir(db: str | Path) -> Path:
    """The mirror's directory of a database file: ``DB.risk`` beside it (absolute).

    Args:
        db: The service's database file.

    Returns:
        The directory.
    """
    path = Path(db).resolve()
    return path.with_name(f"{path.name}.risk")


@dataclass(frozen=True, slots=True)
class _Schema:
    """The columns of the mirrored tables and the ``risk_*`` views' SQL."""

    columns: dict[str, list[tuple[str, str]]]
    views: list[tuple[str, str]]
    #: When the database was created (its first migration): a copy made from
    #: another database at the same path (created again) must start over.
    created: str

    def fingerprint(self, root: Path) -> str:
        # The DuckDB version is in it because the watermark compares row hashes.
        text = json.dumps(
            [
                _FORMAT,
                duckdb.__version__,
                str(root),
                self.created,
                self.columns,
                self.views,
            ]
        )
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(slots=True)
class _State:
    """What the mirror's files hold, saved beside them between refreshes."""

    schema: str
    day_rows: dict[str, dict[date, int]] = field(default_factory=dict)
    current: dict[str, str] = field(default_factory=dict)
    layout: str = ""

    def rows(self, table: str) -> dict[date, int]:
        return self.day_rows.setdefault(table, {})

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": _FORMAT,
                "schema": self.schema,
                "layout": self.layout,
                "current": self.current,
                "day_rows": {
                    table: {day.isoformat(): n for day, n in sorted(days.items())}
                    for table, days in self.day_rows.items()
                },
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> _State | None:
        try:
            raw = json.loads(text)
            if raw.get("format") != _FORMAT:
                return None
            return cls(
                schema=str(raw["schema"]),
                layout=str(raw["layout"]),
                current={str(k): str(v) for k, v in raw["current"].items()},
                day_rows={
                    str(table): {
                        date.fromisoformat(day): int(n) for day, n in days.items()
                    }
                    for table, days in raw["day_rows"].items()
                },
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


class RiskMirror:
    """Keeps ``DB.risk/risk.duckdb`` and its Parquet files up to date.

    Use it from one thread: :meth:`run` in a thread of the service, or
    :meth:`refresh` directly.

    Args:
        conn: A cursor of the service's database, used only by the mirror.
        db: The service's database file (the mirror goes to ``DB.risk/``).
        root: Another directory for the mirror (tests).
    """

    def __init__(
        self, conn: Connection, db: str | Path, *, root: Path | None = None
    ) -> None:
        if is_postgres(conn):
            # The risk team reads PostgreSQL itself (role prop_stream_risk).
            raise StoreError(
                "the risk mirror file is DuckDB's: on PostgreSQL the risk team "
                "reads the risk_* views with the role prop_stream_risk"
            )
        self._conn = conn
        self._root = (root or mirror_dir(db)).resolve()
        self._state: _State | None = None
        self._last: MirrorStats | None = None

    @property
    def last(self) -> MirrorStats | None:
        """The last refresh that finished (None before the first)."""
        return self._last

    @property
    def root(self) -> Path:
        """The mirror's directory."""
        return self._root

    @property
    def risk_db(self) -> Path:
        """The database the risk team opens read-only."""
        return self._root / RISK_DB

    def run(self, stop: threading.Event, interval_s: float = 30.0) -> None:
        """Refresh now and then every ``interval_s`` seconds until ``stop`` is set.

        A refresh that fails (a full disk, say) raises to the caller: the next
        refresh, whenever the caller starts one, redoes what was not finished.

        Args:
            stop: Set it to end the loop (after the refresh under way).
            interval_s: Seconds between the end of a refresh and the next one.

        Raises:
            ValueError: ``interval_s`` is not positive.
        """
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        while not stop.is_set():
            stats = self.refresh()
            log.log(
                logging.INFO if stats.full else logging.DEBUG,
                "risk mirror refreshed in %.3f s: %d changed accounts, days %s, "
                "tables %s",
                stats.seconds,
                stats.changed_accounts,
                stats.days_written,
                stats.tables_written,
            )
            stop.wait(interval_s)

    def refresh(self, *, full: bool = False) -> MirrorStats:
        """Bring the mirror up to the service's last commit.

        Args:
            full: Rewrite every table and ``risk.duckdb`` whatever changed.

        Returns:
            What it did.

        Raises:
            MirrorError: The database is not migrated.
            duckdb.Error, OSError: Reading or writing failed (nothing is lost: the
                next refresh redoes it).
        """
        started = time.monotonic()
        # Taken before the snapshot, so it never flatters the copy's age.
        snapshot_at = datetime.now(UTC)
        try:
            self._last = self._refresh(
                full=full, started=started, snapshot_at=snapshot_at
            )
        except BaseException:
            # Forget what this refresh thought it wrote; the saved state and the
            # watermark file are from the last refresh that finished.
            self._state = None
            raise
        return self._last

    def _refresh(
        self, *, full: bool, started: float, snapshot_at: datetime
    ) -> MirrorStats:
        root = self._root
        make_dir(root)
        state = self._state
        if state is None:
            # A start, or the refresh before failed: clear what a crash left.
            _remove_leftovers(root)
            state = self._load_state()
        conn = self._conn
        days_written: dict[str, int] = {}
        tables_written: list[str] = []
        rows = files = changed = 0
        with transaction(conn):
            schema = _read_schema(conn)
            fingerprint = schema.fingerprint(root)
            if full or state is None or state.schema != fingerprint:
                full = True
                state = _State(schema=fingerprint)
            changes = None if full else self._changed_accounts()
            if changes is not None:
                changed = changes.height
            for table in HISTORY_TABLES:
                counts = self._write_history(table, state, changes)
                days_written[table] = len(counts)
                rows += sum(counts.values())
                files += sum(1 for n in counts.values() if n)
            for table in CURRENT_TABLES:
                written = self._write_current(table, state, full=full)
                if written is not None:
                    tables_written.append(table)
                    rows += written
                    files += 1
        empty = [t for t in HISTORY_TABLES if not any(state.rows(t).values())]
        layout = hashlib.sha256(f"{fingerprint} {empty}".encode()).hexdigest()
        rebuilt = False
        if full or layout != state.layout or not self.risk_db.is_file():
            self._build_risk_db(schema, set(empty))
            state.layout = layout
            rebuilt = True
            files += 1
        self._save_state(state)
        self._state = state
        return MirrorStats(
            full=full,
            changed_accounts=changed,
            days_written=days_written,
            tables_written=tuple(tables_written),
            rows_written=rows,
            files_written=files,
            risk_db_rebuilt=rebuilt,
            seconds=time.monotonic() - started,
            snapshot_at=snapshot_at,
        )

    # ------------------------------------------------------------ history tables

    def _changed_accounts(self) -> pl.DataFrame:
        """Accounts whose latest metric differs from the mirror's copy of it."""
        previous = self._root / "metrics_latest" / CURRENT_FILE
        if not previous.is_file():
            query = (
                "SELECT account_id, CAST(NULL AS TIMESTAMPTZ) AS old_ts, "
                "CAST(NULL AS DATE) AS old_day FROM metrics_latest"
            )
        else:
            query = (
                "SELECT l.account_id, p.ts AS old_ts, p.day AS old_day "  # noqa: S608 - our own path, quoted
                "FROM metrics_latest AS l "
                f"LEFT JOIN read_parquet({sql_literal(previous)}) AS p "
                "ON p.account_id = l.account_id "
                # The whole row: a second tick at the same ts changes it too.
                "WHERE p.account_id IS NULL OR hash(l) <> hash(p)"
            )
        return query_frame(self._conn, query)

    def _write_history(
        self, table: str, state: _State, changes: pl.DataFrame | None
    ) -> dict[date, int]:
        """Rewrite a history table's changed days (all days if ``changes`` is None)."""
        conn, root = self._conn, self._root
        known = state.rows(table)
        if changes is None:
            counts = write_days(conn, table, root)
            _remove_days_except(root / table, set(counts))
            known.clear()
            known.update({d: n for d, n in counts.items() if n})
            return counts
        counts = write_days(conn, table, root, self._changed_days(table, changes))
        _merge_counts(known, counts)
        # fetchall, not fetchone: a pending result would block the next register().
        total = conn.execute(f"SELECT count(*) FROM {table}").fetchall()  # noqa: S608 - constant name
        if int(total[0][0]) != sum(known.values()):
            # Rows the watermark can't see (samples added between older ones on a
            # replay): compare the rows per day and rewrite the days that differ.
            query = EXPORT_QUERIES[table]
            actual = {
                day: int(n)
                for day, n in conn.execute(
                    f"SELECT day, count(*) FROM ({query}) GROUP BY day"  # noqa: S608 - constant query
                ).fetchall()
            }
            stale = {
                day
                for day in actual.keys() | known.keys()
                if actual.get(day, 0) != known.get(day, 0)
            }
            log.info("risk mirror: %s differs on %d days; rewriting", table, len(stale))
            again = write_days(conn, table, root, stale)
            _merge_counts(known, again)
            counts.update(again)
        return counts

    def _changed_days(self, table: str, changes: pl.DataFrame) -> set[date]:
        if not changes.height:
            return set()
        query = (
            f"SELECT DISTINCT q.day FROM ({EXPORT_QUERIES[table]}) AS q "  # noqa: S608 - constant queries
            f"JOIN {_CHANGED_VIEW} AS c ON c.account_id = q.account_id "
            f"WHERE (c.old_ts IS NULL OR {_CHANGED_ROWS[table]})"
        )
        params: list[object] = []
        prune = _PRUNE.get(table)
        if prune is not None and changes[prune[1]].null_count() == 0:
            query += f" AND q.{prune[0]} >= ?"
            params.append(changes[prune[1]].min())
        conn = self._conn
        with frame_table(conn, _CHANGED_VIEW, changes):
            return {row[0] for row in conn.execute(query, params).fetchall()}

    # ---------------------------------------------------------- current tables

    def _write_current(self, table: str, state: _State, *, full: bool) -> int | None:
        """Rewrite a current-state table if it changed; its rows, or None."""
        conn = self._conn
        digest_row = conn.execute(
            f"SELECT count(*), bit_xor(hash({table})) FROM {table}"  # noqa: S608 - constant name
        ).fetchall()[0]
        digest = f"{digest_row[0]}:{digest_row[1]}"
        folder = self._root / table
        final = folder / CURRENT_FILE
        if not full and state.current.get(table) == digest and final.is_file():
            return None
        make_dir(folder)
        staged = folder / f".{CURRENT_FILE}.{uuid.uuid4().hex}.tmp"
        try:
            result = conn.execute(
                f"COPY (SELECT * FROM {table}) TO {sql_literal(staged)} "  # noqa: S608 - constant name
                "(FORMAT parquet, RETURN_STATS true)"
            ).fetchall()
            staged.chmod(FILE_MODE)
            os.replace(staged, final)
        finally:
            staged.unlink(missing_ok=True)
        state.current[table] = digest
        return sum(int(row[1]) for row in result)

    # ------------------------------------------------------------- risk.duckdb

    def _build_risk_db(self, schema: _Schema, empty: set[str]) -> None:
        """Write ``risk.duckdb`` aside and rename it over the old one.

        A reader holding the old file keeps it (DuckDB would refuse to open it for
        writing); the next time it opens the path it gets the new one.
        """
        staged = self._root / f".{RISK_DB}.{uuid.uuid4().hex}.tmp"
        try:
            con = duckdb.connect()
            try:
                # An old storage version, so that clients older than this DuckDB
                # (a DBeaver driver, last year's CLI) open it too.
                con.execute(
                    f"ATTACH {sql_literal(staged)} AS risk "
                    f"(STORAGE_VERSION '{RISK_DB_STORAGE_VERSION}')"
                )
                con.execute("USE risk")
                for table in (*HISTORY_TABLES, *CURRENT_TABLES):
                    con.execute(
                        self._table_view(table, schema.columns[table], table in empty)
                    )
                for _name, sql in schema.views:
                    con.execute(sql)
                con.execute("USE memory")
                con.execute("DETACH risk")
            finally:
                con.close()
            staged.chmod(FILE_MODE)
            os.replace(staged, self.risk_db)
        finally:
            staged.unlink(missing_ok=True)
            Path(f"{staged}.wal").unlink(missing_ok=True)

    def _table_view(
        self, table: str, columns: list[tuple[str, str]], empty: bool
    ) -> str:
        # Cast every column to the service's type, so the views have the same
        # columns whatever Parquet makes of a type.
        select = ", ".join(
            f"CAST({_ident(name)} AS {kind}) AS {_ident(name)}"
            for name, kind in columns
        )
        if table in HISTORY_TABLES:
            if empty:
                # read_parquet fails on a glob without files: an empty table.
                nulls = ", ".join(
                    f"CAST(NULL AS {kind}) AS {_ident(name)}" for name, kind in columns
                )
                return f"CREATE VIEW {_ident(table)} AS SELECT {nulls} WHERE false"
            files = sql_literal(self._root / table / "day=*" / "*.parquet")
            source = (
                f"read_parquet({files}, hive_partitioning = true, "
                "hive_types = {'day': 'DATE'})"
            )
        else:
            source = f"read_parquet({sql_literal(self._root / table / CURRENT_FILE)})"
        return f"CREATE VIEW {_ident(table)} AS SELECT {select} FROM {source}"  # noqa: S608 - catalog names, quoted

    # ------------------------------------------------------------------- state

    def _load_state(self) -> _State | None:
        path = self._root / _STATE_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        state = _State.from_json(text)
        if state is None:
            log.warning("risk mirror: %s is unreadable; refreshing in full", path)
        return state

    def _save_state(self, state: _State) -> None:
        path = self._root / _STATE_FILE
        staged = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            with os.fdopen(fd, "w") as out:
                out.write(state.to_json())
            os.replace(staged, path)
        finally:
            staged.unlink(missing_ok=True)


def _read_schema(conn: Connection) -> _Schema:
    tables = (*HISTORY_TABLES, *CURRENT_TABLES)
    marks = ", ".join("?" for _ in tables)
    columns: dict[str, list[tuple[str, str]]] = {}
    for table, name, kind in conn.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "  # noqa: S608 - placeholders only
        f"WHERE table_schema = 'main' AND table_name IN ({marks}) "
        "ORDER BY table_name, ordinal_position",
        list(tables),
    ).fetchall():
        columns.setdefault(str(table), []).append((str(name), str(kind)))
    missing = [t for t in tables if t not in columns]
    if missing:
        raise MirrorError(
            f"the database has no table {', '.join(missing)}: "
            "run prop-stream init --db PATH"
        )
    views = [
        (str(name), str(sql))
        for name, sql in conn.execute(
            "SELECT view_name, sql FROM duckdb_views() "
            "WHERE NOT internal AND schema_name = 'main' "
            "AND starts_with(view_name, 'risk_') ORDER BY view_name"
        ).fetchall()
    ]
    created = conn.execute(
        "SELECT CAST(min(applied_at) AS VARCHAR) FROM schema_migrations"
    ).fetchall()[0][0]
    return _Schema(columns=columns, views=views, created=str(created))


def _merge_counts(known: dict[date, int], counts: dict[date, int]) -> None:
    for day, n in counts.items():
        if n:
            known[day] = n
        else:
            known.pop(day, None)


def _remove_days_except(table_dir: Path, keep: set[date]) -> None:
    names = {partition_name(day) for day in keep}
    for part in table_dir.glob("day=*"):
        if part.name not in names:
            shutil.rmtree(part, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Staging directories and temporary files of refreshes that never finished."""
    for path in root.glob(".staging-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in (*root.glob(".*.tmp"), *root.glob("*/.*.tmp")):
        path.unlink(missing_ok=True)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


__all__ = [
    "CURRENT_TABLES",
    "HISTORY_TABLES",
    "RISK_DB",
    "MirrorError",
    "MirrorStats",
    "RiskMirror",
    "mirror_dir",
]
