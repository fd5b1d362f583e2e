"""The archive on PostgreSQL: one stream per partition, one mover per stream.

A consumer group's members stage their partitions' ticks and deals in streams of
their own (``archive_streams``, migration 8): a member's batch transaction takes
its numbers from its partition's row, so members never wait on one another's row
(the single ``tick_archive_state`` row used to serialise them). Several
archivers (one per ``jobs`` process) share the database and the archive
directory: each stream is moved by one at a time, into files named for it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from prop_stream.rules import DEAL_COLUMNS, TICK_SCHEMA, Evaluation, RuleEngine
from prop_stream.sinks import DuckDBSink
from prop_stream.sinks.exceptions import SinkError
from prop_stream.store import connect, cursor, init_database
from prop_stream.store.archive import (
    ArchiveError,
    TickArchiver,
    part_name,
    staged_deals,
    staged_rows,
    stream_slug,
)
from prop_stream.store.db import Connection

START = datetime(2026, 1, 5, 23, 0, tzinfo=UTC)  # an hour before a day ends
STREAMS = ("", "ticks:0", "ticks:1", "ticks:2")


def _no_outputs() -> Evaluation:
    return RuleEngine().process(pl.DataFrame(schema=TICK_SCHEMA))


def _ticks(stream: str, n: int, first_minute: int) -> pl.DataFrame:
    """``n`` ticks one minute apart (some after midnight: two day files)."""
    account = 1_000 + STREAMS.index(stream)
    return pl.DataFrame(
        {
            "account_id": [account] * n,
            "ts": [START + timedelta(minutes=first_minute + i) for i in range(n)],
            "equity": [float(first_minute + i) for i in range(n)],
            "balance": [1.0] * n,
        },
        schema=TICK_SCHEMA,
    )


def _deals(stream: str, n: int, first_minute: int) -> pl.DataFrame:
    account = 1_000 + STREAMS.index(stream)
    return pl.DataFrame(
        {
            "account_id": [account] * n,
            "ts": [START + timedelta(minutes=first_minute + i) for i in range(n)],
            "deal_id": [first_minute + i for i in range(n)],
            "position_id": [first_minute + i for i in range(n)],
            "symbol": ["EURUSD"] * n,
            "side": ["buy"] * n,
            "volume": [0.1] * n,
            "price": [1.1] * n,
            "entry": ["in"] * n,
            "before_tick": [0] * n,  # the loop's column: not archived
        },
        schema={
            "account_id": pl.Int64,
            "ts": pl.Datetime("us", "UTC"),
            "deal_id": pl.Int64,
            "position_id": pl.Int64,
            "symbol": pl.String,
            "side": pl.String,
            "volume": pl.Float64,
            "price": pl.Float64,
            "entry": pl.String,
            "before_tick": pl.Int64,
        },
    )


def _stage(conn: Connection, stream: str, minute: int, n: int = 40) -> DuckDBSink:
    # The connection itself, not a cursor: on PostgreSQL a cursor is a new
    # session, without the caller's lock_timeout.
    sink = DuckDBSink(conn, source="kafka")
    sink.add(
        _no_outputs(),
        position={stream or "ticks:9": minute + n},
        ticks=_ticks(stream, n, minute),
        deals=_deals(stream, n // 4, minute),
        stream=stream,
    )
    return sink


def test_members_stage_in_their_own_streams_without_waiting_on_each_other(
    pg_url: str,
) -> None:
    init_database(pg_url)
    first, second = connect(pg_url), connect(pg_url)
    try:
        second.execute("SET lock_timeout = '2s'")  # a wait fails, never hangs
        outcome: dict[str, object] = {}

        def while_first_is_open(stream: str) -> None:
            # Runs inside the first member's transaction, after its staging.
            try:
                _stage(second, stream, 100).flush()
                outcome[stream] = "committed"
            except SinkError as exc:
                outcome[stream] = exc

        # Another partition's stream: no shared row, so no wait.
        _stage(first, "ticks:0", 0).flush(also=lambda _: while_first_is_open("ticks:1"))
        assert outcome["ticks:1"] == "committed"
        # The same stream (two owners of one partition, one about to be fenced):
        # the row lock orders them, which is what makes the numbers unique.
        _stage(first, "ticks:0", 200).flush(
            also=lambda _: while_first_is_open("ticks:0")
        )
        assert isinstance(outcome["ticks:0"], SinkError)
        assert "lock" in str(outcome["ticks:0"])
        rows = first.execute(
            "SELECT stream, next_tick_seq, next_deal_seq FROM archive_streams "
            "ORDER BY stream"
        ).fetchall()
        assert rows == [("", 0, 0), ("ticks:0", 80, 20), ("ticks:1", 40, 10)]
        seqs = first.execute(
            "SELECT stream, min(seq), max(seq), count(*) FROM tick_archive_staging "
            "GROUP BY stream ORDER BY stream"
        ).fetchall()
        assert seqs == [("ticks:0", 0, 79, 80), ("ticks:1", 0, 39, 40)]
    finally:
        first.close()
        second.close()


def test_two_archivers_move_each_stream_once_into_files_named_for_it(
    pg_url: str, tmp_path: Path
) -> None:
    init_database(pg_url)
    conn, other = connect(pg_url), connect(pg_url)
    root = tmp_path / "shared-archive"
    try:
        expected_ticks, expected_deals = [], []
        for i, stream in enumerate(STREAMS):
            _stage(conn, stream, 10 * i).flush()
            expected_ticks.append(_ticks(stream, 40, 10 * i))
            expected_deals.append(_deals(stream, 10, 10 * i).select(DEAL_COLUMNS))
        seen: list[object] = []

        def meanwhile() -> None:
            # The other process's archiver runs while this one holds a stream.
            if not seen:
                seen.append(TickArchiver(cursor(other), None, root=root).archive_once())

        mine = TickArchiver(cursor(conn), None, root=root, after_write=meanwhile)
        first = mine.archive_once()
        theirs = seen[0]
        assert isinstance(theirs, type(first))
        assert theirs.streams_skipped == 1  # the stream this one was moving
        assert first.rows + theirs.rows == 4 * 40
        assert first.deal_rows + theirs.deal_rows == 4 * 10
        assert staged_rows(conn) == staged_deals(conn) == 0
    finally:
        conn.close()
        other.close()
    ticks = pl.read_parquet(root / "ticks" / "**" / "*.parquet")
    assert ticks.sort("account_id", "ts").equals(
        pl.concat(expected_ticks).sort("account_id", "ts")
    )
    deals = pl.read_parquet(root / "deals" / "**" / "*.parquet")
    assert deals.sort("account_id", "ts").equals(
        pl.concat(expected_deals).sort("account_id", "ts")
    )
    names = sorted(p.name for p in (root / "ticks").rglob("part-*.parquet"))
    # Each stream's rows are numbered from 0 and its files carry its name.
    for stream in STREAMS:
        assert part_name(0, 39, stream) in names
    assert "part-ticks_1-00000000000000000000-00000000000000000039.parquet" in names
    # A range over midnight: one file per day, under the range's one name.
    crossing = part_name(0, 39, "ticks:2")
    assert sorted(p.parent.name for p in (root / "ticks").rglob(crossing)) == [
        "day=2026-01-05",
        "day=2026-01-06",
    ]


def test_stream_names_are_partition_keys_or_empty() -> None:
    assert stream_slug("") == ""
    assert stream_slug("prop.equity-ticks:11") == "prop.equity-ticks_11"
    for bad in ("a/b:1", "ticks", "ticks:x", "../x:1"):
        with pytest.raises(ArchiveError, match="archive stream"):
            stream_slug(bad)


def test_an_archiver_needs_a_file_or_a_root(tmp_path: Path) -> None:
    db = tmp_path / "prop.duckdb"
    init_database(db)
    conn = connect(db)
    try:
        with pytest.raises(ValueError, match="root"):
            TickArchiver(cursor(conn), None)
        with pytest.raises(ValueError, match="archive_dir"):
            TickArchiver(cursor(conn), "postgresql://u@localhost/prop")
    finally:
        conn.close()


def test_migration_8_keeps_the_staged_ticks_and_their_numbers(
    store_db: Path | str,
) -> None:
    from prop_stream.store.db import transaction
    from prop_stream.store.migrations import _LEDGER as LEDGER
    from prop_stream.store.migrations import LATEST_VERSION, MIGRATIONS, migrate

    conn = connect(store_db)
    try:
        # A store at version 7 with ticks staged by the one-row counter.
        conn.execute(LEDGER)
        for migration in MIGRATIONS[:7]:
            with transaction(conn):
                for statement in migration.statements_for(conn):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (?, ?)",
                    [migration.version, migration.name],
                )
        conn.execute(
            "INSERT INTO tick_archive_staging (seq, account_id, ts, equity, balance) "
            "VALUES (5, 1000, ?, 1.0, 1.0), (6, 1000, ?, 2.0, 1.0)",
            [START, START + timedelta(seconds=1)],
        )
        conn.execute("UPDATE tick_archive_state SET next_seq = 7")
        assert migrate(conn) == list(range(8, LATEST_VERSION + 1))
        assert conn.execute(
            "SELECT stream, next_tick_seq, next_deal_seq FROM archive_streams"
        ).fetchall() == [("", 7, 0)]
        assert conn.execute(
            "SELECT stream, seq FROM tick_archive_staging ORDER BY seq"
        ).fetchall() == [("", 5), ("", 6)]
        # The single evaluator numbers on after them.
        _stage(conn, "", 0, n=4).flush()
        assert conn.execute(
            "SELECT max(seq) FROM tick_archive_staging WHERE stream = ''"
        ).fetchall() == [(10,)]
    finally:
        conn.close()


def test_the_archive_is_on_for_postgresql_only_with_a_directory(
    tmp_path: Path,
) -> None:
    from prop_stream.config import StreamSettings
    from prop_stream.evaluator.service import archives
    from prop_stream.store.archive import archive_dir, archive_root

    url = "postgresql://u@localhost/prop"
    assert not archives(StreamSettings(db=url))
    assert archives(StreamSettings(db=url, archive_dir=tmp_path))
    assert not archives(StreamSettings(db=url, archive_dir=tmp_path, archive=False))
    assert archives(StreamSettings(db=tmp_path / "prop.duckdb"))
    assert archive_root(url, None) is None
    assert archive_root(url, tmp_path) == tmp_path.resolve()
    db = tmp_path / "prop.duckdb"
    assert archive_root(db, None) == archive_dir(db)
