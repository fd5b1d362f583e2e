"""The archive: ticks and deals staged in the batch's transaction, moved once."""

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
from prop_stream.rules import DEAL_COLUMNS, DEAL_SCHEMA, TICK_SCHEMA
from prop_stream.sinks import DuckDBSink
from prop_stream.store import connect, cursor, init_database
from prop_stream.store.archive import (
    TickArchiver,
    part_name,
    staged_deals,
    staged_rows,
)
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
_DEAL_SORT = ["account_id", "deal_id"]


class _Recording(DemoSource):
    """The demo source, keeping every batch (ticks and deals) it hands out."""

    def __init__(self, config: DemoConfig) -> None:
        super().__init__(config)
        self.polled: list[pl.DataFrame] = []
        self.polled_deals: list[pl.DataFrame] = []

    def poll(self, max_records: int, timeout: float) -> tuple[pl.DataFrame, Position]:
        ticks, position = super().poll(max_records, timeout)
        if ticks.height:
            self.polled.append(ticks)
        deals = self.deals()
        if deals is not None and deals.height:
            self.polled_deals.append(deals.select(DEAL_COLUMNS))
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


def _archived_deals(root: Path) -> pl.DataFrame:
    return pl.read_parquet(root / "deals" / "**" / "*.parquet", hive_partitioning=False)


