"""The tick archive: staged in the batch's transaction, moved once, never doubled."""

from __future__ import annotations

import stat
from datetime import UTC, date, datetime
from pathlib import Path

import polars as pl
import pytest
from kafka.consumer.fetcher import ConsumerRecord
from replay_support import assert_matches_backtest, demo_backtest_inputs, stored_outputs

from prop_stream.backtest import run_backtest
from prop_stream.evaluator import DemoConfig, DemoSource, EvaluatorLoop
from prop_stream.kafka import KafkaSource
from prop_stream.rules import TICK_SCHEMA
from prop_stream.sinks import DuckDBSink
from prop_stream.store import connect, cursor, init_database
from prop_stream.store.archive import TickArchiver, part_name, staged_rows
from prop_stream.store.db import Connection
from prop_stream.store.progress import Position

START = datetime(2026, 1, 5, tzinfo=UTC)
#: Five demo accounts ticking once a demo minute, 20 demo minutes per batch.
DEMO = DemoConfig(
    seed=11, rate=5 / 60, batch_ms=20 * 60_000, realtime=False, epoch=START
)
BATCHES = 120  # 40 demo hours: two UTC days
CHECKPOINT_EVERY = 10
_SORT = ["account_id", "ts", "equity", "balance"]


class _Recording(DemoSource):
    """The demo source, keeping every batch it hands out."""

    def __init__(self, config: DemoConfig) -> None:
        super().__init__(config)
        self.polled: list[pl.DataFrame] = []

    def poll(self, max_records: int, timeout: float) -> tuple[pl.DataFrame, Position]:
        ticks, position = super().poll(max_records, timeout)
        if ticks.height:
            self.polled.append(ticks)
        return ticks, position


def _loop(conn: Connection, source: DemoSource) -> EvaluatorLoop:
    return EvaluatorLoop(
        cursor(conn),
        source,
        DuckDBSink(cursor(conn), source=source.name, checkpoints_kept=5),
        checkpoint_every=CHECKPOINT_EVERY,
        poll_timeout_s=0.05,
        archive=True,
    )


def _fresh_db(path: Path) -> Path:
    init_database(path, demo=True, now=START)
    return path


def _archive(root: Path) -> pl.DataFrame:
    return pl.read_parquet(root / "ticks" / "**" / "*.parquet", hive_partitioning=False)