def _sorted(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select(list(TICK_SCHEMA)).sort(_SORT, maintain_order=True)


def _sorted_deals(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select(DEAL_COLUMNS).sort(_DEAL_SORT, maintain_order=True)


@pytest.fixture(scope="module")
def whole_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, pl.DataFrame, pl.DataFrame]:
    """A run without a crash: its store, every tick and every deal polled."""
    path = _fresh_db(tmp_path_factory.mktemp("whole") / "prop.duckdb")
    conn = connect(path)
    source = _Recording(DEMO)
    stats = _loop(conn, source).run(max_batches=BATCHES)
    assert stats.batches == BATCHES
    TickArchiver(cursor(conn), path).archive_once()
    conn.close()
    return path, pl.concat(source.polled), pl.concat(source.polled_deals)


@pytest.fixture(scope="module")
def uninterrupted(
    whole_run: tuple[Path, pl.DataFrame, pl.DataFrame],
) -> tuple[Path, pl.DataFrame]:
    """The uninterrupted run's store and every tick its source handed out."""
    return whole_run[0], whole_run[1]


@pytest.fixture(scope="module")
def polled_deals(whole_run: tuple[Path, pl.DataFrame, pl.DataFrame]) -> pl.DataFrame:
    """Every deal the uninterrupted run's source handed out."""
    return whole_run[2]


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
    assert staged_deals(conn) == 0
    conn.close()


def test_archive_holds_every_polled_deal_once_in_the_deals_format(
    uninterrupted: tuple[Path, pl.DataFrame], polled_deals: pl.DataFrame
) -> None:
    path, _ = uninterrupted
    root = path.with_name(path.name + ".archive")
    got = _archived_deals(root)
    assert got.schema == pl.DataFrame(DEAL_SCHEMA.empty_table()).schema
    assert polled_deals.height > 100
    assert got.height == polled_deals.height
    assert _sorted_deals(got).equals(_sorted_deals(polled_deals))
    for day_dir in (root / "deals").iterdir():
        for part in day_dir.iterdir():
            assert pl.read_parquet(part)["ts"].dt.date().unique().to_list() == [
                date.fromisoformat(day_dir.name.removeprefix("day="))
            ]
            assert stat.S_IMODE(part.stat().st_mode) == 0o600


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
    root = path.with_name(path.name + ".archive")
    run_backtest(rules_file, root / "ticks", tmp_path / "out", deals=root / "deals")
    assert_matches_backtest(expected, tmp_path / "out")


@pytest.mark.parametrize(
    ("crash_after", "rewind", "archive_before_crash"),
    [(75, 0, True), (75, 2, True), (75, 2, False), (CHECKPOINT_EVERY * 4, 0, True)],
    ids=["archived-then-replayed", "older-checkpoint", "staged-only", "at-checkpoint"],
)
def test_restart_replay_neither_doubles_nor_loses_an_archived_tick(
    tmp_path: Path,
    uninterrupted: tuple[Path, pl.DataFrame],
    polled_deals: pl.DataFrame,
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
        moved = TickArchiver(cursor(conn), path).archive_once()
        assert moved.rows > 0
        assert moved.deal_rows > 0
        assert staged_rows(conn) == staged_deals(conn) == 0
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
    root = path.with_name(path.name + ".archive")
    got = _archive(root)
    assert got.height == polled.height
    assert _sorted(got).equals(_sorted(polled))
    deals = _archived_deals(root)
    assert deals.height == polled_deals.height
    assert _sorted_deals(deals).equals(_sorted_deals(polled_deals))


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
    deal_files = list((root / "deals").rglob("part-*.parquet"))
    assert len(deal_files) == 2  # the deals were not reached before the kill
    assert redo.files_written == 1 + len(deal_files)
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


def test_archiver_cut_short_after_the_ticks_moves_each_deal_once(
    tmp_path: Path, polled_deals: pl.DataFrame
) -> None:
    path = _fresh_db(tmp_path / "prop.duckdb")
    conn = connect(path)
    loop = _loop(conn, DemoSource(DEMO))
    loop.run(max_batches=90)
    deals = staged_deals(conn)
    assert deals > 0
    calls: list[int] = []

    class Killed(Exception):
        pass

    def kill_at_deals() -> None:
        calls.append(1)
        if len(calls) == 2:  # the ticks' range is moved, the deals' written
            raise Killed

    with pytest.raises(Killed):
        TickArchiver(cursor(conn), path, after_write=kill_at_deals).archive_once()
    root = path.with_name(path.name + ".archive")
    assert staged_rows(conn) == 0
    assert staged_deals(conn) == deals  # the deals' files are there, rows too
    written = sorted((root / "deals").rglob("part-*.parquet"))
    assert written
    loop.run(max_batches=BATCHES - loop.stats.batch_seq)
    archiver = TickArchiver(cursor(conn), path)
    redo = archiver.archive_once()
    assert redo.deal_rows == deals  # the same range, no more
    assert redo.files_found == len(written)
    archiver.archive_once()
    assert staged_deals(conn) == 0
    conn.close()
    got = _archived_deals(root)
    assert got.height == polled_deals.height
    assert _sorted_deals(got).equals(_sorted_deals(polled_deals))


def test_archive_off_stages_nothing(tmp_path: Path) -> None:
    path = _fresh_db(tmp_path / "prop.duckdb")
    conn = connect(path)
    source = DemoSource(DEMO)
    loop = EvaluatorLoop(
        cursor(conn), source, DuckDBSink(cursor(conn), source=source.name)
    )
    loop.run(max_batches=5)
    assert loop.stats.ticks > 0
    assert loop.stats.deals > 0
    assert staged_rows(conn) == staged_deals(conn) == 0
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
    assert archiver.archive_once().days_removed == 2  # its ticks and deals folders
    conn.close()
    days = sorted(p.name for p in archiver.ticks_dir.iterdir())
    assert days == ["day=2026-01-06"]
    assert sorted(p.name for p in archiver.deals_dir.iterdir()) == days
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


def test_kafka_deal_cuts_follow_the_committed_offsets() -> None:
    source = KafkaSource(bootstrap="127.0.0.1:1", topic="ticks")
    # Partition 0 offsets 10..13, partition 1 offsets 3..5; deals came from the
    # records at indexes 0, 2, 2, 3 (partition 0) and 5, 6 (partition 1).
    records = [_record(0, o) for o in range(10, 14)] + [
        _record(1, o) for o in range(3, 6)
    ]
    deal_messages = [0, 2, 2, 3, 5, 6]
    deals = pl.DataFrame(
        {"deal_id": list(range(len(deal_messages)))}, schema={"deal_id": pl.Int64}
    )
    source._last_records = records
    source._last_messages = pl.Series("message", [1, 4], dtype=pl.Int64)
    source._last_deal_messages = pl.Series("message", deal_messages)
    source._last_deals = deals
    committed = {"ticks:0": 12, "ticks:1": 5}
    kept = source.unseen_deals(deals, before={}, committed=committed)
    # Partition 0 from offset 12 (index 2 on), partition 1 from offset 5 (index 6).
    assert kept["deal_id"].to_list() == [1, 2, 3, 5]
    # The group loop's view: per partition, the first of its deals to archive.
    assert source.last_deal_cuts(committed) == {0: 1, 1: 1}
    assert source.last_deal_cuts({"ticks:0": 99}) == {0: 4}
    assert source.unseen_deals(deals, before={}, committed={}).equals(deals)