def _sorted(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select(list(TICK_SCHEMA)).sort(_SORT, maintain_order=True)


@pytest.fixture(scope="module")
def uninterrupted(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, pl.DataFrame]:
    """A run without a crash: its store and every tick its source handed out."""
    path = _fresh_db(tmp_path_factory.mktemp("whole") / "prop.duckdb")
    conn = connect(path)
    source = _Recording(DEMO)
    stats = _loop(conn, source).run(max_batches=BATCHES)
    assert stats.batches == BATCHES
    TickArchiver(cursor(conn), path).archive_once()
    conn.close()
    return path, pl.concat(source.polled)


def test_archive_holds_every_polled_tick_once_in_the_backtest_format(
    uninterrupted: tuple[Path, pl.DataFrame],
) -> None:
    path, polled = uninterrupted
    root = path.with_name(path.name + ".archive")
    got = _archive(root)
    assert got.schema == pl.Schema(TICK_SCHEMA)
    assert polled.height > 5 * BATCHES // 2
    assert _sorted(got).equals(_sorted(polled))
    days = sorted(p.name for p in (root / "ticks").iterdir())
    assert days == ["day=2026-01-05", "day=2026-01-06"]
    for day_dir in (root / "ticks").iterdir():
        for part in day_dir.iterdir():
            assert pl.read_parquet(part)["ts"].dt.date().unique().to_list() == [
                date.fromisoformat(day_dir.name.removeprefix("day="))
            ]
            assert stat.S_IMODE(part.stat().st_mode) == 0o600
            meta = pl.read_parquet_metadata(part)
            assert meta is not None
    assert stat.S_IMODE((root / "ticks").stat().st_mode) == 0o700
    conn = connect(path, read_only=True)
    assert staged_rows(conn) == 0
    conn.close()


def test_archive_is_zstd_parquet(uninterrupted: tuple[Path, pl.DataFrame]) -> None:
    import pyarrow.parquet as pq

    path, _ = uninterrupted
    part = next((path.with_name(path.name + ".archive") / "ticks").rglob("*.parquet"))
    column = pq.ParquetFile(part).metadata.row_group(0).column(0)
    assert column.compression == "ZSTD"


def test_backtest_of_the_archive_equals_the_service_outputs(
    tmp_path: Path, uninterrupted: tuple[Path, pl.DataFrame]
) -> None:
    path, _ = uninterrupted
    rules_file, _, _ = demo_backtest_inputs(
        path, tmp_path, config=DEMO, batches=BATCHES, active_only=False
    )
    conn = connect(path, read_only=True)
    expected = stored_outputs(conn)
    conn.close()
    ticks_dir = path.with_name(path.name + ".archive") / "ticks"
    run_backtest(rules_file, ticks_dir, tmp_path / "out")
    assert_matches_backtest(expected, tmp_path / "out")


@pytest.mark.parametrize(
    ("crash_after", "rewind", "archive_before_crash"),
    [(75, 0, True), (75, 2, True), (75, 2, False), (CHECKPOINT_EVERY * 4, 0, True)],
    ids=["archived-then-replayed", "older-checkpoint", "staged-only", "at-checkpoint"],
)
def test_restart_replay_neither_doubles_nor_loses_an_archived_tick(
    tmp_path: Path,
    uninterrupted: tuple[Path, pl.DataFrame],
    crash_after: int,
    rewind: int,
    archive_before_crash: bool,
) -> None:
    _, polled = uninterrupted
    path = _fresh_db(tmp_path / "prop.duckdb")
    conn = connect(path)
    _loop(conn, DemoSource(DEMO)).run(
        max_batches=crash_after, checkpoint_on_exit=False
    )  # a crash
    if archive_before_crash:
        # The replayed batches' ticks are no longer staged: only the position
        # can tell that they were archived.
        assert TickArchiver(cursor(conn), path).archive_once().rows > 0
        assert staged_rows(conn) == 0
    if rewind:
        conn.execute(
            "DELETE FROM engine_checkpoints WHERE id IN (SELECT id FROM "
            "engine_checkpoints ORDER BY id DESC LIMIT ?)",
            [rewind],
        )
    loop = _loop(conn, DemoSource(DEMO))
    loop.start()
    restored = loop.stats.batch_seq
    # Batches after the checkpoint are replayed (none if it was the last batch).
    assert restored == crash_after // CHECKPOINT_EVERY * CHECKPOINT_EVERY - (
        rewind * CHECKPOINT_EVERY
    )
    loop.run(max_batches=BATCHES - restored)
    TickArchiver(cursor(conn), path).archive_once()
    conn.close()
    got = _archive(path.with_name(path.name + ".archive"))
    assert got.height == polled.height
    assert _sorted(got).equals(_sorted(polled))


def test_archiver_cut_short_between_rename_and_delete_moves_each_tick_once(
    tmp_path: Path, uninterrupted: tuple[Path, pl.DataFrame]
) -> None:
    _, polled = uninterrupted
    path = _fresh_db(tmp_path / "prop.duckdb")
    conn = connect(path)
    loop = _loop(conn, DemoSource(DEMO))
    loop.run(max_batches=90)  # 30 demo hours: two days, two files
    staged = staged_rows(conn)

    class Killed(Exception):
        pass

    def kill() -> None:
        raise Killed

    with pytest.raises(Killed):
        TickArchiver(cursor(conn), path, after_write=kill).archive_once()
    root = path.with_name(path.name + ".archive")
    written = sorted((root / "ticks").rglob("part-*.parquet"))
    assert len(written) == 2  # renamed into place...
    assert staged_rows(conn) == staged  # ...but the rows are still staged
    # A temporary file of a write cut shorter still is cleaned up.
    (written[0].parent / ".part-x.tmp").write_bytes(b"half")
    # As if the cut came between the two days' renames: the redo writes it.
    written[-1].unlink()

    # The loop goes on before the archiver comes back.
    loop.run(max_batches=BATCHES - loop.stats.batch_seq)
    archiver = TickArchiver(cursor(conn), path)
    redo = archiver.archive_once()
    assert (redo.first_seq, redo.last_seq) == (0, staged - 1)  # the same range
    assert redo.files_found == len(written) - 1
    assert redo.files_written == 1
    assert redo.rows == staged
    assert staged_rows(conn) > 0  # what came after waits for the next run
    rest = archiver.archive_once()
    assert rest.first_seq == staged
    assert staged_rows(conn) == 0
    assert archiver.archive_once().rows == 0
    conn.close()
    assert not list((root / "ticks").rglob(".*.tmp"))
    assert _sorted(_archive(root)).equals(_sorted(polled))
    names = {p.name for p in (root / "ticks").rglob("part-*.parquet")}
    assert part_name(0, staged - 1) in names


def test_archive_off_stages_nothing(tmp_path: Path) -> None:
    path = _fresh_db(tmp_path / "prop.duckdb")
    conn = connect(path)
    source = DemoSource(DEMO)
    loop = EvaluatorLoop(
        cursor(conn), source, DuckDBSink(cursor(conn), source=source.name)
    )
    loop.run(max_batches=5)
    assert loop.stats.ticks > 0
    assert staged_rows(conn) == 0
    conn.close()


def test_retention_removes_day_folders_older_than_kept(
    tmp_path: Path, uninterrupted: tuple[Path, pl.DataFrame]
) -> None:
    path = _fresh_db(tmp_path / "prop.duckdb")
    conn = connect(path)
    _loop(conn, DemoSource(DEMO)).run(max_batches=BATCHES)
    today = [date(2026, 1, 6)]
    archiver = TickArchiver(
        cursor(conn), path, retention_days=1, today=lambda: today[0]
    )
    assert archiver.archive_once().days_removed == 0  # yesterday is kept
    today[0] = date(2026, 1, 7)
    assert archiver.archive_once().days_removed == 1
    conn.close()
    days = sorted(p.name for p in archiver.ticks_dir.iterdir())
    assert days == ["day=2026-01-06"]
    with pytest.raises(ValueError, match="retention_days"):
        TickArchiver(cursor(connect(path)), path, retention_days=-1)


def _record(partition: int, offset: int) -> ConsumerRecord:
    return ConsumerRecord(
        "ticks", partition, -1, offset, 0, 0, None, b"{}", [], None, -1, 2, -1
    )


def test_kafka_unseen_cuts_each_partition_at_its_committed_offset() -> None:
    source = KafkaSource(bootstrap="127.0.0.1:1", topic="ticks")
    # A replayed poll: partition 0 offsets 10..14, partition 1 offsets 3..5; the
    # message at index 5 was rejected (no tick), index 2 is a batch of two ticks.
    records = [_record(0, o) for o in range(10, 15)] + [
        _record(1, o) for o in range(3, 6)
    ]
    messages = [0, 1, 2, 2, 3, 4, 6, 7]
    ticks = pl.DataFrame(
        {
            "account_id": list(range(len(messages))),
            "ts": [START] * len(messages),
            "equity": [1.0] * len(messages),
            "balance": [1.0] * len(messages),
        },
        schema=TICK_SCHEMA,
    )
    source._last_records = records
    source._last_messages = pl.Series("message", messages)
    kept = source.unseen(
        ticks, before={"ticks:0": 10, "ticks:1": 3}, committed={"ticks:0": 12}
    )
    # Partition 0 from offset 12 (indexes 2, 3, 4), partition 1 whole.
    assert kept["account_id"].to_list() == [2, 3, 4, 5, 6, 7]
    kept = source.unseen(ticks, before={}, committed={"ticks:0": 99, "ticks:1": 5})
    assert kept["account_id"].to_list() == [7]
    assert source.unseen(ticks, before={}, committed={}).equals(ticks)
